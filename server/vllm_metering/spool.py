"""The on-disk spool: usage events the sidecar has not acknowledged yet, as NDJSON, replayed in order.

Files, all next to METERING_SPOOL_PATH (`spool.ndjson` below):

- `spool.ndjson`: appended to (write + fsync per batch) while the sidecar is down or the queue is full.
- `spool.ndjson.replaying`: the spool being replayed. Replay starts by renaming the spool to this
  name, so new events go to a fresh file; it is deleted only after the sidecar acknowledged every line.
  A crash during replay leaves it in place and it is sent again from its start on the next run, which
  is safe because the sidecar de-duplicates by event_id.
- `spool.ndjson.rejected`: events the sidecar refused as invalid, with its reason, for an operator.
- `spool.ndjson.lock`, `spool.ndjson.replay.lock`: flock(2) files, so several vLLM API-server
  processes can share one spool path (appends and the rename are serialised; one process replays).

The spool and its `.replaying` file together never exceed `max_bytes`; what does not fit is dropped
and reported to the caller, which logs it loudly. Every method here is blocking file I/O: the
reporter calls them from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class AppendResult:
    """How many lines an append wrote and how many it dropped for lack of room."""

    written: int
    dropped: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class ReplayBatch:
    """A run of spooled lines to send; `commit` it once the sidecar acknowledged them."""

    lines: list[bytes]
    end_offset: int
    at_eof: bool
    corrupt: int = 0
    event_ids: list[str] = field(default_factory=list)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def event_id_of(line: bytes) -> str | None:
    """The event_id of one spooled line, or None when the line is not a usage event object."""
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict):
        return None
    event_id = value.get("event_id")
    return event_id if isinstance(event_id, str) and event_id else None


class Spool:
    """An append-only NDJSON file with a size cap and crash-safe, acknowledged replay."""

    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.replaying_path = path.with_name(path.name + ".replaying")
        self.rejected_path = path.with_name(path.name + ".rejected")
        self._lock_path = path.with_name(path.name + ".lock")
        self._replay_lock_path = path.with_name(path.name + ".replay.lock")
        self._replay_lock_fd: int | None = None
        self._offset = 0

    def size_bytes(self) -> int:
        """Bytes the spool occupies (new appends plus the file being replayed)."""
        return _size(self.path) + _size(self.replaying_path)

    def has_data(self) -> bool:
        """Whether anything is waiting to be replayed."""
        return self.size_bytes() > 0

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def append(self, lines: Sequence[bytes]) -> AppendResult:
        """Append whole lines (JSON objects without newlines), flushed and fsynced, up to the cap."""
        if not lines:
            return AppendResult(0, 0, self.size_bytes())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            used = self.size_bytes()
            fitting = _fitting(lines, self.max_bytes - used)
            if fitting:
                _append_lines(self.path, lines[:fitting])
                used = self.size_bytes()
        return AppendResult(fitting, len(lines) - fitting, used)

    def append_rejected(self, records: Sequence[tuple[bytes, str]]) -> int:
        """Keep events the sidecar refused, with its reason; returns how many did not fit."""
        lines = [b'{"error":' + json.dumps(reason).encode() + b',"event":' + line + b"}" for line, reason in records]
        if not lines:
            return 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._exclusive():
            fitting = _fitting(lines, self.max_bytes - _size(self.rejected_path))
            if fitting:
                _append_lines(self.rejected_path, lines[:fitting])
        return len(lines) - fitting

    def next_batch(self, *, max_events: int, max_bytes: int) -> ReplayBatch | None:
        """The next lines to replay, or None when there is nothing (or another process replays)."""
        if self._replay_lock_fd is None:
            if not self.has_data():
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._replay_lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    return None  # another process is replaying this spool
                raise
            self._replay_lock_fd = fd
            self._offset = 0
        if not self.replaying_path.exists():
            with self._exclusive():
                if _size(self.path) == 0:
                    self.release()
                    return None
                os.replace(self.path, self.replaying_path)
                _fsync_dir(self.path.parent)
            self._offset = 0
        return self._read(max_events=max_events, max_bytes=max_bytes)

    def _read(self, *, max_events: int, max_bytes: int) -> ReplayBatch:
        lines: list[bytes] = []
        ids: list[str] = []
        corrupt = 0
        size = 2
        offset = self._offset
        with open(self.replaying_path, "rb") as handle:
            total = os.fstat(handle.fileno()).st_size
            handle.seek(offset)
            while len(lines) < max_events:
                raw = handle.readline()
                if not raw:
                    break
                line = raw.strip()
                if lines and size + len(line) + 1 > max_bytes:
                    break
                offset += len(raw)
                if not line:
                    continue
                event_id = event_id_of(line)
                if event_id is None:
                    corrupt += 1  # e.g. a line torn by a crash mid-write
                    continue
                lines.append(line)
                ids.append(event_id)
                size += len(line) + 1
        return ReplayBatch(lines, offset, offset >= total, corrupt, ids)

    def commit(self, batch: ReplayBatch) -> None:
        """Record that `batch` was acknowledged; deletes the replay file once it is all done."""
        self._offset = batch.end_offset
        if batch.at_eof:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.replaying_path)
            _fsync_dir(self.path.parent)
            self._offset = 0
            self.release()

    def release(self) -> None:
        """Give up the replay lock (another process may then replay)."""
        if self._replay_lock_fd is not None:
            os.close(self._replay_lock_fd)
            self._replay_lock_fd = None


def _fitting(lines: Sequence[bytes], room: int) -> int:
    """How many leading lines fit in `room` bytes (each line costs its length plus a newline)."""
    need = 0
    for count, line in enumerate(lines):
        need += len(line) + 1
        if need > room:
            return count
    return len(lines)


def _append_lines(path: Path, lines: Sequence[bytes]) -> None:
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        # A previous writer may have died mid-line; never glue a new event onto its fragment.
        prefix = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
        _write_all(fd, prefix + b"\n".join(lines) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)
