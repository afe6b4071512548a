"""``megatron-ep doctor``: check what breaks expert-parallel jobs here, and say how to fix each.

One :class:`Finding` per fact checked, each ``ok`` / ``info`` / ``warning`` / ``problem`` with the fix for
anything not ok. Exit status (:func:`run`): 0 no problem, 1 problems found, 2 the doctor cannot run (torch
does not import). Fast on a CPU host (no CUDA context is created, Megatron is not imported: its sources are
read), and it prints how long it took.

Checks: Python; torch and its CUDA build; GPUs (count, compute capability); the NCCL torch was compiled with
vs the ``libnccl.so.2`` actually loaded; which DeepEP imports, its buffer classes (``Buffer``, ``ElasticBuffer``,
``EPBuffer``, ``HybridEPBuffer``) and whether it loads against this torch; NVSHMEM; ``EP_DISABLE_GIN`` on
hosts without GPU-initiated networking; every ``MCORE_EP_*`` variable parsed; megatron-core against the patch
table; whether stock Megatron would see DeepEP (``HAVE_DEEP_EP``); plugins; what ``auto`` (and
``MCORE_EP_BACKEND``) would choose.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

__all__ = ["Finding", "Report", "run"]

OK, INFO, WARNING, PROBLEM = "ok", "info", "warning", "problem"
BUFFER_CLASSES = ("Buffer", "ElasticBuffer", "EPBuffer", "HybridEPBuffer")
#: NCCL each DeepEP generation needs at run time (V2 2.0-2.1 ElasticBuffer; V2.5 EPBuffer), as deepep_elastic checks.
V2_MIN_NCCL = {"ElasticBuffer": (2, 30, 4), "EPBuffer": (2, 32, 3)}
#: Module names DeepEP installs as, with their distribution names (SGLang's wheel ships V2.5 as deep_ep_v25).
DEEP_EP_MODULES = {"deep_ep": ("deep_ep", "deep-ep", "sgl-deep-ep"), "deep_ep_v25": ("sgl-deep-ep-v25",)}


@dataclass
class Finding:
    check: str
    status: str
    summary: str
    fix: str = ""
    details: dict = field(default_factory=dict)


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    cannot_run: str = ""

    def add(self, check: str, status: str, summary: str, fix: str = "", **details: Any) -> Finding:
        finding = Finding(check, status, summary, fix, {k: v for k, v in details.items() if v is not None})
        self.findings.append(finding)
        return finding

    @property
    def exit_code(self) -> int:
        if self.cannot_run:
            return 2
        return 1 if any(f.status == PROBLEM for f in self.findings) else 0

    def as_dict(self) -> dict:
        from . import __version__

        return {"megatron_ep_plugins": __version__, "exit_code": self.exit_code, "seconds": round(self.seconds, 3),
                "cannot_run": self.cannot_run or None, "problems": sum(f.status == PROBLEM for f in self.findings),
                "warnings": sum(f.status == WARNING for f in self.findings),
                "findings": [asdict(f) for f in self.findings]}

    def text(self) -> str:
        from . import __version__

        lines = [f"megatron-ep doctor (megatron_ep_plugins {__version__})"]
        marks = {OK: "ok", INFO: "info", WARNING: "WARNING", PROBLEM: "PROBLEM"}
        for f in self.findings:
            lines.append(f"  {marks[f.status]:<8} {f.check:<12} {f.summary}")
            if f.fix:
                lines.append(f"  {'':<8} {'':<12} fix: {f.fix}")
        if self.cannot_run:
            lines.append(f"cannot run: {self.cannot_run}")
        problems = sum(f.status == PROBLEM for f in self.findings)
        warnings = sum(f.status == WARNING for f in self.findings)
        lines.append(f"{problems} problem(s), {warnings} warning(s) in {self.seconds:.2f} s; exit status {self.exit_code}")
        return "\n".join(lines)


def _version_text(version: tuple) -> str:
    return ".".join(str(v) for v in version)


def _dist_version(*names: str) -> Optional[str]:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _loaded_libraries(word: str) -> list[str]:
    """Shared libraries of this process whose path contains ``word`` (Linux /proc/self/maps; else empty)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if word in line and "/" in line}
    except OSError:
        return []
    return sorted(paths)


