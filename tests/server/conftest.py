"""Fixtures for the vLLM-side metering tests: settings with a private spool, a real fake sidecar."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from vllm_metering.settings import MeteringSettings
from vllm_metering.testing import FakeSidecar, ManualClock


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., MeteringSettings]:
    """Settings with a spool under tmp_path and backoff short enough for tests; override by keyword."""

    def make(**overrides: Any) -> MeteringSettings:
        base = MeteringSettings(
            spool_path=tmp_path / "spool" / "spool.ndjson",
            batch_linger_s=0.0,
            backoff_base_s=0.001,
            backoff_max_s=0.005,
            request_timeout_s=2.0,
            shutdown_timeout_s=2.0,
        )
        return dataclasses.replace(base, **overrides)

    return make


@pytest.fixture
async def sidecar() -> AsyncIterator[FakeSidecar]:
    """A started fake sidecar on a free local port."""
    fake = FakeSidecar()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
def clock() -> ManualClock:
    """A manual monotonic clock for the reporter's backoff."""
    return ManualClock()


@pytest.fixture
def free_port() -> int:
    """A local port nothing listens on (yet)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
