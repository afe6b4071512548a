"""The parent side of the kit: resolve a backend, run cases on a :class:`~.pool.RankPool`, collect failures.

:func:`check_backend` is the whole kit as one call (what the pytest tests run piece by piece)::

    from megatron_ep_plugins.testing import check_backend
    report = check_backend("my-ep", worlds=(2, 4), quick=True)
    assert report.passed, report.text()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from .cases import Case, Shape, bad_id_cases, case_strategy, scenarios
from .pool import Outcome, RankPool

__all__ = ["ConformanceError", "KitConfig", "Report", "check_backend", "resolve_backend", "run_bad_case",
           "run_case", "run_random"]

#: Random cases per group size: the full run and ``--ep-quick``.
FULL_CASES, QUICK_CASES = 200, 25


class ConformanceError(AssertionError):
    """A backend broke the contract; the message names the case and what differed on which rank."""


class KitUsageError(ValueError):
    """The kit cannot run as asked (unknown or unavailable backend, wrong device); the message says why."""


@dataclass(frozen=True)
class KitConfig:
    device: str = "cpu"
    shape: Shape = field(default_factory=Shape)
    cases: int = FULL_CASES
    force_device: bool = False
    timeout: float = 120.0
    grace: float = 3.0
    seed: Optional[int] = None  # the random cases' seed (None: a new one each run; hypothesis prints it on failure)


def resolve_backend(name: str, config: KitConfig) -> Any:
    """The registered spec of ``name`` (an alias is fine), or :class:`KitUsageError` saying why it cannot run."""
    from ..config import load_settings, normalize_backend_request
    from ..manager import discover
    from ..selection import probe_all

    registry = discover(load_settings())
    word = normalize_backend_request(name)
    spec = registry.lookup(word)
    if spec is None:
        names = sorted(n for s in registry.backends for n in s.names)
        raise KitUsageError(f"--ep-backend {name!r} is not a registered backend; registered: {names} "
                            "(is the plugin installed in this environment?)")
    candidate = next(c for c in probe_all(registry) if c.spec.name == spec.name)
    if not candidate.availability:
        raise KitUsageError(f"backend {spec.name!r} is unavailable here: {candidate.availability.reason}")
    if config.device not in spec.capabilities.devices and not config.force_device:
        raise KitUsageError(
            f"backend {spec.name!r} declares devices {list(spec.capabilities.devices)}, the kit runs on "
            f"{config.device!r}: use --ep-device {spec.capabilities.devices[0]} (or --ep-force-device to run it "
            f"anyway, e.g. on a CPU emulator of its library)")
    return spec


def _check_outcomes(case: Case, outcomes: list[Outcome], pool: RankPool) -> None:
    failures = []
    for o in outcomes:
        if o.status == "ok":
            failures += [f"rank {o.rank}: {text}" for text in o.value["failures"]]
        else:
            failures.append(o.describe())
    if any(o.status == "ok" and o.value.get("raised") for o in outcomes):
        pool.close()  # a backend raised mid-round: start the next case from a clean group
    if failures:
        raise ConformanceError(f"{case.describe()}\n" + "\n".join(failures))


def run_case(pool: RankPool, name: str, case: Case, config: KitConfig, fresh: bool = False) -> None:
    """One round on every rank; raises :class:`ConformanceError` listing every rank's failures."""
    from . import checks

    outcomes = pool.run(checks.run_case, case, name, config.device, fresh,
                        failed=lambda v: bool(v.get("failures")))
    _check_outcomes(case, outcomes, pool)


