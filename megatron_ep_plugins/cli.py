"""``megatron-ep``: what is installed, what would be chosen and why.

Commands (each with ``--json`` for machines):

* ``list``    -- plugins (name, source, status, error) and backends (name, provider, priority,
  available or not and why);
* ``explain`` -- what ``install()`` would select now (``--backend`` to ask about a name), and why;
* ``env``     -- every ``MCORE_EP_*`` variable: value here, default, meaning;
* ``compat``  -- the Megatron-Core versions the patch table supports and how each was verified.

Exit status: 0 on success, 1 when the question has no good answer (e.g. the named backend is
unavailable; the message says why), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

from . import __version__
from .errors import EPPluginError

__all__ = ["main"]


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def _cmd_list(args: argparse.Namespace) -> int:
    from .api import list_backends

    registry, candidates = list_backends()
    if args.json:
        _print_json({
            "version": __version__,
            "plugins": [p.as_dict() for p in registry.plugins],
            "backends": [
                {"name": c.spec.name, "aliases": list(c.spec.aliases), "provider": c.spec.provider,
                 "priority": c.spec.priority, "available": c.availability.available,
                 "reason": c.availability.reason, "details": dict(c.availability.details),
                 "capabilities": c.spec.capabilities.as_dict(), "description": c.spec.description}
                for c in candidates
            ],
            "disabled_backends": [s.name for s in registry.disabled_backends],
            "notes": list(registry.notes),
        })
        return 0
    print(f"megatron_ep_plugins {__version__}\n\nplugins:")
    for p in registry.plugins:
        extra = f"  backends: {', '.join(p.backends)}" if p.backends else ""
        error = f"\n      error: {p.error}" if p.error else ""
        print(f"  {p.name:<12} {p.status:<8} {p.source} [{p.distribution}]{extra}{error}")
    print("\nbackends (auto order):")
    for c in candidates:
        state = "available  " if c.availability else "unavailable"
        aliases = f" (aliases: {', '.join(c.spec.aliases)})" if c.spec.aliases else ""
        print(f"  {c.spec.name:<10} prio {c.spec.priority:>4}  {state}  provider {c.spec.provider}{aliases}\n"
              f"      {c.availability.reason}")
    for s in registry.disabled_backends:
        print(f"  {s.name:<10} disabled by MCORE_EP_PLUGINS_DISABLE")
    for note in registry.notes:
        print(f"\nnote: {note}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from .api import explain

    choice = explain(args.backend)
    if args.json:
        _print_json(choice.as_dict())
    else:
        print(choice.summary())
    return 0


def env_markdown() -> str:
    """The README's variable table, generated from the registry (``megatron-ep env --markdown``)."""
    from .config import ENV_VARS

    lines = ["| variable | default | scope | meaning |", "| --- | --- | --- | --- |"]
    for v in ENV_VARS.values():
        default = f"`{v.default}`" if v.default else "(unset)"
        lines.append(f"| `{v.name}` | {default} | {v.scope} | {v.help} |")
    return "\n".join(lines) + "\n"


def _cmd_env(args: argparse.Namespace) -> int:
    from .config import ENV_VARS

    rows = [{"name": v.name, "scope": v.scope, "value": os.environ.get(v.name), "default": v.default,
             "help": v.help} for v in ENV_VARS.values()]
    if args.json:
        _print_json(rows)
        return 0
    if args.markdown:
        sys.stdout.write(env_markdown())
        return 0
    for r in rows:
        value = "(unset)" if r["value"] is None else repr(r["value"])
        print(f"{r['name']:<38} {value:<12} default {r['default']!r:<8} [{r['scope']}]\n    {r['help']}")
    return 0


def _cmd_compat(args: argparse.Namespace) -> int:
    from . import patching

    if args.json:
        _print_json([{"min_version": ".".join(map(str, e.min_version)), "max_version": ".".join(map(str, e.max_version)),
                      "verified_with": e.verified_with, "verified_by": e.verified_by, "notes": e.notes,
                      "targets": [t.path for t in e.targets],
                      "optional_targets": [[t.path for t in g] for g in e.optional]} for e in patching.PATCH_TABLE])
        return 0
    sys.stdout.write(patching.compatibility_markdown())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ep", description="Expert-parallel backends for Megatron-Core.")
    parser.add_argument("--version", action="version", version=f"megatron_ep_plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,explain,env,compat}")
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("list", "plugins and backends, with availability and reasons", _cmd_list),
        ("explain", "which backend would be selected now, and why", _cmd_explain),
        ("env", "every MCORE_EP_* variable with its value and meaning", _cmd_env),
        ("compat", "supported Megatron-Core versions (the patch table) and how each was verified", _cmd_compat),
    ]
    for name, help_text, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(fn=fn)
        if name == "explain":
            p.add_argument("--backend", default=None, help="ask about this name instead of MCORE_EP_BACKEND")
        if name == "env":
            p.add_argument("--markdown", action="store_true", help="the README's table of variables")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except EPPluginError as exc:
        if getattr(args, "json", False):
            _print_json({"error": type(exc).__name__, "message": str(exc)})
        else:
            print(f"megatron-ep: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
