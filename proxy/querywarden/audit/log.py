"""The durable audit log: append-only, hash-chained JSON-lines segments.

Layout of the directory (the record contract is in ``docs/audit.md``)::

    audit-00000000000000000001.jsonl   records 1 .. n       (closed segment)
    audit-<n+1, 20 digits>.jsonl       records n+1 ..       (the current segment)
    HEAD                               {"seq", "hash", "segment"} of the last record known durable

Every record is one line: ``{"seq", "ts", "type", "prev", ...fields}`` where ``prev`` is the
SHA-256 of the previous line's bytes (64 zeros for the very first record), so the chain runs
across segments. ``HEAD`` is rewritten atomically after each fsync; it protects the tail, which
the chain alone cannot (cutting the last records leaves a valid, shorter chain).

One :class:`AuditLog` writes a directory (an exclusive ``flock`` on the directory enforces it);
any number of readers (:func:`read_records`, :func:`follow`, :func:`verify`) may read it while it
is written: they skip a last line that has no newline yet.

Errors: :class:`AuditWriteError` (a record could not be written: the caller refuses the
statement) and :class:`AuditFormatError` (a reader met a complete line that is not a record).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

__all__ = [
    "GENESIS_HASH",
    "HEAD_FILE",
    "AuditFormatError",
    "AuditLog",
    "AuditWriteError",
    "VerifyReport",
    "follow",
    "read_records",
    "record_hash",
    "segment_name",
    "verify",
]

logger = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
"""The ``prev`` of the first record ever written to a log."""

HEAD_FILE = "HEAD"
_HEAD_TMP = "HEAD.tmp"
_SEGMENT_RE = re.compile(r"^audit-(\d{20})\.jsonl$")
_RESERVED = frozenset({"seq", "ts", "type", "prev"})
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
# ensure_ascii: a line is pure ASCII, so no reader can split it on a Unicode line separator
# (U+2028) and lone surrogates from undecodable client bytes still serialize.
_ENCODER = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False)
_READ_CHUNK = 64 * 1024


class AuditWriteError(Exception):
    """A record could not be written: disk full, I/O error, unusable directory, closed log.

    The log stays consistent (no partial line is left behind), so the caller may refuse the
    statement and try again with the next one.
    """


class AuditFormatError(ValueError):
    """A complete line of a segment is not a valid record (the log was damaged or edited)."""


def segment_name(first_seq: int) -> str:
    """The file name of the segment whose first record is ``first_seq``."""
    return f"audit-{first_seq:020d}.jsonl"


def encode_fields(fields: dict[str, Any]) -> str:
    """A record's fields as the JSON object text the log writes: compact, ASCII only.

    orjson, several times faster than json's C encoder on the gateway's records, when its
    output is ASCII; otherwise (non-ASCII text, which the log escapes as JSON ``u`` escapes so
    that no reader splits a line on a Unicode line separator; or anything orjson
    refuses) the reference encoder, whose output it then is exactly. orjson writes NaN
    and infinities as null where the reference refuses them: callers pass finite
    numbers only (:meth:`AuditLog.append_record`).
    """
    try:
        data = orjson.dumps(fields)
    except TypeError:  # orjson.JSONEncodeError: a non-str key, an unknown type ...
        return _ENCODER.encode(fields)
    if data.isascii():
        return data.decode("ascii")
    return _ENCODER.encode(fields)


def record_hash(line: bytes) -> str:
    """The hash of a record: hex SHA-256 of its line, without the trailing newline."""
    return hashlib.sha256(line).hexdigest()


@functools.lru_cache(maxsize=4)
def _second_prefix(second: int) -> str:
    # Records come many per second, and strftime costs more than the rest of a header.
    return datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _format_ts(epoch: float) -> str:
    """``epoch`` as ``2026-11-24T08:12:56.123456Z`` (UTC, microseconds, rounded)."""
    second, micros = divmod(round(epoch * 1_000_000), 1_000_000)
    return f"{_second_prefix(second)}.{micros:06d}Z"


def _parse_ts(text: str) -> float:
    return datetime.strptime(text, _TS_FORMAT).replace(tzinfo=UTC).timestamp()


def _list_segments(directory: Path) -> list[tuple[int, str]]:
    """``(first seq, file name)`` of every segment, oldest first."""
    found: list[tuple[int, str]] = []
    for name in os.listdir(directory):
        match = _SEGMENT_RE.match(name)
        if match:
            found.append((int(match.group(1)), name))
    found.sort()
    return found


def _parse_record(line: bytes) -> dict[str, Any]:
    """A line (without newline) as a record; raises ValueError when it is not one."""
    record = json.loads(line)
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError("no valid seq")
    for key in ("ts", "type", "prev"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"no valid {key}")
    return record


def _tail_of_file(fd: int, size: int) -> tuple[bytes, int]:
    """The last complete line of an open file (without newline) and the offset after it.

    Reads backwards in chunks, so finding the tail of a large segment costs one chunk.
    Returns ``(b"", 0)`` when the file holds no complete line; the offset tells where the
    complete part ends (bytes after it are a torn line).
    """
    end = size
    buffer = b""
    # First find the last newline: everything after it is torn.
    cut: int | None = None
    while end > 0 and cut is None:
        start = max(0, end - _READ_CHUNK)
        chunk = os.pread(fd, end - start, start)
        buffer = chunk + buffer
        position = chunk.rfind(b"\n")
        if position >= 0:
            cut = start + position + 1
        end = start
    if cut is None:
        return b"", 0
    # Then the newline before it, which starts the last complete line.
    line_end = cut - 1
    buffer_start = end
    while True:
        relative = buffer.rfind(b"\n", 0, line_end - buffer_start)
        if relative >= 0:
            return buffer[relative + 1 : line_end - buffer_start], cut
        if buffer_start == 0:
            return buffer[: line_end - buffer_start], cut
        start = max(0, buffer_start - _READ_CHUNK)
        buffer = os.pread(fd, buffer_start - start, start) + buffer
        buffer_start = start


def _last_line(path: Path) -> bytes:
    """The last complete line of a file (b"" when none)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _tail_of_file(fd, os.fstat(fd).st_size)[0]
    finally:
        os.close(fd)