# -- the checks ------------------------------------------------------------------------------------------------
def _python(report: Report) -> None:
    ok = sys.version_info >= (3, 12)
    report.add("python", OK if ok else PROBLEM, f"Python {platform.python_version()} ({sys.executable})",
               "" if ok else "megatron-core >= 0.17 and this package need Python >= 3.12")


def _torch(report: Report, facts: dict) -> None:
    import torch
    import torch.distributed as dist

    cuda = torch.version.cuda
    backends = [name for name, ok in (("gloo", dist.is_available() and dist.is_gloo_available()),
                                      ("nccl", dist.is_available() and dist.is_nccl_available())) if ok]
    facts["torch"] = torch.__version__
    if not dist.is_available():
        report.add("torch", PROBLEM, f"torch {torch.__version__}: torch.distributed is not available in this build",
                   "install a torch build with distributed support (the PyPI wheels have it)")
        return
    report.add("torch", OK, f"torch {torch.__version__} ({'CUDA ' + cuda if cuda else 'CPU-only'} build), "
                            f"process groups: {', '.join(backends) or 'none'}", torch=torch.__version__, cuda=cuda)


def _gpus(report: Report, facts: dict) -> None:
    import torch

    try:
        available = torch.cuda.is_available()
        count = torch.cuda.device_count() if available else 0
    except Exception as exc:  # noqa: BLE001 - a broken driver is a finding, not a crash
        report.add("gpus", PROBLEM, f"torch.cuda raised {type(exc).__name__}: {exc}",
                   "check the NVIDIA driver (nvidia-smi) and that it supports this torch's CUDA version")
        facts["gpus"] = []
        return
    gpus = []
    for i in range(count):
        major, minor = torch.cuda.get_device_capability(i)
        gpus.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": f"{major}.{minor}"})
    facts["gpus"] = gpus
    if not gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        report.add("gpus", WARNING, "no CUDA device visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})"
                                                                 if visible is not None else ""),
                   "only the torch backend (gloo, CPU) can run here; DeepEP, HybridEP and NCCL EP need NVIDIA GPUs "
                   "(on a GPU host: nvidia-smi, and a CUDA build of torch)", gpus=[])
        return
    caps = sorted({g["capability"] for g in gpus})
    names = sorted({g["name"] for g in gpus})
    low = [g for g in gpus if tuple(map(int, g["capability"].split("."))) < (8, 0)]
    report.add("gpus", PROBLEM if low else OK,
               f"{len(gpus)} GPU(s): {', '.join(names)}, compute capability {', '.join(caps)} (DeepEP V1 needs >= 8.0, "
               "V2/HybridEP/NCCL EP >= 9.0)",
               "use Ampere (SM80) or newer GPUs for DeepEP; the torch backend runs on any GPU" if low else "",
               gpus=gpus)


