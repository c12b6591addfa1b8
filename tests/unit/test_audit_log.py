"""The durable audit log: chain, rotation, retention, recovery, fsync, verify, disk full.

Real files in a temporary directory, no mocks. The disk-full test uses a real size-capped
file system (a 256 KiB tmpfs; else a loop-mounted ext4 image; else RLIMIT_FSIZE in a child
process). Set ``QW_TEST_DISK_FULL=tmpfs|ext4|rlimit`` to force one of them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from querywarden.audit.log import (
    _ENCODER,
    GENESIS_HASH,
    AuditFormatError,
    AuditLog,
    AuditWriteError,
    encode_fields,
    follow,
    read_records,
    segment_name,
    verify,
)

FsyncMode = Literal["always", "batch"]


class FakeClock:
    """A settable clock (epoch seconds)."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data[:-1].split(b"\n")


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("audit-*.jsonl"))


def head(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "HEAD").read_text())
    return result


def write_log(directory: Path, count: int, **options: Any) -> None:
    """``count`` statement records, synced and closed."""
    with AuditLog(directory, **options) as log:
        for n in range(1, count + 1):
            log.append(
                "statement.request", session_id="s1", statement_id=f"s1-{n}", text=f"SELECT {n}"
            )


def rewrite_line(path: Path, index: int, edit: Any) -> None:
    """Replace line ``index`` (0-based) of a segment by ``edit(record)`` re-serialized."""
    lines = lines_of(path)
    record = json.loads(lines[index])
    edit(record)
    lines[index] = json.dumps(record, separators=(",", ":")).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")


# --- writing and reading ------------------------------------------------------------------


def test_round_trip_keeps_fields_order_and_values(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000.123456)
    fields: dict[str, Any] = {
        "session_id": "s1",
        "text": "SELECT 'ünïcode', '\u2028', E'\\n'",
        "summary": {"operations": ["select"], "reads": ["public.t"]},
        "approval": None,
        "rows": 3,
        "sample": [["a", None, "\\x00ff"]],
    }
    with AuditLog(tmp_path, clock=clock) as log:
        assert log.append("statement.request", **fields) == 1
        assert log.append("session.end") == 2
        assert log.last_seq == 2
    records = list(read_records(tmp_path))
    assert [r["seq"] for r in records] == [1, 2]
    first = records[0]
    assert list(first)[:4] == ["seq", "ts", "type", "prev"]
    assert first["ts"] == "2027-01-15T08:00:00.123456Z"
    assert first["type"] == "statement.request"
    assert {k: first[k] for k in fields} == fields
    assert list(first)[4:] == list(fields)
    assert set(records[1]) == {"seq", "ts", "type", "prev"}
    # One record per line, pure ASCII (a U+2028 in the text cannot split a line).
    raw = segments(tmp_path)[0].read_bytes()
    assert raw.count(b"\n") == 2
    assert raw.isascii()


def test_chain_links_every_line_to_the_previous_one(tmp_path: Path) -> None:
    write_log(tmp_path, 5)
    lines = lines_of(segments(tmp_path)[0])
    prevs = [json.loads(line)["prev"] for line in lines]
    assert prevs[0] == GENESIS_HASH
    for line, prev in zip(lines, prevs[1:], strict=False):
        assert prev == hashlib.sha256(line).hexdigest()
    assert head(tmp_path) == {
        "seq": 5,
        "hash": hashlib.sha256(lines[-1]).hexdigest(),
        "segment": segment_name(1),
    }