def _first_line(path: Path) -> bytes:
    with path.open("rb") as handle:
        line = handle.readline()
    return line[:-1] if line.endswith(b"\n") else b""


def _read_head(directory: Path) -> dict[str, Any] | None:
    """HEAD as a dict, None when absent; raises ValueError when it is unreadable."""
    try:
        text = (directory / HEAD_FILE).read_bytes()
    except FileNotFoundError:
        return None
    head = json.loads(text)
    if (
        not isinstance(head, dict)
        or not isinstance(head.get("seq"), int)
        or not isinstance(head.get("hash"), str)
        or not isinstance(head.get("segment"), str)
    ):
        raise ValueError("HEAD is not {seq, hash, segment}")
    return head


def _find_record(path: Path, seq: int) -> bytes | None:
    """The line of record ``seq`` in a segment, None when it is not there."""
    prefix = f'{{"seq":{seq},'.encode()
    try:
        with path.open("rb") as handle:
            for raw in handle:
                if raw.startswith(prefix) and raw.endswith(b"\n"):
                    return raw[:-1]
    except FileNotFoundError:
        return None
    return None


class AuditLog:
    """The writer of one audit directory.

    ``append`` writes each record with a single ``write`` on an ``O_APPEND`` descriptor, so a
    record is in the operating system (and survives a crash of the gateway) when it returns.
    Durability on disk depends on ``fsync``:

    - ``"always"``: ``append`` fsyncs before it returns.
    - ``"batch"``: a background thread fsyncs at most ``fsync_interval`` seconds after a
      record was written, sooner once ``fsync_max_records`` are pending.

    In both modes the thread rewrites ``HEAD`` after the fsync. Segments rotate inside
    ``append`` when the next record would make the current one exceed ``max_segment_bytes``
    or when its first record is older than ``max_segment_age``; a rotation makes the thread
    delete the oldest segments whose newest record is older than ``retention`` (never the
    segment HEAD points into, nor anything after it). All times come from ``clock``.

    Thread-safe. One writer per directory: a second ``AuditLog`` on the same directory (in
    any process) raises :class:`AuditWriteError` until the first is closed.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: Literal["always", "batch"] = "batch",
        fsync_interval: float = 0.05,
        fsync_max_records: int = 1000,
        max_segment_bytes: int = 64 * 1024 * 1024,
        max_segment_age: float = 3600.0,
        retention: float = 30 * 86400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open or create ``directory`` and recover the chain from its newest record.

        A torn last line (a crash in the middle of a write: never acknowledged) is cut off
        and logged. Raises :class:`AuditWriteError` when the directory cannot be used, or when
        the log does not end where HEAD says (its tail was removed): appending would then
        overwrite the evidence, so the operator must look first (``querywarden audit verify``).
        Raises ValueError for an unknown ``fsync`` mode or a non-positive interval or size.
        """
        if fsync not in ("always", "batch"):
            raise ValueError(f"fsync must be 'always' or 'batch', not {fsync!r}")
        if fsync_interval <= 0 or fsync_max_records < 1 or max_segment_bytes < 1:
            raise ValueError("fsync_interval, fsync_max_records and max_segment_bytes must be > 0")
        self.directory = Path(directory)
        self._always = fsync == "always"
        self._fsync_interval = fsync_interval
        self._fsync_max_records = fsync_max_records
        self._max_segment_bytes = max_segment_bytes
        self._max_segment_age = max_segment_age
        self._retention = retention
        self._clock = clock

        # _lock guards the write state below; _sync_lock serializes fsync + HEAD + retention
        # so that HEAD only moves forward. Order: _sync_lock, then _lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sync_lock = threading.Lock()

        self._dir_fd = -1
        self._fd: int | None = None
        self._segment = ""  # current segment's file name
        self._size = 0  # bytes of complete records in the current segment
        self._segment_started: float | None = None  # ts of the current segment's first record
        self._last_seq = 0
        self._last_hash = GENESIS_HASH
        self._last_segment = ""  # the segment holding record _last_seq
        self._synced_seq = 0  # fsynced up to here
        self._head_seq = 0  # HEAD says this (guarded by _sync_lock for writing)
        self._head_segment: str | None = None
        self._dirty_since = 0.0  # monotonic time since which records wait for HEAD
        self._sync_error: OSError | None = None
        self._retention_due = False
        self._closed = False
        self._stopping = False
        # Deferred records (append_deferred): in the chain, not yet in the file. They go
        # out with the next record written, or at the next sync, in the same write.
        self._deferred: list[bytes] = []
        self._deferred_bytes = 0
        #: (seq, hash, segment) before the first deferred record: where the chain goes
        #: back to if writing them fails.
        self._deferred_base: tuple[int, str, str] | None = None

        try:
            self._open()
        except OSError as exc:
            self._release()
            raise AuditWriteError(f"audit directory {self.directory} is unusable: {exc}") from exc
        except AuditWriteError:
            self._release()
            raise
        self._thread = threading.Thread(
            target=self._sync_loop, name=f"audit-sync:{self.directory}", daemon=True
        )
        self._thread.start()

    # --- opening and recovery -------------------------------------------------------------

    def _open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self._dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditWriteError(
                f"audit directory {self.directory} is already being written by another AuditLog"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / _HEAD_TMP)  # a HEAD update cut short by a crash

        segments = _list_segments(self.directory)
        if not segments:
            self._create_segment(1)
            self._last_segment = self._segment
        else:
            self._recover(segments)
        self._synced_seq = self._last_seq
        self._check_head()
        # Retention is otherwise only looked at on rotation; a gateway that restarts often
        # might never rotate, so look once at startup too.
        self._retention_due = True
        self._dirty_since = time.monotonic()

    def _recover(self, segments: list[tuple[int, str]]) -> None:
        first_seq, name = segments[-1]
        path = self.directory / name
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        self._fd, self._segment = fd, name
        size = os.fstat(fd).st_size
        last, complete = _tail_of_file(fd, size)
        if complete < size:
            logger.warning(
                "audit: cut off a torn last line of %s (%d bytes at offset %d): a write was "
                "interrupted by a crash; it was never acknowledged",
                path,
                size - complete,
                complete,
            )
            os.ftruncate(fd, complete)
            os.fsync(fd)
        self._size = complete
        if last:
            record = self._recover_record(last, path)
            self._last_seq, self._last_hash, self._last_segment = (
                record["seq"],
                record_hash(last),
                name,
            )
            first = _first_line(path)
            try:
                self._segment_started = _parse_ts(_parse_record(first)["ts"])
            except ValueError:
                self._segment_started = self._clock()
            return
        # The current segment is empty: a rotation whose first write failed, or a log that
        # was opened and closed without records. The chain continues from the segment before.
        if len(segments) == 1:
            if first_seq != 1:
                raise AuditWriteError(
                    f"{path} is empty and no earlier segment exists: the log before seq "
                    f"{first_seq} is missing, so the chain cannot continue"
                )
            self._last_segment = name
            return
        previous = self.directory / segments[-2][1]
        last = _last_line(previous)
        if not last:
            raise AuditWriteError(f"{previous} holds no complete record; cannot continue the chain")
        record = self._recover_record(last, previous)
        if record["seq"] + 1 != first_seq:
            raise AuditWriteError(
                f"{previous} ends at seq {record['seq']} but the next segment is {name}: "
                "the log is inconsistent (run `querywarden audit verify`)"
            )
        self._last_seq, self._last_hash, self._last_segment = (
            record["seq"],
            record_hash(last),
            segments[-2][1],
        )

    @staticmethod
    def _recover_record(line: bytes, path: Path) -> dict[str, Any]:
        try:
            return _parse_record(line)
        except ValueError as exc:
            raise AuditWriteError(
                f"the last record of {path} is not valid ({exc}): the chain cannot continue "
                "(run `querywarden audit verify`)"
            ) from exc

    def _check_head(self) -> None:
        try:
            head = _read_head(self.directory)
        except (ValueError, OSError) as exc:
            # HEAD is only ever replaced atomically, so an unreadable one was edited.
            raise AuditWriteError(
                f"{self.directory / HEAD_FILE} is unreadable ({exc}); "
                "run `querywarden audit verify`"
            ) from exc
        if head is None:
            return
        seq, digest, segment = head["seq"], head["hash"], head["segment"]
        if seq > self._last_seq:
            raise AuditWriteError(
                f"HEAD says seq {seq} is durable but the log in {self.directory} ends at seq "
                f"{self._last_seq}: records were removed. Appending would hide that; run "
                "`querywarden audit verify` and move the directory aside"
            )
        if seq == self._last_seq and segment == self._last_segment:
            matches = digest == self._last_hash  # after a clean close: no scan needed
        else:
            line = _find_record(self.directory / segment, seq)
            matches = line is not None and record_hash(line) == digest
        if not matches:
            raise AuditWriteError(
                f"HEAD says seq {seq} in {segment} hashes to {digest}, but the log does not "
                "hold that record: it was altered. Run `querywarden audit verify` and move the "
                "directory aside"
            )
        self._head_seq, self._head_segment = seq, segment

    def _create_segment(self, first_seq: int) -> None:
        name = segment_name(first_seq)
        path = self.directory / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except FileExistsError:
            # Left empty by an earlier attempt whose directory fsync failed: reuse it. A
            # segment with records is never overwritten.
            if path.stat().st_size != 0:
                raise
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            # The new directory entry must be durable before records in it are called durable.
            os.fsync(self._dir_fd)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._segment, self._size, self._segment_started = fd, name, 0, None

    # --- writing --------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The seq of the newest record written (0 for an empty log)."""
        return self._last_seq

    def append(self, type_: str, **fields: Any) -> int:
        """Write one record and return its seq.

        The record is ``{"seq", "ts", "type", "prev", **fields}``; ``fields`` must be JSON
        values (TypeError/ValueError otherwise, nothing written). Raises
        :class:`AuditWriteError` when the record could not be written; the log is then left
        as it was before the call (deferred records before it, which went in the same
        write, are lost with it: an error is logged).
        """
        return self._append(type_, fields, defer=False)

    def append_deferred(self, type_: str, **fields: Any) -> int:
        """Add a record to the chain now and write it with the next one (or the next sync).

        For records nothing waits on: a statement's result is recorded after the client
        has it, so it is not write-ahead, and riding with the next request record saves a
        ``write`` per statement. It reaches the file within ``fsync_interval`` at the
        latest (the background sync writes what is deferred). In ``always`` mode the
        record is written at once. Raises TypeError/ValueError for bad fields.
        """
        return self._append(type_, fields, defer=not self._always)

    def append_record(self, type_: str, fields: dict[str, Any], *, defer: bool = False) -> int:
        """:meth:`append` (or, deferred, :meth:`append_deferred`) for the gateway's records.

        Their fields hold only finite numbers, so they are encoded with orjson (see
        :func:`encode_fields`).
        """
        return self._append(type_, fields, defer=defer and not self._always, fast=True)

    def _append(
        self, type_: str, fields: dict[str, Any], *, defer: bool, fast: bool = False
    ) -> int:
        if not _RESERVED.isdisjoint(fields):
            raise TypeError(f"append() fields may not set {sorted(_RESERVED & fields.keys())}")
        # Encode outside the lock: records with sampled rows can be large.
        body = encode_fields(fields) if fast else _ENCODER.encode(fields)
        tail = "," + body[1:] if fields else "}"
        type_json = _ENCODER.encode(type_)
        with self._lock:
            if self._closed or self._fd is None:
                raise AuditWriteError(f"the audit log {self.directory} is closed")
            if self._sync_error is not None:
                self._retry_failed_sync()
            now = self._clock()
            seq = self._last_seq + 1
            line = (
                f'{{"seq":{seq},"ts":"{_format_ts(now)}","type":{type_json},'
                f'"prev":"{self._last_hash}"{tail}'
            ).encode("ascii")
            data = line + b"\n"
            if self._size + self._deferred_bytes > 0 and (
                self._size + self._deferred_bytes + len(data) > self._max_segment_bytes
                or (
                    self._segment_started is not None
                    and now - self._segment_started >= self._max_segment_age
                )
            ):
                # What is deferred belongs to the segment being closed.
                self._write_deferred()
                self._rotate(seq)
            if defer:
                if self._deferred_base is None:
                    self._deferred_base = (self._last_seq, self._last_hash, self._last_segment)
                self._deferred.append(data)
                self._deferred_bytes += len(data)
                if self._segment_started is None:
                    self._segment_started = now
                if self._last_seq == self._head_seq:
                    self._dirty_since = time.monotonic()
                    self._cond.notify()
                self._last_seq, self._last_hash, self._last_segment = (
                    seq,
                    record_hash(line),
                    self._segment,
                )
                return seq
            self._write_deferred(then=data)
            if self._always:
                try:
                    os.fsync(self._fd)
                except OSError as exc:
                    # Not on disk, so not acknowledged: take it back to keep the chain true.
                    self._rollback()
                    raise AuditWriteError(f"audit fsync failed: {exc}") from exc
                self._synced_seq = seq
            if self._size == 0 or self._segment_started is None:
                self._segment_started = now
            self._size += len(data)
            if self._last_seq == self._head_seq:
                self._dirty_since = time.monotonic()
                self._cond.notify()
            elif seq - self._synced_seq >= self._fsync_max_records:
                self._cond.notify()
            self._last_seq, self._last_hash, self._last_segment = (
                seq,
                record_hash(line),
                self._segment,
            )
            return seq

    def _write(self, data: bytes) -> None:
        """Write ``data`` at the end of the current segment, or raise with nothing left behind."""
        assert self._fd is not None
        view = memoryview(data)
        try:
            # A nearly full file system accepts part of a write; the rest then fails.
            written = os.write(self._fd, view)
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            self._rollback()
            raise AuditWriteError(f"cannot write the audit record: {exc}") from exc

    def _write_deferred_or_note(self) -> None:
        """For the sync: write what is deferred; a failure is logged, not raised.

        The records are gone either way, and the sync still makes the rest durable.
        """
        with contextlib.suppress(AuditWriteError):
            self._write_deferred()

    def _write_deferred(self, then: bytes = b"") -> None:
        """Write what is deferred, and ``then`` after it, in one ``write`` (``_lock`` held).

        On failure nothing of it stays in the file, the deferred records are lost (logged)
        and AuditWriteError is raised.
        """
        if not self._deferred:
            if then:
                self._write(then)
            return
        deferred = b"".join(self._deferred)
        try:
            self._write(deferred + then)
        except AuditWriteError:
            self._drop_deferred()
            raise
        self._size += len(deferred)
        self._deferred.clear()
        self._deferred_bytes = 0
        self._deferred_base = None

    def _drop_deferred(self) -> None:
        """Take the deferred records out of the chain again: they could not be written."""
        assert self._deferred_base is not None
        logger.error(
            "audit: %d deferred record(s) (statement results) could not be written and are "
            "lost", len(self._deferred),
        )  # fmt: skip
        self._last_seq, self._last_hash, self._last_segment = self._deferred_base
        self._deferred.clear()
        self._deferred_bytes = 0
        self._deferred_base = None

    def _rollback(self) -> None:
        """Cut the current segment back to its last complete record."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError as exc:  # pragma: no cover - truncation frees space; it fails on EIO only
            logger.error("audit: cannot cut a partial record from %s: %s", self._segment, exc)
            raise AuditWriteError(f"cannot remove a partial audit record: {exc}") from exc

    def _rotate(self, next_seq: int) -> None:
        """Close the current segment (fsynced) and start ``audit-<next_seq>.jsonl``."""
        assert self._fd is not None
        try:
            # A closed segment is complete on disk before anything is written after it.
            os.fsync(self._fd)
            old_fd = self._fd
            self._create_segment(next_seq)
        except OSError as exc:
            raise AuditWriteError(f"cannot rotate the audit log: {exc}") from exc
        os.close(old_fd)
        self._synced_seq = self._last_seq
        self._retention_due = True

    def _retry_failed_sync(self) -> None:
        """After a failed background fsync, refuse records until an fsync succeeds again."""
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditWriteError(f"the audit log cannot be fsynced: {exc}") from exc
        logger.warning("audit: fsync works again on %s", self._segment)
        self._sync_error = None
        self._synced_seq = self._last_seq

    # --- fsync, HEAD, retention -----------------------------------------------------------

    def sync(self) -> None:
        """Fsync now, rewrite HEAD and apply retention if due. Raises AuditWriteError."""
        try:
            self._sync()
        except OSError as exc:
            raise AuditWriteError(f"audit fsync failed: {exc}") from exc

    def _sync(self) -> None:
        with self._sync_lock:
            with self._lock:
                if self._fd is None:
                    return
                # Deferred records first: HEAD must name a record that is in the file.
                self._write_deferred_or_note()
                seq, digest, segment = self._last_seq, self._last_hash, self._last_segment
                started = time.monotonic()
                # fsync a duplicate: a rotation may close the original meanwhile, and the
                # fsync must not hold _lock (appends would wait for the disk).
                fd = os.dup(self._fd) if seq > self._synced_seq else -1
            if fd >= 0:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    with self._lock:
                        self._sync_error = exc
                        self._dirty_since = time.monotonic()  # back off one interval
                    logger.error("audit: fsync of %s failed: %s", segment, exc)
                    raise
                finally:
                    os.close(fd)
            head_failed = False
            if seq > self._head_seq:
                try:
                    self._write_head(seq, digest, segment)
                except OSError as exc:
                    # A stale HEAD is still true (it names an earlier durable record).
                    logger.warning(
                        "audit: cannot update HEAD (it stays at an earlier record): %s", exc
                    )
                    head_failed = True
                else:
                    self._head_seq, self._head_segment = seq, segment
            with self._lock:
                self._synced_seq = max(self._synced_seq, seq)
                if fd >= 0:
                    self._sync_error = None  # appends may go on
                if head_failed:
                    self._dirty_since = time.monotonic()  # back off one interval
                elif self._last_seq > seq:
                    self._dirty_since = started
                retention_due, self._retention_due = self._retention_due, False
            if retention_due:
                self._apply_retention()

    def _write_head(self, seq: int, digest: str, segment: str) -> None:
        data = _ENCODER.encode({"seq": seq, "hash": digest, "segment": segment}).encode() + b"\n"
        tmp = self.directory / _HEAD_TMP
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            # No directory fsync: if the rename is lost in a power failure, the old HEAD
            # names an older durable record, which is still true.
            os.replace(tmp, self.directory / HEAD_FILE)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _apply_retention(self) -> None:
        """Delete the oldest segments whose newest record is older than the retention."""
        if self._head_segment is None:
            return
        cutoff = self._clock() - self._retention
        for _, name in _list_segments(self.directory):
            # Everything from HEAD's segment on is needed to continue and to verify the chain;
            # stopping at the first young segment keeps what remains contiguous.
            if name >= self._head_segment or name == self._segment:
                return
            path = self.directory / name
            try:
                newest = _parse_ts(_parse_record(_last_line(path))["ts"])
            except (OSError, ValueError) as exc:
                logger.warning(
                    "audit: retention stops at %s (cannot read its last record: %s)", name, exc
                )
                return
            if newest >= cutoff:
                return
            try:
                path.unlink()
            except OSError as exc:
                logger.warning("audit: retention cannot delete %s: %s", name, exc)
                return
            logger.info("audit: retention deleted %s (newest record %s)", name, _format_ts(newest))

    def _sync_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (
                    self._last_seq > self._head_seq or self._retention_due
                ):
                    self._cond.wait()
                deadline = self._dirty_since + self._fsync_interval
                while (
                    not self._stopping
                    and self._last_seq - self._synced_seq < self._fsync_max_records
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self._cond.wait(remaining)
                if self._stopping:
                    return  # close() does the last sync itself
            try:
                self._sync()
            except OSError:
                pass  # logged in _sync; appends refuse until an fsync works again
            except Exception:  # pragma: no cover - keep syncing whatever went wrong once
                logger.exception("audit: background sync failed")

    # --- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Sync, stop the background thread and release the directory. Idempotent.

        Later appends raise :class:`AuditWriteError`; so does this call if the final fsync
        fails (the descriptors are released anyway).
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        try:
            self.sync()
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._dir_fd >= 0:
            os.close(self._dir_fd)  # releases the flock
            self._dir_fd = -1

    def __enter__(self) -> AuditLog:
        """Return the log itself."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the log."""
        self.close()


