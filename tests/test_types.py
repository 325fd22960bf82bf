"""The daemon and the vLLM-side integration type-check under mypy --strict (configured in pyproject.toml)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("sidecar", "server/vllm_metering")


def test_mypy_is_strict_over_both_packages() -> None:
    """pyproject.toml runs mypy in strict mode over sidecar/ and server/vllm_metering/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["strict"] is True
    assert set(CHECKED) <= set(config["files"])


@pytest.mark.slow
def test_sidecar_and_server_are_strictly_typed() -> None:
    """mypy --strict finds nothing in sidecar/ or server/vllm_metering/, and checks every file of both."""
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-4000:]
    checked = re.search(r"no issues found in (\d+) source files", done.stdout)
    assert checked is not None, done.stdout[-4000:]
    expected = sum(len(list((ROOT / package).rglob("*.py"))) for package in CHECKED)
    assert int(checked.group(1)) == expected, done.stdout[-4000:]
