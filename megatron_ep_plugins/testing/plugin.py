"""pytest plugin of the conformance kit (entry point ``pytest11``: ``megatron_ep``).

Loaded by every pytest run in an environment where megatron_ep_plugins is installed, so it only adds the
``--ep-*`` options and the kit's fixtures; nothing runs unless the kit's tests are collected
(``pytest --pyargs megatron_ep_plugins.testing --ep-backend NAME``).
"""

from __future__ import annotations

from typing import Any

import pytest

_DTYPE_WORDS = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("megatron-ep", "megatron_ep_plugins conformance kit (pytest --pyargs "
                                           "megatron_ep_plugins.testing --ep-backend NAME)")
    group.addoption("--ep-backend", action="append", default=[], metavar="NAME",
                    help="backend to check (name or alias; repeatable)")
    group.addoption("--ep-ranks", default="2,4", metavar="N[,N]", help="group sizes to run (default 2,4)")
    group.addoption("--ep-device", default="cpu", choices=("cpu", "cuda"),
                    help="cpu: gloo ranks (default); cuda: NCCL ranks, rank r on GPU r")
    group.addoption("--ep-quick", action="store_true", help="25 random cases per group size instead of 200")
    group.addoption("--ep-cases", type=int, default=None, metavar="N", help="random cases per group size")
    group.addoption("--ep-hidden", default="256", metavar="H[,H]",
                    help="hidden sizes to draw from (default 256, valid for every built-in backend)")
    group.addoption("--ep-experts-per-rank", default="2,4", metavar="E[,E]",
                    help="experts per rank to draw from (default 2,4)")
    group.addoption("--ep-max-topk", type=int, default=8, metavar="K", help="largest top-k (default 8)")
    group.addoption("--ep-max-tokens", type=int, default=48, metavar="T", help="largest tokens per rank (default 48)")
    group.addoption("--ep-dtypes", default="bf16", metavar="D[,D]",
                    help="token dtypes (bf16, fp16, fp32; default bf16, Megatron's)")
    group.addoption("--ep-force-device", action="store_true",
                    help="run a backend on --ep-device even if its capabilities do not declare that device "
                         "(e.g. a CPU emulator of its library)")
    group.addoption("--ep-seed", type=int, default=None, metavar="N",
                    help="seed of the random cases (default: a new one each run); the same seed, the same cases")
    group.addoption("--ep-timeout", type=float, default=120.0, metavar="S",
                    help="seconds one round may take before the ranks count as hung (default 120)")


def _ints(config: Any, option: str) -> tuple[int, ...]:
    raw = config.getoption(option)
    try:
        values = tuple(int(v) for v in str(raw).split(",") if v.strip())
    except ValueError:
        raise pytest.UsageError(f"--{option.replace('_', '-')} must be comma-separated integers, got {raw!r}") from None
    if not values or any(v < 1 for v in values):
        raise pytest.UsageError(f"--{option.replace('_', '-')} must list positive integers, got {raw!r}")
    return values


def kit_config(config: Any) -> Any:
    """The :class:`~megatron_ep_plugins.testing.kit.KitConfig` the options describe (UsageError when invalid)."""
    from .cases import Shape
    from .kit import FULL_CASES, QUICK_CASES, KitConfig

    words = [w.strip().lower() for w in config.getoption("ep_dtypes").split(",") if w.strip()]
    unknown = [w for w in words if w not in _DTYPE_WORDS]
    if unknown or not words:
        raise pytest.UsageError(f"--ep-dtypes: unknown dtype(s) {unknown or words}; use bf16, fp16 or fp32")
    cases = config.getoption("ep_cases")
    if cases is not None and cases < 1:
        raise pytest.UsageError(f"--ep-cases must be >= 1, got {cases}")
    if cases is None:
        cases = QUICK_CASES if config.getoption("ep_quick") else FULL_CASES
    try:
        shape = Shape(hidden=_ints(config, "ep_hidden"), experts_per_rank=_ints(config, "ep_experts_per_rank"),
                      max_topk=config.getoption("ep_max_topk"), max_tokens=config.getoption("ep_max_tokens"),
                      dtypes=tuple(dict.fromkeys(_DTYPE_WORDS[w] for w in words)))
    except ValueError as exc:
        raise pytest.UsageError(f"conformance kit options: {exc}") from None
    return KitConfig(device=config.getoption("ep_device"), shape=shape, cases=cases,
                     force_device=config.getoption("ep_force_device"), timeout=config.getoption("ep_timeout"),
                     seed=config.getoption("ep_seed"))


def pytest_generate_tests(metafunc: Any) -> None:
    if "ep_backend" not in metafunc.fixturenames:
        return
    names = metafunc.config.getoption("ep_backend")
    if not names:
        raise pytest.UsageError("the conformance kit needs the backend to check: pytest --pyargs "
                                "megatron_ep_plugins.testing --ep-backend NAME (repeatable; `megatron-ep list` "
                                "shows the registered names)")
    _resolve_all(metafunc.config, names)  # an unknown or unavailable backend: one usage error, before any test
    metafunc.parametrize("ep_backend", list(dict.fromkeys(names)), scope="session")
    metafunc.parametrize("ep_world", list(dict.fromkeys(_ints(metafunc.config, "ep_ranks"))), scope="session",
                         ids=lambda w: f"{w}ranks")
    if "ep_scenario" in metafunc.fixturenames:
        from .cases import scenarios

        metafunc.parametrize("ep_scenario", [c.name for c in scenarios(2, kit_config(metafunc.config).shape)])
    if "ep_bad_id" in metafunc.fixturenames:
        metafunc.parametrize("ep_bad_id", ["bad_id_too_large", "bad_id_below_minus_one"])


def _resolve_all(config: Any, names: list) -> dict:
    cache = getattr(config, "_megatron_ep_specs", None)
    if cache is None:
        from .kit import KitUsageError, resolve_backend

        kit = kit_config(config)
        cache = {}
        for name in dict.fromkeys(names):
            try:
                cache[name] = resolve_backend(name, kit)
            except KitUsageError as exc:
                raise pytest.UsageError(f"conformance kit: {exc}") from None
        config._megatron_ep_specs = cache
    return cache


@pytest.fixture(scope="session")
def ep_config(pytestconfig: Any) -> Any:
    return kit_config(pytestconfig)


@pytest.fixture(scope="session")
def ep_pools() -> Any:
    pools: dict = {}
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture(scope="session")
def ep_spec(ep_backend: str, pytestconfig: Any) -> Any:
    return _resolve_all(pytestconfig, pytestconfig.getoption("ep_backend"))[ep_backend]


@pytest.fixture
def ep_pool(ep_world: int, ep_config: Any, ep_pools: dict) -> Any:
    from .pool import RankPool

    pool = ep_pools.get(ep_world)
    if pool is None:
        pool = ep_pools[ep_world] = RankPool(ep_world, ep_config.device, timeout=ep_config.timeout,
                                             grace=ep_config.grace)
    return pool


@pytest.fixture
def ep_kit(ep_spec: Any, ep_config: Any) -> Any:
    """``(backend name, KitConfig)`` with the shape adjusted to the backend's declared capabilities."""
    from dataclasses import replace

    config = ep_config
    if not ep_spec.capabilities.uneven_tokens and config.shape.uneven_tokens:
        config = replace(config, shape=replace(config.shape, uneven_tokens=False))
    return ep_spec.name, config