def _nccl(report: Report, facts: dict) -> None:
    import torch

    compiled = None
    try:
        compiled = tuple(torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001 - CPU build
        pass
    loaded, why = None, ""
    try:
        from .backends._deepep_common import loaded_nccl_version

        loaded = tuple(loaded_nccl_version())
    except Exception as exc:  # noqa: BLE001 - reported
        why = str(exc)
    facts["nccl_loaded"] = loaded
    paths = _loaded_libraries("libnccl")
    if compiled is None and loaded is None:
        report.add("nccl", INFO, f"no NCCL in this torch build ({why or 'CPU-only'}); gloo only")
        return
    if loaded is None:
        report.add("nccl", WARNING, f"torch was compiled with NCCL {_version_text(compiled)}; the loaded library "
                                    f"cannot be asked: {why}", "DeepEP V2 needs the loaded NCCL to be >= 2.30.4; "
                                    "check with ldd on torch's libtorch_cuda.so", compiled=_version_text(compiled))
        return
    text = (f"torch compiled with NCCL {_version_text(compiled) if compiled else '?'}, this process loaded "
            f"{_version_text(loaded)}" + (f" ({paths[0]})" if paths else ""))
    details = dict(compiled=_version_text(compiled) if compiled else None, loaded=_version_text(loaded),
                   library=paths[0] if paths else None)
    if compiled and loaded < compiled:
        report.add("nccl", PROBLEM, text + ": an older libnccl.so.2 shadows the one torch was built with",
                   "remove the older library from LD_LIBRARY_PATH (or the system's), or install the NCCL wheel torch "
                   f"expects: pip install 'nvidia-nccl-cu{(torch.version.cuda or '12').split('.')[0]}>="
                   f"{_version_text(compiled)}'", **details)
    else:
        report.add("nccl", OK, text, **details)


def _deep_ep(report: Report, facts: dict) -> None:
    facts["deep_ep"] = None
    found = [m for m in DEEP_EP_MODULES if importlib.util.find_spec(m) is not None]
    if not found:
        report.add("deep_ep", INFO, "DeepEP is not installed: the legacy, elastic and hybridep backends are unavailable",
                   "for DeepEP kernels build DeepEP against this torch (https://github.com/deepseek-ai/DeepEP), or "
                   "pip install sgl-deep-ep-v25 (V2.5, EPBuffer); the torch backend needs nothing")
        return
    for module in found:
        _one_deep_ep(report, facts, module)


def _one_deep_ep(report: Report, facts: dict, module: str) -> None:
    spec = importlib.util.find_spec(module)
    try:
        deep_ep = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - the reason is the finding
        message = f"{type(exc).__name__}: {exc}"
        if "undefined symbol" in message or "version `" in message:
            fix = (f"it was built against another torch (or CUDA) than this torch {facts.get('torch')}: rebuild and "
                   "reinstall DeepEP in this environment")
        elif "nvshmem" in message.lower():
            fix = "its NVSHMEM library is not found: pip install nvidia-nvshmem-cu12 (or set NVSHMEM_DIR / LD_LIBRARY_PATH)"
        elif "libnccl" in message or "nccl" in message.lower():
            fix = "its NCCL is not found or too old: DeepEP V2 needs NCCL >= 2.30.4 (pip install nvidia-nccl-cu13)"
        else:
            fix = "reinstall DeepEP built against this torch"
        report.add("deep_ep", PROBLEM, f"{module} is installed ({spec.origin}) but does not import: {message}", fix)
        return
    from .backends._deepep_common import deep_ep_version

    classes = [name for name in BUFFER_CLASSES if hasattr(deep_ep, name)]
    version = deep_ep_version(deep_ep)
    dist = _dist_version(*DEEP_EP_MODULES[module])
    emulator = bool(getattr(deep_ep, "IS_EMULATOR", False))
    extensions = [p for p in _loaded_libraries(module) if p.endswith(".so")]
    known = facts.get("deep_ep") or {"version": version, "classes": []}
    known["classes"] = sorted(set(known["classes"]) | set(classes), key=BUFFER_CLASSES.index)
    facts["deep_ep"] = known
    built = ("a CPU test double" if emulator else
             f"its extension loads against torch {facts.get('torch')}" + (f" ({extensions[0]})" if extensions else ""))
    if dist and "torch" in dist.split("+")[-1]:
        built += f"; distribution {dist}"
    backends = [b for b, cls in (("legacy", "Buffer"), ("elastic", "ElasticBuffer"), ("elastic", "EPBuffer"),
                                 ("hybridep", "HybridEPBuffer")) if cls in classes]
    report.add("deep_ep", OK if classes else PROBLEM,
               f"{module} {version} at {os.path.dirname(deep_ep.__file__ or '')}: classes {classes or 'none'} "
               f"(backends {backends or 'none'}); {built}",
               "" if classes else "this deep_ep has none of DeepEP's buffer classes: is another package called "
                                  "deep_ep shadowing it?", classes=classes, version=version)
    loaded = facts.get("nccl_loaded")
    for cls, need in V2_MIN_NCCL.items():
        if cls in classes and loaded and loaded < need:
            report.add("deep_ep", PROBLEM, f"DeepEP {cls} needs NCCL >= {_version_text(need)} at run time; this "
                                           f"process loaded {_version_text(loaded)}",
                       f"pip install 'nvidia-nccl-cu13>={_version_text(need)}' (and make sure no older libnccl.so.2 "
                       "comes first)")


def _nvshmem(report: Report, facts: dict) -> None:
    dists = {name: v for name in ("nvidia-nvshmem-cu12", "nvidia-nvshmem-cu13")
             if (v := _dist_version(name))}
    loaded = _loaded_libraries("nvshmem")
    env = {k: os.environ[k] for k in ("NVSHMEM_DIR", "NVSHMEM_HOME") if k in os.environ}
    parts = [f"{k} {v}" for k, v in dists.items()] + [f"{k}={v}" for k, v in env.items()]
    where = "; ".join(parts) or "no nvidia-nvshmem wheel, NVSHMEM_DIR unset"
    if loaded:
        report.add("nvshmem", OK, f"NVSHMEM loaded in this process ({loaded[0]}); {where}")
    elif facts.get("deep_ep") and "Buffer" in facts["deep_ep"]["classes"]:
        report.add("nvshmem", INFO, f"deep_ep does not load NVSHMEM ({where}): DeepEP V1 intranode needs none; V1 "
                                    "internode and low-latency kernels do (V2 uses NCCL instead)",
                   "for V1 across nodes: build DeepEP with NVSHMEM (pip install nvidia-nvshmem-cu12, NVSHMEM_DIR)")
    else:
        report.add("nvshmem", INFO, f"not used without DeepEP ({where})")


def rdma_devices() -> list[str]:
    """RDMA NICs (InfiniBand / RoCE / EFA), the precondition of GPU-initiated networking."""
    try:
        return sorted(os.listdir("/sys/class/infiniband"))
    except OSError:
        return []


def _gin(report: Report, facts: dict) -> None:
    rdma = rdma_devices()
    disabled = os.environ.get("EP_DISABLE_GIN", "").strip()
    classes = (facts.get("deep_ep") or {}).get("classes", [])
    v2 = [c for c in ("ElasticBuffer", "EPBuffer") if c in classes]
    if rdma:
        text = f"RDMA devices {rdma}: GPU-initiated networking (GIN) is possible"
        if disabled and disabled != "0":
            report.add("gin", INFO, text + f"; EP_DISABLE_GIN={disabled} turns it off (intended?)")
        else:
            report.add("gin", OK, text)
        return
    text = "no RDMA device (/sys/class/infiniband is empty): no GPU-initiated networking (GIN) on this host"
    if disabled and disabled != "0":
        report.add("gin", OK, text + f"; EP_DISABLE_GIN={disabled} is set")
    elif v2 and facts.get("gpus"):
        report.add("gin", PROBLEM, text + f", and EP_DISABLE_GIN is not set: DeepEP {'/'.join(v2)} fails or crashes "
                                          "creating its buffer", "export EP_DISABLE_GIN=1 (the elastic backend then "
                                                                  "builds the buffer with allow_hybrid_mode=False)")
    else:
        report.add("gin", INFO, text + ("; set EP_DISABLE_GIN=1 before using DeepEP V2 here" if not disabled else ""))


def _variables(report: Report, facts: dict, registry: Any) -> None:
    from .errors import ConfigError

    declared = {}
    for v in getattr(registry, "variables", ()) or ():
        declared[v.name] = v
    if not declared:
        from .config import ENV_VARS

        declared = dict(ENV_VARS)
    set_here, bad = [], []
    for name, var in declared.items():
        if name not in os.environ:
            continue
        set_here.append(f"{name}={os.environ[name]!r}")
        value = getattr(var, "value", None)
        if value is None:
            continue
        try:
            value(os.environ)
        except ConfigError as exc:
            bad.append(str(exc))
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{name}: {type(exc).__name__}: {exc}")
    try:
        from .config import load_settings

        load_settings()
    except ConfigError as exc:
        if str(exc) not in bad:
            bad.append(str(exc))
    undeclared = sorted(k for k in os.environ if k.startswith("MCORE_EP_") and k not in declared)
    import difflib

    for name in undeclared:
        close = difflib.get_close_matches(name, list(declared), n=1)
        bad.append(f"{name} is set but no loaded plugin declares it" + (f" (did you mean {close[0]}?)" if close else
                                                                         " (a typo, or its plugin is not loaded)"))
    if bad:
        report.add("variables", PROBLEM, f"{len(bad)} MCORE_EP_* problem(s): " + " | ".join(bad),
                   "fix the values above (`megatron-ep env` lists every variable, its values and meaning)",
                   problems=bad)
    else:
        report.add("variables", OK, f"{len(declared)} MCORE_EP_* variables known, "
                                    f"{'set here: ' + ', '.join(set_here) if set_here else 'none set'}; all parse")


def _megatron(report: Report, facts: dict) -> None:
    from . import patching
    from .errors import EPPluginError

    try:
        version = patching.megatron_version()
    except EPPluginError as exc:
        report.add("megatron", PROBLEM, str(exc), "pip install megatron-core (0.15 - 0.20 are in the patch table)")
        return
    facts["megatron"] = version
    allow = os.environ.get("MCORE_EP_ALLOW_UNTESTED_MEGATRON", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        entry = patching.entry_for(version, allow)
    except EPPluginError as exc:
        report.add("megatron", PROBLEM, f"megatron-core {version}: {exc}".split(". Set ")[0],
                   "use a megatron-core version from `megatron-ep compat`, or set MCORE_EP_ALLOW_UNTESTED_MEGATRON=1")
        return
    in_table = patching._parse(version) < entry.max_version and patching._parse(version) >= entry.min_version
    report.add("megatron", OK if in_table else WARNING,
               f"megatron-core {version}: patch table row {entry.describe()}"
               + ("" if in_table else " used for an untested version (MCORE_EP_ALLOW_UNTESTED_MEGATRON=1)"))
    _have_deep_ep(report, facts, version)


def _megatron_deepep_imports() -> tuple[Optional[str], list[tuple[str, list[str]]]]:
    """The ``from deep_ep... import ...`` statements guarding ``HAVE_DEEP_EP`` in Megatron's fused_a2a.py (read,
    not imported: importing Megatron costs seconds)."""
    spec = importlib.util.find_spec("megatron.core")
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        path = os.path.join(folder, "transformer", "moe", "fused_a2a.py")
        try:
            with open(path, encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.Try):
                continue
            sets_flag = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "HAVE_DEEP_EP"
                                                              for t in n.targets) for n in node.body)
            if sets_flag:
                return path, [(n.module, [a.name for a in n.names]) for n in node.body
                              if isinstance(n, ast.ImportFrom) and n.module]
        return path, []
    return None, []