def run_bad_case(pool: RankPool, name: str, case: Case, config: KitConfig) -> None:
    """Bad ids on one rank: every rank must raise InvalidInputError; then the same backend must still work."""
    from . import checks

    # any rank's answer starts the grace period: the others must answer alike, at once
    outcomes = pool.run(checks.run_bad_case, case, name, config.device, failed=lambda v: True)
    failures = []
    for o in outcomes:
        if o.status != "ok":
            failures.append(o.describe())
        else:
            failures += [f"rank {o.rank}: {text}" for text in o.value["failures"]]
    if failures:
        failures += [f"rank {o.rank}: raised {o.value['raised']}: {o.value['message']}" for o in outcomes
                     if o.status == "ok" and o.value["raised"] and not o.value["failures"]]
        pool.close()
        raise ConformanceError(f"{case.describe()}: every rank must raise InvalidInputError\n" + "\n".join(failures))
    # the group and the backend stay usable after the error
    good = replace(case, bad=None, name=case.name + " (the next, valid round)")
    outcomes = pool.run(checks.run_case, good, name, config.device, False, failed=lambda v: bool(v.get("failures")))
    _check_outcomes(good, outcomes, pool)


def run_random(pool: RankPool, name: str, world: int, config: KitConfig, examples: Optional[int] = None) -> int:
    """``examples`` (default ``config.cases``) random cases drawn by hypothesis; shrinks a failure to a small
    case. Returns how many cases ran."""
    try:
        from hypothesis import HealthCheck, given, settings
    except ImportError:  # pragma: no cover - depends on the environment
        raise KitUsageError("the property-based cases need hypothesis: pip install 'megatron-ep-plugins[conformance]'"
                            " (or pip install hypothesis)") from None
    count = [0]
    hung: list[str] = []

    @settings(max_examples=examples or config.cases, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(case_strategy(world, config.shape))
    def random_round(case: Case) -> None:
        count[0] += 1
        if hung:  # one hang is enough: do not wait again for every shrinking step
            raise ConformanceError(f"not run: an earlier case hung ({hung[0]})")
        restarts = pool.restarts
        try:
            run_case(pool, name, case, config)
        except ConformanceError as exc:
            if pool.restarts > restarts and "no result within" in str(exc):
                hung.append(case.describe())
            raise

    if config.seed is not None:
        from hypothesis import seed

        random_round = seed(config.seed)(random_round)
    random_round()
    return count[0]


@dataclass
class Report:
    backend: str
    results: list[tuple[str, str]] = field(default_factory=list)  # (check, "" = passed, else the failure)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.results) and not any(err for _, err in self.results)

    def failures(self) -> list[tuple[str, str]]:
        return [(check, err) for check, err in self.results if err]

    def text(self) -> str:
        head = (f"backend {self.backend!r}: {sum(1 for _, e in self.results if not e)}/{len(self.results)} checks "
                f"passed in {self.seconds:.1f} s")
        return "\n".join([head] + [f"FAILED {check}:\n{err}" for check, err in self.failures()])


def check_backend(name: str, worlds: Sequence[int] = (2, 4), quick: bool = False,
                  config: Optional[KitConfig] = None, stop_early: bool = False) -> Report:
    """Run the whole contract against backend ``name`` on each group size; returns a :class:`Report`."""
    config = config or KitConfig()
    if quick:
        config = replace(config, cases=min(config.cases, QUICK_CASES))
    spec = resolve_backend(name, config)
    shape = config.shape
    if not spec.capabilities.uneven_tokens and shape.uneven_tokens:
        config = replace(config, shape=replace(shape, uneven_tokens=False))
    report = Report(spec.name)
    t0 = time.perf_counter()
    for world in worlds:
        with RankPool(world, config.device, timeout=config.timeout, grace=config.grace) as pool:
            checks_: list[tuple[str, Any]] = []
            checks_ += [(f"{world} ranks: {c.name}", lambda c=c: run_case(pool, spec.name, c, config))
                        for c in scenarios(world, config.shape)]
            checks_ += [(f"{world} ranks: {c.name}", lambda c=c: run_bad_case(pool, spec.name, c, config))
                        for c in bad_id_cases(world, config.shape)]
            checks_.append((f"{world} ranks: {config.cases} random cases",
                            lambda: run_random(pool, spec.name, world, config)))
            for label, fn in checks_:
                try:
                    fn()
                    report.results.append((label, ""))
                except ConformanceError as exc:
                    report.results.append((label, str(exc)))
                    if stop_early:
                        break
    report.seconds = time.perf_counter() - t0
    return report