# --- reading ------------------------------------------------------------------------------


def _complete_lines(path: Path, offset: int) -> tuple[list[bytes], int]:
    """The complete lines of ``path`` from ``offset`` and the offset after the last of them."""
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    return data[:end].split(b"\n"), offset + end + 1


def _load(line: bytes, name: str, number: int) -> dict[str, Any]:
    try:
        return _parse_record(line)
    except ValueError as exc:
        raise AuditFormatError(f"{name} line {number}: not a valid audit record: {exc}") from exc


def _start_index(segments: list[tuple[int, str]], after_seq: int) -> int:
    """The first segment that may hold a record with seq > after_seq."""
    index = 0
    while index + 1 < len(segments) and segments[index + 1][0] <= after_seq + 1:
        index += 1
    return index


def read_records(directory: Path, *, after_seq: int = 0) -> Iterator[dict[str, Any]]:
    """Every complete record with ``seq > after_seq``, oldest first, across segments.

    A last line without its newline (a write in progress or torn by a crash) is skipped.
    Raises :class:`AuditFormatError` on a complete line that is not a record.
    """
    directory = Path(directory)
    segments = _list_segments(directory)
    for _, name in segments[_start_index(segments, after_seq) :]:
        try:
            handle = (directory / name).open("rb")
        except FileNotFoundError:
            continue  # removed by retention while we read
        with handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.endswith(b"\n"):
                    break
                record = _load(raw[:-1], name, number)
                if record["seq"] > after_seq:
                    yield record


