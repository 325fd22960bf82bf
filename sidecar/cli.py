"""The `sidecar` command: parses arguments, calls the library, maps errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import math
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import structlog

from sidecar import logs
from sidecar.app import Registrar, present_row, present_subscription
from sidecar.clock import HOUR_S, Clock, SystemClock, clock_from_env, hour_start
from sidecar.config import DIMENSION_NAME, Settings, load_settings, validate_for_serving
from sidecar.errors import BadArgument, ConfigError, DatabaseCorrupt, StoreLocked
from sidecar.events import NDJSON_TYPES, check_items, parse_body
from sidecar.flush import Flusher, MeteringApi
from sidecar.model import REPLAYABLE, BucketState, ParkedState, RecordState, Scheme
from sidecar.notifications import QueueApi
from sidecar.store import MeteringStore, UsageFilter, migrate_store, open_store, open_view
from sidecar.when import WHEN_RULE, parse_when

T = TypeVar("T")
# What `sidecar release --state` acts on: held records, parked usage, a tenant's unmapped usage.
RELEASABLE = (RecordState.HELD, ParkedState.UNCONFIGURED, BucketState.UNMAPPED)


def _settings(args: argparse.Namespace, env: Mapping[str, str], **kw: Any) -> Settings:
    merged = dict(env)
    given = getattr(args, "db", None)
    if given is not None:
        merged["SIDECAR_DB"] = given
    settings = load_settings(merged, **kw)
    if settings.db_path.is_dir():
        where = "--db" if given is not None else "SIDECAR_DB"
        problem = f"{where}: {settings.db_path} is a directory; give the path of the database file"
        raise BadArgument(problem) if given is not None else ConfigError(problem)
    return settings


def metering_client(settings: Settings, env: Mapping[str, str]) -> MeteringApi | None:
    """The botocore client, or None in dry-run mode (requests are logged, nothing is sent)."""
    if settings.dry_run:
        return None
    from sidecar.marketplace import MeteringClient

    return MeteringClient(settings, env=env)


def subscription_queue(settings: Settings, env: Mapping[str, str]) -> QueueApi | None:
    """The SQS queue of subscription notifications, when SIDECAR_SUBSCRIPTION_QUEUE_URL names one."""
    if settings.subscription_queue_url is None:
        return None
    from sidecar.marketplace import SubscriptionQueue

    return SubscriptionQueue(settings, env=env)


def cmd_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run the daemon until SIGTERM/SIGINT, then seal the open hour and flush within the deadline."""
    from aiohttp import web

    from sidecar.app import create_app

    settings = _settings(args, env, require_region=not args.dry_run and not _truthy(env.get("SIDECAR_DRY_RUN")))
    if args.dry_run:
        settings = replace(settings, dry_run=True)
    validate_for_serving(settings)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    clock = clock_from_env(env)
    if env.get("SIDECAR_TEST_CLOCK"):
        structlog.get_logger("sidecar.cli").error("test_clock_in_use", value=env["SIDECAR_TEST_CLOCK"],
                                                  note="SIDECAR_TEST_CLOCK is for tests and demos: never bill with it")
    api = metering_client(settings, env)
    app = create_app(settings, api=api, clock=clock, queue=subscription_queue(settings, env),
                     registrar=cast("Registrar", api) if api is not None else None)
    web.run_app(app, host=settings.listen_host, port=settings.listen_port, print=None,
                access_log=None, shutdown_timeout=2.0, handle_signals=True)
    return 0


