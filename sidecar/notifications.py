"""The consumer of AWS Marketplace's subscription notifications (SIDECAR_SUBSCRIPTION_QUEUE_URL).

One consumer per store: the single-file daemon, or the fleet's lease holder. It long-polls the SQS
queue, parses each message (`sidecar.subscriptions`), applies it to the store in one transaction
and deletes the message only after that commit: a consumer killed in between sees the message
again, and applying it again changes nothing. A message it cannot parse, or one for another
product, is logged and left on the queue, so the queue's redrive policy moves it to the
dead-letter queue. When an agreement begins to end, the customer's usage is sealed and frozen in
that transaction and the flusher runs at once: that customer's records go before every other.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, cast

import structlog

from sidecar.clock import Clock
from sidecar.config import Settings
from sidecar.flush import Flusher
from sidecar.marketplace import QueueMessage
from sidecar.store.protocol import SendingStore
from sidecar.subscriptions import UnparseableMessage, parse_message

log = structlog.get_logger("sidecar.notifications")

MAX_ERROR_WAIT_S = 30.0
FINAL_USAGE_CALLS = 4  # calls of 25 records: far more than an ending customer's records


T = TypeVar("T")


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call (a long poll of up to 20 s) on a daemon thread of its own: a stopping
    daemon abandons it (its messages become visible again) instead of waiting for it to return."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():
            return  # the caller gave up (shutdown)
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(cast(T, result))

    def run() -> None:
        try:
            result, error = fn(), None
        except BaseException as exc:  # handed to the awaiting task, which decides
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="subscription-queue", daemon=True).start()
    return await done


class QueueApi(Protocol):
    """What the consumer needs of a queue (`marketplace.SubscriptionQueue`)."""

    def receive(self, *, max_messages: int = 10) -> list[QueueMessage]: ...

    def delete(self, receipt_handle: str) -> None: ...


class NotificationConsumer:
    """Applies the queue's notifications to a store; never two at once for one store."""

    def __init__(self, queue: QueueApi, store: SendingStore, flusher: Flusher, settings: Settings,
                 clock: Clock) -> None:
        self.queue = queue
        self.store = store
        self.flusher = flusher
        self.settings = settings
        self.clock = clock
        self.messages: Counter[str] = Counter()  # by result: applied, duplicate, unparseable, other_product
        self.error: str | None = None  # the last polling failure, cleared by the next success
        self.last_poll_at: float | None = None
        self.final_usage_s: float | None = None  # the last end's time from the message to AWS's answer

    async def poll_once(self) -> int:
        """Receive one batch (waiting up to the long poll) and handle it; returns messages received."""
        batch = await _in_daemon_thread(self.queue.receive)
        self.last_poll_at = self.clock.now()
        ending_since: float | None = None
        for message in batch:
            started = time.monotonic()
            if await self._handle(message) and ending_since is None:
                ending_since = started
        if ending_since is not None:
            # The ending customers' records are claimed first; a backlog of others waits for the
            # flush loop, so the next notification is not kept waiting behind it.
            summary = await self.flusher.flush_once(max_calls=FINAL_USAGE_CALLS)
            took = time.monotonic() - ending_since
            if summary.outcomes["sent"]:  # AWS accepted (the first call carries the ending customers' records)
                self.final_usage_s = took
            log.warning("final_usage_sent" if summary.outcomes["sent"] else "final_usage_not_sent_yet",
                        seconds=round(took, 3), calls=summary.calls, outcomes=dict(summary.outcomes),
                        pending=summary.pending)
        return len(batch)

    async def _handle(self, message: QueueMessage) -> bool:
        """Apply one message and delete it; True when it sealed final usage to send now."""
        try:
            notice = parse_message(message.body, sent_at=message.sent_at)
        except UnparseableMessage as exc:
            self.messages["unparseable"] += 1
            log.error("subscription_message_unparseable", message_id=message.message_id, error=str(exc),
                      note="left on the queue: its redrive policy moves it to the dead-letter queue")
            return False
        # SNS notifications and licence events name the product; the docs' agreement events do not.
        theirs, mine = notice.product_code, self.settings.product_code
        if theirs and mine and theirs != mine:
            self.messages["other_product"] += 1
            log.error("subscription_message_other_product", message_id=message.message_id, product=theirs,
                      configured=mine, note="left on the queue: one queue per product; its redrive policy"
                                            " moves it to the dead-letter queue")
            return False
        result = await self.store.apply_notice(notice, now=self.clock.now())
        await asyncio.to_thread(self.queue.delete, message.receipt_handle)  # only after the commit
        self.messages["applied" if result.changed else "duplicate"] += 1
        return result.frozen > 0 or result.sealed > 0

    async def run(self, stop: asyncio.Event, *, active: Callable[[], bool] = lambda: True) -> None:
        """Poll until told to stop, while `active()` (a fleet member: while it holds the lease).
        Failures (the queue unreachable, the store refusing) back off up to MAX_ERROR_WAIT_S."""
        failures = 0
        while not stop.is_set():
            wait = 0.0
            if not active():
                wait = 1.0
            else:
                try:
                    await self.poll_once()
                    if self.error is not None:
                        log.info("subscription_queue_resumed")
                    self.error, failures = None, 0
                except Exception as exc:
                    failures += 1
                    if self.error is None:
                        log.warning("subscription_queue_failed", error=f"{type(exc).__name__}: {exc}",
                                    note="messages stay on the queue and are applied once it works again")
                    self.error = f"{type(exc).__name__}: {exc}"
                    wait = min(MAX_ERROR_WAIT_S, 0.5 * 2 ** min(failures, 6))
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)

    def health(self) -> dict[str, Any]:
        """The consumer's figures for /healthz."""
        return {"messages": dict(self.messages), "error": self.error, "last_poll_at": self.last_poll_at,
                "final_usage_s": self.final_usage_s}
