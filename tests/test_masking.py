"""Inline masking through the real gateway, with real clients and a real PostgreSQL.

The leak corpus runs through psql (text), psycopg (text and binary) and asyncpg (binary,
prepared); a tap between each client and the gateway records every byte the client
received, and none of the seeded sensitive values may be in them, in any spelling
(digits only, upper case, hex, base64).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from byte_tap import ByteTap
from gateway_harness import DATABASE, POLICY, RunningGateway, token_for
from masking_corpus import CORPUS, SEED, UPDATES, leak_patterns
from querywarden import codec
from querywarden.devcluster import EphemeralCluster
from querywarden.masking import compiled
from querywarden.policy import PolicyDocument
from raw_client import Message, RawClient
from wire_client import SYNC, bind, execute

HASH_KEY = "test-masking-key-0123456789abcdef"

RULES = [
    {
        "name": "agents-read",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": ["select", "explain", "copy_out", "prepare", "execute", "deallocate"],
            # pg_stats by its exact name: the policy lets these identities read statistics
            # (a built-in protection otherwise), and masking redacts their sampled values.
            "tables": ["public.*", "pg_catalog.*", "pg_catalog.pg_stats"],
        },
    },
    {
        "name": "support-update",
        "subjects": {"groups": ["support"]},
        "allow": {"operations": ["select", "update"], "tables": ["public.*", "pg_catalog.*"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]

MASKING = {
    "columns": [
        {"table": "public.qm_customers", "column": "ssn", "strategy": "partial", "keepLast": 4},
        {"table": "qm_customers", "column": "card", "strategy": "digits"},
        {"table": "qm_customers", "column": "email", "strategy": "email"},
        {"table": "qm_customers", "column": "api_key", "strategy": "hash"},
        {"table": "qm_people", "column": "ssn", "strategy": "redact"},
    ],
    "detectors": ["ssn", "credit_card", "api_key", "jwt", "private_key", "email"],
    "predicates": "deny",
    "exempt": {"groups": ["dba"]},
}

PATTERNS = leak_patterns()


def leaks(data: bytes) -> list[str]:
    """The secrets whose bytes (in any of their spellings) appear in ``data``."""
    return sorted({secret for pattern, secret in PATTERNS.items() if pattern in data})


@pytest.fixture(scope="module")
def seeded(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(SEED)
    yield
    pg.psql("DROP TABLE qm_customers, qm_orders, qm_people CASCADE")


@pytest.fixture(scope="module", params=["on", "off"], ids=["native", "python"])
def row_masker(request: pytest.FixtureRequest) -> str:
    """``performance.native``: every test here runs with the compiled row masker and with
    the pure-Python reference (``on`` fails if the compiled one is not built).
    """
    mode: str = request.param
    return mode


def masking_gateway(
    make_gateway: Callable[..., RunningGateway], rules: list[dict[str, Any]], row_masker: str
) -> RunningGateway:
    """A gateway with the test policy's masking section and ``rules``."""
    policy = PolicyDocument.model_validate(
        {"identity": POLICY.identity.model_dump(by_alias=True), "rules": rules, "masking": MASKING}
    )
    gw = make_gateway(
        policy=policy, masking={"hashKey": HASH_KEY}, performance={"native": row_masker}
    )
    assert compiled.enabled() == (row_masker == "on")
    return gw


@pytest.fixture
def masked(
    make_gateway: Callable[..., RunningGateway], seeded: None, row_masker: str
) -> Iterator[RunningGateway]:
    gw = masking_gateway(make_gateway, RULES, row_masker)
    tap = ByteTap(gw.host, gw.port)
    gw.extra["tap"] = tap
    try:
        yield gw
    finally:
        tap.close()


def _tap(gw: RunningGateway) -> ByteTap:
    tap = gw.extra["tap"]
    assert isinstance(tap, ByteTap)
    return tap


def _outcome(error: BaseException | None) -> str:
    if error is None:
        return "ran"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def test_leak_corpus_psycopg_text_and_binary(masked: RunningGateway) -> None:
    tap = _tap(masked)
    outcomes: dict[str, set[str]] = {}
    for binary in (False, True):
        with psycopg.connect(masked.dsn("alice", port=tap.port), autocommit=True) as conn:
            tap.take()
            for sql in CORPUS:
                error: BaseException | None = None
                try:
                    with conn.cursor(binary=binary) as cur:
                        if sql.startswith("COPY"):
                            with cur.copy(sql) as copy:
                                for _ in copy:
                                    pass
                        else:
                            cur.execute(sql)
                            while True:
                                if cur.description is not None:
                                    cur.fetchall()
                                if not cur.nextset():
                                    break
                except psycopg.Error as exc:
                    error = exc
                received = tap.take()
                assert leaks(received) == [], (sql, binary, _outcome(error))
                outcomes.setdefault(sql, set()).add(_outcome(error).split(":")[0])
    # The corpus exercises both paths: masked results and refusals.
    assert sum("ran" in o for o in outcomes.values()) >= 30
    assert sum("InsufficientPrivilege" in o for o in outcomes.values()) >= 10