def _await(coro: Coroutine[Any, Any, T]) -> T:
    """Run one store operation to completion from a synchronous command (on a thread of its own
    when the caller already runs an event loop, as a test calling `main` does)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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
    clock = clock_from_env(env)
    if settings.fleet:
        return flush_fleet_once(args, settings, env, clock)
    store = open_store(settings, clock=clock)
    try:
        if args.final:  # finish a dead task's file: seal its open hour as SIGTERM would have
            _await(store.seal_through(hour_start(clock.now()) + HOUR_S, final=True))
        flusher = Flusher(store, metering_client(settings, env), settings, clock)
        summary = _await(flusher.drain(deadline_s=args.timeout))
    finally:
        store.close()
    out = summary.as_dict()
    view = open_view(settings)
    out["open_buckets"] = view.open_buckets()
    left = view.left_behind(clock.now())
    if args.final and left:  # the file is about to be thrown away: say what it still holds
        out["left_behind"] = left
        structlog.get_logger("sidecar.cli").error(
            "usage_left_behind", **left, note="this file still holds unsent usage; keep it until that is resolved")
    print(json.dumps(out, sort_keys=True))
    return 1 if (summary.failed or (args.final and left)) and not settings.dry_run else 0


def flush_fleet_once(args: argparse.Namespace, settings: Settings, env: Mapping[str, str], clock: Clock) -> int:
    """`flush --once [--final]` with SIDECAR_FLEET_URL: the fleet's store sends (see fleet.flush_fleet)."""
    from sidecar.fleet import flush_fleet

    local = open_store(settings, clock=clock) if settings.db_path.exists() else None
    try:
        summary, left = _await(flush_fleet(settings, metering_client(settings, env), clock, local=local,
                                           final=args.final, deadline_s=args.timeout))
    finally:
        if local is not None:
            local.close()
    out = {**summary.as_dict(), "fleet": True}
    if left:
        out["left_behind"] = left
        structlog.get_logger("sidecar.cli").error("usage_left_behind", **left)
    print(json.dumps(out, sort_keys=True))
    return 1 if (summary.failed or left) and not settings.dry_run else 0