def _have_deep_ep(report: Report, facts: dict, version: str) -> None:
    path, imports = _megatron_deepep_imports()
    if not imports:
        report.add("have_deep_ep", INFO, f"megatron-core {version}: no HAVE_DEEP_EP import guard found in "
                                         f"{path or 'fused_a2a.py'}")
        return
    failing = ""
    for module, names in imports:
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            failing = f"`from {module} import {', '.join(names)}` fails: {type(exc).__name__}: {exc}"
            break
        missing = [n for n in names if not hasattr(mod, n)]
        if missing:
            failing = f"`from {module} import {', '.join(names)}` fails: {module} has no {', '.join(missing)}"
            break
    statements = "; ".join(f"from {m} import {', '.join(n)}" for m, n in imports)
    if not failing:
        report.add("have_deep_ep", OK, f"stock Megatron {version} would see DeepEP (HAVE_DEEP_EP=True: {statements})")
    elif facts.get("deep_ep"):
        report.add("have_deep_ep", WARNING,
                   f"stock Megatron {version} reports HAVE_DEEP_EP=False although deep_ep imports: {failing} (DeepEP "
                   "2.x no longer exports EventOverlap from deep_ep.utils)",
                   "through megatron_ep_plugins it works anyway: install() sets HAVE_DEEP_EP=True and serves "
                   "moe_flex_dispatcher_backend='deepep' with MCORE_EP_BACKEND=legacy|elastic")
    else:
        report.add("have_deep_ep", INFO, f"stock Megatron {version} reports HAVE_DEEP_EP=False (no usable deep_ep)")


