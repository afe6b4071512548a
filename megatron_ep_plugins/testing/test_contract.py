"""The contract, as pytest tests: ``pytest --pyargs megatron_ep_plugins.testing --ep-backend NAME``.

Parametrized by the kit's plugin (:mod:`megatron_ep_plugins.testing.plugin`) over ``--ep-backend`` and
``--ep-ranks``; see the package docstring for what each test checks.
"""

from __future__ import annotations

import pytest

from megatron_ep_plugins.testing import kit
from megatron_ep_plugins.testing.cases import bad_id_cases, scenarios


def test_scenario(ep_kit, ep_world, ep_pool, ep_scenario):
    name, config = ep_kit
    case = next((c for c in scenarios(ep_world, config.shape) if c.name == ep_scenario), None)
    if case is None:
        pytest.skip(f"{ep_scenario} does not apply (backend {name!r} declares uneven_tokens=False)")
    kit.run_case(ep_pool, name, case, config)


def test_bad_ids_fail_on_every_rank(ep_kit, ep_world, ep_pool, ep_bad_id):
    name, config = ep_kit
    case = next(c for c in bad_id_cases(ep_world, config.shape) if c.name == ep_bad_id)
    kit.run_bad_case(ep_pool, name, case, config)


def test_random_routings(ep_kit, ep_world, ep_pool):
    name, config = ep_kit
    ran = kit.run_random(ep_pool, name, ep_world, config)
    print(f"{ran} random cases on {ep_world} ranks passed for backend {name!r}")
