"""``python -m megatron_ep_plugins.bench`` (also under ``torchrun -m``)."""

import sys

from megatron_ep_plugins.bench import main

sys.exit(main(prog="python -m megatron_ep_plugins.bench"))