def _plugins_and_choice(report: Report, facts: dict, registry: Any, candidates: tuple) -> None:
    from .api import explain
    from .errors import EPPluginError

    failed = [p for p in registry.plugins if p.status == "failed"]
    empty = [p for p in registry.plugins if p.status == "loaded" and not p.backends]
    for p in failed:
        report.add("plugins", PROBLEM, f"plugin {p.name!r} ({p.source}, {p.distribution}) failed to load: {p.error}",
                   f"fix or uninstall {p.distribution}, or block it: MCORE_EP_PLUGINS_DISABLE={p.name}")
    for p in empty:
        report.add("plugins", WARNING, f"plugin {p.name!r} ({p.source}, {p.distribution}) loaded but registered no "
                                       "backend", "check that its entry point names the module with the "
                                                  "@hookimpl ep_register_backends, and that no folder of the same "
                                                  "name on sys.path (e.g. next to the script) shadows the package")
    for conflict in getattr(registry, "conflicts", ()) or ():
        report.add("plugins", PROBLEM, f"conflict: {conflict}", "block one side with MCORE_EP_PLUGINS_DISABLE")
    available = [c.spec.name for c in candidates if c.availability]
    unavailable = {c.spec.name: c.availability.reason for c in candidates if not c.availability}
    loaded = [p.name for p in registry.plugins if p.status == "loaded"]
    report.add("backends", OK if available else PROBLEM,
               f"plugins loaded: {', '.join(loaded) or 'none'}; backends available: {', '.join(available) or 'none'}; "
               f"unavailable: {', '.join(unavailable) or 'none'}", "" if available else
               "is megatron_ep_plugins installed (pip install -e .)? `megatron-ep list` shows why each is unavailable",
               unavailable=unavailable)
    for label, request in (("auto", "auto"), ("MCORE_EP_BACKEND", None)):
        raw = os.environ.get("MCORE_EP_BACKEND", "").strip()
        if request is None and (not raw or raw.lower() in ("auto", "default")):
            continue
        if request is None and raw.lower() in ("off", "none", "0", "false", "disabled"):
            report.add("selection", INFO, f"MCORE_EP_BACKEND={raw!r}: nothing is installed automatically")
            continue
        if any(f.check == "variables" and f.status == PROBLEM for f in report.findings):
            report.add("selection", INFO, f"{label}: not evaluated until the MCORE_EP_* values above parse")
            continue
        try:
            choice = explain(request)
        except EPPluginError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            first = " ".join(lines[:2])
            report.add("selection", PROBLEM if request is None else WARNING,
                       f"{label if request else 'MCORE_EP_BACKEND=' + repr(raw)} would fail: {first}",
                       "see `megatron-ep explain` for every backend's reason")
            continue
        what = "auto would choose" if request else f"MCORE_EP_BACKEND={raw!r} selects"
        report.add("selection", OK, f"{what} {choice.spec.name!r} ({choice.mode}, priority {choice.spec.priority}, "
                                    f"provider {choice.spec.provider})", backend=choice.spec.name)


