"""The README stays true: its commands are CI's, and it documents every variable and backend."""

from __future__ import annotations

from pathlib import Path

from megatron_ep_plugins.config import ENV_VARS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    block = README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert block == ["bash scripts/setup.sh && .venv/bin/python examples/train_moe.py",
                     "bash scripts/setup.sh && .venv/bin/python -m pytest"]
    assert block[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_documents_every_variable_and_builtin_backend():
    missing = [name for name in ENV_VARS if f"`{name}`" not in README]
    assert not missing, f"README lacks {missing}"
    for backend in ("elastic", "legacy", "hybridep", "torch"):
        assert f"| `{backend}` |" in README