def follow(
    directory: Path,
    *,
    after_seq: int = 0,
    poll_interval: float = 0.2,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[dict[str, Any]]:
    """Like :func:`read_records`, then keep polling for new records and segments.

    ``stop`` is checked after each pass over the files; the generator returns once it is
    true. A missing directory is waited for.
    """
    directory = Path(directory)
    last = after_seq
    current: str | None = None
    offset = 0
    line_number = 0
    while True:
        try:
            segments = _list_segments(directory)
        except FileNotFoundError:
            segments = []
        if current is None and segments:
            current = segments[_start_index(segments, last)][1]
        for _, name in segments:
            if current is None or name < current:
                continue
            if name != current:
                current, offset, line_number = name, 0, 0
            try:
                lines, new_offset = _complete_lines(directory / name, offset)
            except FileNotFoundError:
                continue  # deleted by retention: go on with the next segment
            offset = new_offset
            for line in lines:
                line_number += 1
                record = _load(line, name, line_number)
                if record["seq"] > last:
                    last = record["seq"]
                    yield record
        if stop():
            return
        time.sleep(poll_interval)


# --- verification -------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """The outcome of :func:`verify`.

    ``records``, ``first_seq`` and ``last_seq`` describe the intact records checked before
    the first problem (all of them when ``ok``); ``problem`` names the first broken or
    missing record: segment file, line, seq and what is wrong.
    """

    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    problem: str | None


def verify(directory: Path) -> VerifyReport:
    """Check the whole log: lines, seq continuity, the hash chain, segment names and HEAD.

    A log that is being written may end in a line whose write is in progress; that is
    checked once more after a moment before it is reported as torn.
    """
    report, torn_tail = _verify_once(Path(directory))
    if torn_tail:
        time.sleep(0.1)
        report, _ = _verify_once(Path(directory))
    return report


def _locate(directory: Path, segments: list[tuple[int, str]], seq: int) -> str | None:
    """Where record ``seq`` is, as "<segment> line <n>", scanning every segment."""
    prefix = f'{{"seq":{seq},'.encode()
    for _, name in segments:
        try:
            with (directory / name).open("rb") as handle:
                for number, raw in enumerate(handle, start=1):
                    if raw.startswith(prefix):
                        return f"{name} line {number}"
        except FileNotFoundError:
            continue
    return None


class _Verifier:
    """The state of one pass of :func:`verify` (a class so that problems can use it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.records = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_hash: str | None = None
        self.last_where = ""  # "<segment> line <n>" of the last intact record
        self.head_line: tuple[str, str] | None = None  # (where, hash) of the record HEAD names

    def report(self, problem: str | None) -> VerifyReport:
        return VerifyReport(problem is None, self.records, self.first_seq, self.last_seq, problem)


def _verify_once(directory: Path) -> tuple[VerifyReport, bool]:
    state = _Verifier(directory)
    if not directory.is_dir():
        return state.report(f"{directory} is not a directory"), False
    try:
        head = _read_head(directory)
        head_problem = None
    except (ValueError, OSError) as exc:
        head, head_problem = None, f"{HEAD_FILE} is unreadable: {exc}"
    for name in sorted(os.listdir(directory)):
        if name.startswith("audit-") and name.endswith(".jsonl") and not _SEGMENT_RE.match(name):
            return state.report(f"{name}: not a segment name (audit-<20 digits>.jsonl)"), False
    segments = _list_segments(directory)
    for index, (named_first, name) in enumerate(segments):
        is_last = index == len(segments) - 1
        before = state.records
        try:
            problem, torn = _verify_segment(state, segments, index, head, is_last)
        except OSError as exc:
            return state.report(f"{name}: cannot be read: {exc}"), False
        if problem is not None:
            return state.report(problem), torn
        if state.records > before:
            continue
        # An empty segment is only the newest one (a rotation whose first write failed, or
        # a log opened without records), and it is named for the next seq.
        if not is_last:
            return state.report(f"{name} is empty: a closed segment must hold records"), False
        if state.last_seq is None and named_first != 1:
            return state.report(
                f"{name} is the only segment and is empty: the records before seq "
                f"{named_first} are missing"
            ), False
        if state.last_seq is not None and named_first != state.last_seq + 1:
            return state.report(
                f"{name} is empty but named for seq {named_first}; the log ends at seq "
                f"{state.last_seq} ({state.last_where})"
            ), False
    return state.report(head_problem or _check_head(state, head)), False


def _verify_segment(
    state: _Verifier,
    segments: list[tuple[int, str]],
    index: int,
    head: dict[str, Any] | None,
    is_last: bool,
) -> tuple[str | None, bool]:
    """Check one segment; ``(problem, torn tail of the last segment)``."""
    named_first, name = segments[index]
    with (state.directory / name).open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{name} line {number}"
            expected = None if state.last_seq is None else state.last_seq + 1
            if not raw.endswith(b"\n"):
                return _torn(
                    state, where, raw, expected=expected, head=head, is_last=is_last
                ), is_last
            line = raw[:-1]
            try:
                record = _parse_record(line)
            except ValueError as exc:
                return f"{where} (seq {expected or '?'} expected): not a valid record: {exc}", False
            seq = record["seq"]
            if list(record)[:4] != ["seq", "ts", "type", "prev"]:
                return (
                    f"{where} (seq {seq}): fields out of order (seq, ts, type, prev first)",
                    False,
                )
            if expected is not None and seq != expected:
                return _seq_problem(
                    state, segments, where, number=number, seq=seq, expected=expected
                ), False
            if number == 1 and seq != named_first:
                return (
                    f"{where}: {name} is named for seq {named_first} but starts with seq {seq} "
                    "(renamed segment)"
                ), False
            if state.last_hash is None:
                if seq == 1 and record["prev"] != GENESIS_HASH:
                    return f"{where} (seq 1): the first record's prev must be 64 zeros", False
                # seq > 1: older segments were deleted by retention; this prev cannot be checked.
                state.first_seq = seq
            elif record["prev"] != state.last_hash:
                return (
                    f"{where} (seq {seq}): prev does not match the hash of seq {seq - 1} "
                    f"({state.last_where}): seq {seq - 1} was altered"
                ), False
            digest = record_hash(line)
            if head is not None and seq == head["seq"]:
                state.head_line = (where, digest)
            state.records += 1
            state.last_seq, state.last_hash, state.last_where = seq, digest, where
    return None, False


def _torn(
    state: _Verifier,
    where: str,
    raw: bytes,
    *,
    expected: int | None,
    head: dict[str, Any] | None,
    is_last: bool,
) -> str:
    seq = f"seq {expected}" if expected is not None else "the first record"
    text = f"{where} ({seq}): incomplete line ({len(raw)} bytes, no newline)"
    if not is_last:
        return text + " in a closed segment: the segment was truncated"
    if head is not None and state.last_seq is not None and head["seq"] > state.last_seq:
        return (
            text + f" and HEAD says seq {head['seq']} is durable: the segment was truncated "
            f"({_seqs(state.last_seq + 1, head['seq'])} missing)"
        )
    return text + ": a write cut short by a crash (never acknowledged) or a truncated segment"


def _seqs(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}..{last}"


def _seq_problem(
    state: _Verifier,
    segments: list[tuple[int, str]],
    where: str,
    *,
    number: int,
    seq: int,
    expected: int,
) -> str:
    if seq < expected:
        return f"{where}: seq {seq} repeats or goes back (seq {expected} expected)"
    found = _locate(state.directory, segments, expected)
    if found is not None:
        return (
            f"{where}: seq {seq} where seq {expected} belongs; "
            f"seq {expected} is at {found} (reordered)"
        )
    missing = _seqs(expected, seq - 1)
    if number == 1:
        return (
            f"{where}: {missing} missing: the previous segment ends at seq {expected - 1} "
            f"({state.last_where}) and this one starts at seq {seq} (a segment was deleted "
            "or truncated)"
        )
    return (
        f"{where}: {missing} missing: seq {seq} follows seq {expected - 1} "
        f"({state.last_where}) (deleted)"
    )


def _check_head(state: _Verifier, head: dict[str, Any] | None) -> str | None:
    if state.last_seq is None:
        if head is not None:
            return f"HEAD says seq {head['seq']} is durable but the log holds no records"
        return None
    if head is None:
        return (
            f"{HEAD_FILE} is missing: the tail of the log (seq {state.last_seq}) "
            "cannot be confirmed"
        )
    seq = head["seq"]
    if seq > state.last_seq:
        return (
            f"HEAD says seq {seq} ({head['segment']}) is durable but the log ends at seq "
            f"{state.last_seq} ({state.last_where}): the tail was cut off "
            f"({_seqs(state.last_seq + 1, seq)} missing)"
        )
    if state.first_seq is not None and seq < state.first_seq:
        return f"HEAD says seq {seq}, older than the oldest record (seq {state.first_seq})"
    if state.head_line is None:  # pragma: no cover - continuity makes every seq in range present
        return f"HEAD says seq {seq} but no such record was found"
    where, digest = state.head_line
    if not where.startswith(head["segment"] + " "):
        return f"HEAD says seq {seq} is in {head['segment']} but it is at {where}"
    if digest != head["hash"]:
        return f"{where} (seq {seq}): its hash does not match HEAD: seq {seq} was altered"
    return None