def _zero_code(report: Report) -> None:
    import sysconfig

    pth = os.path.join(sysconfig.get_paths()["purelib"], "megatron_ep_plugins.pth")
    if os.path.isfile(pth):
        report.add("activation", OK, "megatron_ep_plugins.pth is installed: MCORE_EP_BACKEND=<name> activates the "
                                     "backend with no code change")
    else:
        report.add("activation", INFO, f"no megatron_ep_plugins.pth in {os.path.dirname(pth)}: call "
                                       "megatron_ep_plugins.install() in the training script",
                   "pip install -e . (or the wheel) installs the .pth for zero-code activation")


def run(environ_check: bool = True) -> Report:
    """Run every check; never raises (a crashing check becomes a problem naming it)."""
    report = Report()
    t0 = time.perf_counter()
    facts: dict = {}
    _python(report)
    try:
        import torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        report.cannot_run = f"torch does not import: {type(exc).__name__}: {exc} (pip install torch)"
        report.seconds = time.perf_counter() - t0
        return report
    steps: list[tuple[str, Callable[[], None]]] = [
        ("torch", lambda: _torch(report, facts)),
        ("gpus", lambda: _gpus(report, facts)),
        ("nccl", lambda: _nccl(report, facts)),
        ("deep_ep", lambda: _deep_ep(report, facts)),
        ("nvshmem", lambda: _nvshmem(report, facts)),
        ("gin", lambda: _gin(report, facts)),
        ("megatron", lambda: _megatron(report, facts)),
    ]
    for name, step in steps:
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - the doctor must finish
            report.add(name, PROBLEM, f"the check itself raised {type(exc).__name__}: {exc}",
                       "please report this with the output of `megatron-ep doctor --json`")
    try:
        from .api import list_backends

        registry, candidates = list_backends()
    except Exception as exc:  # noqa: BLE001
        report.add("plugins", PROBLEM, f"discovery failed: {type(exc).__name__}: {exc}",
                   "`megatron-ep list` shows the details")
    else:
        for name, step in (("variables", lambda: _variables(report, facts, registry)),
                           ("selection", lambda: _plugins_and_choice(report, facts, registry, candidates))):
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                report.add(name, PROBLEM, f"the check itself raised {type(exc).__name__}: {exc}",
                           "please report this with the output of `megatron-ep doctor --json`")
    _zero_code(report)
    report.seconds = time.perf_counter() - t0
    return report
