"""The policy stage: what the gate decides of each request, and how a refusal is made.

Refusals are made by the server itself. A refused Query, Parse or FunctionCall is replaced
by a *sentinel*: a statement that fails at parse time with a syntax error at a unique
token and has no side effect. The server then produces exactly what it would for any
failed statement (discarding until Sync in the extended protocol, the right ReadyForQuery
status, a failed transaction block), and this stage swaps the server's syntax error for
the refusal's ErrorResponse. The client's view stays in order even deep inside a
pipeline, and the gateway never has to imitate the server's state machine.

A policy reload reaches every statement that runs after it: the stage notices the gate's
new generation at the next request, and statements prepared under the old policy are
decided again at their next Execute.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable
from typing import Final

import orjson

from querywarden import codec, encodings
from querywarden.hooks import Decision, SessionInfo, StatementGate, StatementRequest
from querywarden.masking.plan import MaskPlan
from querywarden.session.owed import P, Q

#: Every refusal token starts with this; the rest is a per-session nonce and a counter.
SENTINEL_PREFIX = "querywarden_refused_"

PIPELINED_TEXT: Final = Decision.refuse(
    "querywarden: SQL text with non-ASCII characters or backslashes may not follow an "
    "Execute in the same pipeline: what runs before the next Sync could change how the "
    "server reads it (client_encoding, standard_conforming_strings), and the gateway "
    "could not check it the same way; the statement was not run",
    sqlstate="0A000",
    hint="send a Sync before this statement (end the pipeline), or pass the text as a "
    "parameter ($1) instead of writing it into the SQL",
    rule="built-in",
)


class PolicyStage:
    """Decisions, refusal sentinels and policy reloads for one session."""

    def __init__(self, info: SessionInfo, gate: StatementGate) -> None:
        self.info = info
        self.gate = gate
        self.nonce = secrets.token_hex(6)
        self._count = 0
        self._refusals: dict[str, Decision] = {}
        self._generation = _generation_of(gate)

    def decide(self, request: StatementRequest) -> Decision | Awaitable[Decision]:
        return self.gate.decide(self.info, request)

    # Refusals

    def sentinel(self, mtype: int, statement_name: str, decision: Decision) -> bytes:
        """The message that makes the server fail in place of a refused request.

        A Parse is replaced by a Parse (the server then skips to the Sync, as for any
        failed Parse); a Query or FunctionCall by a Query (both answer ErrorResponse and
        ReadyForQuery).
        """
        self._count += 1
        token = f"{SENTINEL_PREFIX}{self.nonce}_{self._count}"
        self._refusals[token] = decision
        if mtype == P:
            return codec.parse(statement_name, token)
        return codec.query(token)

    def named_sentinel(self, suffix: str, decision: Decision) -> bytes:
        """A sentinel Parse under a name of its own (it fails in place of an Execute)."""
        return self.sentinel(P, f"{SENTINEL_PREFIX}{self.nonce}_{suffix}", decision)

    def refusal_for(self, frame: bytes) -> bytes | None:
        """The refusal's ErrorResponse, when ``frame`` is a sentinel's syntax error."""
        if not self._refusals:
            return None
        fields = codec.decode_fields(frame)
        text = fields.get("M", "")
        if fields.get("C") != "42601" or SENTINEL_PREFIX not in text:
            return None
        for token, decision in self._refusals.items():
            if f'"{token}"' in text:
                del self._refusals[token]
                if decision.server_error is not None:
                    return self._server_error(decision.server_error)
                error = codec.error_response(
                    decision.sqlstate, decision.message, detail=decision.detail, hint=decision.hint
                )
                if "decisions" in self.info.annotations:
                    return decision_annotation(decision) + error
                return error
        return None

    def _server_error(self, fields: dict[str, str]) -> bytes:
        """The server's own ErrorResponse, in the session's client encoding."""
        python_codec = encodings.python_codec(self.info.client_encoding, source="the server")
        parts = [
            code.encode("ascii") + value.encode(python_codec, "replace") + b"\0"
            for code, value in fields.items()
        ]
        return codec.message(b"E", b"".join(parts) + b"\0")

    def settled(self) -> None:
        """Nothing is in flight: no sentinel's error is still to come."""
        if self._refusals:
            self._refusals.clear()

    # Reloads

    def reloaded(self) -> bool:
        """Whether the gate's policy changed since this session last looked (cheap)."""
        generation = _generation_of(self.gate)
        if generation == self._generation:
            return False
        self._generation = generation
        return True

    def plan_is_current(self, plan: MaskPlan) -> bool:
        """Whether a statement's mask plan was made from the catalog as it is now."""
        is_current = getattr(self.gate, "plan_is_current", None)
        return is_current is None or bool(is_current(self.info, plan))

    def redecide(
        self, statement: str, texts: list[str]
    ) -> tuple[StatementRequest, Decision | Awaitable[Decision]]:
        """Decide again every text a stale statement name may run at this Execute."""
        request = StatementRequest("execute", texts[-1], statement_name=statement)
        outcomes = [
            self.decide(StatementRequest("execute", t, statement_name=statement))
            for t in dict.fromkeys(texts)
        ]
        if all(isinstance(o, Decision) for o in outcomes):
            return request, _all_of([o for o in outcomes if isinstance(o, Decision)])
        return request, _awaited_all(outcomes)


def _generation_of(gate: StatementGate) -> int:
    """The gate's policy generation (a gate that never reloads has none: 0)."""
    generation = getattr(gate, "generation", 0)
    return generation if isinstance(generation, int) else 0


def _all_of(decisions: list[Decision]) -> Decision:
    """One decision for every text a statement name may hold: all must be allowed."""
    for decision in decisions:
        if not decision.allowed:
            return decision
    first = decisions[0].mask
    if all(d.mask is first for d in decisions):
        return decisions[0]
    # Which text runs is not known here: its rows are masked whole.
    return Decision(True, rule=decisions[0].rule)


async def _awaited_all(outcomes: list[Decision | Awaitable[Decision]]) -> Decision:
    return _all_of([o if isinstance(o, Decision) else await o for o in outcomes])


def invalid_text(encoding: str) -> Decision:
    return Decision.refuse(
        f"querywarden: the statement is not valid text in the session's client encoding "
        f"({encoding}), so the gateway cannot read it as the server would; it was not run",
        sqlstate="22021",
        hint="send statements encoded in the client_encoding the session started with",
        rule="analysis",
    )


def may_read_differently(mtype: int, frame: bytes) -> bool:
    """Whether a Query's or Parse's text could be read otherwise by the server.

    In another client_encoding, a byte above 0x7F could; with standard_conforming_strings
    off, a backslash could. Every encoding PostgreSQL supports reads 0x00-0x7F as ASCII.
    """
    end = len(frame) - 1 if mtype == Q else frame.find(b"\0", frame.find(b"\0", 5) + 1)
    text = frame[5:end]
    return b"\\" in text or not text.isascii()


def decision_annotation(decision: Decision) -> bytes:
    """A NoticeResponse naming the rule behind a refusal (``querywarden.annotations``).

    Refusal messages are worded for people and name the rule only where it reads well;
    a program (``querywarden mcp``) reads the rule from this notice's JSON detail,
    ``{"rule": name or null}``: null when no rule of the policy allows the statement.
    """
    rule = decision.rule
    said = f"rule {rule}" if rule else "no rule (none of the policy's rules allows it)"
    return codec.notice_response(
        f"querywarden: refused by {said}", detail=orjson.dumps({"rule": rule}).decode()
    )
