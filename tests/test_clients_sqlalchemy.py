"""SQLAlchemy 2 through the gateway, with the psycopg and the asyncpg drivers.

Each scenario runs through the gateway and directly, on tables of its own, and the
results are compared; the tables written through the gateway are also read back
directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import orm
from sqlalchemy.dialects import postgresql

from client_helpers import direct_url, unique_name
from gateway_harness import RunningGateway
from querywarden.devcluster import EphemeralCluster

START = datetime(2024, 4, 5, 6, 7, 8, 90000, tzinfo=UTC)


def core_table(metadata: sa.MetaData, name: str) -> sa.Table:
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("amount", sa.Numeric(12, 3)),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now()),
        sa.Column("at", sa.DateTime(timezone=True)),
        sa.Column("doc", postgresql.JSONB),
        sa.Column("tags", postgresql.ARRAY(sa.Text)),
        sa.Column("blob", sa.LargeBinary),
    )


def core_rows() -> list[dict[str, Any]]:
    return [
        {
            "id": i,
            "name": f"item {i} ✓",
            "amount": None if i % 5 == 0 else Decimal(i) / 8,
            "at": START + timedelta(hours=i),
            "doc": {"i": i, "list": [1, None, "x"]},
            "tags": ["a", f"t{i}"],
            "blob": bytes([i % 256, 0]),
        }
        for i in range(1, 501)
    ]


def core_scenario(engine: sa.Engine, table: sa.Table) -> Any:
    columns = [c for c in table.c if c.name != "created"]
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), core_rows())
        returned = conn.execute(
            table.insert().returning(table.c.id, table.c.created.is_not(None)),
            [{"id": 1000, "name": "returning"}],
        ).all()
    # A failed transaction rolls back and leaves the connection usable.
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(table.update().where(table.c.id == 2).values(name="changed"))
        conn.execute(table.insert(), [{"id": 3, "name": "duplicate"}])
    with engine.connect() as conn:
        everything = conn.execute(sa.select(*columns).order_by(table.c.id)).all()
        grouped = conn.execute(
            sa.select(
                (table.c.id % 3).label("bucket"),
                sa.func.count(),
                sa.func.sum(table.c.amount),
                sa.func.max(table.c.doc["i"].astext.cast(sa.Integer)),
            )
            .group_by(sa.text("1"))
            .order_by(sa.text("1"))
        ).all()
        param = conn.execute(
            sa.select(table.c.name).where(table.c.tags.contains(["t7"]))
        ).scalar_one()
    return returned, [tuple(r) for r in everything], [tuple(r) for r in grouped], param


@pytest.fixture
def engines(pg: EphemeralCluster, gateway: RunningGateway) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    through = sa.create_engine(gateway.url(scheme="postgresql+psycopg"))
    direct = sa.create_engine(direct_url(pg, scheme="postgresql+psycopg"))
    try:
        yield through, direct
    finally:
        through.dispose()
        direct.dispose()


def test_core_with_psycopg(engines: tuple[sa.Engine, sa.Engine], pg: EphemeralCluster) -> None:
    through_engine, direct_engine = engines
    names = unique_name("sa_core_gw"), unique_name("sa_core_direct")
    metadata = sa.MetaData()
    tables = [core_table(metadata, n) for n in names]
    try:
        through = core_scenario(through_engine, tables[0])
        direct = core_scenario(direct_engine, tables[1])
        assert through == direct
        returned, everything, grouped, param = through
        assert returned == [(1000, True)]
        assert len(everything) == 501
        assert everything[1][1] == "item 2 ✓"  # the failed update was rolled back
        assert everything[0][2:7] == (
            Decimal("0.125"),
            START + timedelta(hours=1),
            {"i": 1, "list": [1, None, "x"]},
            ["a", "t1"],
            b"\x01\x00",
        )
        assert sum(count for _, count, _, _ in grouped) == 501
        assert param == "item 7 ✓"
        # What was written through the gateway reads back the same directly.
        with direct_engine.connect() as conn:
            columns = [c for c in tables[0].c if c.name != "created"]
            read_back = conn.execute(sa.select(*columns).order_by(tables[0].c.id)).all()
        assert [tuple(r) for r in read_back] == everything
    finally:
        metadata.drop_all(direct_engine)


def make_models(suffix: str) -> tuple[type[Any], type[Any], orm.registry]:
    """ORM classes on tables of their own (a new registry per call)."""

    class Base(orm.DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"sa_author_{suffix}"
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
        name: orm.Mapped[str] = orm.mapped_column(sa.String(100), unique=True)
        books: orm.Mapped[list[Book]] = orm.relationship(
            back_populates="author", order_by="Book.id", cascade="all, delete-orphan"
        )

    class Book(Base):
        __tablename__ = f"sa_book_{suffix}"
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
        title: orm.Mapped[str]
        price: orm.Mapped[Decimal] = orm.mapped_column(sa.Numeric(8, 2))
        author_id: orm.Mapped[int] = orm.mapped_column(sa.ForeignKey(f"sa_author_{suffix}.id"))
        author: orm.Mapped[Author] = orm.relationship(back_populates="books")

    return Author, Book, Base.registry


def orm_scenario(engine: sa.Engine, suffix: str) -> Any:
    author_cls, book_cls, registry = make_models(suffix)
    registry.metadata.create_all(engine)
    try:
        with orm.Session(engine) as session:
            for a in range(1, 6):
                author = author_cls(name=f"author {a}")
                author.books = [
                    book_cls(title=f"book {a}.{b}", price=Decimal(f"{a}.{b}0")) for b in range(4)
                ]
                session.add(author)
            session.commit()
            ids = session.scalars(sa.select(author_cls.id).order_by(author_cls.id)).all()

        with orm.Session(engine) as session:
            session.add(author_cls(name="author 1"))
            with pytest.raises(sa.exc.IntegrityError):
                session.commit()
            session.rollback()
            first = session.scalars(
                sa.select(author_cls).where(author_cls.name == "author 1")
            ).one()
            first.books[0].title = "renamed"
            del first.books[1]
            session.commit()

        with orm.Session(engine) as session:
            rows = session.execute(
                sa.select(author_cls.name, sa.func.count(book_cls.id), sa.func.sum(book_cls.price))
                .join(author_cls.books)
                .group_by(author_cls.name)
                .order_by(author_cls.name)
            ).all()
            loaded = session.scalars(
                sa.select(author_cls)
                .options(orm.selectinload(author_cls.books))
                .order_by(author_cls.id)
            ).all()
            titles = [[b.title for b in a.books] for a in loaded]
        return len(ids), [tuple(r) for r in rows], titles
    finally:
        registry.metadata.drop_all(engine)


def test_orm_with_psycopg(engines: tuple[sa.Engine, sa.Engine]) -> None:
    through_engine, direct_engine = engines
    through = orm_scenario(through_engine, unique_name("gw"))
    direct = orm_scenario(direct_engine, unique_name("direct"))
    assert through == direct
    count, rows, titles = through
    assert count == 5
    assert rows[0] == ("author 1", 3, Decimal("3.50"))
    assert titles[0] == ["renamed", "book 1.2", "book 1.3"]


def test_core_with_asyncpg(pg: EphemeralCluster, gateway: RunningGateway) -> None:
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

    async def scenario(engine: AsyncEngine, table: sa.Table) -> Any:
        columns = [c for c in table.c if c.name != "created"]
        try:
            async with engine.begin() as conn:
                await conn.run_sync(table.create)
                await conn.execute(table.insert(), core_rows())
            with pytest.raises(sa.exc.IntegrityError):
                async with engine.begin() as conn:
                    await conn.execute(table.delete().where(table.c.id < 10))
                    await conn.execute(table.insert(), [{"id": 20, "name": "duplicate"}])
            async with engine.begin() as conn:
                result = await conn.execute(sa.select(*columns).order_by(table.c.id))
                everything = [tuple(r) for r in result]
                # A server-side cursor, fetched in partitions.
                streamed = 0
                stream = await conn.stream(sa.select(table.c.id).order_by(table.c.id))
                async for partition in stream.partitions(100):
                    streamed += len(partition)
                total = await conn.scalar(sa.select(sa.func.sum(table.c.amount)))
            return everything, streamed, total
        finally:
            async with engine.begin() as conn:
                await conn.run_sync(table.drop)

    async def both() -> tuple[Any, Any]:
        metadata = sa.MetaData()
        outcomes = []
        for url in (
            gateway.url(scheme="postgresql+asyncpg"),
            direct_url(pg, scheme="postgresql+asyncpg"),
        ):
            engine = create_async_engine(url)
            try:
                table = core_table(metadata, unique_name("sa_async"))
                outcomes.append(await scenario(engine, table))
            finally:
                await engine.dispose()
        return outcomes[0], outcomes[1]

    through, direct = asyncio.run(both())
    assert through == direct
    everything, streamed, total = through
    assert len(everything) == 500 and streamed == 500
    assert everything[0][:3] == (1, "item 1 ✓", Decimal("0.125"))
    assert total == sum(Decimal(i) / 8 for i in range(1, 501) if i % 5)
