"""Starting and stopping the processes a benchmark case measures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout_s: float = 60.0) -> float:
    """Seconds until `url` answers."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return time.perf_counter() - started
        except OSError:
            time.sleep(0.01)
    raise TimeoutError(url)


def sidecar_env(db: Path, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "AWS_"))}
    env.update({"SIDECAR_DB": str(db), "SIDECAR_LISTEN": f"127.0.0.1:{port}", "SIDECAR_LOG_LEVEL": "warning",
                "SIDECAR_LOG_FORMAT": "json", "SIDECAR_FLUSH_INTERVAL_S": "3600", "SIDECAR_DRY_RUN": "true",
                "SIDECAR_MAX_EVENT_AGE_S": str(10 * 24 * 3600), **(extra or {})})
    return env


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