def cmd_replay(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Re-drive rejected/conflict/expired records, and/or import events from an NDJSON spool file."""
    settings = _settings(args, env)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    if not args.state and not args.spool:
        raise BadArgument("give --state and/or --spool")
    clock = SystemClock()
    if settings.fleet and args.state:
        raise BadArgument("--state: replaying records is not available in fleet mode yet (the fleet's records"
                          " live in PostgreSQL); --spool imports events into this member's file, which ships them")
    store = open_store(settings, clock=clock, owner=False)
    out: dict[str, Any] = {}
    try:
        if args.state:
            try:
                out["records"] = _await(store.replay(states=args.state, customer=args.customer,
                                                          rename=dict(args.dimension or [])))
            except ValueError as exc:
                raise BadArgument(str(exc)) from None
        if args.spool:
            out["spool"] = _await(import_spool(store, Path(args.spool), settings, clock=clock))
    finally:
        store.close()
    print(json.dumps(out, sort_keys=True))
    return 1 if out.get("spool", {}).get("rejected") else 0


def cmd_release(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """An operator's decision: send (or discard) held records, move parked usage into a dimension,
    or give up a tenant's unmapped usage."""
    settings = _settings(args, env)
    logs.configure(level=settings.log_level, fmt=settings.log_format)
    pairs: list[str] = args.dimension or []
    rename: dict[str, str] = {}
    if args.state == BucketState.UNMAPPED:
        if not args.discard or not args.customer or not args.customer.startswith(Scheme.TENANT):
            raise BadArgument("--state unmapped: give --customer tenant:NAME and --discard (map the tenant instead"
                              " with PUT /v1/customers/NAME to bill it)")
    elif args.state == ParkedState.UNCONFIGURED:
        if not pairs or any("=" not in p for p in pairs):
            raise BadArgument("--dimension: with --state unconfigured give OLD=NEW (repeatable): the parked "
                              "dimension and the configured one to bill it as")
        if args.record is not None or args.discard:
            raise BadArgument("--record/--discard: only with --state held")
        try:
            rename = dict(rename_pair(p) for p in pairs)
        except argparse.ArgumentTypeError as exc:
            raise BadArgument(f"--dimension: {exc}") from None
    elif any("=" in p for p in pairs) or len(pairs) > 1:
        raise BadArgument("--dimension: with --state held give one dimension NAME to filter on")
    if settings.fleet:
        return release_in_fleet(args, settings, pairs)
    store = open_store(settings, clock=SystemClock(), owner=False)
    try:
        if args.state == BucketState.UNMAPPED:
            out = {"discarded": _await(store.discard_unmapped(customer=args.customer))}
        elif args.state == RecordState.HELD:
            n = _await(store.release_held(customer=args.customer, dimension=pairs[0] if pairs else None,
                                               record_id=args.record, discard=args.discard))
            out = {"discarded" if args.discard else "released": n}
        else:
            try:
                out = {"released": _await(store.release_parked(rename=rename, customer=args.customer))}
            except ValueError as exc:
                raise BadArgument(str(exc)) from None
    finally:
        store.close()
    print(json.dumps(out, sort_keys=True))
    return 0


def release_in_fleet(args: argparse.Namespace, settings: Settings, pairs: list[str]) -> int:
    """`release --state held` with SIDECAR_FLEET_URL: the fleet's held records (PostgreSQL)."""
    if args.state != RecordState.HELD:
        raise BadArgument(f"--state {args.state}: fleet mode holds such usage as `held` records;"
                          " use --state held")
    from sidecar.fleet import member_id_for
    from sidecar.store.pg import FleetStore

    async def run() -> int:
        assert settings.fleet_url is not None
        fleet = await FleetStore.open(settings.fleet_url, settings=settings, clock=SystemClock(),
                                      member_id=f"cli-{member_id_for(settings)}")
        try:
            return await fleet.release_held(customer=args.customer, dimension=pairs[0] if pairs else None,
                                            record_id=args.record, discard=args.discard)
        finally:
            await fleet.close()

    n = _await(run())
    print(json.dumps({"discarded" if args.discard else "released": n, "fleet": True}, sort_keys=True))
    return 0


async def import_spool(store: MeteringStore, path: Path, settings: Settings, *, clock: Clock) -> dict[str, int]:
    """Ingest an NDJSON spool file 1,000 lines at a time; duplicates of stored events count once."""
    counts = {"accepted": 0, "duplicates": 0, "rejected": 0}
    chunk: list[tuple[int, bytes]] = []  # (line number, line) of non-blank lines

    async def ingest() -> None:
        items = parse_body(b"\n".join(line for _, line in chunk), NDJSON_TYPES[0])
        valid, rejected = check_items(items, now=clock.now(), max_age_s=settings.max_event_age_s,
                                      max_future_s=settings.max_future_s)
        for r in rejected:
            print(f"{path}:{chunk[r['index']][0]}: {r['error']}", file=sys.stderr)
        counts["rejected"] += len(rejected)
        if valid:
            res = await store.ingest(valid)
            counts["accepted"] += res.accepted
            counts["duplicates"] += res.duplicates
        chunk.clear()

    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                chunk.append((lineno, line.rstrip(b"\r\n")))
            if len(chunk) >= 1000:
                await ingest()
    if chunk:
        await ingest()
    return counts


def cmd_migrate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Apply pending schema migrations to the database file."""
    settings = _settings(args, env)
    where, applied = migrate_store(settings)
    print(f"{where}: applied {', '.join(applied)}" if applied else f"{where}: up to date")
    return 0


USAGE_COLUMNS = ("hour", "customer", "dimension", "state", "events", "raw", "carried_in",
                 "quantity", "remainder", "attempts", "aws_status", "last_error", "hold_rule")


def cmd_usage(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Print usage straight from the database file, or in fleet mode from the fleet's PostgreSQL
    with every member (works while the daemon is down)."""
    settings = _settings(args, env)
    filt = UsageFilter(customer=args.customer, dimension=args.dimension, state=args.state,
                                 since=args.since, until=args.until)
    view = open_view(settings)
    data = view.usage(filt, limit=args.limit)
    rows = [present_row(r) for r in data["rows"]]
    totals = data["totals"]
    parked = [present_row(r) for r in data["parked"]]
    now = SystemClock().now()
    subscriptions = [present_subscription(r, now=now) for r in data.get("subscriptions", [])]
    # Fleet mode: every member with its heartbeat age and unshipped backlog, from PostgreSQL.
    members = view.health(now).get("members", []) if settings.fleet else []
    if args.json:
        out: dict[str, Any] = {"rows": rows, "totals": totals, "parked": parked, "subscriptions": subscriptions}
        if settings.fleet:
            out["members"] = members
        json.dump(out, sys.stdout, indent=2, default=str)
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
    for p in parked:
        print(f"{p['state'].upper()} (parked, not sent) {p['customer']} {p['dimension']}: raw={p['raw']} "
              f"unit_raw={p['unit_raw']} events={p['events']} from hour {p['hour']}: {p['reason']}")
    for sub in subscriptions:
        times = " ".join(f"{k}={sub[k]}" for k in ("subscribed_at", "end_began_at", "ended_at", "failed_at")
                         if sub.get(k))
        flag = "  FINAL USAGE OVERDUE" if sub["final_usage_overdue"] else ""
        print(f"subscription {sub['subscriber']}: {sub['state']} {times} parked_events={sub['parked_events']}"
              f" unaccepted_records={sub['unaccepted_records']}{flag}")
    for m in members:
        state = "stopped" if m["stopped"] else f"heartbeat {m['heartbeat_age_s']:.0f} s ago"
        print(f"member {m['member_id']}: {state}, {m['backlog']} delta(s) not shipped")
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


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr, `sidecar <subcommand>: <message>`, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {' '.join(message.splitlines())}\n")


# Types for argparse: each returns the value or raises ArgumentTypeError with the rule, which
# argparse prefixes with the option's name ("argument --limit: must be ...").
MAX_TIMEOUT_S = 86400.0
SQLITE_MAX_INT = 2**63 - 1


def non_empty(text: str) -> str:
    """Any text with something other than whitespace in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def customer_filter(text: str) -> str:
    """A customer filter (matched exactly by store.queries.customer_clause)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "must not be empty; give a customer key (identifier:ID, account:ACCOUNT/LICENSE_ARN, tenant:NAME),"
            " a 12-digit AWS account id or a customer identifier")
    return text