def test_bad_fields_raise_before_anything_is_written(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as log:
        log.append("a")
        with pytest.raises(TypeError, match="seq"):
            log.append("b", seq=7)
        with pytest.raises(TypeError):
            log.append("b", value=b"bytes are not JSON")
        with pytest.raises(ValueError):
            log.append("b", value=float("nan"))
        assert log.append("c") == 2
    assert verify(tmp_path).ok


def test_a_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.close()
    log.close()  # idempotent
    with pytest.raises(AuditWriteError, match="closed"):
        log.append("x")


def test_an_unusable_directory_raises(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(AuditWriteError, match="unusable"):
        AuditLog(not_a_dir)


def test_new_directory_and_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "audit"
    write_log(directory, 1)
    assert directory.stat().st_mode & 0o777 == 0o700
    assert segments(directory)[0].stat().st_mode & 0o077 == 0
    assert (directory / "HEAD").stat().st_mode & 0o077 == 0


def test_one_writer_per_directory(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as log:
        log.append("x")
        with pytest.raises(AuditWriteError, match="already being written"):
            AuditLog(tmp_path)
    with AuditLog(tmp_path) as log:  # released by close
        assert log.append("y") == 2


# --- rotation and retention ---------------------------------------------------------------


def test_rotation_by_size_chains_across_segments(tmp_path: Path) -> None:
    with AuditLog(tmp_path, max_segment_bytes=1000) as log:
        for n in range(40):
            log.append("statement.request", session_id="s1", text="x" * 100, n=n)
    files = segments(tmp_path)
    assert len(files) > 3
    first_seqs = [json.loads(lines_of(f)[0])["seq"] for f in files]
    assert [f.name for f in files] == [segment_name(s) for s in first_seqs]
    assert all(f.stat().st_size <= 1000 for f in files)
    assert [r["seq"] for r in read_records(tmp_path)] == list(range(1, 41))
    # The first record of a segment chains to the last line of the previous one.
    assert (
        json.loads(lines_of(files[1])[0])["prev"]
        == hashlib.sha256(lines_of(files[0])[-1]).hexdigest()
    )
    assert verify(tmp_path).ok


def test_a_record_larger_than_a_segment_gets_its_own(tmp_path: Path) -> None:
    with AuditLog(tmp_path, max_segment_bytes=500) as log:
        log.append("a")
        log.append("big", text="y" * 2000)
        log.append("c")
    assert [len(lines_of(f)) for f in segments(tmp_path)] == [1, 1, 1]
    assert verify(tmp_path).ok


def test_rotation_by_age(tmp_path: Path) -> None:
    clock = FakeClock()
    with AuditLog(tmp_path, max_segment_age=60.0, clock=clock) as log:
        log.append("a")
        clock.now += 59
        log.append("b")
        clock.now += 1  # 60 s after the segment's first record
        log.append("c")
        clock.now += 30
        log.append("d")
    assert [f.name for f in segments(tmp_path)] == [segment_name(1), segment_name(3)]
    assert verify(tmp_path).ok


def test_age_rotation_survives_a_reopen(tmp_path: Path) -> None:
    clock = FakeClock()
    with AuditLog(tmp_path, max_segment_age=60.0, clock=clock) as log:
        log.append("a")
    clock.now += 61
    with AuditLog(tmp_path, max_segment_age=60.0, clock=clock) as log:
        log.append("b")
    assert [f.name for f in segments(tmp_path)] == [segment_name(1), segment_name(2)]


def test_retention_deletes_old_segments_on_rotation(tmp_path: Path) -> None:
    clock = FakeClock()
    day = 86400.0
    # A long fsync interval keeps the background thread out of it: retention then runs
    # exactly when the test calls sync(), at the clock's time then.
    options: dict[str, Any] = {
        "max_segment_age": day,
        "retention": 7 * day,
        "clock": clock,
        "fsync_interval": 30.0,
    }
    with AuditLog(tmp_path, **options) as log:
        for _ in range(10):  # ten daily segments of two records
            log.append("a")
            log.append("b")
            clock.now += day
        log.sync()
        # Segments whose newest record is more than 7 days old are gone, the rest stays.
        names = [f.name for f in segments(tmp_path)]
        assert names == [segment_name(s) for s in range(7, 21, 2)]
        clock.now += 30 * day
        log.sync()  # retention waits for a rotation
        assert len(segments(tmp_path)) == 7
        log.append("c")  # rotates (age), then every old segment goes but the current one
        log.sync()
        assert [f.name for f in segments(tmp_path)] == [segment_name(21)]
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert (report.first_seq, report.last_seq) == (21, 21)
    assert [r["seq"] for r in read_records(tmp_path)] == [21]
    with AuditLog(tmp_path, **options) as log:  # and the chain continues
        assert log.append("d") == 22
    assert verify(tmp_path).ok


# --- recovery -----------------------------------------------------------------------------


def test_reopen_continues_seq_and_chain(tmp_path: Path) -> None:
    write_log(tmp_path, 3, max_segment_bytes=300)
    with AuditLog(tmp_path, max_segment_bytes=300) as log:
        assert log.last_seq == 3
        assert log.append("statement.request", text="after") == 4
    records = list(read_records(tmp_path))
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert verify(tmp_path).ok


def test_reopen_after_an_empty_current_segment(tmp_path: Path) -> None:
    write_log(tmp_path, 2)
    # A rotation whose first write failed leaves an empty segment named for the next seq.
    (tmp_path / segment_name(3)).touch()
    assert verify(tmp_path).ok
    with AuditLog(tmp_path) as log:
        assert log.append("x") == 3
    assert lines_of(tmp_path / segment_name(3))[0].startswith(b'{"seq":3,')
    assert verify(tmp_path).ok


def test_a_torn_last_line_is_cut_off_on_reopen(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_log(tmp_path, 3)
    segment = segments(tmp_path)[0]
    good_size = segment.stat().st_size
    with segment.open("ab") as handle:  # a crash in the middle of writing record 4
        handle.write(b'{"seq":4,"ts":"2026-11-24T06:20:00.000000Z","type":"statem')
    assert [r["seq"] for r in read_records(tmp_path)] == [1, 2, 3]
    report = verify(tmp_path)
    assert not report.ok
    assert report.problem is not None
    assert f"{segment.name} line 4 (seq 4): incomplete line" in report.problem
    with (
        caplog.at_level(logging.WARNING, logger="querywarden.audit.log"),
        AuditLog(tmp_path) as log,
    ):
        assert segment.stat().st_size == good_size
        assert log.append("statement.request", text="next") == 4
    assert "torn last line" in caplog.text
    assert verify(tmp_path).ok


def test_records_larger_than_a_read_chunk_recover(tmp_path: Path) -> None:
    big = "z" * 200_000
    with AuditLog(tmp_path) as log:
        log.append("a", text=big)
        log.append("b", text=big)
    with (segments(tmp_path)[0]).open("ab") as handle:
        handle.write(b'{"seq":3,' + b"t" * 150_000)  # a torn line longer than a chunk
    with AuditLog(tmp_path) as log:
        assert log.last_seq == 2
        assert log.append("c", text=big) == 3
    assert [len(r["text"]) for r in read_records(tmp_path)] == [200_000] * 3
    assert verify(tmp_path).ok


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from querywarden.audit.log import AuditLog

    log = AuditLog(Path(sys.argv[1]), fsync_interval=30.0)
    for n in range(5):
        log.append("x", n=n)
    log.sync()
    for n in range(5, 10):
        log.append("x", n=n)
    os._exit(0)  # a gateway crash: no close, no fsync, HEAD stays at 5
    """
)


def test_records_written_before_a_crash_survive_it(tmp_path: Path) -> None:
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert head(tmp_path)["seq"] == 5
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert report.last_seq == 10
    with AuditLog(tmp_path) as log:
        assert log.last_seq == 10
        assert log.append("x", n=10) == 11
    assert verify(tmp_path).ok
    assert head(tmp_path)["seq"] == 11


def test_a_removed_tail_stops_the_writer(tmp_path: Path) -> None:
    write_log(tmp_path, 4)
    segment = segments(tmp_path)[0]
    lines = lines_of(segment)
    segment.write_bytes(b"\n".join(lines[:2]) + b"\n")
    with pytest.raises(AuditWriteError, match="HEAD says seq 4 is durable"):
        AuditLog(tmp_path)


def test_an_altered_head_record_stops_the_writer(tmp_path: Path) -> None:
    write_log(tmp_path, 4)
    rewrite_line(segments(tmp_path)[0], 3, lambda r: r.update(text="SELECT 'innocent'"))
    with pytest.raises(AuditWriteError, match="altered"):
        AuditLog(tmp_path)


# --- concurrency and fsync ----------------------------------------------------------------


def test_many_threads_append_one_chain(tmp_path: Path) -> None:
    per_thread, threads = 300, 6
    returned: dict[int, list[int]] = {}
    with AuditLog(tmp_path, max_segment_bytes=20_000) as log:

        def worker(n: int) -> None:
            returned[n] = [log.append("t", thread=n, i=i) for i in range(per_thread)]

        workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    records = list(read_records(tmp_path))
    assert [r["seq"] for r in records] == list(range(1, per_thread * threads + 1))
    by_seq = {r["seq"]: r for r in records}
    for n, seqs in returned.items():
        assert [by_seq[s]["thread"] for s in seqs] == [n] * per_thread
        assert [by_seq[s]["i"] for s in seqs] == list(range(per_thread))
    assert len(segments(tmp_path)) > 1
    report = verify(tmp_path)
    assert report.ok, report.problem


def wait_for_head(directory: Path, seq: int, timeout: float = 5.0) -> float:
    """Seconds until HEAD names ``seq``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            if head(directory)["seq"] == seq:
                return time.monotonic() - start
        time.sleep(0.005)
    pytest.fail(f"HEAD did not reach seq {seq} within {timeout} s")


def test_batch_mode_updates_head_within_the_interval(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="batch", fsync_interval=0.05) as log:
        for _ in range(3):
            seq = log.append("x")
        waited = wait_for_head(tmp_path, seq)
        assert waited < 2.0
        assert verify(tmp_path).ok


def test_batch_mode_syncs_early_when_enough_records_are_pending(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="batch", fsync_interval=30.0, fsync_max_records=10) as log:
        for _ in range(3):
            log.append("x")
        time.sleep(0.2)
        assert not (tmp_path / "HEAD").exists()  # below the count, within the interval
        for _ in range(7):
            seq = log.append("x")
        assert seq == 10
        wait_for_head(tmp_path, seq)


def test_sync_writes_head_now(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="batch", fsync_interval=30.0) as log:
        log.append("x")
        seq = log.append("y")
        log.sync()
        assert head(tmp_path)["seq"] == seq


def test_always_mode(tmp_path: Path) -> None:
    with AuditLog(tmp_path, fsync="always", fsync_interval=0.02) as log:
        for _ in range(5):
            seq = log.append("x")
        wait_for_head(tmp_path, seq)
    assert verify(tmp_path).ok


# --- following ----------------------------------------------------------------------------


def test_follow_sees_new_records_and_segments(tmp_path: Path) -> None:
    total = 60
    with AuditLog(tmp_path, max_segment_bytes=800) as log:
        log.append("x", n=0)

        def writer() -> None:
            for n in range(1, total):
                log.append("x", n=n)
                time.sleep(0.002)

        thread = threading.Thread(target=writer)
        thread.start()
        seen: list[int] = []
        deadline = time.monotonic() + 10
        for record in follow(
            tmp_path,
            poll_interval=0.01,
            stop=lambda: len(seen) >= total or time.monotonic() > deadline,
        ):
            seen.append(record["seq"])
        thread.join()
    assert seen == list(range(1, total + 1))
    assert len(segments(tmp_path)) > 2
    tail = list(follow(tmp_path, after_seq=total - 3, stop=lambda: True))
    assert [r["seq"] for r in tail] == [total - 2, total - 1, total]


def test_read_records_after_seq_skips_whole_segments(tmp_path: Path) -> None:
    write_log(tmp_path, 30, max_segment_bytes=600)
    assert [r["seq"] for r in read_records(tmp_path, after_seq=25)] == [26, 27, 28, 29, 30]
    assert list(read_records(tmp_path, after_seq=30)) == []


def test_readers_reject_a_damaged_line(tmp_path: Path) -> None:
    write_log(tmp_path, 3)
    segment = segments(tmp_path)[0]
    lines = lines_of(segment)
    lines[1] = b"not json"
    segment.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(AuditFormatError, match=f"{segment.name} line 2"):
        list(read_records(tmp_path))


# --- verify -------------------------------------------------------------------------------


@pytest.fixture
def three_segments(tmp_path: Path) -> Path:
    """Records 1..30 in several segments, synced, HEAD at 30."""
    write_log(tmp_path, 30, max_segment_bytes=1100)
    assert len(segments(tmp_path)) >= 3
    report = verify(tmp_path)
    assert report.ok, report.problem
    assert (report.records, report.first_seq, report.last_seq) == (30, 1, 30)
    return tmp_path


def problem_of(directory: Path) -> str:
    report = verify(directory)
    assert not report.ok
    assert report.problem is not None
    return report.problem


def test_verify_finds_a_tampered_record(three_segments: Path) -> None:
    first = segments(three_segments)[0]
    rewrite_line(first, 2, lambda r: r.update(text="SELECT 'something else'"))
    problem = problem_of(three_segments)
    assert problem.startswith(f"{first.name} line 4 (seq 4): prev does not match")
    assert f"seq 3 ({first.name} line 3)" in problem
    assert "seq 3 was altered" in problem
    assert verify(three_segments).records == 3


def test_verify_finds_a_deleted_record(three_segments: Path) -> None:
    first = segments(three_segments)[0]
    lines = lines_of(first)
    del lines[2]  # seq 3
    first.write_bytes(b"\n".join(lines) + b"\n")
    problem = problem_of(three_segments)
    assert problem == (
        f"{first.name} line 3: seq 3 missing: seq 4 follows seq 2 ({first.name} line 2) (deleted)"
    )


def test_verify_finds_a_reordered_record(three_segments: Path) -> None:
    first = segments(three_segments)[0]
    lines = lines_of(first)
    lines[2], lines[3] = lines[3], lines[2]
    first.write_bytes(b"\n".join(lines) + b"\n")
    problem = problem_of(three_segments)
    assert problem == (
        f"{first.name} line 3: seq 4 where seq 3 belongs; seq 3 is at {first.name} line 4 "
        "(reordered)"
    )


def test_verify_finds_a_truncated_closed_segment(three_segments: Path) -> None:
    first, second = segments(three_segments)[:2]
    lines = lines_of(first)
    last_seq = json.loads(lines[-1])["seq"]
    # Cut at a line boundary: two records gone.
    first.write_bytes(b"\n".join(lines[:-2]) + b"\n")
    problem = problem_of(three_segments)
    assert problem.startswith(f"{second.name} line 1: seq {last_seq - 1}..{last_seq} missing")
    assert "a segment was deleted or truncated" in problem
    # Cut in the middle of a line.
    first.write_bytes(b"\n".join(lines)[:-10])
    problem = problem_of(three_segments)
    assert problem.startswith(f"{first.name} line {len(lines)} (seq {last_seq}): incomplete line")
    assert "in a closed segment: the segment was truncated" in problem


def test_verify_finds_a_truncated_last_segment_by_head(three_segments: Path) -> None:
    last = segments(three_segments)[-1]
    lines = lines_of(last)
    last.write_bytes(b"\n".join(lines[:-2]) + b"\n")
    problem = problem_of(three_segments)
    assert problem.startswith(
        f"HEAD says seq 30 ({last.name}) is durable but the log ends at seq 28 "
        f"({last.name} line {len(lines) - 2})"
    )
    assert problem.endswith("the tail was cut off (seq 29..30 missing)")
    # Cut mid-line: a torn line that HEAD shows was durable.
    last.write_bytes(b"\n".join(lines)[:-5])
    problem = problem_of(three_segments)
    assert f"{last.name} line {len(lines)} (seq 30): incomplete line" in problem
    assert problem.endswith(
        "HEAD says seq 30 is durable: the segment was truncated (seq 30 missing)"
    )


def test_verify_finds_an_altered_last_record_by_head(three_segments: Path) -> None:
    last = segments(three_segments)[-1]
    count = len(lines_of(last))
    rewrite_line(last, count - 1, lambda r: r.update(text="DROP TABLE nothing"))
    problem = problem_of(three_segments)
    assert problem == (
        f"{last.name} line {count} (seq 30): its hash does not match HEAD: seq 30 was altered"
    )


def test_verify_finds_a_deleted_middle_segment(three_segments: Path) -> None:
    first, second, third = segments(three_segments)[:3]
    first_end = json.loads(lines_of(first)[-1])["seq"]
    third_start = json.loads(lines_of(third)[0])["seq"]
    second.unlink()
    problem = problem_of(three_segments)
    assert problem.startswith(
        f"{third.name} line 1: seq {first_end + 1}..{third_start - 1} missing: the previous "
        f"segment ends at seq {first_end} ({first.name} line {first_end})"
    )


def test_verify_finds_a_renamed_segment(three_segments: Path) -> None:
    second = segments(three_segments)[1]
    start = json.loads(lines_of(second)[0])["seq"]
    second.rename(three_segments / segment_name(start - 1))
    problem = problem_of(three_segments)
    assert f"is named for seq {start - 1} but starts with seq {start}" in problem


def test_verify_requires_head(three_segments: Path) -> None:
    (three_segments / "HEAD").unlink()
    assert problem_of(three_segments).startswith("HEAD is missing")


def test_verify_an_empty_or_missing_log(tmp_path: Path) -> None:
    assert verify(tmp_path).ok
    assert problem_of(tmp_path / "nope").endswith("is not a directory")


# --- disk full ----------------------------------------------------------------------------


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, timeout=60, check=False
    )


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 64, 1):
            chunk = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info, path.open("ab") as handle:
        handle.write(b"\0")
        handle.flush()
    assert info.value.errno == errno.ENOSPC


def disk_full_scenario(directory: Path, filler: Path, fsync: FsyncMode) -> None:
    """Fill the disk under a live log, check it refuses cleanly, free space, check recovery."""
    padding = "p" * 300
    log = AuditLog(directory, fsync=fsync)
    try:
        for _ in range(3):
            log.append("statement.request", session_id="s1", text=padding)
        log.sync()
        fill(filler)
        for _ in range(1000):  # the segment's last block still has room for a few records
            try:
                log.append("statement.request", session_id="s1", text=padding)
            except AuditWriteError as exc:
                assert "No space left on device" in str(exc)
                break
        else:
            pytest.fail("the audit log never reported the full disk")
        good = log.last_seq
        with pytest.raises(AuditWriteError):  # still full: refused again, still consistent
            log.append("statement.request", session_id="s1", text=padding)
        assert log.last_seq == good
        # A deferred result and the request it rides with: both refused, the chain back
        # where it was (the result is lost, and said so in the log).
        if fsync == "batch":
            log.append_deferred("statement.result", session_id="s1", text=padding)
            assert log.last_seq == good + 1
            with pytest.raises(AuditWriteError):
                log.append("statement.request", session_id="s1", text=padding)
        else:  # always: nothing is deferred, the record is refused at once
            with pytest.raises(AuditWriteError):
                log.append_deferred("statement.result", session_id="s1", text=padding)
        assert log.last_seq == good
        segment = segments(directory)[-1]
        data = segment.read_bytes()
        assert data.endswith(b"\n"), "a partial record was left in the segment"
        assert [r["seq"] for r in read_records(directory)] == list(range(1, good + 1))
        report = verify(directory)
        assert report.ok, report.problem
        assert report.last_seq == good

        filler.unlink()  # space returns
        seq = log.append("statement.request", session_id="s1", text="after")
        assert seq == good + 1
        log.sync()
        records = list(read_records(directory))
        assert [r["seq"] for r in records] == list(range(1, good + 2))
        last_two = lines_of(segments(directory)[-1])[-2:]
        assert json.loads(last_two[1])["prev"] == hashlib.sha256(last_two[0]).hexdigest()
        report = verify(directory)
        assert report.ok, report.problem
        assert head(directory)["seq"] == seq
    finally:
        with contextlib.suppress(AuditWriteError):
            log.close()


@contextlib.contextmanager
def mounted(*mount_command: str | Path, mount_point: Path) -> Iterator[str | None]:
    """Run a mount command; yield None when mounted (unmounted after) or the error text."""
    result = run(*mount_command)
    if result.returncode != 0:
        yield f"{' '.join(map(str, mount_command))}: {result.stderr.strip() or result.returncode}"
        return
    try:
        yield None
    finally:
        if run("umount", mount_point).returncode != 0:
            run("umount", "-l", mount_point)


RLIMIT_SCRIPT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from querywarden.audit.log import AuditLog, AuditWriteError, read_records, verify

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    directory = Path(sys.argv[1])
    log = AuditLog(directory, fsync=sys.argv[2])
    for _ in range(3):
        log.append("statement.request", text="p" * 300)
    log.sync()
    segment = sorted(directory.glob("audit-*.jsonl"))[-1]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (segment.stat().st_size + 2000, hard))
    for _ in range(100):
        try:
            log.append("statement.request", text="p" * 300)
        except AuditWriteError as exc:
            assert "File too large" in str(exc), exc
            break
    else:
        sys.exit("never refused")
    good = log.last_seq
    assert segment.read_bytes().endswith(b"\\n"), "partial record left"
    assert [r["seq"] for r in read_records(directory)] == list(range(1, good + 1))
    assert verify(directory).ok, verify(directory).problem
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    assert log.append("statement.request", text="after") == good + 1
    log.close()
    report = verify(directory)
    assert report.ok and report.last_seq == good + 1, report
    print("ok", good)
    """
)


@pytest.mark.parametrize("fsync", ["batch", "always"])
def test_disk_full_refuses_cleanly_and_recovers(tmp_path: Path, fsync: FsyncMode) -> None:
    forced = os.environ.get("QW_TEST_DISK_FULL")
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    failures: list[str] = []

    if forced in (None, "tmpfs"):
        with mounted(
            "mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mount_point, mount_point=mount_point
        ) as error:
            if error is None:
                disk_full_scenario(mount_point / "audit", mount_point / "filler", fsync)
                return
            failures.append(error)

    if forced in (None, "ext4"):
        image = tmp_path / "disk.img"
        with image.open("wb") as handle:
            handle.truncate(2 * 1024 * 1024)
        made = run("mkfs.ext4", "-q", "-F", "-m", "0", image)
        if made.returncode != 0:
            failures.append(f"mkfs.ext4: {made.stderr.strip()}")
        else:
            with mounted(
                "mount", "-o", "loop", image, mount_point, mount_point=mount_point
            ) as error:
                if error is None:
                    disk_full_scenario(mount_point / "audit", mount_point / "filler", fsync)
                    return
                failures.append(error)

    if forced in (None, "rlimit"):
        child = subprocess.run(
            [sys.executable, "-c", RLIMIT_SCRIPT, str(tmp_path / "audit"), fsync],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0, f"RLIMIT_FSIZE scenario failed:\n{child.stdout}{child.stderr}"
        assert child.stdout.startswith("ok")
        return

    pytest.fail("cannot make a size-capped directory here: " + "; ".join(failures))


def test_ts_format_is_rfc3339_utc_microseconds(tmp_path: Path) -> None:
    with AuditLog(tmp_path) as log:
        before = time.time()
        log.append("x")
    ts = next(read_records(tmp_path))["ts"]
    parsed = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    assert abs(parsed - before) < 5


def test_timestamps_are_formatted_as_datetime_formats_them() -> None:
    from datetime import UTC, datetime

    from querywarden.audit.log import _format_ts, _parse_ts

    for epoch in (0.0, 1.5, 1_779_000_000.000001, 1_779_000_000.999999, 1_779_000_059.25):
        expected = datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        assert _format_ts(epoch) == expected
        assert abs(_parse_ts(_format_ts(epoch)) - epoch) < 1e-6
    # The same second again (from the cache), and the next one.
    assert _format_ts(1_779_000_000.5) == "2026-05-17T06:40:00.500000Z"
    assert _format_ts(1_779_000_000.75) == "2026-05-17T06:40:00.750000Z"
    assert _format_ts(1_779_000_001.0) == "2026-05-17T06:40:01.000000Z"


# --- deferred records (a statement's result rides with the next record) ---------------------


def test_a_deferred_record_goes_out_with_the_next_one(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync="batch", fsync_interval=60)
    try:
        log.append("statement.request", n=1)
        log.append_deferred("statement.result", n=1)
        (segment,) = segments(tmp_path)
        assert len(lines_of(segment)) == 1  # not in the file yet
        log.append("statement.request", n=2)
        records = [json.loads(line) for line in lines_of(segment)]
        assert [(r["seq"], r["type"]) for r in records] == [
            (1, "statement.request"), (2, "statement.result"), (3, "statement.request"),
        ]  # fmt: skip
        # One chain, in order.
        assert records[2]["prev"] == hashlib.sha256(lines_of(segment)[1]).hexdigest()
    finally:
        log.close()
    assert verify(tmp_path).ok


def test_a_deferred_record_reaches_the_file_by_the_next_sync(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync="batch", fsync_interval=0.05)
    try:
        log.append_deferred("statement.result", n=1)
        deadline = time.monotonic() + 5
        while not (segments(tmp_path) and segments(tmp_path)[0].stat().st_size):
            assert time.monotonic() < deadline, "the background sync did not write it"
            time.sleep(0.01)
        assert json.loads(lines_of(segments(tmp_path)[0])[0])["type"] == "statement.result"
    finally:
        log.close()
    report = verify(tmp_path)
    assert report.ok and report.records == 1


def test_deferred_records_close_their_segment_on_rotation(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync="batch", fsync_interval=60, max_segment_bytes=400)
    try:
        for n in range(12):
            log.append("statement.request", n=n, pad="x" * 40)
            log.append_deferred("statement.result", n=n, pad="y" * 40)
    finally:
        log.close()
    seqs = [r["seq"] for r in read_records(tmp_path)]
    assert seqs == list(range(1, 25))
    assert len(segments(tmp_path)) > 2
    assert verify(tmp_path).ok


def test_always_mode_writes_a_deferred_record_at_once(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync="always")
    try:
        log.append_deferred("statement.result", n=1)
        assert len(lines_of(segments(tmp_path)[0])) == 1
    finally:
        log.close()


# --- the fast record encoding and its reference ---------------------------------------------

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text(), _json_values, max_size=8))
def test_fast_encoding_says_what_the_reference_says(fields: dict[str, Any]) -> None:
    fast = encode_fields(fields)
    reference = _ENCODER.encode(fields)
    assert fast.isascii()  # a line never carries a Unicode line separator
    assert json.loads(fast) == json.loads(reference)
    if not json.dumps(fields, ensure_ascii=False).isascii():
        assert fast == reference  # non-ASCII content: the reference's bytes exactly


def test_a_gateway_record_with_non_ascii_text_is_escaped_as_the_reference_does(
    tmp_path: Path,
) -> None:
    with AuditLog(tmp_path) as log:
        log.append_record("statement.request", {"text": "SELECT 'é\u2028'", "n": 1})
        log.append("statement.request", text="SELECT 'é\u2028'", n=1)
    first, second = lines_of(segments(tmp_path)[0])
    assert (
        first.split(b'"prev"')[1].split(b",", 1)[1] == second.split(b'"prev"')[1].split(b",", 1)[1]
    )
    assert b"\\u2028" in first and first.isascii()
