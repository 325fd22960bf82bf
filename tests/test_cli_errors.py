"""Bad command-line input ends in one line on stderr naming the option, and exit 2; never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.cli import main

MISSING = "<tmp>/no-such-spool.ndjson"
DIRECTORY = "<tmp>"

# (subcommand and arguments, text the one line must contain: the option). "<tmp>" is a directory.
BAD: list[tuple[list[str], str]] = [
    (["serve", "--db", DIRECTORY], "--db"),
    (["serve", "--db", ""], "--db"),
    (["serve", "--listen-on", "x"], "--listen-on"),
    (["flush"], "--once"),
    (["flush", "--once", "--timeout", "0"], "--timeout"),
    (["flush", "--once", "--timeout", "-1"], "--timeout"),
    (["flush", "--once", "--timeout", "nan"], "--timeout"),
    (["flush", "--once", "--timeout", "soon"], "--timeout"),
    (["flush", "--once", "--db", DIRECTORY], "--db"),
    (["replay"], "--state"),
    (["replay", "--spool", MISSING], "--spool"),
    (["replay", "--spool", DIRECTORY], "--spool"),
    (["replay", "--state", "lost"], "--state"),
    (["replay", "--state", "rejected", "--customer", ""], "--customer"),
    (["replay", "--state", "rejected", "--db", DIRECTORY], "--db"),
    (["migrate", "--db", DIRECTORY], "--db"),
    (["migrate", "--db", ""], "--db"),
    (["usage", "--from", "nonsense"], "--from"),
    (["usage", "--from", ""], "--from"),
    (["usage", "--to", "1e300"], "--to"),
    (["usage", "--to", "-Infinity"], "--to"),
    (["usage", "--from", "10000-01-01T00:00:00Z"], "--from"),
    (["usage", "--limit", "0"], "--limit"),
    (["usage", "--limit", "-3"], "--limit"),
    (["usage", "--limit", "many"], "--limit"),
    (["usage", "--customer", ""], "--customer"),
    (["usage", "--customer", "  "], "--customer"),
    (["usage", "--db", DIRECTORY], "--db"),
    (["check", "--timeout", "0"], "--timeout"),
    (["check", "--timeout", "inf"], "--timeout"),
    (["check", "--timeout", "1e300"], "--timeout"),
    (["simulate-marketplace", "--throttle-rate", "2"], "--throttle-rate"),
    (["simulate-marketplace", "--listen", "nowhere"], "--listen"),
    (["simulate-marketplace", "--seed", "x"], "--seed"),
    (["simulate-marketplace", "--window-s", "0"], "--window-s"),
    (["simulate-marketplace", "--window-s", "nan"], "--window-s"),
    (["simulate-marketplace", "--latency-s", "-1"], "--latency-s"),
]


def one_line(err: str) -> str:
    """The only line of `err`; fails unless there is exactly one and it is not empty."""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), err
    return lines[0]


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_value_is_one_line_and_exit_2(argv: list[str], option: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Each subcommand given a bad value prints one line naming the option and exits 2."""
    argv = [a.replace("<tmp>", str(tmp_path)) for a in argv]
    env = {"SIDECAR_DB": str(tmp_path / "x.db"), "AWS_REGION": "us-east-1"}
    assert main(argv, env=env) == 2
    out, err = capsys.readouterr()
    line = one_line(err)
    assert line.startswith(f"sidecar {argv[0]}: "), line
    assert option in line
    assert "Traceback" not in out + err
    assert out == ""


def test_database_directory_from_the_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SIDECAR_DB naming a directory is a configuration error naming SIDECAR_DB, in one line."""
    assert main(["usage"], env={"SIDECAR_DB": str(tmp_path)}) == 2
    assert "SIDECAR_DB" in one_line(capsys.readouterr().err)


def test_missing_command_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`sidecar` alone names what is missing in one line."""
    assert main([], env={}) == 2
    assert one_line(capsys.readouterr().err).startswith("sidecar: ")


def test_help_still_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """--help prints the help and exits 0; only errors are squeezed into one line."""
    assert main(["usage", "--help"], env={}) == 0
    assert "--customer" in capsys.readouterr().out


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    """The installed `sidecar` script given a bad --from exits 2 with one line on stderr, end to end."""
    script = Path(sys.executable).parent / "sidecar"
    done = subprocess.run([str(script), "usage", "--from", "nonsense"], capture_output=True, text=True,
                          env={"SIDECAR_DB": str(tmp_path / "x.db")}, timeout=60, check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stdout + done.stderr
    assert one_line(done.stderr).startswith("sidecar usage: argument --from: must be epoch seconds or RFC 3339")
