"""The Marketplace simulator is an independent fake: the daemon never loads its server, nor it the daemon."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sidecar" / "simulator"
# What building the `sidecar` parser may load: the subcommand's options and the pure rules they name.
PARSER_MODULES = {"sidecar.simulator", "sidecar.simulator.cli", "sidecar.simulator.rules"}

DAEMON_SCRIPT = """
import sys
import sidecar.app
import sidecar.cli
from sidecar.config import Settings

sidecar.cli.build_parser()
sidecar.cli.parse_args(["simulate-marketplace", "--seed", "3"])
sidecar.app.create_app(Settings())
print("\\n".join(sorted(name for name in sys.modules if name.startswith("sidecar.simulator"))))
"""


@pytest.mark.slow
def test_daemon_never_loads_the_simulator_server() -> None:
    """Building the parser and creating the app load the subcommand's options, not the simulator itself."""
    python_path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", DAEMON_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path}, check=False, timeout=60)
    assert done.returncode == 0, done.stderr[-4000:]
    loaded = set(done.stdout.split())
    assert "sidecar.simulator.cli" in loaded
    assert loaded <= PARSER_MODULES, sorted(loaded - PARSER_MODULES)


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in `path`; relative imports are given as dots and a name."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _outside_the_package(module: str) -> bool:
    """Whether an import of `module` from inside sidecar/simulator/ reaches the rest of sidecar."""
    if module.startswith(".."):  # relative, above the package
        return True
    in_sidecar = module == "sidecar" or module.startswith("sidecar.")
    return in_sidecar and not (module == "sidecar.simulator" or module.startswith("sidecar.simulator."))


def test_outside_imports_are_recognised() -> None:
    """The check flags the daemon's modules and relative climbs, not the package or third parties."""
    flagged = ["sidecar", "sidecar.config", "sidecar.simulatorx", "..config", ".."]
    allowed = ["sidecar.simulator", "sidecar.simulator.rules", ".rules", "aiohttp", "sidecarlike"]
    assert all(_outside_the_package(m) for m in flagged)
    assert not any(_outside_the_package(m) for m in allowed)


def test_simulator_imports_nothing_from_the_daemon() -> None:
    """No module of sidecar/simulator/ imports from sidecar.* outside the package, so it shares no limit."""
    files = sorted(PACKAGE.rglob("*.py"))
    assert files
    outside = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in files
        for line, module in _imported_modules(path)
        if _outside_the_package(module)
    ]
    assert outside == []


def test_every_public_name_loads() -> None:
    """Each name in sidecar.simulator.__all__ loads from the module that defines it."""
    simulator = importlib.import_module("sidecar.simulator")
    assert set(simulator.__all__) == set(simulator._MODULE_OF)
    for name in simulator.__all__:
        assert getattr(simulator, name) is not None, name
    with pytest.raises(AttributeError):
        _ = simulator.no_such_name