def test_leak_corpus_psql(masked: RunningGateway) -> None:
    tap = _tap(masked)
    tap.take()
    for sql in CORPUS:
        result = subprocess.run(
            ["psql", "-X", "-v", "ON_ERROR_STOP=0", "-c", sql, masked.dsn("alice", port=tap.port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        received = tap.take()
        assert leaks(received) == [], (sql, result.stdout[-300:], result.stderr[-300:])
        assert leaks((result.stdout + result.stderr).encode()) == [], sql


def test_leak_corpus_asyncpg_binary_prepared(masked: RunningGateway) -> None:
    tap = _tap(masked)

    async def run() -> int:
        conn = await asyncpg.connect(
            host=masked.host,
            port=tap.port,
            user="alice",
            password=token_for("alice"),
            database=DATABASE,
            ssl=False,
        )
        ran = 0
        try:
            tap.take()
            for sql in CORPUS:
                if ";" in sql or sql.startswith("COPY"):
                    continue  # asyncpg prepares one statement at a time; no COPY TO here
                try:
                    await conn.fetch(sql)
                    ran += 1
                except (asyncpg.PostgresError, asyncpg.InterfaceError):
                    pass
                received = tap.take()
                assert leaks(received) == [], sql
        finally:
            await conn.close()
        return ran

    assert asyncio.run(run()) >= 30


def test_updates_errors_and_returning_do_not_leak(masked: RunningGateway) -> None:
    tap = _tap(masked)
    with psycopg.connect(masked.dsn("carol", port=tap.port), autocommit=True) as conn:
        tap.take()
        for sql in UPDATES:
            try:
                cur = conn.execute(sql)
                if cur.description is not None:
                    cur.fetchall()
            except psycopg.Error:
                pass
            assert leaks(tap.take()) == [], sql


def test_masked_values_follow_each_strategy(masked: RunningGateway) -> None:
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT ssn, card, email, api_key, name FROM qm_customers WHERE id = 1"
        ).fetchone()
        assert row is not None
        ssn, card, email, api_key, name = row
        assert ssn.endswith("6789") and "123" not in ssn
        assert len(card) == len("4111 1111 1111 1111") and card.count(" ") == 3
        assert card != "4111 1111 1111 1111"
        assert email.endswith("@example.com") and "alice" not in email
        assert api_key != "qwk_9f8e7d6c5b4a3b2a"
        assert name == "Ada"  # not sensitive: untouched
        # Computed from nothing sensitive: untouched too.
        assert conn.execute("SELECT count(*), max(id) FROM qm_customers").fetchone() == (2, 2)
        # Computed from a sensitive column: masked whole.
        (upper,) = conn.execute("SELECT upper(ssn) FROM qm_customers WHERE id = 1").fetchone() or ()
        assert upper != "123-45-6789" and "6789" not in upper
        # A content detector catches an SSN in an unmarked column.
        (notes,) = conn.execute("SELECT notes FROM qm_customers WHERE id = 2").fetchone() or ()
        assert "078-05-1120" not in notes and "redacted" in notes
        # In json/jsonb a flagged value is replaced whole, so the document stays valid.
        for cast in ("json", "jsonb"):
            (doc,) = (
                conn.execute(
                    f'SELECT \'{{"n": 4111111111111111, "ssn": "078-05-1120"}}\'::{cast}'
                ).fetchone()
                or ()
            )
            assert isinstance(doc, str) and "078-05-1120" not in doc
        # The refusal says why and what to do instead.
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
            conn.execute("SELECT id FROM qm_customers WHERE ssn LIKE '1%'")
        assert "public.qm_customers.ssn" in str(refused.value)
        assert refused.value.diag.message_hint is not None


def test_hash_is_stable_across_sessions_and_joins_still_match(masked: RunningGateway) -> None:
    values = []
    for _ in range(2):
        with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
            values.append(conn.execute("SELECT api_key FROM qm_customers ORDER BY id").fetchall())
    assert values[0] == values[1]
    assert values[0][0] != values[0][1]
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        # A self-join on the masked key: the hashed values on both sides still match.
        rows = conn.execute(
            "SELECT a.api_key, b.api_key FROM qm_customers a JOIN qm_customers b USING (id)"
        ).fetchall()
        assert all(left == right for left, right in rows)


def test_exempt_group_sees_real_values(masked: RunningGateway) -> None:
    with psycopg.connect(masked.dsn("bob"), autocommit=True) as conn:
        assert conn.execute("SELECT ssn FROM qm_customers WHERE id = 1").fetchone() == (
            "123-45-6789",
        )
        assert conn.execute("SELECT count(*) FROM qm_customers WHERE ssn LIKE '1%'").fetchone() == (
            1,
        )


def test_binary_values_decode_as_their_types(masked: RunningGateway) -> None:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(
            host=masked.host,
            port=masked.port,
            user="alice",
            password=token_for("alice"),
            database=DATABASE,
            ssl=False,
        )
        try:
            row = await conn.fetchrow(
                "SELECT ssn, length(ssn), ssn::bytea, to_jsonb(c) FROM qm_customers c WHERE id = 1"
            )
            assert row is not None
            return list(row)
        finally:
            await conn.close()

    ssn, length, raw, doc = asyncio.run(run())
    assert ssn.endswith("6789") and "123" not in ssn
    # Computed columns of a tainted request are masked whole: a type-valid value or NULL.
    assert length is None or isinstance(length, int)
    assert raw is None or b"123" not in raw
    assert doc is None or "123-45" not in str(doc)
    # A whole row (a record) has no safe constant: NULL, in binary as in text.
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        for binary in (False, True):
            cur = conn.cursor(binary=binary)
            assert cur.execute("SELECT c FROM qm_customers c WHERE id = 1").fetchone() == (None,)


def test_views_mask_the_columns_that_carry_sensitive_values(
    make_gateway: Callable[..., RunningGateway],
    seeded: None,
    pg: EphemeralCluster,
    row_masker: str,
) -> None:
    pg.psql(
        "CREATE VIEW qm_filtered_view AS SELECT id, name FROM qm_customers WHERE ssn LIKE '1%';"
        "CREATE FUNCTION qm_leak(int) RETURNS text LANGUAGE sql STABLE "
        "AS 'SELECT ssn FROM qm_customers WHERE id = $1';"
        "CREATE VIEW qm_function_view AS SELECT id, qm_leak(id) AS looked_up FROM qm_customers;"
        "GRANT SELECT ON qm_filtered_view, qm_function_view TO PUBLIC"
    )
    try:
        gw = masking_gateway(make_gateway, RULES, row_masker)
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            # id and name pass clean columns through: untouched, and usable in WHERE.
            row = conn.execute("SELECT id, name, ssn FROM qm_customer_view WHERE id = 1").fetchone()
            assert row is not None and row[:2] == (1, "Ada")
            assert row[2].endswith("6789") and "123" not in row[2]  # ssn's own strategy
            # A column computed from ssn is redacted; its neighbour is not.
            tag_row = conn.execute("SELECT id, tagged FROM qm_ssn_view WHERE id = 1").fetchone()
            assert tag_row is not None and tag_row[0] == 1 and "6789" not in tag_row[1]
            # Rows chosen by ssn: every column of the view carries something of it.
            (name,) = conn.execute("SELECT name FROM qm_filtered_view").fetchone() or ()
            assert name != "Ada"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT name FROM qm_filtered_view WHERE id = 1")
            # A function of the user's reads ssn where pg_depend cannot see it: the whole
            # view is redacted.
            rows = conn.execute("SELECT id, looked_up FROM qm_function_view").fetchall()
            assert len(rows) == 2
            assert not leaks(repr(rows).encode())
            assert all(
                looked_up != ssn
                for (_, looked_up), ssn in zip(rows, ["123-45-6789", "987-65-4321"], strict=True)
            )
    finally:
        pg.psql("DROP VIEW qm_filtered_view, qm_function_view; DROP FUNCTION qm_leak(int)")


def test_statistics_do_not_hand_out_sampled_values(
    masked: RunningGateway, pg: EphemeralCluster
) -> None:
    # ANALYZE copies values of every column into pg_statistic, which pg_stats shows to
    # any role that may read the table: histogram bounds of ssn are ssns.
    pg.psql("ANALYZE qm_customers")
    with psycopg.connect(masked.dsn("alice"), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT attname, histogram_bounds::text, most_common_vals::text "
            "FROM pg_catalog.pg_stats WHERE tablename = 'qm_customers' ORDER BY attname"
        ).fetchall()
        assert [r[0] for r in rows] == ["api_key", "card", "email", "id", "name", "notes", "ssn"]
        assert not leaks(repr(rows).encode())
        assert "987-65-4321" not in repr(rows)  # an ssn the ssn detector does not flag
        bounds = conn.execute(
            "SELECT histogram_bounds FROM pg_stats WHERE tablename = 'qm_customers' "
            "AND attname = 'api_key'"
        ).fetchone()
        assert bounds is not None and "qwk_" not in str(bounds[0])
    # The exempt group still sees the statistics as they are.
    with psycopg.connect(masked.dsn("bob"), autocommit=True) as conn:
        (bounds_text,) = conn.execute(
            "SELECT histogram_bounds::text FROM pg_stats WHERE tablename = 'qm_customers' "
            "AND attname = 'ssn'"
        ).fetchone() or (None,)
        assert bounds_text is not None and "987-65-4321" in bounds_text


#: A masked identity that may do much more than read: side channels are what is tested.
WIDE_RULES = [
    {
        "name": "agents-wide",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {
            "operations": [
                "select",
                "listen",
                "notify",
                "set",
                "show",
                "do",
                "call",
                "side_effects",
            ],
            "tables": ["public.*", "pg_catalog.*"],
        },
    }
]


def test_side_channels_do_not_carry_masked_values(
    make_gateway: Callable[..., RunningGateway],
    seeded: None,
    pg: EphemeralCluster,
    row_masker: str,
) -> None:
    pg.psql(
        "CREATE FUNCTION qm_shout(int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE NOTICE '%', (SELECT api_key FROM qm_customers WHERE id = $1); RETURN $1; END $$;"
        "CREATE FUNCTION qm_fail(int) RETURNS int LANGUAGE plpgsql AS $$ BEGIN "
        "RAISE EXCEPTION '%', (SELECT api_key FROM qm_customers WHERE id = $1); END $$"
    )
    try:
        gw = masking_gateway(make_gateway, WIDE_RULES, row_masker)
        with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
            received: list[str] = []
            conn.add_notify_handler(lambda n: received.append(n.payload))
            conn.add_notice_handler(lambda d: received.append(str(d.message_primary)))
            conn.execute("LISTEN qm")
            # A notification's payload is not masked: sending a masked value is refused.
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="pg_notify"):
                conn.execute("SELECT pg_notify('qm', ssn) FROM qm_customers")
            conn.execute("SELECT pg_notify('qm', id::text) FROM qm_customers")  # allowed
            # A DO block could RAISE or SET any value: refused, saying what to do instead.
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute(
                    "DO $$ BEGIN RAISE NOTICE '%', (SELECT api_key FROM qm_customers LIMIT 1);"
                    " END $$"
                )
            assert "plain SQL" in (refused.value.diag.message_hint or "")
            # A function of the user's RAISEs the value as its message: withheld whole.
            # (Its result is computed by code the gateway cannot see into: masked too.)
            assert conn.execute("SELECT qm_shout(2)").fetchone() != (2,)
            with pytest.raises(psycopg.errors.RaiseException) as raised:
                conn.execute("SELECT qm_fail(1)")
            assert raised.value.diag.sqlstate == "P0001"  # the SQLSTATE is kept
            texts = [str(raised.value), *received]
            # Another session notifies with row data (an application's trigger would): the
            # masked session gets the signal, not the payload.
            pg.psql('NOTIFY qm, \'{"ssn": "987-65-4321"}\'')
            conn.execute("SELECT 1")
            texts = [str(raised.value), *received]
            assert not leaks(repr(texts).encode()), texts
            withheld = "querywarden: payload withheld (masked identity)"
            assert received.count(withheld) == 3  # two allowed pg_notify calls, one NOTIFY
    finally:
        pg.psql("DROP FUNCTION qm_shout(int), qm_fail(int)")


# --- which statement a result belongs to ----------------------------------------------
# A result is masked by the plan of the statement that produced it. The gateway learns
# which one from the server's answers, in order (ParseComplete, BindComplete), never from
# what the client sent last: a pipeline may define the unnamed statement or portal again
# before the first one's rows arrive, and a Parse the server rejects leaves the old
# statement in place.

_SSN_SQL = "SELECT ssn FROM qm_customers"
_HARMLESS_SQL = "SELECT name FROM qm_customers"


def _agent_rows(masked: RunningGateway, *frames: bytes) -> tuple[list[Message], bytes]:
    """Send ``frames`` as an agent in one write; the messages up to the last ReadyForQuery."""
    syncs = sum(1 for f in frames if f[:1] == b"S")
    with RawClient.to(masked) as client:
        client.login("alice")
        client.send(b"".join(frames))
        messages: list[Message] = []
        while sum(1 for m in messages if m.mtype == b"Z") < syncs:
            message = client.read_message()
            assert message is not None, [m.mtype for m in messages]
            messages.append(message)
    raw = b"".join(m.frame for m in messages)
    return messages, raw


def test_a_pipeline_that_redefines_the_unnamed_statement_masks_each_result_by_its_own(
    masked: RunningGateway,
) -> None:
    messages, raw = _agent_rows(
        masked,
        codec.parse("", _SSN_SQL),
        bind(),
        execute(),
        codec.parse("", _HARMLESS_SQL),
        bind(),
        execute(),
        SYNC,
    )
    assert [m.mtype for m in messages].count(b"C") == 2, [m.mtype for m in messages]
    assert b"Ada" in raw  # the second statement ran and was not masked
    assert leaks(raw) == []


def test_a_pipeline_that_rebinds_the_unnamed_portal_masks_each_result_by_its_own(
    masked: RunningGateway,
) -> None:
    messages, raw = _agent_rows(
        masked,
        codec.parse("secret", _SSN_SQL),
        codec.parse("harmless", _HARMLESS_SQL),
        SYNC,
        bind("", "secret"),
        execute(),
        bind("", "harmless"),
        execute(),
        SYNC,
    )
    assert [m.mtype for m in messages].count(b"C") == 2, [m.mtype for m in messages]
    assert leaks(raw) == []


def test_a_rejected_parse_leaves_the_statement_and_its_masking_as_they_were(
    masked: RunningGateway,
) -> None:
    messages, raw = _agent_rows(
        masked,
        codec.parse("s1", _SSN_SQL),
        SYNC,
        codec.parse("s1", _HARMLESS_SQL),  # already exists: the server rejects it
        SYNC,
        bind("", "s1"),
        execute(),
        SYNC,
    )
    errors = [m.fields for m in messages if m.mtype == b"E"]
    assert [e["C"] for e in errors] == ["42P05"], errors
    assert [m.mtype for m in messages].count(b"D") > 0  # the old statement's rows came
    assert leaks(raw) == []


def _annotations(gw: RunningGateway, sql: str, *, prepare: bool, **params: Any) -> list[Any]:
    """The masking notices a client asking for them receives for ``sql``, and its rows."""
    notices: list[Any] = []
    with psycopg.connect(gw.dsn(**params), autocommit=True) as conn:
        # A Diagnostic is only valid inside the handler: keep its fields.
        conn.add_notice_handler(lambda d: notices.append((d.message_primary, d.message_detail)))
        rows = conn.execute(sql, prepare=prepare).fetchall()
    return [notices, rows]


@pytest.mark.parametrize("prepare", [False, True], ids=["simple", "extended"])
def test_a_client_that_asks_is_told_which_columns_are_masked_and_how(
    masked: RunningGateway, prepare: bool
) -> None:
    sql = "SELECT id, ssn AS tax_id, email, notes FROM qm_customers ORDER BY id"
    options = "'-c querywarden.annotations=masking'"
    notices, rows = _annotations(masked, sql, prepare=prepare, options=options)
    assert len(notices) == 1, notices
    primary, detail = notices[0]
    assert primary == (
        "querywarden: masked in this result: tax_id (partial), email (email), notes (detectors)"
    )
    assert json.loads(detail) == {
        "all": False,
        "columns": [
            {
                "index": 1,
                "name": "tax_id",
                "source": "public.qm_customers.ssn",
                "strategy": "partial",
            },
            {
                "index": 2,
                "name": "email",
                "source": "public.qm_customers.email",
                "strategy": "email",
            },
            {"index": 3, "name": "notes", "source": None, "strategy": "detectors"},
        ],
    }
    assert rows[0][1] != "123-45-6789" and rows[0][1].endswith("6789")
    # Without asking, the same query gets no notice; an exempt identity gets none either.
    assert _annotations(masked, sql, prepare=prepare)[0] == []
    assert _annotations(masked, sql, prepare=prepare, user="bob", options=options)[0] == []


def test_an_unknown_annotation_is_refused_at_start_up(masked: RunningGateway) -> None:
    with pytest.raises(
        psycopg.OperationalError, match=r"unknown querywarden\.annotations value 'rows'"
    ):
        psycopg.connect(masked.dsn(options="'-c querywarden.annotations=rows'"))
