"""The README is the manual: every setting, command, option and route must be in it."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sidecar.app import create_app
from sidecar.cli import build_parser
from sidecar.config import ENV_SETTINGS, Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    """Each SIDECAR_* variable the code reads has a row in the README's settings table."""
    missing = [name for name in [*ENV_SETTINGS, "SIDECAR_CONFIG"] if f"| `{name}` |" not in README]
    assert not missing


def test_every_command_and_option_is_documented() -> None:
    """Each subcommand and each of its long options appears in the README."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        if f"sidecar {name}" not in README:
            missing.append(name)
        for action in p._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help" and opt not in README:
                    missing.append(f"{name} {opt}")
    assert not missing


def test_every_route_is_documented() -> None:
    """Each HTTP route of the app is in the README's API table."""
    app = create_app(Settings())
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    missing = [f"{m} {p}" for m, p in routes if m != "HEAD" and f"`{m} {p}`" not in README]
    assert not missing


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run's last command is the README's test command, verbatim."""
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"\n{ci}\n" in README
    blocks = re.findall(r"```\n(.*?)\n```", README, flags=re.S)
    assert ci in blocks
