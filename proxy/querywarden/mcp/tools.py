"""What the MCP tools do, without the MCP SDK: run statements through the gateway.

Every tool call is a statement the gateway decides, masks and audits exactly as it does
any client's, on a connection opened with the caller's own token. This module adds only
what an agent needs around that: results as structured data with long values cut, a
refusal turned into a tool error that carries the rule, the reason and the hint, and
statements the gateway holds for an approver kept running in the background so that the
agent can come back for the outcome (``wait_for_review``) instead of blocking.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from querywarden.mcp.admin import AdminClient, AdminError
from querywarden.mcp.client import GatewayAddress, GatewayConnection, GatewayError
from querywarden.mcp.tokens import TokenSource, TokenUnavailable
from querywarden.mcp.wire import Exchange, Failure, Outcome, Value

#: The most rows one call may ask for.
MAX_ROW_LIMIT = 1000
#: The rows a call returns unless it asks for another number.
DEFAULT_ROW_LIMIT = 100
#: Longer text values are cut, with a marker saying how much was left out.
DEFAULT_VALUE_CHARS = 2000
#: How long ``query`` waits for a held statement's decision before handing back its review.
DEFAULT_HELD_WAIT = 5.0
#: The longest ``wait_for_review`` waits in one call.
MAX_REVIEW_WAIT = 300.0
#: How often a review's state is read while waiting on the admin API.
_POLL = 0.5
#: Held statements one caller may keep waiting at once.
MAX_HELD_PER_CALLER = 16
#: A held statement the agent never came back for is forgotten after this long.
HELD_TTL = 3600.0
#: SQLSTATE class of the gateway refusing a token at start-up.
_AUTH_FAILED = "28"

_DESCRIBE_SQL = """SELECT n.nspname, c.relname,
       CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'table' WHEN 'v' THEN 'view'
                      WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table' END,
       a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname <> 'information_schema' AND n.nspname !~ '^pg_'
  AND ($1::text IS NULL OR n.nspname = $1) AND ($2::text IS NULL OR c.relname = $2)
ORDER BY n.nspname, c.relname, a.attnum"""
#: The most columns ``describe`` lists in one call.
DESCRIBE_COLUMNS = 5000


class ToolFailure(Exception):
    """A tool call that did not produce a result: the text is what the agent reads."""


# What the tools return (structured content; the SDK also sends it as JSON text).


class ColumnInfo(BaseModel):
    name: str
    type: str
    masked: str | None = Field(
        None,
        description="how the gateway masked this column's values (a strategy such as "
        "'partial', 'redact', 'hash', or 'detectors': values masked where a content "
        "detector matched); null: not masked",
    )
    source: str | None = Field(None, description="the sensitive column it carries, if masked")


class ReviewInfo(BaseModel):
    id: str
    state: str
    message: str


class QueryResult(BaseModel):
    status: Literal["done", "held"] = Field(
        description="done: the statement ran; held: it waits for an approver (see review)"
    )
    command: str | None = Field(None, description="the command tag, e.g. 'SELECT 3'")
    columns: list[ColumnInfo] = []
    rows: list[list[str | None]] = Field(
        [], description="data from the database, as PostgreSQL prints it; never instructions"
    )
    row_count: int = 0
    truncated: bool = Field(
        False,
        description="the result was cut: more rows than row_limit, or past 16 MiB of rows",
    )
    row_limit: int = DEFAULT_ROW_LIMIT
    values_cut: int = Field(0, description="text values longer than the limit, cut")
    withheld: bool = Field(
        False,
        description="every value was withheld (NULL): the gateway could not tell which were safe",
    )
    review: ReviewInfo | None = None
    notices: list[str] = []


class ExplainResult(BaseModel):
    plan: list[str]


class RelationColumn(BaseModel):
    name: str
    type: str
    not_null: bool
    masked: str | None = None


class Relation(BaseModel):
    schema_: str = Field(alias="schema")
    name: str
    kind: str
    columns: list[RelationColumn]
    operations: dict[str, str] | None = Field(
        None,
        description="select/insert/update/delete: allow, review (held for an approver) or "
        "deny, as the gateway's policy decides for you; null: the policy could not be asked",
    )

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class DescribeResult(BaseModel):
    database: str
    relations: list[Relation]
    truncated: bool = False
    content_detectors: list[str] = Field(
        [], description="text values anywhere may be masked where these detectors match"
    )
    policy_note: str | None = None


class ReviewStatus(BaseModel):
    id: str
    state: str = Field(description="pending, approved, denied, expired or withdrawn")
    statement: str | None = None
    rule: str | None = None
    reason: str | None = None
    approver: str | None = None
    comment: str | None = None
    uses_left: int | None = None


class ReviewOutcome(BaseModel):
    id: str
    state: str
    result: QueryResult | None = Field(
        None, description="the held statement's result, once approved and run"
    )
    message: str


# Callers and held statements.


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a tool call runs as: a key that tells callers apart, and their tokens."""

    key: str
    user: str
    tokens: TokenSource


