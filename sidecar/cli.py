"""The `sidecar` command: parses arguments, calls the library, maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sidecar import logs
from sidecar import store as store_mod
from sidecar.app import parse_when, present_row
from sidecar.clock import SystemClock
from sidecar.config import Settings, load_settings, validate_for_serving
from sidecar.errors import ConfigError, DatabaseCorrupt
from sidecar.events import NDJSON_TYPES, check_items, parse_body
from sidecar.flush import Flusher, MeteringApi
from sidecar.store import Store, records


def _settings(args: argparse.Namespace, env: Mapping[str, str], **kw: Any) -> Settings:
    merged = dict(env)
    if getattr(args, "db", None):
        merged["SIDECAR_DB"] = args.db
    return load_settings(merged, **kw)


def metering_client(settings: Settings, env: Mapping[str, str]) -> MeteringApi | None:
    """The botocore client, or None in dry-run mode (requests are logged, nothing is sent)."""
    if settings.dry_run:
        return None
    from sidecar.marketplace import MeteringClient

    return MeteringClient(settings, env=env)


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run the daemon until SIGTERM/SIGINT, then seal the open hour and flush within the deadline."""
    from aiohttp import web

    from sidecar.app import create_app

    settings = _settings(args, env, require_region=not args.dry_run and not _truthy(env.get("SIDECAR_DRY_RUN")))
    if args.dry_run:
        settings = replace(settings, dry_run=True)
    validate_for_serving(settings)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    app = create_app(settings, api=metering_client(settings, env))
    web.run_app(app, host=settings.listen_host, port=settings.listen_port, print=None,
                access_log=None, shutdown_timeout=2.0, handle_signals=True)
    return 0


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def cmd_flush(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Seal, freeze and send everything due, print a summary; exit 1 if anything failed or is left."""
    if not args.once:
        print("flush: only --once is supported here; the daemon flushes continuously", file=sys.stderr)
        return 2
    settings = _settings(args, env, require_region=not args.dry_run)
    if args.dry_run:
        settings = replace(settings, dry_run=True)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    store = Store.open(settings.db_path, settings=settings, clock=SystemClock())
    try:
        flusher = Flusher(store, metering_client(settings, env), settings, SystemClock())
        summary = asyncio.run(flusher.drain(deadline_s=args.timeout))
    finally:
        store.close()
    print(json.dumps(summary.as_dict(), sort_keys=True))
    return 1 if summary.failed and not settings.dry_run else 0


def cmd_replay(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Re-drive rejected/conflict/expired records, and/or import events from an NDJSON spool file."""
    settings = _settings(args, env)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    if not args.state and not args.spool:
        print("replay: give --state and/or --spool", file=sys.stderr)
        return 2
    clock = SystemClock()
    store = Store.open(settings.db_path, settings=settings, clock=clock, resume=False)
    out: dict[str, Any] = {}
    try:
        if args.state:
            out["records"] = store.replay_sync(states=args.state, customer=args.customer)
        if args.spool:
            out["spool"] = import_spool(store, Path(args.spool), settings)
    finally:
        store.close()
    print(json.dumps(out, sort_keys=True))
    return 1 if out.get("spool", {}).get("rejected") else 0


def import_spool(store: Store, path: Path, settings: Settings) -> dict[str, int]:
    """Ingest an NDJSON spool file 1,000 lines at a time; duplicates of stored events count once."""
    counts = {"accepted": 0, "duplicates": 0, "rejected": 0}
    chunk: list[tuple[int, bytes]] = []  # (line number, line) of non-blank lines

    def ingest() -> None:
        items = parse_body(b"\n".join(line for _, line in chunk), NDJSON_TYPES[0])
        valid, rejected = check_items(items, now=store.clock.now(), max_age_s=settings.max_event_age_s,
                                      max_future_s=settings.max_future_s)
        for r in rejected:
            print(f"{path}:{chunk[r['index']][0]}: {r['error']}", file=sys.stderr)
        counts["rejected"] += len(rejected)
        if valid:
            res = store.ingest_future(valid).result()
            counts["accepted"] += res.accepted
            counts["duplicates"] += res.duplicates
        chunk.clear()

    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                chunk.append((lineno, line.rstrip(b"\r\n")))
            if len(chunk) >= 1000:
                ingest()
    if chunk:
        ingest()
    return counts


def cmd_migrate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Apply pending schema migrations to the database file."""
    settings = _settings(args, env)
    store_mod.check_integrity(settings.db_path)
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    applied = store_mod.migrate(settings.db_path)
    print(f"{settings.db_path}: applied {', '.join(applied)}" if applied else f"{settings.db_path}: up to date")
    return 0


USAGE_COLUMNS = ("hour", "customer", "dimension", "state", "events", "raw", "carried_in",
                 "quantity", "remainder", "attempts", "aws_status", "last_error")


def cmd_usage(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Print usage straight from the database file (works while the daemon is down)."""
    settings = _settings(args, env)
    filt = store_mod.UsageFilter(
        customer=args.customer, dimension=args.dimension, state=args.state,
        since=parse_when("from", args.since) if args.since else None,
        until=parse_when("to", args.until) if args.until else None,
    )
    with store_mod.reader(settings.db_path) as conn:
        rows = [present_row(r) for r in store_mod.usage_rows(conn, filt, limit=args.limit)]
        totals = store_mod.usage_totals(conn, filt)
    if args.json:
        json.dump({"rows": rows, "totals": totals}, sys.stdout, indent=2)
        print()
        return 0
    table = [[("" if r.get(c) is None else str(r.get(c))) for c in USAGE_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in table]) for i, c in enumerate(USAGE_COLUMNS)]
    print("  ".join(c.ljust(w) for c, w in zip(USAGE_COLUMNS, widths, strict=True)))
    for row in table:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"\n{len(rows)} bucket(s)")
    for t in totals:
        states = ", ".join(f"{k}={v}" for k, v in sorted(t["quantity_by_state"].items()))
        print(f"{t['customer']} {t['dimension']}: events={t['events']} open_raw={t['open_raw']} "
              f"carry_raw={t['carry_raw']} units[{states}]")
    return 0


