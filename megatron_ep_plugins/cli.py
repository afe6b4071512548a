"""``megatron-ep``: what is installed, what would be chosen and why.

Commands (each with ``--json`` for machines):

* ``list``    -- plugins (name, source, status, error) and backends (name, provider, priority,
  available or not and why);
* ``explain`` -- what ``install()`` would select now (``--backend`` to ask about a name), and why;
* ``env``     -- every ``MCORE_EP_*`` variable: value here, default, meaning;
* ``compat``  -- the Megatron-Core versions the patch table supports and how each was verified;
* ``doctor``  -- checks what breaks expert-parallel jobs on this host (torch, GPUs, NCCL compiled vs loaded,
  DeepEP and its classes, NVSHMEM, ``EP_DISABLE_GIN``, ``MCORE_EP_*`` values, Megatron vs the patch table,
  ``HAVE_DEEP_EP``, what ``auto`` chooses) and says how to fix each; exit 0 / 1 (problems) / 2 (cannot run);
* ``bench``   -- backends side by side (``benchmarks/ep_bench.py`` as a command, same options and files;
  ``megatron-ep bench --help``).

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
            "conflicts": list(registry.conflicts),
            "settings_problems": _settings_problems(registry),
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
    for conflict in registry.conflicts:
        print(f"\nCONFLICT (install/explain refuse until it is resolved): {conflict}")
    for problem in _settings_problems(registry):
        print(f"\nSETTINGS (install/explain refuse until it is fixed): {problem}")
    return 0


def _settings_problems(registry: Any) -> list[str]:
    """Malformed MCORE_EP_* values, as install() would report them (empty when all parse)."""
    from .config import load_settings
    from .errors import ConfigError
    from .selection import validate_environment

    try:
        validate_environment(registry, load_settings())
    except ConfigError as exc:
        return [line.strip()[2:] for line in str(exc).splitlines()[1:] if line.strip().startswith("- ")] or [str(exc)]
    return []


def _cmd_explain(args: argparse.Namespace) -> int:
    from .api import explain

    choice = explain(args.backend)
    if args.json:
        _print_json(choice.as_dict())
    else:
        print(choice.summary())
    return 0


def _registry(builtin_only: bool = False) -> Any:
    """Discovery for ``env``: with the current settings when they parse, else the defaults."""
    from .config import Settings, load_settings
    from .errors import ConfigError
    from .manager import discover

    if builtin_only:
        return discover(Settings(autoload_plugins=False))
    try:
        settings = load_settings()
    except ConfigError:
        settings = Settings()
    return discover(settings)


def env_markdown() -> str:
    """The README's variable table, generated from the registry (``megatron-ep env --markdown``).

    The core's variables, then those every built-in backend declares, by priority (third-party
    plugins are left out: the README documents this package).
    """
    registry = _registry(builtin_only=True)
    builtin = {p.name for p in registry.plugins if p.builtin}
    order = {s.name: (-s.priority, i) for i, s in enumerate(registry.backends)}
    rows = [v for v in registry.variables if v.scope == "core"]
    rows += sorted((v for v in registry.variables if v.scope != "core" and v.provider in builtin),
                   key=lambda v: order.get(v.scope, (0, 0)))
    lines = ["| variable | default | values | scope | meaning |", "| --- | --- | --- | --- | --- |"]
    for v in rows:
        default = f"`{v.default}`" if v.default else "(unset)"
        lines.append(f"| `{v.name}` | {default} | {v.describe()} | {v.scope} | {v.help} |")
    return "\n".join(lines) + "\n"


def _cmd_env(args: argparse.Namespace) -> int:
    from .errors import ConfigError

    registry = _registry()
    rows = []
    for v in registry.variables:
        value = os.environ.get(v.name)
        try:
            v.value(os.environ)
            problem = ""
        except ConfigError as exc:
            problem = str(exc)
        rows.append({"name": v.name, "scope": v.scope, "provider": v.provider, "value": value, "default": v.default,
                     "values": v.describe(), "help": v.help, "error": problem})
    declared = {v.name for v in registry.variables}
    undeclared = sorted(k for k in os.environ if k.startswith("MCORE_EP_") and k not in declared)
    if args.json:
        _print_json(rows + [{"name": k, "value": os.environ[k], "error": "declared by no loaded plugin"}
                            for k in undeclared])
        return 1 if any(r["error"] for r in rows) else 0
    if args.markdown:
        sys.stdout.write(env_markdown())
        return 0
    for r in rows:
        value = "(unset)" if r["value"] is None else repr(r["value"])
        print(f"{r['name']:<38} {value:<12} default {r['default']!r:<8} [{r['scope']}] {r['values']}\n    {r['help']}")
        if r["error"]:
            print(f"    ERROR: {r['error']}")
    for k in undeclared:
        print(f"{k:<38} {os.environ[k]!r:<12} declared by no loaded plugin (a typo, or its plugin is not loaded)")
    return 1 if any(r["error"] for r in rows) else 0


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


def _cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor

    report = doctor.run()
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.text())
    return report.exit_code


def _cmd_bench(args: argparse.Namespace) -> int:  # pragma: no cover - main() hands `bench` over before parsing
    from .bench import main as bench_main

    return bench_main([])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-ep", description="Expert-parallel backends for Megatron-Core.")
    parser.add_argument("--version", action="version", version=f"megatron_ep_plugins {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,explain,env,compat,doctor,bench}")
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("list", "plugins and backends, with availability and reasons", _cmd_list),
        ("explain", "which backend would be selected now, and why", _cmd_explain),
        ("env", "every MCORE_EP_* variable with its value and meaning", _cmd_env),
        ("compat", "supported Megatron-Core versions (the patch table) and how each was verified", _cmd_compat),
        ("doctor", "check what breaks expert-parallel jobs here and how to fix each (exit 0 ok, 1 problems, "
                   "2 cannot run)", _cmd_doctor),
        ("bench", "benchmark backends side by side (options: megatron-ep bench --help)", _cmd_bench),
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: every ep_bench.py option, unchanged
        from .bench import main as bench_main

        return bench_main(argv[1:], prog="megatron-ep bench")
    args = _parser().parse_args(argv)
    try:
        try:
            return args.fn(args)
        except EPPluginError as exc:
            if getattr(args, "json", False):
                _print_json({"error": type(exc).__name__, "message": str(exc)})
            else:
                print(f"megatron-ep: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (``megatron-ep list | head -1``): stop quietly, as Python's docs advise --
        # point stdout at /dev/null so the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
