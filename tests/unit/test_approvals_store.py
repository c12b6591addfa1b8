"""SqliteReviewStore: the store contract (review_store_contract.py), and what is its own.

The file is private, processes on one host race for one use, a newer schema is refused.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import subprocess
import sys
import textwrap
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from querywarden.approvals import ReviewStore, SqliteReviewStore
from review_store_contract import DBA, NOW, ReviewStoreContract, review

T = TypeVar("T")


def run_with(path: Path, body: Callable[[SqliteReviewStore], Awaitable[T]]) -> T:
    """Run ``body`` with a fresh store on ``path`` (a gateway process's lifetime)."""

    async def scenario() -> T:
        store = SqliteReviewStore(path)
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(scenario())


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "reviews.sqlite"


class TestSqliteReviewStore(ReviewStoreContract):
    """The contract every store keeps, for reviews in one SQLite file."""

    @pytest.fixture
    def opener(self, db: Path) -> Callable[[], ReviewStore]:
        return lambda: SqliteReviewStore(db)


def test_the_file_is_private(db: Path) -> None:
    async def body(store: SqliteReviewStore) -> None:
        await store.create(review())

    run_with(db, body)
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


_USER = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from pathlib import Path
    from querywarden.approvals import ReviewConflict, SqliteReviewStore

    async def main() -> None:
        store = SqliteReviewStore(Path(sys.argv[1]))
        # Start together: wait for the go file the test creates once all are ready.
        go = Path(sys.argv[3])
        while not go.exists():
            await asyncio.sleep(0.005)
        try:
            await store.use(sys.argv[2], now=datetime.fromisoformat(sys.argv[4]))
            print("used")
        except ReviewConflict:
            print("refused")
        finally:
            await store.close()

    asyncio.run(main())
    """
)


def test_processes_racing_for_a_single_use_grant_get_exactly_one_use(
    db: Path, tmp_path: Path
) -> None:
    async def setup(store: SqliteReviewStore) -> str:
        r = (await store.create(review())).review
        await store.decide(r.id, DBA, True, "ok", uses=1, ttl=timedelta(minutes=1), now=NOW)
        return r.id

    review_id = run_with(db, setup)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _USER, str(db), review_id, str(go), NOW.isoformat()],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    go.touch()
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "used"]


def test_a_newer_schema_is_refused(db: Path) -> None:
    run_with(db, lambda store: store.list())
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(RuntimeError, match="newer"):
        run_with(db, lambda store: store.list())