def cmd_check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Exit 0 when the running daemon answers /healthz with 200 (for container health checks)."""
    settings = _settings(args, env)
    host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::") else settings.listen_host  # noqa: S104
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.listen_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"unhealthy: {url} answered {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    age = body.get("oldest_unsent_age_s")
    print(f"ok: db_writable={body.get('db_writable')} oldest_unsent_age_s={age}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; test_docs checks each is in the README."""
    parser = argparse.ArgumentParser(
        prog="sidecar", description="Metering sidecar for vLLM on AWS Marketplace."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--db", help="database file (default: SIDECAR_DB or ./sidecar.db)")
        return p

    p = add("serve", cmd_serve, "Run the sidecar daemon (HTTP API, sealing and flushing).")
    p.add_argument("--dry-run", action="store_true", help="log BatchMeterUsage requests instead of sending them")
    p = add("flush", cmd_flush, "Seal, freeze and send everything due now, then exit.")
    p.add_argument("--once", action="store_true", required=True, help="one drain, then exit (required)")
    p.add_argument("--dry-run", action="store_true", help="log the exact requests, send and mark nothing")
    p.add_argument("--timeout", type=float, default=60.0, help="give up waiting for retries after this many seconds")
    p = add("replay", cmd_replay, "Re-drive rejected/conflict/expired records, or import an NDJSON spool file.")
    p.add_argument("--state", action="append", choices=records.REPLAYABLE,
                   help="re-drive records in this state (repeatable)")
    p.add_argument("--customer", help="only this customer (key or part of it)")
    p.add_argument("--spool", help="NDJSON file of usage events to import (e.g. the vLLM reporter's spool)")
    add("migrate", cmd_migrate, "Apply pending schema migrations to the database.")
    p = add("usage", cmd_usage, "Show usage buckets read straight from the database file.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--customer", help="only this customer (key or part of it)")
    p.add_argument("--dimension", help="only this dimension")
    p.add_argument("--state", help="only buckets in this state")
    p.add_argument("--from", dest="since", help="hours from this time (RFC 3339 or epoch seconds)")
    p.add_argument("--to", dest="until", help="hours before this time (RFC 3339 or epoch seconds)")
    p.add_argument("--limit", type=int, default=5000, help="at most this many rows (default 5000)")
    p = add("check", cmd_check, "Exit 0 if the running daemon is healthy (container health check).")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for /healthz")

    from sidecar import simulator

    p = sub.add_parser("simulate-marketplace", help="Run a local AWS Marketplace Metering simulator.",
                       description="Run a local AWS Marketplace Metering simulator.")
    simulator.add_arguments(p)
    p.set_defaults(fn=lambda a, _env: simulator.run(a))
    return parser


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of the `sidecar` console script."""
    args = build_parser().parse_args(argv)
    environ = os.environ if env is None else env
    try:
        return int(args.fn(args, environ))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except DatabaseCorrupt as exc:
        print(f"database corrupt, refusing to start: {exc}\n"
              "Move the file aside and keep it for recovery; the sidecar never replaces it.",
              file=sys.stderr)
        return 3
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