def timeout_seconds(text: str) -> float:
    """A number of seconds > 0 (and at most a day: sockets refuse absurd timeouts)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0 and <= {MAX_TIMEOUT_S:g}, got {text!r}")
    return value


def row_limit(text: str) -> int:
    """A whole number >= 1 (values beyond SQLite's integers mean "no limit")."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return min(value, SQLITE_MAX_INT)


def time_value(text: str) -> int:
    """A time, as epoch seconds or RFC 3339 (see sidecar.when)."""
    try:
        return parse_when("time", text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{WHEN_RULE}, got {text!r}") from None


def rename_pair(text: str) -> tuple[str, str]:
    """OLD=NEW: two dimension names."""
    old, sep, new = text.partition("=")
    if not sep or not DIMENSION_NAME.match(old) or not DIMENSION_NAME.match(new):
        raise argparse.ArgumentTypeError(f"must be OLD=NEW, two dimension names (got {text!r})")
    return old, new


def readable_file(text: str) -> str:
    """The path of a file this process can open for reading."""
    try:
        with open(text, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text!r}: {exc.strerror or exc}") from None
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand; test_docs checks each is in the README."""
    parser = ArgumentParser(
        prog="sidecar", description="Metering sidecar for vLLM on AWS Marketplace."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--db", type=non_empty, help="database file (default: SIDECAR_DB or ./sidecar.db)")
        return p

    p = add("serve", cmd_serve, "Run the sidecar daemon (HTTP API, sealing and flushing).")
    p.add_argument("--dry-run", action="store_true", help="log BatchMeterUsage requests instead of sending them")
    p = add("flush", cmd_flush, "Seal, freeze and send everything due now, then exit.")
    p.add_argument("--once", action="store_true", required=True, help="one drain, then exit (required)")
    p.add_argument("--dry-run", action="store_true", help="log the exact requests, send and mark nothing")
    p.add_argument("--timeout", type=timeout_seconds, default=60.0,
                   help="give up waiting for retries after this many seconds")
    p.add_argument("--final", action="store_true",
                   help="also seal the open hour and settle remainders, as SIGTERM does (a dead task's file)")
    p = add("replay", cmd_replay, "Re-drive rejected/conflict/expired records, or import an NDJSON spool file.")
    p.add_argument("--state", action="append", choices=REPLAYABLE,
                   help="re-drive records in this state (repeatable)")
    p.add_argument("--customer", type=customer_filter,
                   help="only this customer: its key, a 12-digit AWS account id or a customer identifier (exact)")
    p.add_argument("--spool", type=readable_file,
                   help="NDJSON file of usage events to import (e.g. the vLLM reporter's spool)")
    p.add_argument("--dimension", action="append", type=rename_pair, metavar="OLD=NEW",
                   help="rebuild or carry records of dimension OLD as the configured NEW (repeatable)")
    p = add("release", cmd_release, "Send (or discard) records a guardrail held, or bill parked usage.")
    p.add_argument("--state", required=True, choices=RELEASABLE,
                   help="held: records over a guardrail; unconfigured: usage parked for want of a dimension;"
                        " unmapped: a tenant's usage nobody should pay for (with --discard)")
    p.add_argument("--customer", type=customer_filter,
                   help="only this customer: its key, a 12-digit AWS account id or a customer identifier (exact)")
    p.add_argument("--dimension", action="append", type=non_empty,
                   help="held: only this dimension; unconfigured: OLD=NEW (repeatable)")
    p.add_argument("--record", type=int, help="held: only this record id (as /usage shows it)")
    p.add_argument("--discard", action="store_true",
                   help="held: do not send; end the records as `discarded` (visible, never billed); "
                        "unmapped: give the tenant's unmapped usage up (`discarded`)")
    add("migrate", cmd_migrate, "Apply pending schema migrations to the database.")
    p = add("usage", cmd_usage, "Show usage buckets read straight from the database file.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--customer", type=customer_filter,
                   help="only this customer: its key, a 12-digit AWS account id or a customer identifier (exact)")
    p.add_argument("--dimension", help="only this dimension")
    p.add_argument("--state", help="only buckets in this state")
    p.add_argument("--from", dest="since", type=time_value, help="hours from this time (RFC 3339 or epoch seconds)")
    p.add_argument("--to", dest="until", type=time_value, help="hours before this time (RFC 3339 or epoch seconds)")
    p.add_argument("--limit", type=row_limit, default=5000, help="at most this many rows (default 5000)")
    p = add("check", cmd_check, "Exit 0 if the running daemon is healthy (container health check).")
    p.add_argument("--timeout", type=timeout_seconds, default=3.0, help="seconds to wait for /healthz")

    from sidecar.simulator import cli as simulator_cli  # argparse only: the server loads in run()

    p = sub.add_parser("simulate-marketplace", help="Run a local AWS Marketplace Metering simulator.",
                       description="Run a local AWS Marketplace Metering simulator.")
    simulator_cli.add_arguments(p)
    p.set_defaults(fn=cmd_simulate_marketplace)
    return parser


def cmd_simulate_marketplace(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run the local Marketplace simulator; the seconds its own parser takes as any float are checked here."""
    from sidecar.simulator import cli as simulator_cli

    if not (math.isfinite(args.window_s) and args.window_s > 0):
        raise BadArgument(f"--window-s: must be a number of seconds > 0, got {args.window_s!r}")
    if not (math.isfinite(args.latency_s) and args.latency_s >= 0):
        raise BadArgument(f"--latency-s: must be a number of seconds >= 0, got {args.latency_s!r}")
    return simulator_cli.run(args)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; a bad one ends in one line on stderr and SystemExit(2)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse itself would blame "sidecar", not the subcommand they were given to
        parser.exit(2, f"{parser.prog} {args.command}: unrecognized arguments: {' '.join(extra)}\n")
    return args


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Entry point of the `sidecar` console script."""
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse has printed its one line (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    environ = os.environ if env is None else env
    try:
        return int(args.fn(args, environ))
    except BadArgument as exc:
        print(f"sidecar {args.command}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except StoreLocked as exc:
        print(f"sidecar {args.command}: {exc}", file=sys.stderr)
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


