"""Sans-I/O session state machine for an authenticated connection.

A :class:`Session` sits between one client and one upstream connection once both are
past startup. The I/O shell feeds it bytes from either side (:meth:`Session.receive_client`,
:meth:`Session.receive_server`) and drains what it produces (:attr:`Session.to_server`,
:attr:`Session.to_client`). It never touches a socket.

What it tracks, because later stages (policy, masking, audit) need it:

* the transaction status of every ReadyForQuery (``I``, ``T``, ``E``);
* the protocol mode: ready, or COPY in / out / both;
* the responses the server still owes, in order, so each one can be matched with the
  request that caused it (error-until-Sync recovery included);
* prepared statements and portals, by name, as the server confirms them.

Refusals are made by the server itself. A refused Query, Parse or FunctionCall is
replaced by a *sentinel*: a statement that fails at parse time with a syntax error at a
unique token and has no side effect. The server then produces exactly what it would for
any failed statement (discarding until Sync in the extended protocol, the right
ReadyForQuery status, a failed transaction block), and the session swaps the server's
syntax error for the refusal's ErrorResponse. The client's view stays in order even deep
inside a pipeline, and the gateway never has to imitate the server's state machine.

A :class:`RowLimit` (a rule's ``maxRows``) is enforced the same way: past the limit the
session stops forwarding the result and asks the shell to cancel the statement upstream
(:attr:`Session.cancel_wanted`), so PostgreSQL fails it, rolls back what it did and skips
the rest of the request, exactly as the error the client then receives implies. Client
input is held until the shell reports the cancel delivered, so a late cancel can never
hit a statement the client sends afterwards.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from querywarden import codec, encodings
from querywarden.audit.recorder import AuditWriteError, PendingStatement, SessionAudit
from querywarden.codec import FieldDescription
from querywarden.errors import AuthenticationFailed, ProtocolViolation, UpstreamError
from querywarden.hooks import (
    RESULT_MESSAGE_TYPES,
    Decision,
    ResultHook,
    SessionInfo,
    StatementGate,
    StatementRequest,
)
from querywarden.masking.plan import MaskPlan
from querywarden.masking.rows import MaskCounts, RowLayout, scan_copy_row, scrub_fields

Mode = Literal["ready", "copy_in", "copy_out", "copy_both"]

#: What the server owes for one forwarded message: (type, name, extra, audit record).
_Entry = tuple[int, str, str, PendingStatement | None]

# One-byte message types as ints (frame[0] is an int).
_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X = (ord(c) for c in "QPBDECSHFX")
_COPY_DATA, _COPY_DONE, _COPY_FAIL = ord("d"), ord("c"), ord("f")
_DATA_ROW = ord("D")
_FRONTEND_TYPES: Final = frozenset(b"QPBDECSHFXdcf")
# Messages that make the server do work; a connection whose token expired may send none.
_REQUESTS: Final = frozenset(b"QPBEF")
# Messages the decision point sees.
_GATED: Final = frozenset(b"QPF")
#: A Query or Parse longer than this (bytes) is collected chunk by chunk as it arrives
#: (codec.LargeText): joined and decoded in one step, it would stall every other session.
LARGE_MESSAGE: Final = 1024 * 1024
_COLLECTED: Final = frozenset(b"QP")
_SYNC_ENTRY: Final = (_S, "", "", None)
#: The name a sentinel Parse's entry carries: no statement comes of it.
_REFUSED: Final = "\0refused"

# Messages whose body may be forwarded in pieces before it has fully arrived, so that a
# huge row or COPY chunk streams through in bounded memory.
_STREAMABLE: Final = frozenset(b"Dd")

#: Every refusal token starts with this; the rest is a per-session nonce and a counter.
SENTINEL_PREFIX = "querywarden_refused_"

_QUERY_CANCELED = b"C57014\0"

_PIPELINED_TEXT: Final = Decision.refuse(
    "querywarden: SQL text with non-ASCII characters or backslashes may not follow an "
    "Execute in the same pipeline: what runs before the next Sync could change how the "
    "server reads it (client_encoding, standard_conforming_strings), and the gateway "
    "could not check it the same way; the statement was not run",
    sqlstate="0A000",
    hint="send a Sync before this statement (end the pipeline), or pass the text as a "
    "parameter ($1) instead of writing it into the SQL",
    rule="built-in",
)


@dataclass(frozen=True, slots=True)
class RowLimit:
    """The most rows one result may carry to the client, and the rule that says so."""

    rows: int
    rule: str

    def error(self, *, completed: bool) -> bytes:
        """The ErrorResponse a client gets instead of the end of an oversized result."""
        if completed:
            detail = (
                f"the first {self.rows} rows were withheld with the rest: the statement "
                "finished on the server before the gateway could cancel it, so its effects, "
                "if any, stand"
            )
        else:
            detail = (
                "the statement was cancelled on the server, so it had no effect; "
                "no rows of its result were delivered"
            )
        return codec.error_response(
            "54000",
            f"querywarden: the result has more than {self.rows} rows, the limit of rule "
            f"{self.rule} (maxRows)",
            detail=detail,
            hint=(
                f"ask for at most {self.rows} rows: add LIMIT {self.rows}, a narrower WHERE, "
                "or aggregate (count(*), GROUP BY) instead of reading every row"
            ),
        )


class Session:
    """The relay between one authenticated client and its upstream connection."""

    def __init__(
        self,
        info: SessionInfo,
        gate: StatementGate,
        result_hook: ResultHook | None = None,
        *,
        max_client_message: int = 64 * 1024 * 1024,
        max_server_message: int = 1024 * 1024 * 1024,
        expires_at: float | None = None,
        row_limit: RowLimit | None = None,
        masked: bool = False,
        audit: SessionAudit | None = None,
        clock: Callable[[], float] = time.time,
        policy_settings: Callable[[], tuple[bool, RowLimit | None]] | None = None,
    ) -> None:
        self.info = info
        self.gate = gate
        self.result_hook = result_hook
        self.max_server_message = max_server_message
        #: When the client's token expires (POSIX time): no request runs after it.
        self.expires_at = expires_at
        self._clock = clock
        #: Bytes to send to the upstream server, in order. The shell drains this list.
        self.to_server: list[bytes] = []
        #: Bytes to send to the client, in order. The shell drains this list.
        self.to_client: list[bytes] = []
        #: Transaction status from the last ReadyForQuery: b"I", b"T" or b"E".
        self.transaction_status = b"I"
        self.mode: Mode = "ready"
        #: Prepared statements the server has confirmed: name -> SQL ("" is the unnamed one).
        self.statements: dict[str, str] = {}
        #: Portals the server has confirmed: name -> statement name.
        self.portals: dict[str, str] = {}
        #: Set once the client sent Terminate: the shell closes both sides after flushing.
        self.terminated = False
        #: Set when the server sent a FATAL error: it is about to close the connection.
        self.server_fatal = False
        #: A decision the shell must await, then pass to :meth:`resume`.
        self.awaiting: Awaitable[Decision] | None = None
        #: The Python codec of the session's client_encoding (one of the accepted ones).
        self.encoding = encodings.python_codec(info.client_encoding, source="the server")

        self.max_client_message = max_client_message
        self._client_buf = codec.ChunkBuffer()
        self._client_stream_left = 0  # bytes of a streamed CopyData still to forward
        self._server_buf = codec.ChunkBuffer()
        self._server_stream_left = 0  # bytes of a streamed DataRow/CopyData still to forward
        #: A held request: (type, the message, or its chunks when it was large, ...).
        self._held: tuple[int, bytes | list[bytes], StatementRequest, codec.Parse | None] | None = (
            None
        )
        #: A Query or Parse over LARGE_MESSAGE bytes, collected as it arrives.
        self._large: codec.LargeText | None = None
        # What the server still owes, oldest first: (message type, name, extra).
        self._expected: deque[_Entry] = deque()
        self._nonce = secrets.token_hex(6)
        self._refusal_count = 0
        self._refusals: dict[str, Decision] = {}

        self.row_limit = row_limit
        #: Whether results are masked: the gate attaches a MaskPlan to every decision.
        self.masked = masked
        #: What masking did, for the audit record.
        self.mask_counts = MaskCounts()
        #: The session's audit recorder: every request is written before it is forwarded.
        self.audit = audit
        sampling = audit is not None and audit.sample_rows > 0
        self._sampling = sampling
        self._handlers = (
            _SERVER_HANDLERS
            if row_limit is None and not masked and not sampling
            else _ROW_SERVER_HANDLERS
        )
        #: Masking or audit keep track of binds, texts and Executes; a plain relay does not.
        self._observed = masked or audit is not None
        self._finished: list[PendingStatement] = []  # answered, result not yet recorded
        self._stream_hash = hashlib.sha256()  # of every byte sent to the client
        self._stream_bytes = 0
        self._audit_texts: dict[str, str] = {}  # statement -> SQL
        self._query_plans: deque[MaskPlan | None] = deque()  # one per Query in _expected
        self._statement_plans: dict[str, MaskPlan | None] = {}
        #: Portals bound in this transaction (kept for masking and audit sessions only).
        self._binds: dict[str, _Bound] = {}
        self._statement_fields: dict[str, list[FieldDescription]] = {}
        self._portal_fields: dict[str, list[FieldDescription]] = {}
        self._described: set[tuple[str, str]] = set()  # Describes the client asked for
        self._layout: RowLayout | None = None
        self._layout_known = False
        self._layouts: dict[tuple[object, ...], tuple[MaskPlan, RowLayout]] = {}
        #: Set when the shell should cancel the running statement upstream; the shell
        #: clears it and calls :meth:`cancel_delivered` once the server has the request.
        self.cancel_wanted = False
        self._cancel_in_flight = False  # client input waits while this is set
        # Code the gateway cannot see (a function, a trigger) may change client_encoding
        # or standard_conforming_strings; the server reports it just before its next
        # ReadyForQuery. SQL text that those could make it read differently (non-ASCII
        # bytes, a backslash) waits until every ReadyForQuery owed (one per Query,
        # FunctionCall and Sync sent) has come, or is refused after an Execute that no
        # Sync follows yet (no ReadyForQuery would come before it).
        self._owed_ready = 0
        self._unsynced_execute = False
        #: Set when client input held for that reason may go on: the shell then feeds
        #: the session (``receive_client(b"")``) and clears it.
        self.input_released = False
        self._cancelled = False  # a cancel was sent for the request now running
        self._rows = 0  # rows of the current result so far
        self._cut = False  # the current result passed the limit: drop the rest of it
        self._cut_error: Callable[[bool], bytes] = _no_cut_error  # what replaces its end
        self._copy_binary = False
        self._suspended_rows: dict[str, int] = {}  # portal -> rows sent before it suspended
        #: What the policy in force says of this session: (masked, row limit). Asked
        #: again when the gate's policy generation changes (a reload).
        self._policy_settings = policy_settings
        self._generation = _generation_of(gate)
        #: Prepared statements decided under an older policy: re-decided at their next
        #: Execute (a reload reaches every statement that runs after it).
        self._stale: set[str] = set()
        #: Portal -> statement, as forwarded Binds named them (confirmed or not yet).
        self._portal_statements: dict[str, str] = {}
        #: A mask plan being made again (a result named a relation its catalog does not
        #: know): the shell awaits it and passes it to :meth:`resume_result`; until then
        #: the result waits, unforwarded.
        self.awaiting_result: Awaitable[Decision] | None = None
        self._replanned: MaskPlan | None = None  # the last plan made again

    # --- client -> server --------------------------------------------------------------

    def receive_client(self, data: bytes) -> None:
        """Take bytes from the client; produce output and possibly an awaited decision.

        Messages the gate allows, and those it need not see, leave as slices of the bytes
        received, in runs: a pipelined batch is usually one write upstream.
        """
        if self._client_stream_left:
            n = min(self._client_stream_left, len(data))
            self.to_server.append(data[:n])
            self._client_stream_left -= n
            data = data[n:]
            if not data:
                return
        large = self._large
        if large is not None:
            data = large.feed(data)
            if not large.complete:
                return
            if not self._cancel_in_flight:
                self._large = None
                self._run_large(large)
            if not data:
                return
        buf = self._client_buf
        if buf or self.awaiting is not None or self._cancel_in_flight:
            buf.append(data)
            if self.awaiting is not None or self._cancel_in_flight:
                return  # held behind a decision or a cancel; resume() carries on
            if not buf.ready:
                return  # the message is still incomplete: join its chunks once, later
            data = buf.take()
        self._process_client(data)

    def resume(self, decision: Decision) -> None:
        """Apply the decision that :attr:`awaiting` produced and carry on with the input."""
        if self._held is None:
            raise RuntimeError("resume() without a held request")
        mtype, frame, request, parse = self._held
        self._held = None
        self.awaiting = None
        if mtype == _E:
            assert isinstance(frame, bytes)
            self._run_redecided(frame, request, decision)
            self._continue_client()
            return
        pending = None
        if self.audit is not None:
            decision, pending = self._audit_request(request, decision)
        if decision.allowed:
            self._note_plan(mtype, parse, decision.mask)
            if isinstance(frame, list):
                self.to_server.extend(frame)  # a large message leaves as its chunks
                self._track(mtype, b"", 0, 0, parse, pending=pending)
            else:
                self.to_server.append(frame)
                self._track(mtype, frame, 0, len(frame), parse, pending=pending)
        else:
            self._refuse(mtype, request, decision, pending)
        self._continue_client()

    def cancel_delivered(self) -> None:
        """The shell delivered the cancel :attr:`cancel_wanted` asked for: carry on."""
        self._cancel_in_flight = False
        self._continue_client()

    def _continue_client(self) -> None:
        large = self._large
        if large is not None and large.complete and not self._cancel_in_flight:
            self._large = None
            self._run_large(large)
        if self._client_buf and self.awaiting is None and not self._cancel_in_flight:
            self._process_client(self._client_buf.take())

    def _process_client(self, data: bytes) -> None:
        out = self.to_server
        unpack = codec.TYPE_AND_LENGTH.unpack_from
        limit = self.max_client_message
        size = len(data)
        pos = run_start = 0
        while size - pos >= 5 and self.awaiting is None and not self.terminated:
            mtype, length = unpack(data, pos)
            end = pos + 1 + length
            if length < 4:
                raise ProtocolViolation(f"invalid message length {length} for type {mtype!r}")
            streaming_copy = mtype == _COPY_DATA and self.mode == "copy_in"
            if length + 1 > limit and not streaming_copy:
                raise codec.MessageTooLarge(mtype, length + 1, limit)
            if end > size:
                if length + 1 > LARGE_MESSAGE and mtype in _COLLECTED:
                    # Collected chunk by chunk, its text decoded as it comes (see
                    # codec.LargeText); decided once whole, as any other.
                    if pos > run_start:
                        out.append(data[run_start:pos])
                    self._large = codec.LargeText(data[pos:], self.encoding)
                    return
                if streaming_copy:
                    # Forward the part of a large CopyData that is here; the rest streams.
                    out.append(data[run_start:])
                    self._client_stream_left = end - size
                    return
                break
            if mtype in _GATED:
                self._sync_policy()
                frame = data[pos:end]
                unsettled = (self._owed_ready or self._unsynced_execute) and mtype != _F
                risky = unsettled and _may_read_differently(mtype, frame)
                if risky and not self._unsynced_execute:
                    break  # read once the server's ReadyForQuery has said how (see above)
                try:
                    request, parse = self._request(mtype, frame)
                except codec.InvalidText:
                    # The server refuses such text too (22021) and the session goes on.
                    request, parse = self._undecodable(mtype, frame), None
                    outcome: Decision | Awaitable[Decision] = _invalid_text(self.encoding)
                else:
                    outcome = _PIPELINED_TEXT if risky else self.gate.decide(self.info, request)
                pending = None
                if self.audit is not None and isinstance(outcome, Decision):
                    outcome, pending = self._audit_request(request, outcome)
                if isinstance(outcome, Decision) and outcome.allowed:
                    if self.masked:
                        self._note_plan(mtype, parse, outcome.mask)
                    self._track(mtype, data, pos, end, parse, pending=pending)
                else:
                    # What precedes the request goes first, so the order is kept.
                    if pos > run_start:
                        out.append(data[run_start:pos])
                    run_start = end
                    if isinstance(outcome, Decision):
                        self._refuse(mtype, request, outcome, pending)
                    else:
                        self._held = (mtype, frame, request, parse)
                        self.awaiting = outcome
            elif mtype in _FRONTEND_TYPES:
                if mtype in _REQUESTS:
                    self._check_expiry()
                if mtype == _E:
                    self._sync_policy()
                    if self.masked:
                        self._check_plan(data[pos:end])
                    redecided = self._redecide(data[pos:end]) if self._stale else None
                    if redecided is not None:
                        if pos > run_start:
                            out.append(data[run_start:pos])
                        run_start = end
                        request, outcome = redecided
                        if isinstance(outcome, Decision):
                            self._run_redecided(data[pos:end], request, outcome)
                        else:
                            self._held = (_E, data[pos:end], request, None)
                            self.awaiting = outcome
                        pos = end
                        continue
                pending = None
                if mtype == _E and self._observed:
                    # What goes upstream before the Execute (an audit sentinel, a
                    # Describe the masking needs) leaves first, in order.
                    frame = data[pos:end]
                    pending, before = self._before_execute(frame)
                    if before:
                        if pos > run_start:
                            out.append(data[run_start:pos])
                        out.extend(before)
                        run_start = pos
                self._track(mtype, data, pos, end, None, pending=pending)
            else:
                raise ProtocolViolation(f"invalid frontend message type {mtype!r}")
            pos = end
        if pos > run_start:
            out.append(data[run_start:pos])
        if pos < size:
            self._client_buf.hold(data[pos:])

    def _run_large(self, large: codec.LargeText) -> None:
        """Decide on a whole large Query or Parse, as :meth:`_process_client` on any other.

        Its chunks go upstream as they are, never joined, and only once it is allowed.
        """
        mtype = large.mtype
        self._sync_policy()
        unsettled = self._owed_ready or self._unsynced_execute
        risky = unsettled and large.unusual
        if risky and not self._unsynced_execute:
            # Read once the server's ReadyForQuery has said how, as any such text is:
            # joined, it waits at the head of the buffered input (a rare, slow path).
            self._client_buf.hold(b"".join(large.chunks))
            return
        self._check_expiry()
        parse: codec.Parse | None = None
        try:
            name, sql, types = large.request()
        except codec.InvalidText:
            # The server refuses such text too (22021) and the session goes on.
            name, sql = large.refused_request()
            kind: Literal["query", "parse"] = "query" if mtype == _Q else "parse"
            request = StatementRequest(kind, sql, statement_name=name)
            outcome: Decision | Awaitable[Decision] = _invalid_text(self.encoding)
        else:
            if mtype == _Q:
                request = StatementRequest("query", sql)
            else:
                parse = codec.Parse(name, sql, types)
                request = StatementRequest("parse", sql, statement_name=name)
            outcome = _PIPELINED_TEXT if risky else self.gate.decide(self.info, request)
        pending = None
        if self.audit is not None and isinstance(outcome, Decision):
            outcome, pending = self._audit_request(request, outcome)
        if not isinstance(outcome, Decision):
            self._held = (mtype, large.chunks, request, parse)
            self.awaiting = outcome
        elif outcome.allowed:
            if self.masked:
                self._note_plan(mtype, parse, outcome.mask)
            self.to_server.extend(large.chunks)
            self._track(mtype, b"", 0, 0, parse, pending=pending)
        else:
            self._refuse(mtype, request, outcome, pending)

    def _before_execute(self, frame: bytes) -> tuple[PendingStatement | None, list[bytes]]:
        """An Execute in a masked or audited session: its record, and messages to go first.

        No record, no execution: when the request record cannot be written, a sentinel
        Parse goes first, fails, and the server skips the rest up to the Sync.
        """
        portal = codec.decode_execute_portal(frame, self.encoding)
        pending = None
        before: list[bytes] = []
        if self.audit is not None:
            pending = self._audit_execute(portal)
            if pending is None:
                name = f"{SENTINEL_PREFIX}{self._nonce}_audit"
                request = StatementRequest("parse", "", statement_name=name)
                before.append(self._sentinel(_P, request, _AUDIT_REFUSAL))
        if self.masked:
            describe = self._describe_before_execute(portal)
            if describe is not None:
                before.append(describe)
        return pending, before

    # Policy reloads: what runs after a reload runs under the new policy.

    def _sync_policy(self) -> None:
        """Catch up with a policy reload at this request boundary (cheap when none).

        Every statement prepared so far was decided under the old policy: each is decided
        again at its next Execute. Masking and the row limit switch now, for every request
        decided from here on; results of earlier requests still arriving have no plan
        and are masked whole, if the session becomes masked.
        """
        generation = _generation_of(self.gate)
        if generation == self._generation:
            return
        self._generation = generation
        self._stale.update(self.statements)
        self._stale.update(e[1] for e in self._expected if e[0] == _P and e[1] != _REFUSED)
        if self._policy_settings is None:
            return
        masked, row_limit = self._policy_settings()
        self.row_limit = row_limit
        if masked != self.masked:
            self._drop_layout()
            if masked:
                # The requests already in flight were decided without a plan.
                self._query_plans = deque(None for e in self._expected if e[0] == _Q)
                self._statement_plans.clear()
            self.masked = masked
            self._observed = masked or self.audit is not None
        if masked or row_limit is not None:
            # Never back to the plain table: a result being cut must stay cut.
            self._handlers = _ROW_SERVER_HANDLERS

    def _check_plan(self, frame: bytes) -> None:
        """Mark the Execute's statement stale when its mask plan's catalog is not current."""
        is_current = getattr(self.gate, "plan_is_current", None)
        if is_current is None:
            return
        portal = codec.decode_execute_portal(frame, self.encoding)
        statement = self._portal_statements.get(portal, self.portals.get(portal))
        if statement is None:
            return
        plan = self._statement_plans.get(statement)
        if plan is not None and not is_current(self.info, plan):
            self._stale.add(statement)

    def _redecide(
        self, frame: bytes
    ) -> tuple[StatementRequest, Decision | Awaitable[Decision]] | None:
        """Decide again the statement an Execute runs, if it was decided before a reload."""
        portal = codec.decode_execute_portal(frame, self.encoding)
        statement = self._portal_statements.get(portal, self.portals.get(portal))
        if statement is None or statement not in self._stale:
            return None
        texts = self._texts_of(statement)
        if not texts:
            return None
        request = StatementRequest("execute", texts[-1], statement_name=statement)
        outcomes = [
            self.gate.decide(self.info, StatementRequest("execute", t, statement_name=statement))
            for t in dict.fromkeys(texts)
        ]
        if all(isinstance(o, Decision) for o in outcomes):
            return request, _all_of([o for o in outcomes if isinstance(o, Decision)])
        return request, _awaited_all(outcomes)

    def _texts_of(self, statement: str) -> list[str]:
        """Every text the server may run under a statement name at the next Execute.

        A Parse of the name since the last Sync decides it alone: it replaces the text,
        or fails and the Execute is skipped. Otherwise it is the confirmed text or that
        of a Parse still in flight (one that failed left the old text), so all count.
        """
        texts: list[str] = []
        synced = False
        for entry in reversed(self._expected):
            if entry[0] == _S:
                synced = True
            elif entry[0] == _P and entry[1] == statement:
                if not synced:
                    return [entry[2]]
                texts.append(entry[2])
        confirmed = self.statements.get(statement)
        if confirmed is not None:
            texts.append(confirmed)
        return texts

    def _run_redecided(self, frame: bytes, request: StatementRequest, decision: Decision) -> None:
        """Forward an Execute whose statement was decided again, or fail it in place."""
        if decision.allowed:
            self._stale.discard(request.statement_name)
            if self.masked:
                self._statement_plans[request.statement_name] = decision.mask
            pending = None
            if self._observed:
                pending, before = self._before_execute(frame)
                self.to_server.extend(before)
            self.to_server.append(frame)
            self._track(_E, frame, 0, len(frame), None, pending=pending)
            return
        pending = None
        if self.audit is not None:
            decision, pending = self._audit_request(request, decision)
        # A sentinel Parse fails in the Execute's place; the server skips to the Sync.
        name = f"{SENTINEL_PREFIX}{self._nonce}_stale"
        sentinel = StatementRequest("parse", "", statement_name=name)
        self.to_server.append(self._sentinel(_P, sentinel, decision, pending))

    def _check_expiry(self) -> None:
        if self.expires_at is not None and self._clock() >= self.expires_at:
            # A connection lives no longer than the token that opened it.
            raise AuthenticationFailed(
                "your token has expired: this connection is closed; reconnect with a fresh token",
                sqlstate="28000",
            )

    def _request(self, mtype: int, frame: bytes) -> tuple[StatementRequest, codec.Parse | None]:
        self._check_expiry()
        if mtype == _Q:
            return StatementRequest("query", codec.decode_query(frame, self.encoding)), None
        if mtype == _P:
            parse = codec.decode_parse(frame, self.encoding)
            request = StatementRequest("parse", parse.sql, statement_name=parse.statement)
            return request, parse
        oid = codec.decode_function_call_oid(frame)
        return StatementRequest("function_call", "", function_oid=oid), None

    def _undecodable(self, mtype: int, frame: bytes) -> StatementRequest:
        """The request of a Query or Parse whose SQL text does not decode (to refuse)."""
        if mtype == _Q:
            return StatementRequest("query", frame[5:-1].decode(self.encoding, "replace"))
        name, pos = codec.decode_cstring(frame, 5, self.encoding)  # a bad name: FATAL
        sql = frame[pos : frame.find(b"\0", pos)].decode(self.encoding, "replace")
        return StatementRequest("parse", sql, statement_name=name)

    def _refuse(
        self,
        mtype: int,
        request: StatementRequest,
        decision: Decision,
        pending: PendingStatement | None = None,
    ) -> None:
        self.to_server.append(self._sentinel(mtype, request, decision, pending))

    def _sentinel(
        self,
        mtype: int,
        request: StatementRequest,
        decision: Decision,
        pending: PendingStatement | None = None,
    ) -> bytes:
        """The message that makes the server fail in place of a refused request."""
        self._refusal_count += 1
        token = f"{SENTINEL_PREFIX}{self._nonce}_{self._refusal_count}"
        self._refusals[token] = decision
        if mtype == _P:
            sentinel = codec.parse(request.statement_name, token)
            self._expected.append((_P, _REFUSED, "", pending))
        else:
            # Query and FunctionCall both answer ErrorResponse + ReadyForQuery.
            sentinel = codec.query(token)
            self._expected.append((_Q, "", "", pending))
            self._owed_ready += 1
            self._unsynced_execute = False
            if self.masked:
                self._query_plans.append(None)
        return sentinel

    def _track(
        self,
        mtype: int,
        data: bytes,
        pos: int,
        end: int,
        parse: codec.Parse | None,
        *,
        pending: PendingStatement | None = None,
    ) -> None:
        """Note what the server will owe for a message that is being forwarded."""
        expected = self._expected
        if self._observed:
            self._observe(mtype, data, pos, end, parse)
        if mtype == _B:
            # The unnamed portal and statement are by far the most common: skip decoding.
            if end - pos > 6 and data[pos + 5] == 0 and data[pos + 6] == 0:
                expected.append((_B, "", "", None))
                self._portal_statements[""] = ""
            else:
                bind = codec.decode_bind_names(data[pos:end], self.encoding)
                expected.append((_B, bind.portal, bind.statement, None))
                self._portal_statements[bind.portal] = bind.statement
        elif mtype == _E:
            portal = (
                ""
                if end - pos == 10 and data[pos + 5] == 0
                else codec.decode_execute_portal(data[pos:end], self.encoding)
            )
            expected.append((_E, portal, "", pending))
            self._unsynced_execute = True
        elif mtype == _S:
            # During COPY IN the server ignores Sync (and Flush): it owes nothing for it.
            if self.mode != "copy_in":
                expected.append(_SYNC_ENTRY)
                self._owed_ready += 1
                self._unsynced_execute = False
        elif mtype == _P:
            assert parse is not None
            expected.append((_P, parse.statement, parse.sql, pending))
        elif mtype in (_D, _C):
            kind, name = codec.decode_target(data[pos:end], self.encoding)
            expected.append((mtype, name, kind, None))
        elif mtype in (_Q, _F):
            expected.append((mtype, "", "", pending))
            self._owed_ready += 1
            self._unsynced_execute = False
        elif mtype == _X:
            self.terminated = True

    # --- server -> client --------------------------------------------------------------

    def receive_server(self, data: bytes) -> None:
        """Take bytes from the upstream server and produce what the client should get.

        Messages nobody needs to change leave as slices of the bytes received, in runs.
        A message the gateway must read but cannot is the server's fault (UpstreamError).
        """
        start = len(self.to_client)
        try:
            self._receive_server(data)
        except ProtocolViolation as exc:
            raise UpstreamError(
                f"the upstream database sent a malformed message: {exc.message}",
                sqlstate="08P01",
            ) from exc
        if self.audit is None:
            return
        # The response digest covers every byte this session sent its client so far.
        stream = self._stream_hash
        for chunk in self.to_client[start:]:
            stream.update(chunk)
            self._stream_bytes += len(chunk)
        if self._finished:
            self._record_results()

    def _receive_server(self, data: bytes) -> None:
        if self.awaiting_result is not None:
            self._server_buf.append(data)  # the result waits for its new plan
            return
        out = self.to_client
        if self._server_stream_left:
            n = min(self._server_stream_left, len(data))
            if not self._cut:
                out.append(data[:n])
            self._server_stream_left -= n
            data = data[n:]
            if not data:
                return
        buf = self._server_buf
        if buf:
            buf.append(data)
            if not buf.ready:
                return  # the message is still incomplete: join its chunks once, later
            data = buf.take()
        hook = self.result_hook
        info = self.info
        unpack = codec.TYPE_AND_LENGTH.unpack_from
        handlers = self._handlers
        masked = self.masked  # (changed by client input only)
        size = len(data)
        pos = run_start = 0
        while size - pos >= 5:
            mtype, length = unpack(data, pos)
            end = pos + 1 + length
            if length < 4:
                raise UpstreamError(f"upstream sent an invalid message length {length}")
            if end > size:
                if (
                    hook is None
                    and mtype in _STREAMABLE
                    and not self.masked
                    and not (mtype == _DATA_ROW and self._sampling and self._samples_row())
                ):
                    # Forward the part that is here; the rest follows as it arrives (or,
                    # past a row limit, is dropped as it arrives).
                    handler = handlers.get(mtype)
                    if handler is not None and handler(self, data, pos, end) is not None:
                        if pos > run_start:
                            out.append(data[run_start:pos])
                    else:
                        out.append(data[run_start:])
                    self._server_stream_left = end - size
                    return
                if length + 1 > self.max_server_message:
                    raise UpstreamError(
                        f"upstream message of {length + 1} bytes is over the gateway's limit",
                        sqlstate="54000",
                    )
                break
            if mtype == _DATA_ROW and masked and self._layout is not None:
                layout = self._run_layout(hook)
                if layout is not None:
                    # The rows of a result arrive in runs: one call masks the whole run.
                    stop, rows = layout.mask_rows(data, pos, size)
                    if rows is not None:
                        if pos > run_start:
                            out.append(data[run_start:pos])
                        out.append(rows)
                        run_start = stop
                    pos = stop
                    continue
            handler = handlers.get(mtype)
            replacement = handler(self, data, pos, end) if handler is not None else None
            if replacement is None and hook is not None and mtype in RESULT_MESSAGE_TYPES:
                replacement = hook.on_result(info, mtype, data[pos:end])
            if replacement is not None:
                if pos > run_start:
                    out.append(data[run_start:pos])
                if replacement is _HOLD:
                    # From here on the result waits (resume_result() goes on with it).
                    self._server_buf.append(data[pos:])
                    return
                if replacement:
                    out.append(replacement)
                run_start = end
            pos = end
        if pos > run_start:
            out.append(data[run_start:pos])
        if pos < size:
            buf.hold(data[pos:])

    # Handlers return None to forward the message untouched, or replacement bytes.

    def _on_parameter_status(self, data: bytes, pos: int, end: int) -> bytes | None:
        name, value = codec.decode_parameter_status(data[pos:end])
        if name == "client_encoding" and encodings.canonical(value) != self.info.client_encoding:
            # The gateway refuses every change of encoding it sees, so this one came from
            # code it cannot see (a function calling set_config). What the client
            # pipelined behind it was decoded the old way: end the session at once.
            raise encodings.EncodingRefused(
                f"querywarden: the server reports that client_encoding changed from "
                f"{self.info.client_encoding} to {value} (set by a function or procedure); "
                "the gateway reads each session in the encoding it started with, so the "
                "session is closed. Reconnect, and set the encoding at start-up "
                "(PGCLIENTENCODING) instead of in SQL"
            )
        if name == "standard_conforming_strings":
            encodings.check_string_syntax(value)
        return None

    def _on_ready_for_query(self, data: bytes, pos: int, end: int) -> bytes | None:
        if end - pos != 6:
            raise ProtocolViolation(f"ReadyForQuery of length {end - pos - 1}")
        status = data[pos + 5 : end]
        self.transaction_status = status
        self.mode = "ready"
        expected = self._expected
        while expected:
            entry = expected.popleft()
            mtype = entry[0]
            if mtype == _Q and self._query_plans:
                self._query_plans.popleft()
            if entry[3] is not None:
                self._finished.append(entry[3])
            if mtype in (_S, _Q, _F):
                self._owed_ready -= 1
                self.input_released = not self._owed_ready and bool(self._client_buf)
                break
        if status == b"I" and self.portals:
            # Portals live no longer than their transaction.
            self.portals.clear()
        if status == b"I" and not expected and len(self._portal_statements) > 1:
            self._portal_statements.clear()  # (nothing bound is still in flight)
        if self._refusals and not expected:
            # Only once nothing is in flight: a refusal pipelined behind this Sync has
            # its error still to come.
            self._refusals.clear()
        if self.row_limit is not None or self._cut or self._cancelled:
            # (A reload may have lifted the limit of a result being cut.)
            self._rows = 0
            self._cut = self._cancelled = False
            if status == b"I":
                self._suspended_rows.clear()
        if self.masked:
            self._drop_layout()
        if status == b"I" and self._binds:
            # Portals live no longer than their transaction.
            self._binds.clear()
            self._portal_fields.clear()
        return None

    def _on_error(self, data: bytes, pos: int, end: int) -> bytes | None:
        plan = self._head_plan() if self.masked else None
        head = self._expected[0][3] if self.audit is not None and self._expected else None
        skipped = self._skipped_by_error() if self.audit is not None else []
        replaced = self._on_error_response(data, pos, end)
        if self.masked:
            self._drop_layout()
            if replaced is None:
                replaced = scrub_fields(data[pos:end], plan, self.encoding, self.mask_counts)
        if head is not None:
            fields = codec.decode_fields(replaced if replaced is not None else data[pos:end])
            head.sqlstate = fields.get("C")
            head.error = fields.get("M")
        for pending in skipped:
            if pending is not head:
                pending.error = "not run: an earlier message of the same pipeline failed"
            self._finished.append(pending)
        return replaced

    def _skipped_by_error(self) -> list[PendingStatement]:
        """Records of the extended-protocol messages an error ends (up to the Sync)."""
        expected = self._expected
        if not expected or expected[0][0] in (_Q, _F):
            return []
        found = []
        for entry in expected:
            if entry[0] == _S:
                break
            if entry[3] is not None:
                found.append(entry[3])
        return found

    def _on_notice(self, data: bytes, pos: int, end: int) -> bytes | None:
        if not self.masked:
            return None
        return scrub_fields(data[pos:end], self._head_plan(), self.encoding, self.mask_counts)

    def _on_notification(self, data: bytes, pos: int, end: int) -> bytes | None:
        """A masked session gets a NOTIFY's process id and channel, not its payload.

        Another session may notify anything (``pg_notify('customers', row_to_json(NEW))``
        in an application's trigger), and the payload is free text: it cannot be masked
        column by column, so it is withheld; the notification still arrives as a signal.
        """
        if not self.masked:
            return None
        pid, channel, payload = codec.decode_notification(data[pos:end])
        if not payload:
            return None
        self.mask_counts.values["(notification payload)"] += 1
        return codec.notification_response(pid, channel, _WITHHELD_PAYLOAD)

    def _on_error_response(self, data: bytes, pos: int, end: int) -> bytes | None:
        self.mode = "ready"
        if b"VFATAL\0" in data[pos:end] or b"VPANIC\0" in data[pos:end]:
            # The server says why it is closing; the shell need not add its own FATAL.
            self.server_fatal = True
        expected = self._expected
        # In the extended protocol the server now discards everything up to Sync.
        if expected and expected[0][0] not in (_Q, _F):
            while expected and expected[0][0] != _S:
                expected.popleft()
        if self._cut or self._cancelled:
            self._cut = False
            self._rows = 0
            if self._cancelled and _QUERY_CANCELED in data[pos:end]:
                # Our own cancel (or the statement timeout, past the cut all the same).
                return self._cut_error(False)
        if not self._refusals:
            return None
        fields = codec.decode_fields(data[pos:end])
        text = fields.get("M", "")
        if fields.get("C") != "42601" or SENTINEL_PREFIX not in text:
            return None
        for token, decision in self._refusals.items():
            if f'"{token}"' in text:
                del self._refusals[token]
                return codec.error_response(
                    decision.sqlstate, decision.message, detail=decision.detail, hint=decision.hint
                )
        return None

    def _pop_expected(self, *types: int) -> _Entry | None:
        expected = self._expected
        if expected and expected[0][0] in types:
            return expected.popleft()
        return None

    def _on_parse_complete(self, data: bytes, pos: int, end: int) -> bytes | None:
        entry = self._pop_expected(_P)
        if entry is not None:
            self.statements[entry[1]] = entry[2]
            if entry[3] is not None:
                entry[3].command = "PARSE"
                self._finished.append(entry[3])
        return None

    def _on_bind_complete(self, data: bytes, pos: int, end: int) -> bytes | None:
        entry = self._pop_expected(_B)
        if entry is not None:
            self.portals[entry[1]] = entry[2]
        return None

    def _on_close_complete(self, data: bytes, pos: int, end: int) -> bytes | None:
        entry = self._pop_expected(_C)
        if entry is not None:
            name = entry[1]
            # What the session noted about the name goes too, or a client that prepares
            # and closes statements under fresh names would grow it for as long as it is
            # connected. Unless the name is being defined again behind the Close: a Parse
            # (Bind) sent after it already noted the new statement's (portal's) text,
            # plan and description.
            if entry[2] == "S":
                self.statements.pop(name, None)
                if not self._in_flight(_P, name):
                    self._audit_texts.pop(name, None)
                    self._statement_plans.pop(name, None)
                    self._statement_fields.pop(name, None)
                    self._stale.discard(name)
            else:
                self.portals.pop(name, None)
                if not self._in_flight(_B, name):
                    self._binds.pop(name, None)
                    self._portal_fields.pop(name, None)
                    self._suspended_rows.pop(name, None)
                    self._portal_statements.pop(name, None)
        return None

    def _in_flight(self, mtype: int, name: str) -> bool:
        """Whether a message of ``mtype`` for ``name`` still waits for its answer."""
        return any(e[0] == mtype and e[1] == name for e in self._expected)

    def _on_describe_done(self, data: bytes, pos: int, end: int) -> bytes | None:
        # RowDescription or NoData ends a Describe; in a simple Query it is just a result.
        self._pop_expected(_D)
        return None

    def _on_execute_done(self, data: bytes, pos: int, end: int) -> bytes | None:
        if self.mode != "ready":
            self.mode = "ready"  # CommandComplete ends a COPY
        pending = None
        if self.audit is not None and self._expected:
            pending = self._expected[0][3]
            if pending is not None:
                _note_completion(pending, data, pos, end)
        entry = self._pop_expected(_E)
        if entry is not None and entry[3] is not None:
            self._finished.append(entry[3])
        if self.masked:
            self._drop_layout()
        if self.row_limit is not None:
            rows, self._rows = self._rows, 0
            if data[pos] == _PORTAL_SUSPENDED and entry is not None:
                # The portal goes on at the next Execute: so does its count.
                self._suspended_rows[entry[1]] = rows
        if not self._cut:
            return None
        self._cut = False
        error = self._cut_error(True)
        if pending is not None:
            # The client got an error, not this CommandComplete: so does the record.
            fields = codec.decode_fields(error)
            pending.sqlstate, pending.error = fields.get("C"), fields.get("M")
        return error

    # Row limits: only sessions with a RowLimit have these handlers.

    def _on_row(self, data: bytes, pos: int, end: int) -> bytes | None:
        """A DataRow or COPY TO STDOUT row: counted against the limit, then masked."""
        if data[pos] == _COPY_DATA and self.mode != "copy_out":
            return None
        if self._cut:
            return b""  # also when a reload lifted the limit that cut this result
        if self.masked and not self._layout_known and data[pos] != _COPY_DATA:
            layout = self._result_layout(None)
            if self.awaiting_result is not None:
                return _HOLD  # before the row is counted: it comes again
            self._layout = layout
            self._layout_known = True
        if self.row_limit is not None:
            dropped = self._count_row()
            if dropped is not None:
                return dropped
        if not self.masked:
            if self.audit is not None:
                self._sample(data[pos:end])
            return None
        if data[pos] == _COPY_DATA:
            plan = self._head_plan()
            if plan is None:
                return None
            masked = scan_copy_row(data[pos:end], plan, self.encoding, self.mask_counts)
            if masked is not None and self._copy_binary:
                # A binary row's fields have lengths: a replacement would corrupt it.
                self._cut_result(_binary_copy_error)
                return b""
            return masked
        layout = self._layout
        masked = layout.mask_row(data, pos, end) if layout is not None else None
        if self.audit is not None:
            self._sample(masked if masked is not None else data[pos:end])
        return masked

    def _run_layout(self, hook: ResultHook | None) -> RowLayout | None:
        """The layout that may mask the DataRows from here on as a run, or None.

        A run skips :meth:`_on_row` for each row: the result's layout must be known, and
        no row cut, counted against a limit, sampled or shown to a hook (None: the rows go
        one by one).
        """
        if (
            not self._layout_known
            or hook is not None
            or self._cut
            or self.row_limit is not None
            or (self._sampling and self._samples_row())
        ):
            return None
        return self._layout

    def _samples_row(self) -> bool:
        """Whether the DataRow now arriving goes into the audit sample (so it must be whole)."""
        audit = self.audit
        if audit is None or not self._expected:
            return False
        pending = self._expected[0][3]
        return pending is not None and len(pending.sample) < audit.sample_rows

    def _sample(self, frame: bytes) -> None:
        """Keep the first rows of the current request, as the client gets them."""
        audit = self.audit
        if audit is None or not self._expected or frame[:1] != b"D":
            return
        pending = self._expected[0][3]
        if pending is not None and len(pending.sample) < audit.sample_rows:
            pending.sample.append(_texts(codec.decode_data_row(frame), self.encoding))

    def _count_row(self) -> bytes | None:
        """Count a row against the limit; past it, drop the row (b"")."""
        if self._cut:
            return b""
        rows = self._rows
        if rows == 0 and self._suspended_rows:
            entry = self._expected[0] if self._expected else None
            if entry is not None and entry[0] == _E:
                rows = self._suspended_rows.pop(entry[1], 0)
        rows += 1
        self._rows = rows
        limit = self.row_limit
        assert limit is not None
        if rows <= limit.rows:
            return None
        self._cut_result(lambda completed: limit.error(completed=completed))
        return b""

    def _cut_result(self, error: Callable[[bool], bytes]) -> None:
        """Withhold the rest of the current result; it ends with ``error`` instead.

        ``error(completed)`` builds the ErrorResponse: ``completed`` says whether the
        statement finished on the server (else the gateway's cancel stopped it).
        """
        self._cut = True
        self._cut_error = error
        if not self._cancelled and self._cancel_is_safe():
            self._cancelled = self.cancel_wanted = self._cancel_in_flight = True

    def _on_copy_done(self, data: bytes, pos: int, end: int) -> bytes | None:
        return b"" if self._cut else None

    def _on_result_start(self, data: bytes, pos: int, end: int) -> bytes | None:
        self._rows = 0
        if self.masked:
            return self._on_description(data, pos, end)
        return self._on_describe_done(data, pos, end)

    # Masking: only sessions with masked=True have these paths.

    def _note_plan(self, mtype: int, parse: codec.Parse | None, plan: MaskPlan | None) -> None:
        if mtype == _Q:
            self._query_plans.append(plan)
        elif mtype == _P and parse is not None:
            self._statement_plans[parse.statement] = plan

    def _observe(
        self, mtype: int, data: bytes, pos: int, end: int, parse: codec.Parse | None
    ) -> None:
        """What masking and audit keep of a forwarded message (binds, texts, describes)."""
        if mtype == _B:
            self._track_bind(data[pos:end])
            return
        if self.audit is not None and mtype == _P and parse is not None:
            self._audit_texts[parse.statement] = parse.sql
        if not self.masked:
            return
        if mtype == _P and parse is not None:
            self._statement_fields.pop(parse.statement, None)
            self._described.discard(("S", parse.statement))
        elif mtype == _D:
            kind, name = codec.decode_target(data[pos:end], self.encoding)
            self._described.add((kind, name))

    def _track_bind(self, frame: bytes) -> None:
        """Remember what a forwarded Bind bound: its statement, result formats and values."""
        bind = codec.decode_bind_names(frame, self.encoding)
        parameters = codec.decode_bind_parameters(frame)
        formats = parameters.result_formats if self.masked else ()
        values = (
            _texts(parameters.values, self.encoding, parameters.formats)
            if self.audit is not None
            else []
        )
        self._binds[bind.portal] = _Bound(bind.statement, formats, values)
        if self.masked:
            self._portal_fields.pop(bind.portal, None)
            self._described.discard(("P", bind.portal))

    def _describe_before_execute(self, portal: str) -> bytes | None:
        """A Describe of the portal, when nothing else will say what its rows hold."""
        bound = self._binds.get(portal)
        if (
            ("P", portal) in self._described
            or portal in self._portal_fields
            or (
                bound is not None
                and (
                    bound.statement in self._statement_fields
                    or ("S", bound.statement) in self._described
                )
            )
        ):
            return None
        # The server answers it before the Execute's rows; the session keeps the answer.
        self._expected.append((_D, portal, "internal", None))
        self._described.add(("P", portal))
        return codec.describe("P", portal)

    def _on_description(self, data: bytes, pos: int, end: int) -> bytes | None:
        """RowDescription or NoData: a Describe's answer, or a simple Query's result."""
        head = self._expected[0] if self._expected else None
        fields = codec.decode_row_description(data[pos:end]) if data[pos] == ord("T") else []
        self._drop_layout()
        if head is not None and head[0] == _D:
            self._expected.popleft()
            if head[2] == "S":
                self._statement_fields[head[1]] = fields
                return None
            self._portal_fields[head[1]] = fields
            return b"" if head[2] == "internal" else None
        if head is not None and head[0] == _Q:
            layout = self._result_layout(fields)
            if self.awaiting_result is not None:
                return _HOLD
            self._layout = layout
            self._layout_known = True
        return None

    def _drop_layout(self) -> None:
        """The current result ended: count what its layout masked, forget the layout."""
        if self._layout is not None:
            self._layout.flush()
            self._layout = None
        self._layout_known = False

    def mask_summary(self) -> dict[str, int]:
        """What masking did in this session so far: values masked per column/detector."""
        if self._layout is not None:
            self._layout.flush()
        return self.mask_counts.summary()

    def _head_plan(self) -> MaskPlan | None:
        """The plan of the request the server is answering now."""
        head = self._expected[0] if self._expected else None
        if head is None:
            return None
        if head[0] == _Q:
            return self._query_plans[0] if self._query_plans else None
        if head[0] == _E:
            bound = self._binds.get(head[1])
            return self._statement_plans.get(bound.statement) if bound is not None else None
        return None

    def _result_layout(self, fields: list[FieldDescription] | None) -> RowLayout | None:
        """How the rows of the result now arriving are masked (None: not at all)."""
        plan = self._head_plan()
        formats: tuple[int, ...] = ()
        head = self._expected[0] if self._expected else None
        if fields is None and head is not None and head[0] == _E:
            bound = self._binds.get(head[1])
            fields = self._portal_fields.get(head[1])
            if fields is None and bound is not None:
                fields = self._statement_fields.get(bound.statement)
                formats = bound.formats
        if plan is None or fields is None:
            # Rows the session cannot attribute: send none of their values.
            plan, fields = _MASK_ALL, None
        elif plan.relations is not None and _unknown_relation(fields, plan.relations):
            # The result comes from a relation created (or replaced) after the plan's
            # catalog was read: the plan is made again before any row leaves.
            if plan is not self._replanned and self._replan(plan):
                return None
            # Unknown even to the newest catalog (the session's own uncommitted DDL):
            # nothing says what its columns carry.
            plan, fields = _MASK_ALL, None
        # The same statement shape gets the same plan object (plans are cached) and the
        # same description: its layout (maskers, compiled ops) is made once per session.
        # A layout keeps nothing of a result once flushed, so it serves the next one.
        key = (id(plan), tuple(fields) if fields is not None else None, formats, self.encoding)
        cached = self._layouts.get(key)
        if cached is not None and cached[0] is plan:
            layout = cached[1]
        else:
            layout = RowLayout(fields, formats, plan, self.encoding, self.mask_counts)
            if len(self._layouts) >= _LAYOUT_CACHE:
                self._layouts.clear()
            self._layouts[key] = (plan, layout)  # the plan kept alive: its id stays its own
        return layout if layout.needed else None

    def _replan(self, plan: MaskPlan) -> bool:
        """Ask the gate for the plan again, with a newer catalog (False: it cannot)."""
        replan = getattr(self.gate, "replan", None)
        if replan is None:
            return False
        self.awaiting_result = replan(self.info, plan)
        return True

    def resume_result(self, decision: Decision) -> None:
        """Apply the plan :attr:`awaiting_result` made, and go on with the held result."""
        if self.awaiting_result is None:
            raise RuntimeError("resume_result() without a held result")
        self.awaiting_result = None
        if decision.allowed:
            plan = decision.mask
        else:
            # Under the catalog as it is now the statement is refused: its rows are not
            # sent, and its end is the refusal.
            plan = _MASK_ALL
            self._cut_result(lambda completed: _replan_refusal(decision, completed))
        self._replanned = plan
        head = self._expected[0] if self._expected else None
        if head is not None and head[0] == _Q and self._query_plans:
            self._query_plans[0] = plan
        elif head is not None and head[0] == _E:
            bound = self._binds.get(head[1])
            if bound is not None:
                self._statement_plans[bound.statement] = plan
        held = self._server_buf.take()
        if held:
            self.receive_server(held)

    def _cancel_is_safe(self) -> bool:
        """Whether a cancel can only stop what the client would see as one failed unit.

        That is the running simple Query, or the running Execute and what follows it up to
        the next Sync: an error anywhere there ends the unit for the client anyway. Client
        messages already sent past that point would be at risk, so then the session does
        not cancel (the statement runs to its end, and only the rows are withheld).
        """
        expected = self._expected
        if not expected:
            return False
        head = expected[0][0]
        if head == _Q:
            return len(expected) == 1
        if head != _E:
            return False
        for index, entry in enumerate(expected):
            if entry[0] == _S:
                return index == len(expected) - 1
        return True  # no Sync yet: what the client sends next waits for the cancel

    def _on_copy_in(self, data: bytes, pos: int, end: int) -> bytes | None:
        self.mode = "copy_in"
        # Syncs the client pipelined behind this COPY reach the server in COPY IN mode,
        # where they are ignored: the server owes nothing for them.
        expected = self._expected
        if expected and expected[0][0] == _E:
            head = expected.popleft()
            kept = deque(e for e in expected if e[0] != _S)
            self._owed_ready -= len(expected) - len(kept)
            expected.clear()
            expected.append(head)
            expected.extend(kept)
        return None

    def _on_copy_out(self, data: bytes, pos: int, end: int) -> bytes | None:
        if end - pos < 8:
            raise ProtocolViolation("insufficient data left in message: CopyOutResponse")
        self.mode = "copy_out"
        self._copy_binary = data[pos + 5] == 1
        return None

    def _on_copy_both(self, data: bytes, pos: int, end: int) -> bytes | None:
        self.mode = "copy_both"
        return None

    # Audit: only sessions with a SessionAudit use these.

    def _audit_request(
        self, request: StatementRequest, decision: Decision
    ) -> tuple[Decision, PendingStatement | None]:
        """Write the request record first; no record, no statement (fail closed)."""
        assert self.audit is not None
        try:
            pending = self.audit.request(
                request, decision, masking=self.mask_summary() if self.masked else None
            )
        except AuditWriteError:
            return _AUDIT_REFUSAL, None
        return decision, pending

    def _audit_execute(self, portal: str) -> PendingStatement | None:
        """Write an Execute's request record; None when it cannot be written."""
        assert self.audit is not None
        bound = self._binds.get(portal)
        statement, values = (bound.statement, bound.values) if bound else ("", [])
        request = StatementRequest(
            "execute", self._audit_texts.get(statement, ""), statement_name=statement
        )
        plan = self._statement_plans.get(statement) if self.masked else None
        if self.masked and (plan is None or plan.scrub_errors):
            # The values may be masked ones (WHERE id = $1 is fine, but a value compared
            # with or stored into a masked column is as sensitive as the column).
            values = ["****" if v is not None else None for v in values]
        try:
            return self.audit.request(
                request,
                _EXECUTE_ALLOWED,
                masking=self.mask_summary() if self.masked else None,
                parameters=values,
            )
        except AuditWriteError:
            return None

    def _record_results(self) -> None:
        assert self.audit is not None
        digest = self._stream_hash.hexdigest()
        masking = self.mask_summary() if self.masked else None
        finished, self._finished = self._finished, []
        for pending in finished:
            self.audit.finish(
                pending, masking=masking, stream_digest=digest, stream_bytes=self._stream_bytes
            )

    def close_audit(self) -> None:
        """The session ended: record what was still unanswered, then the end."""
        if self.audit is None:
            return
        for entry in self._expected:
            if entry[3] is not None:
                entry[3].error = entry[3].error or "the session ended before the answer"
                self._finished.append(entry[3])
        self._expected.clear()
        if self._finished:
            self._record_results()
        self.audit.end(self.mask_summary() if self.masked else {})

    # --- for the shell ---------------------------------------------------------------

    @property
    def held_for_answer(self) -> int:
        """Client input held until the server answers an earlier Query (bytes)."""
        return len(self._client_buf) if self._owed_ready else 0

    @property
    def buffered_client_bytes(self) -> int:
        """Client input held in the session (behind a decision or a cancel)."""
        return len(self._client_buf)

    @property
    def expected_responses(self) -> int:
        """How many requests still await a response from the server."""
        return len(self._expected)


_PORTAL_SUSPENDED = ord("s")


class _Bound(NamedTuple):
    """What a Bind bound to a portal (formats kept when masking, values when auditing)."""

    statement: str
    formats: tuple[int, ...]
    values: list[str | None]


_AUDIT_REFUSAL = Decision.refuse(
    "querywarden: the statement was not run because the gateway could not write its audit "
    "record (the audit log is full or unwritable)",
    sqlstate="58030",
    hint="retry later; nothing runs unrecorded, so tell the gateway's operator if it persists",
    rule="audit",
)
_EXECUTE_ALLOWED = Decision(True, rule="prepared")


def _note_completion(pending: PendingStatement, data: bytes, pos: int, end: int) -> None:
    """Add a CommandComplete's rows (or a PortalSuspended / EmptyQuery) to a record."""
    kind = data[pos]
    if kind == ord("C"):
        tag = data[pos + 5 : end - 1].decode("ascii", "replace")
        pending.command = tag
        last = tag.rsplit(" ", 1)[-1]
        if last.isdigit():
            pending.rows = (pending.rows or 0) + int(last)
    elif kind == _PORTAL_SUSPENDED:
        pending.command = "PORTAL SUSPENDED"
    else:
        pending.command = pending.command or "EMPTY"


def _texts(
    values: tuple[bytes | None, ...], encoding: str, formats: tuple[int, ...] = ()
) -> list[str | None]:
    """Bind or DataRow values for the audit record: text, or a backslash-x hex string.

    Text values are read in the session's client encoding, as the server reads them;
    binary ones (Bind's ``formats``: none, all text; one, for all) are recorded in hex.
    """
    texts: list[str | None] = []
    for i, raw in enumerate(values):
        if raw is None:
            texts.append(None)
            continue
        code = formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0
        if code != 1:
            try:
                texts.append(raw.decode(encoding))
                continue
            except UnicodeDecodeError:
                pass
        texts.append("\\x" + raw.hex())
    return texts


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


def _unknown_relation(fields: list[FieldDescription], relations: frozenset[int]) -> bool:
    """Whether a column comes from a relation outside ``relations`` (0: no relation)."""
    return any(f.table_oid and f.table_oid not in relations for f in fields)


def _replan_refusal(decision: Decision, completed: bool) -> bytes:
    ran = (
        "the statement finished on the server, its rows were withheld"
        if completed
        else "the statement was cancelled on the server, no rows were delivered"
    )
    return codec.error_response(
        decision.sqlstate,
        decision.message,
        detail="the database's tables or views changed after the statement was allowed, "
        f"and the gateway refuses it as they are now; {ran}",
        hint=decision.hint,
    )


def _invalid_text(encoding: str) -> Decision:
    return Decision.refuse(
        f"querywarden: the statement is not valid text in the session's client encoding "
        f"({encoding}), so the gateway cannot read it as the server would; it was not run",
        sqlstate="22021",
        hint="send statements encoded in the client_encoding the session started with",
        rule="analysis",
    )


def _may_read_differently(mtype: int, frame: bytes) -> bool:
    """Whether a Query's or Parse's text could be read otherwise by the server.

    In another client_encoding, a byte above 0x7F could; with standard_conforming_strings
    off, a backslash could. Every encoding PostgreSQL supports reads 0x00-0x7F as ASCII.
    """
    end = len(frame) - 1 if mtype == _Q else frame.find(b"\0", frame.find(b"\0", 5) + 1)
    text = frame[5:end]
    return b"\\" in text or not text.isascii()


def _no_cut_error(completed: bool) -> bytes:
    raise AssertionError("a result was cut without an error to end it")


def _binary_copy_error(completed: bool) -> bytes:
    return codec.error_response(
        "42501",
        "querywarden: a row of this binary COPY holds a value a content detector flags, and "
        "binary COPY rows cannot be masked in place",
        detail="the rest of the COPY was withheld"
        + ("; the statement finished on the server" if completed else ""),
        hint="use COPY ... TO STDOUT in text or CSV format, or SELECT, whose values are masked",
    )


_SERVER_HANDLERS = {
    ord("S"): Session._on_parameter_status,
    ord("Z"): Session._on_ready_for_query,
    ord("E"): Session._on_error,
    ord("1"): Session._on_parse_complete,
    ord("2"): Session._on_bind_complete,
    ord("3"): Session._on_close_complete,
    ord("T"): Session._on_describe_done,
    ord("n"): Session._on_describe_done,
    ord("C"): Session._on_execute_done,
    ord("s"): Session._on_execute_done,
    ord("I"): Session._on_execute_done,
    ord("G"): Session._on_copy_in,
    ord("H"): Session._on_copy_out,
    ord("W"): Session._on_copy_both,
}

_ROW_SERVER_HANDLERS = {
    **_SERVER_HANDLERS,
    ord("D"): Session._on_row,
    ord("d"): Session._on_row,
    ord("c"): Session._on_copy_done,
    ord("T"): Session._on_result_start,
    ord("n"): Session._on_result_start,
    ord("N"): Session._on_notice,
    ord("A"): Session._on_notification,
}

#: What a masked session receives as a notification's payload.
_WITHHELD_PAYLOAD = "querywarden: payload withheld (masked identity)"

#: A handler's answer that stops the result here until :meth:`Session.resume_result`.
_HOLD: Final = b"\0querywarden: hold"

#: Masks every value: for rows whose statement or layout the session does not know.
#: Row layouts a session keeps for the statement shapes it repeats.
_LAYOUT_CACHE = 64
_MASK_ALL = MaskPlan(origins={}, computed=None, scanner=None, scrub_errors=True, mask_all=True)
