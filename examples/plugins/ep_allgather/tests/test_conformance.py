"""The backend keeps megatron_ep_plugins' dispatch/combine contract: the conformance kit, on 2 and 4 CPU ranks.

The same as the one command ``pytest --pyargs megatron_ep_plugins.testing --ep-backend allgather``, from a test
file of this package (so ``pytest`` in this folder checks it). Needs the plugin installed
(``pip install -e .[test]``): the kit finds backends through their entry points, as Megatron jobs do.
"""

from megatron_ep_plugins.testing import check_backend


def test_keeps_the_contract():
    report = check_backend("allgather", worlds=(2, 4), quick=True)
    assert report.passed, report.text()
