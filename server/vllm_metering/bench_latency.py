"""Measure the latency UsageMiddleware adds: the same requests with and without it, in one run.

    python -m vllm_metering.bench_latency [--requests 1000] [--tokens 64] [--http]

In-process mode drives the fake vLLM app (`vllm_metering.testing.FakeVLLM`) directly as ASGI in three
variants, rotating their order request by request so drift affects all alike: bare; wrapped in
UsageMiddleware with an in-memory sink (the request-path cost alone); and wrapped with the real Reporter
posting to a fake sidecar over local HTTP (that delivery runs on the same event loop, and so does the
fake sidecar, so this variant is pessimistic). `--http` also serves the bare and the metered app with
uvicorn (one subprocess each, the fake sidecar in a third) and measures over real HTTP with keep-alive.

Reported per workload: p50/p99 of time to the last response byte (what the client waits for), bare
vs metered and the difference, and the median/p99 of the per-pair difference (each metered request
minus the bare one of the same round). "whole call" is the full ASGI call, which also includes the
accounting done after the last byte was sent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vllm_metering.middleware import ASGIApp, UsageMiddleware
from vllm_metering.settings import MeteringSettings
from vllm_metering.testing import FakeSidecar, FakeVLLM, RecordingSink, asgi_request

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
WARMUP = 100

WORKLOADS: dict[str, Callable[[int], dict[str, Any]]] = {
    "json": lambda tokens: {"messages": [{"content": "hello there " * 20}], "max_tokens": tokens},
    "sse+usage": lambda tokens: {
        "messages": [{"content": "hello there " * 20}],
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    "sse-no-usage": lambda tokens: {
        "messages": [{"content": "hello there " * 20}],
        "max_tokens": tokens,
        "stream": True,
    },
}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:9.1f}"


def _report(name: str, bare: list[float], metered: list[float]) -> str:
    pairs = [m - b for b, m in zip(bare, metered, strict=True)]
    b50, b99 = _percentile(bare, 50), _percentile(bare, 99)
    m50, m99 = _percentile(metered, 50), _percentile(metered, 99)
    return (
        f"{name:<44} {_us(b50)} {_us(m50)} {_us(m50 - b50)}   {_us(b99)} {_us(m99)} {_us(m99 - b99)}"
        f"   {_us(statistics.median(pairs))} {_us(_percentile(pairs, 99))}"
    )


HEADER = (
    f"{'workload':<44} {'p50 bare':>9} {'p50 mtrd':>9} {'p50 +':>9}   "
    f"{'p99 bare':>9} {'p99 mtrd':>9} {'p99 +':>9}   {'pair p50':>9} {'pair p99':>9}"
)


async def _in_process(requests: int, tokens: int, spool_dir: Path) -> tuple[list[str], int, int]:
    sidecar = FakeSidecar()
    await sidecar.start()
    settings = MeteringSettings(sidecar_url=sidecar.url, spool_path=spool_dir / "spool.ndjson")
    apps: dict[str, ASGIApp] = {
        "bare": FakeVLLM(),
        "sink": UsageMiddleware(FakeVLLM(), settings=settings, sink=RecordingSink()),
        "reporter": UsageMiddleware(FakeVLLM(), settings=settings),
    }
    lines: list[str] = []
    sent = 0
    try:
        for name, make_body in WORKLOADS.items():
            body = make_body(tokens)
            last_byte: dict[str, list[float]] = {label: [] for label in apps}
            whole: dict[str, list[float]] = {label: [] for label in apps}
            labels = list(apps)
            for i in range(requests + WARMUP):
                for label in labels[i % 3 :] + labels[: i % 3]:  # rotate the order every round
                    headers = {"x-tenant-id": f"tenant-{i % 4}"}
                    start = time.perf_counter()
                    result = await asgi_request(apps[label], "/v1/chat/completions", json_body=body, headers=headers)
                    end = time.perf_counter()
                    sent += label == "reporter"
                    if i >= WARMUP:
                        assert result.last_byte_at is not None
                        last_byte[label].append(result.last_byte_at - start)
                        whole[label].append(end - start)
            prefix = f"in-process {name}"
            lines.append(_report(f"{prefix}: last byte, sink", last_byte["bare"], last_byte["sink"]))
            lines.append(_report(f"{prefix}: last byte, reporter", last_byte["bare"], last_byte["reporter"]))
            lines.append(_report(f"{prefix}: whole call, reporter", whole["bare"], whole["reporter"]))
        await apps["reporter"].aclose()  # type: ignore[attr-defined]
    finally:
        await sidecar.stop()
    return lines, sent, len(sidecar.events)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(kind: str, port: int, sidecar_url: str, spool: str) -> None:
    if kind == "sidecar":
        asyncio.run(_serve_sidecar(port))
        return
    import uvicorn

    app: Any = FakeVLLM()
    if kind == "metered":
        app = UsageMiddleware(app, settings=MeteringSettings(sidecar_url=sidecar_url, spool_path=Path(spool)))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


async def _serve_sidecar(port: int) -> None:
    sidecar = FakeSidecar()
    await sidecar.start(port=port)
    try:
        await asyncio.Event().wait()  # until terminated
    finally:
        await sidecar.stop()


async def _spawn(kind: str, port: int, sidecar_url: str, spool: Path) -> asyncio.subprocess.Process:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vllm_metering.bench_latency",
        "--serve",
        kind,
        "--port",
        str(port),
        "--sidecar-url",
        sidecar_url,
        "--spool",
        str(spool),
        env=env,
    )


async def _over_http(requests: int, tokens: int, spool_dir: Path) -> tuple[list[str], int, int]:
    import aiohttp

    sidecar_port = _free_port()
    sidecar_url = f"http://127.0.0.1:{sidecar_port}"
    ports = {"bare": _free_port(), "metered": _free_port()}
    processes = [await _spawn("sidecar", sidecar_port, sidecar_url, spool_dir / "unused")]
    processes += [
        await _spawn(kind, port, sidecar_url, spool_dir / "http-spool.ndjson") for kind, port in ports.items()
    ]
    lines: list[str] = []
    sent = 0
    try:
        async with aiohttp.ClientSession() as session:
            for url in [sidecar_url + "/v1/fake/stats"] + [f"http://127.0.0.1:{p}/v1/models" for p in ports.values()]:
                for _ in range(400):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with session.get(url) as resp:
                            if resp.status == 200:
                                break
                    await asyncio.sleep(0.05)
            for name, make_body in WORKLOADS.items():
                body = make_body(tokens)
                samples: dict[str, list[float]] = {"bare": [], "metered": []}
                for i in range(requests + WARMUP):
                    order = list(ports.items()) if i % 2 == 0 else list(reversed(ports.items()))
                    for label, port in order:
                        start = time.perf_counter()
                        async with session.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            json=body,
                            headers={"x-tenant-id": f"tenant-{i % 4}"},
                        ) as resp:
                            await resp.read()
                        elapsed = time.perf_counter() - start
                        sent += label == "metered"
                        if i >= WARMUP:
                            samples[label].append(elapsed)
                lines.append(_report(f"http/uvicorn {name}: response", samples["bare"], samples["metered"]))
            for process in processes[1:]:
                process.terminate()  # SIGTERM: uvicorn runs lifespan shutdown, the reporter drains
                await asyncio.wait_for(process.wait(), 30)
            async with session.get(sidecar_url + "/v1/fake/stats") as resp:
                stored = int((await resp.json())["events"])
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 30)
    return lines, sent, stored


async def _main(args: argparse.Namespace) -> None:
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.requests} measured requests per workload "
        f"and variant (+{WARMUP} warm-up), {args.tokens} completion tokens per request "
        f"(SSE: {args.tokens + 3} chunks); times in microseconds"
    )
    with tempfile.TemporaryDirectory() as tmp:
        lines, sent, stored = await _in_process(args.requests, args.tokens, Path(tmp))
        print(HEADER)
        print("\n".join(lines))
        print(f"in-process: {sent} requests through the reporter, {stored} events stored by the sidecar")
        if args.http:
            try:
                import uvicorn  # noqa: F401
            except ImportError:
                print("uvicorn is not installed: HTTP measurement skipped")
                return
            lines, sent, stored = await _over_http(args.requests, args.tokens, Path(tmp))
            print(HEADER)
            print("\n".join(lines))
            print(f"http: {sent} metered requests, {stored} events stored by the sidecar")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per workload and side")
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--http", action="store_true", help="also measure over HTTP with uvicorn")
    parser.add_argument("--serve", choices=["bare", "metered", "sidecar"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sidecar-url", help=argparse.SUPPRESS)
    parser.add_argument("--spool", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.port, args.sidecar_url, args.spool)
        return
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
