"""Processes for the end-to-end test: each command in its own process group, logged, waited on, stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: Any = None, *, timeout_s: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request with an optional JSON body; returns (status, raw body), never raises on 4xx/5xx."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(method: str, url: str, body: Any = None, *, timeout_s: float = 10.0) -> Any:
    """An HTTP request that must answer 2xx with JSON; returns the decoded body."""
    status, raw = http(method, url, body, timeout_s=timeout_s)
    if not 200 <= status < 300:
        raise AssertionError(f"{method} {url} answered {status}: {raw[:500]!r}")
    return json.loads(raw)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def prometheus_totals(text: str) -> dict[str, float]:
    """Prometheus text format → metric name → value summed over all label sets."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            totals[match[1]] = totals.get(match[1], 0.0) + float(match[3])
    return totals


class Service:
    """A long-running command in its own session (process group) with its output in a log file."""

    def __init__(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log_dir: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Service:
        """Start the command; its children share its process group, so `stop` reaches them all."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.started_at = time.monotonic()
        return self

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_http(self, url: str, *, timeout_s: float) -> float:
        """Poll `url` until it answers 200; return seconds since start. Fails fast if the process exits."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                code = None if self.proc is None else self.proc.returncode
                raise AssertionError(f"{self.name} exited with {code} before {url} answered:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return time.monotonic() - self.started_at
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise AssertionError(f"{self.name}: {url} did not answer 200 within {timeout_s:.0f}s:\n{self.tail()}")

    def stop(self, *, timeout_s: float = 30.0) -> int | None:
        """Stop it as `docker stop` does; returns the exit code.

        SIGTERM goes to the main process only (it shuts its own children down, as vLLM's API server
        does with its engine); if it outlives `timeout_s` the whole group gets SIGKILL, and so does
        anything left in the group afterwards.
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._signal_group(signal.SIGKILL)  # children the leader left behind (e.g. vLLM's engine core)
        return self.proc.returncode

    def _signal_group(self, signum: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, chars: int = 6000) -> str:
        """The end of the log."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]