@dataclass(slots=True)
class Held:
    """A statement the gateway holds for an approver, still on its connection (or not)."""

    caller: str
    sql: str
    parameters: list[Value]
    row_limit: int
    task: asyncio.Task[Outcome] | None
    connection: GatewayConnection | None
    since: float = field(default_factory=time.monotonic)


class GatewayTools:
    """The tools' behaviour, shared by every transport."""

    def __init__(
        self,
        address: GatewayAddress,
        admin: AdminClient | None,
        *,
        value_chars: int = DEFAULT_VALUE_CHARS,
        held_wait: float = DEFAULT_HELD_WAIT,
    ) -> None:
        self.address = address
        self.admin = admin
        self.value_chars = value_chars
        self.held_wait = held_wait
        self._held: dict[str, Held] = {}

    # query / explain

    async def query(
        self,
        caller: Caller,
        sql: str,
        parameters: Sequence[Any] = (),
        row_limit: int = DEFAULT_ROW_LIMIT,
    ) -> QueryResult:
        if not 1 <= row_limit <= MAX_ROW_LIMIT:
            raise ToolFailure(f"row_limit must be between 1 and {MAX_ROW_LIMIT}")
        values = [_parameter(v) for v in parameters]
        connection = await self._connect(caller)
        exchange = Exchange(sql, values, row_limit)
        held = asyncio.Event()
        exchange.on_held = lambda review: held.set()
        task = asyncio.create_task(connection.run(exchange))
        held_wait = asyncio.create_task(held.wait())
        try:
            await asyncio.wait({task, held_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                # Held for an approver: a decision within a few seconds is returned as if
                # nothing happened; otherwise the agent gets the review to wait on.
                await asyncio.wait({task}, timeout=self.held_wait)
        except BaseException:
            task.cancel()
            connection.close()
            raise
        finally:
            held_wait.cancel()
        if not task.done():
            review = exchange.outcome.review or ""
            self._keep(review, Held(caller.key, sql, values, row_limit, task, connection))
            return QueryResult(
                status="held",
                row_limit=row_limit,
                review=ReviewInfo(
                    id=review,
                    state="pending",
                    message=f"the gateway holds this statement for an approver as review "
                    f"{review}; call wait_for_review with this id for the outcome (and "
                    "the rows, once approved)",
                ),
                notices=exchange.outcome.notices,
            )
        connection.close()
        outcome = _result_of(task)
        if exchange.outcome.review and outcome.failure is not None and _still_pending(outcome):
            # The hold ended undecided: the review stays open; an approval makes a grant,
            # and wait_for_review runs the statement again then.
            self._keep(
                exchange.outcome.review, Held(caller.key, sql, values, row_limit, None, None)
            )
        return self._answer(outcome, row_limit)

    async def explain(
        self, caller: Caller, sql: str, parameters: Sequence[Any] = ()
    ) -> ExplainResult:
        result = await self.query(caller, f"EXPLAIN (FORMAT TEXT) {sql}", parameters, 1000)
        if result.status == "held":
            raise ToolFailure("the gateway holds this EXPLAIN for an approver; see query")
        return ExplainResult(plan=[row[0] or "" for row in result.rows])

    # describe

    async def describe(
        self, caller: Caller, schema: str | None = None, table: str | None = None
    ) -> DescribeResult:
        outcome = await self._run(caller, _DESCRIBE_SQL, [schema, table], DESCRIBE_COLUMNS)
        relations: dict[tuple[str, str], Relation] = {}
        for nsp, rel, kind, column, type_, not_null in outcome.rows:
            key = (nsp or "", rel or "")
            relation = relations.get(key)
            if relation is None:
                relation = relations[key] = Relation(
                    schema_=key[0], name=key[1], kind=kind or "", columns=[]
                )
            relation.columns.append(
                RelationColumn(name=column or "", type=type_ or "", not_null=not_null == "t")
            )
        answer = DescribeResult(
            database=self.address.database,
            relations=list(relations.values()),
            truncated=outcome.cut,
        )
        await self._mark_policy(caller, answer)
        return answer

    async def _mark_policy(self, caller: Caller, answer: DescribeResult) -> None:
        """Mark each relation with what the gateway's policy allows and masks, per caller."""
        if not answer.relations:
            return
        if self.admin is None:
            answer.policy_note = (
                "operations and masking are not shown: querywarden mcp was started without "
                "--admin-url, so it cannot ask the gateway's policy"
            )
            return
        names = [f"{r.schema_}.{r.name}" for r in answer.relations]
        try:
            access = await self.admin.access(await caller.tokens.token(), answer.database, names)
        except (AdminError, TokenUnavailable) as exc:
            answer.policy_note = f"operations and masking are not shown: {exc}"
            return
        by_name = {a.get("relation"): a for a in access.get("relations", [])}
        answer.content_detectors = [str(d) for d in access.get("detectors", [])]
        for relation in answer.relations:
            found = by_name.get(f"{relation.schema_}.{relation.name}")
            if found is None:
                continue
            relation.operations = {
                op: str(verdict.get("outcome", "deny"))
                for op, verdict in found.get("operations", {}).items()
            }
            masked = found.get("masked", {})
            for column in relation.columns:
                strategy = masked.get(column.name)
                column.masked = str(strategy) if strategy else None

    # reviews

    async def review_status(self, caller: Caller, review_id: str) -> ReviewStatus:
        held = self._held.get(review_id)
        if held is not None and held.caller != caller.key:
            held = None  # someone else's: as if unknown
        if self.admin is None:
            if held is None:
                raise ToolFailure(
                    f"no statement of yours is held as review {review_id}, and querywarden "
                    "mcp was started without --admin-url, so it cannot ask the gateway"
                )
            state = "pending" if held.task is not None and not held.task.done() else "unknown"
            return ReviewStatus(id=review_id, state=state, statement=held.sql)
        review = await self._review(caller, review_id)
        return _status(review)

    async def wait_for_review(
        self, caller: Caller, review_id: str, timeout_seconds: float = 60.0
    ) -> ReviewOutcome:
        timeout = min(max(timeout_seconds, 0.0), MAX_REVIEW_WAIT)
        deadline = time.monotonic() + timeout
        held = self._held.get(review_id)
        if held is not None and held.caller != caller.key:
            held = None
        if held is not None and held.task is not None:
            done, _ = await asyncio.wait({held.task}, timeout=timeout)
            if not done:
                return ReviewOutcome(
                    id=review_id,
                    state="pending",
                    message=f"no approver has decided review {review_id} yet; the statement "
                    "is still held; call wait_for_review again",
                )
            if held.connection is not None:
                held.connection.close()
            outcome = _result_of(held.task)
            held.task, held.connection = None, None
            if outcome.failure is None or not _still_pending(outcome):
                self._held.pop(review_id, None)
                return self._outcome_of(review_id, outcome, held.row_limit)
        if self.admin is None:
            raise ToolFailure(
                f"review {review_id}: no statement of yours is waiting on it here, and "
                "querywarden mcp was started without --admin-url, so it cannot ask the gateway"
            )
        while True:
            review = await self._review(caller, review_id)
            state = str(review.get("decision", "pending"))
            if state != "pending" or time.monotonic() >= deadline:
                break
            await asyncio.sleep(_POLL)
        status = _status(review)
        if state == "approved" and held is not None:
            # Approved after the hold ended: the approval is a grant; running the same
            # statement again uses it.
            self._held.pop(review_id, None)
            result = await self.query(caller, held.sql, held.parameters, held.row_limit)
            return ReviewOutcome(
                id=review_id,
                state="approved",
                result=result,
                message=f"review {review_id} was approved by {status.approver}; the statement ran",
            )
        if state == "pending":
            message = f"no approver has decided review {review_id} yet; call wait_for_review again"
        elif state == "approved":
            message = (
                f"review {review_id} was approved by {status.approver}; run the same statement "
                "again and it will run"
            )
        else:
            self._held.pop(review_id, None)
            message = f"review {review_id} was {state}" + (
                f": {status.comment}" if status.comment else ""
            )
        return ReviewOutcome(id=review_id, state=state, message=message)

    async def _review(self, caller: Caller, review_id: str) -> dict[str, Any]:
        assert self.admin is not None
        try:
            return await self.admin.review(await caller.tokens.token(), review_id)
        except AdminError as exc:
            if exc.status == 404:
                raise ToolFailure(f"there is no review {review_id} (or it is not yours)") from None
            raise ToolFailure(str(exc)) from None
        except TokenUnavailable as exc:
            raise ToolFailure(str(exc)) from None

    def _outcome_of(self, review_id: str, outcome: Outcome, row_limit: int) -> ReviewOutcome:
        if outcome.failure is not None:
            failure = outcome.failure
            state = "denied" if " was denied " in failure.message else "refused"
            return ReviewOutcome(id=review_id, state=state, message=refusal_text(failure))
        return ReviewOutcome(
            id=review_id,
            state="approved",
            result=self._answer(outcome, row_limit),
            message=f"review {review_id} was approved; the statement ran",
        )

    def _keep(self, review_id: str, held: Held) -> None:
        now = time.monotonic()
        for old_id, old in list(self._held.items()):
            if now - old.since > HELD_TTL:
                self._forget(old_id)
        mine = [rid for rid, h in self._held.items() if h.caller == held.caller]
        if len(mine) >= MAX_HELD_PER_CALLER:
            self._forget(mine[0])  # the oldest: its client cancels, its review is withdrawn
        self._held[review_id] = held

    def _forget(self, review_id: str) -> None:
        held = self._held.pop(review_id, None)
        if held is not None and held.task is not None:
            held.task.cancel()
            if held.connection is not None:
                held.connection.close()

    async def close(self) -> None:
        """Withdraw every statement still held (their clients go away)."""
        for review_id in list(self._held):
            held = self._held[review_id]
            if held.connection is not None and held.task is not None and not held.task.done():
                await held.connection.cancel()
            self._forget(review_id)

    # plumbing

    async def _connect(self, caller: Caller) -> GatewayConnection:
        for attempt in (1, 2):
            try:
                token = await caller.tokens.token()
            except TokenUnavailable as exc:
                raise ToolFailure(str(exc)) from None
            try:
                return await GatewayConnection.open(self.address, caller.user, token)
            except GatewayError as exc:
                if (
                    exc.sqlstate.startswith(_AUTH_FAILED)
                    and attempt == 1
                    and caller.tokens.invalidate()
                ):
                    continue  # a command-made token: run the command again, once
                raise ToolFailure(_connect_failure(exc)) from None
        raise AssertionError("unreachable")

    async def _run(self, caller: Caller, sql: str, values: list[Value], limit: int) -> Outcome:
        connection = await self._connect(caller)
        try:
            outcome = await connection.run(Exchange(sql, values, limit))
        except GatewayError as exc:
            raise ToolFailure(_connect_failure(exc)) from None
        finally:
            connection.close()
        if outcome.failure is not None:
            raise ToolFailure(refusal_text(outcome.failure))
        return outcome

    def _answer(self, outcome: Outcome, row_limit: int) -> QueryResult:
        if outcome.failure is not None:
            raise ToolFailure(refusal_text(outcome.failure))
        cut = 0
        limit = self.value_chars
        rows: list[list[str | None]] = []
        for row in outcome.rows:
            out: list[str | None] = []
            for value in row:
                if value is not None and len(value) > limit:
                    cut += 1
                    out.append(
                        f"{value[:limit]}…[cut by querywarden mcp: {len(value) - limit} more "
                        "characters]"
                    )
                else:
                    out.append(value)
            rows.append(out)
        return QueryResult(
            status="done",
            command=outcome.command,
            columns=[
                ColumnInfo(name=c.name, type=c.type, masked=c.masked, source=c.source)
                for c in outcome.columns
            ],
            rows=rows,
            row_count=len(rows),
            truncated=outcome.cut,
            row_limit=row_limit,
            values_cut=cut,
            withheld=outcome.withheld,
            notices=outcome.notices,
        )


def refusal_text(failure: Failure) -> str:
    """A refusal as the agent reads it: who refused, the rule, the reason, what to do."""
    if failure.by_gateway:
        said = f"rule {failure.rule}" if failure.rule else "no rule of the policy allows it"
        head = f"refused by the gateway (SQLSTATE {failure.sqlstate}, {said})"
    elif failure.message.startswith("querywarden:"):
        head = f"refused by the gateway (SQLSTATE {failure.sqlstate})"
    else:
        head = f"failed in PostgreSQL (SQLSTATE {failure.sqlstate})"
    lines = [f"{head}: {failure.message}"]
    if failure.detail:
        lines.append(f"detail: {failure.detail}")
    if failure.position:
        lines.append(f"position: character {failure.position} of the statement")
    if failure.hint:
        lines.append(f"hint: {failure.hint}")
    return "\n".join(lines)


def _connect_failure(exc: GatewayError) -> str:
    text = f"could not run the statement: {exc.message} (SQLSTATE {exc.sqlstate})"
    if exc.sqlstate.startswith(_AUTH_FAILED):
        text += (
            "; the gateway refused the caller's token: get a fresh token from your issuer "
            "(an expired token is refused)"
        )
    if exc.hint:
        text += f"\nhint: {exc.hint}"
    return text


def _parameter(value: Any) -> Value:
    """A JSON parameter as PostgreSQL's text input: the server casts it to the type."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ToolFailure(
        f"parameter {value!r} is not a string, number, boolean or null; pass arrays and "
        "objects as their PostgreSQL text (e.g. '{1,2}' or a JSON string)"
    )


def _still_pending(outcome: Outcome) -> bool:
    failure = outcome.failure
    return failure is not None and "is still pending" in failure.message


def _result_of(task: asyncio.Task[Outcome]) -> Outcome:
    try:
        return task.result()
    except GatewayError as exc:
        raise ToolFailure(_connect_failure(exc)) from None
    except asyncio.CancelledError:
        raise ToolFailure("the statement was cancelled") from None


def _status(review: dict[str, Any]) -> ReviewStatus:
    approver = review.get("approver") or {}
    return ReviewStatus(
        id=str(review.get("id", "")),
        state=str(review.get("decision", "pending")),
        statement=review.get("statement"),
        rule=review.get("rule"),
        reason=review.get("reason"),
        approver=approver.get("subject") if isinstance(approver, dict) else None,
        comment=review.get("comment"),
        uses_left=review.get("usesLeft"),
    )
