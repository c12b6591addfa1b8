"""The relay core: one client and one upstream connection, past startup, as bytes.

The I/O shell feeds :class:`Session` bytes from either side (:meth:`Session.receive_client`,
:meth:`Session.receive_server`) and drains what it produces (:attr:`Session.to_server`,
:attr:`Session.to_client`). It never touches a socket.

The core frames both directions over chunked buffers and forwards every message nobody
needs to change as a slice of the bytes received, in runs (a pipelined batch is usually
one write). It keeps the protocol's own state: the transaction status, COPY modes, what
the server still owes (:mod:`.owed`), and the prepared statements and portals
(:mod:`.records`). Everything else is a stage, each in its own module, each called at
the events it cares about:

* :mod:`.policy`: each Query, Parse and FunctionCall is decided; a refused one becomes a
  sentinel the server fails in its place;
* :mod:`.hold`: a request whose decision must be awaited (an approval) waits on the wire;
* :mod:`.masking`: results are masked by their statement's plan;
* :mod:`.row_limit`: results are counted, and one over the limit is cut and cancelled;
* :mod:`.audit`: a record is written before each request is forwarded (no record, no
  statement), and another when the server has answered it.

Client input is held while a decision is awaited, while a cancel the core asked for is on
its way (so a late cancel never hits a later statement), and while SQL text that the
server could read differently after pending changes waits for the server's answer.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal

from querywarden import codec, encodings
from querywarden.audit.recorder import PendingStatement, SessionAudit
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
from querywarden.masking.rows import MaskCounts
from querywarden.session.audit import AUDIT_REFUSAL, AuditStage
from querywarden.session.hold import HeldRequest, Hold
from querywarden.session.masking import MaskingStage, NeedsPlan
from querywarden.session.owed import REFUSED, B, C, D, E, F, Owed, OwedQueue, P, Q, S, X
from querywarden.session.policy import (
    PIPELINED_TEXT,
    SENTINEL_PREFIX,
    PolicyStage,
    invalid_text,
    may_read_differently,
)
from querywarden.session.records import Records
from querywarden.session.row_limit import RowLimit, RowLimitStage

Mode = Literal["ready", "copy_in", "copy_out", "copy_both"]

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
# Messages whose body may be forwarded in pieces before it has fully arrived, so that a
# huge row or COPY chunk streams through in bounded memory.
_STREAMABLE: Final = frozenset(b"Dd")


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
        self.max_client_message = max_client_message
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
        #: Set once the client sent Terminate: the shell closes both sides after flushing.
        self.terminated = False
        #: Set when the server sent a FATAL error: it is about to close the connection.
        self.server_fatal = False
        #: The Python codec of the session's client_encoding (one of the accepted ones).
        self.encoding = encodings.python_codec(info.client_encoding, source="the server")
        #: Set when the shell should cancel the running statement upstream; the shell
        #: clears it and calls :meth:`cancel_delivered` once the server has the request.
        self.cancel_wanted = False
        #: Set when client input held for an answer may go on: the shell then feeds the
        #: session (``receive_client(b"")``) and clears it.
        self.input_released = False

        self.records = Records()
        self.owed = OwedQueue()
        # The stages.
        self.policy = PolicyStage(info, gate)
        self.hold = Hold()
        self.masking = MaskingStage(info, gate, self.encoding, masked=masked)
        self.limiter = RowLimitStage(row_limit)
        self.auditing = AuditStage(audit, self.encoding) if audit is not None else None
        #: What the policy in force says of this session: (masked, row limit). Asked
        #: again when the gate's policy generation changes (a reload).
        self._policy_settings = policy_settings

        self._client_buf = codec.ChunkBuffer()
        self._client_stream_left = 0  # bytes of a streamed CopyData still to forward
        self._server_buf = codec.ChunkBuffer()
        self._server_stream_left = 0  # bytes of a streamed DataRow/CopyData still to forward
        #: A Query or Parse over LARGE_MESSAGE bytes, collected as it arrives.
        self._large: codec.LargeText | None = None
        self._sampling = self.auditing is not None and self.auditing.sample_rows > 0
        self._handlers = (
            _SERVER_HANDLERS
            if row_limit is None and not masked and not self._sampling
            else _ROW_SERVER_HANDLERS
        )
        #: Masking or audit keep track of binds and Executes; a plain relay does not.
        self._observed = masked or audit is not None
        self._any_stale = False  # a statement may have been decided under an old policy
        self._cancel_in_flight = False  # client input waits while this is set
        # Code the gateway cannot see (a function, a trigger) may change client_encoding
        # or standard_conforming_strings; the server reports it just before its next
        # ReadyForQuery. SQL text that those could make it read differently (non-ASCII
        # bytes, a backslash) waits until every ReadyForQuery owed (one per Query,
        # FunctionCall and Sync sent) has come, or is refused after an Execute that no
        # Sync follows yet (no ReadyForQuery would come before it).
        self._owed_ready = 0
        self._unsynced_execute = False
        self._copy_binary = False

    # --- what the shell sees of the stages -----------------------------------------------

    @property
    def awaiting(self) -> Awaitable[Decision] | None:
        """A decision the shell must await, then pass to :meth:`resume`."""
        return self.hold.awaiting

    @property
    def awaiting_result(self) -> Awaitable[Decision] | None:
        """A mask plan being made again, or None.

        A result named a relation its plan's catalog does not know: the shell awaits the
        new plan and passes it to :meth:`resume_result`; until then the result waits.
        """
        return self.masking.awaiting

    @property
    def masked(self) -> bool:
        return self.masking.masked

    @property
    def row_limit(self) -> RowLimit | None:
        return self.limiter.limit

    @property
    def mask_counts(self) -> MaskCounts:
        return self.masking.counts

    @property
    def statements(self) -> dict[str, str]:
        """Prepared statements the server has confirmed: name -> SQL."""
        return self.records.confirmed_statements()

    @property
    def portals(self) -> dict[str, str]:
        """Portals the server has confirmed: name -> statement name."""
        return self.records.confirmed_portals()

    def _masking_so_far(self) -> dict[str, int] | None:
        return self.masking.summary() if self.masking.masked else None

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
        waiting = self.hold.awaiting is not None or self._cancel_in_flight
        if buf or waiting:
            buf.append(data)
            if waiting:
                return  # held behind a decision or a cancel; resume() carries on
            if not buf.ready:
                return  # the message is still incomplete: join its chunks once, later
            data = buf.take()
        self._process_client(data)

    def resume(self, decision: Decision) -> None:
        """Apply the decision that :attr:`awaiting` produced and carry on with the input."""
        held = self.hold.release()
        mtype, frame, request, parse = held.mtype, held.frame, held.request, held.parse
        if mtype == E:
            assert isinstance(frame, bytes)
            self._run_redecided(frame, request, decision)
            self._continue_client()
            return
        pending = None
        if self.auditing is not None:
            decision, pending = self._audit_request(request, decision)
        if decision.allowed:
            if isinstance(frame, list):
                self.to_server.extend(frame)  # a large message leaves as its chunks
                self._track(mtype, b"", 0, 0, parse, pending=pending, plan=decision.mask)
            else:
                self.to_server.append(frame)
                self._track(mtype, frame, 0, len(frame), parse, pending=pending, plan=decision.mask)
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
        if self._client_buf and self.hold.awaiting is None and not self._cancel_in_flight:
            self._process_client(self._client_buf.take())

    def _process_client(self, data: bytes) -> None:
        out = self.to_server
        hold = self.hold
        unpack = codec.TYPE_AND_LENGTH.unpack_from
        limit = self.max_client_message
        size = len(data)
        pos = run_start = 0
        while size - pos >= 5 and hold.awaiting is None and not self.terminated:
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
                unsettled = (self._owed_ready or self._unsynced_execute) and mtype != F
                risky = unsettled and may_read_differently(mtype, frame)
                if risky and not self._unsynced_execute:
                    break  # read once the server's ReadyForQuery has said how (see above)
                try:
                    request, parse = self._request(mtype, frame)
                except codec.InvalidText:
                    # The server refuses such text too (22021) and the session goes on.
                    request, parse = self._undecodable(mtype, frame), None
                    outcome: Decision | Awaitable[Decision] = invalid_text(self.encoding)
                else:
                    self.info.wire.in_flight = bool(self._owed_ready or self._unsynced_execute)
                    outcome = PIPELINED_TEXT if risky else self.policy.decide(request)
                pending = None
                if self.auditing is not None and isinstance(outcome, Decision):
                    outcome, pending = self._audit_request(request, outcome)
                if isinstance(outcome, Decision) and outcome.allowed:
                    self._track(mtype, data, pos, end, parse, pending=pending, plan=outcome.mask)
                else:
                    # What precedes the request goes first, so the order is kept.
                    if pos > run_start:
                        out.append(data[run_start:pos])
                    run_start = end
                    if isinstance(outcome, Decision):
                        self._refuse(mtype, request, outcome, pending)
                    else:
                        hold.start(HeldRequest(mtype, frame, request, parse), outcome)
            elif mtype in _FRONTEND_TYPES:
                if mtype in _REQUESTS:
                    self._check_expiry()
                pending = None
                if mtype == E:
                    self._sync_policy()
                    if self.masking.masked:
                        self._check_plan(data[pos:end])
                    redecided = self._redecide(data[pos:end]) if self._any_stale else None
                    if redecided is not None:
                        if pos > run_start:
                            out.append(data[run_start:pos])
                        run_start = end
                        request, outcome = redecided
                        if isinstance(outcome, Decision):
                            self._run_redecided(data[pos:end], request, outcome)
                        else:
                            hold.start(HeldRequest(E, data[pos:end], request, None), outcome)
                        pos = end
                        continue
                    if self._observed:
                        # What goes upstream before the Execute (an audit sentinel, a
                        # Describe the masking needs) leaves first, in order.
                        pending, before = self._before_execute(data[pos:end])
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
            kind: Literal["query", "parse"] = "query" if mtype == Q else "parse"
            request = StatementRequest(kind, sql, statement_name=name)
            outcome: Decision | Awaitable[Decision] = invalid_text(self.encoding)
        else:
            if mtype == Q:
                request = StatementRequest("query", sql)
            else:
                parse = codec.Parse(name, sql, types)
                request = StatementRequest("parse", sql, statement_name=name)
            self.info.wire.in_flight = bool(unsettled)
            outcome = PIPELINED_TEXT if risky else self.policy.decide(request)
        pending = None
        if self.auditing is not None and isinstance(outcome, Decision):
            outcome, pending = self._audit_request(request, outcome)
        if not isinstance(outcome, Decision):
            self.hold.start(HeldRequest(mtype, large.chunks, request, parse), outcome)
        elif outcome.allowed:
            self.to_server.extend(large.chunks)
            self._track(mtype, b"", 0, 0, parse, pending=pending, plan=outcome.mask)
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
        if self.auditing is not None:
            pending = self._audit_execute(portal)
            if pending is None:
                before.append(self._sentinel(P, "", AUDIT_REFUSAL, None, suffix="audit"))
        if self.masking.masked:
            describe = self.masking.describe_before_execute(portal, self.records, self.owed)
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
        if not self.policy.reloaded():
            return
        statements = self.records.statements
        for record in statements.values():
            if record.sql is not None:
                record.stale = True
        for entry in self.owed:
            if entry.kind == P and entry.name != REFUSED and entry.name in statements:
                statements[entry.name].stale = True
        self._any_stale = True
        if self._policy_settings is None:
            return
        masked, row_limit = self._policy_settings()
        self.limiter.limit = row_limit
        if masked != self.masking.masked:
            self.masking.switched(masked, self.records, self.owed)
            self._observed = masked or self.auditing is not None
        if masked or row_limit is not None:
            # Never back to the plain table: a result being cut must stay cut.
            self._handlers = _ROW_SERVER_HANDLERS

    def _check_plan(self, frame: bytes) -> None:
        """Mark the Execute's statement stale when its mask plan's catalog is not current."""
        portal = codec.decode_execute_portal(frame, self.encoding)
        statement = self.records.statement_of(portal)
        if statement is None or statement.plan is None:
            return
        if not self.policy.plan_is_current(statement.plan):
            statement.stale = True
            self._any_stale = True

    def _redecide(
        self, frame: bytes
    ) -> tuple[StatementRequest, Decision | Awaitable[Decision]] | None:
        """Decide again the statement an Execute runs, if it was decided before a reload."""
        portal = self.records.portals.get(codec.decode_execute_portal(frame, self.encoding))
        if portal is None:
            return None
        record = self.records.statements.get(portal.statement)
        if record is None or not record.stale:
            return None
        texts = self._texts_of(portal.statement)
        if not texts:
            return None
        return self.policy.redecide(portal.statement, texts)

    def _texts_of(self, statement: str) -> list[str]:
        """Every text the server may run under a statement name at the next Execute.

        A Parse of the name since the last Sync decides it alone: it replaces the text,
        or fails and the Execute is skipped. Otherwise it is the confirmed text or that
        of a Parse still in flight (one that failed left the old text), so all count.
        """
        texts: list[str] = []
        synced = False
        for entry in reversed(self.owed):
            if entry.kind == S:
                synced = True
            elif entry.kind == P and entry.name == statement:
                if not synced:
                    return [entry.extra]
                texts.append(entry.extra)
        record = self.records.statements.get(statement)
        if record is not None and record.sql is not None:
            texts.append(record.sql)
        return texts

    def _run_redecided(self, frame: bytes, request: StatementRequest, decision: Decision) -> None:
        """Forward an Execute whose statement was decided again, or fail it in place."""
        if decision.allowed:
            record = self.records.statements.get(request.statement_name)
            if record is not None:
                record.stale = False
                if self.masking.masked:
                    record.plan = decision.mask
            pending = None
            if self._observed:
                pending, before = self._before_execute(frame)
                self.to_server.extend(before)
            self.to_server.append(frame)
            self._track(E, frame, 0, len(frame), None, pending=pending)
            return
        pending = None
        if self.auditing is not None:
            decision, pending = self._audit_request(request, decision)
        # A sentinel Parse fails in the Execute's place; the server skips to the Sync.
        self.to_server.append(self._sentinel(P, "", decision, pending, suffix="stale"))

    def _check_expiry(self) -> None:
        if self.expires_at is not None and self._clock() >= self.expires_at:
            # A connection lives no longer than the token that opened it.
            raise AuthenticationFailed(
                "your token has expired: this connection is closed; reconnect with a fresh token",
                sqlstate="28000",
            )

    def _request(self, mtype: int, frame: bytes) -> tuple[StatementRequest, codec.Parse | None]:
        self._check_expiry()
        if mtype == Q:
            return StatementRequest("query", codec.decode_query(frame, self.encoding)), None
        if mtype == P:
            parse = codec.decode_parse(frame, self.encoding)
            request = StatementRequest("parse", parse.sql, statement_name=parse.statement)
            return request, parse
        oid = codec.decode_function_call_oid(frame)
        return StatementRequest("function_call", "", function_oid=oid), None

    def _undecodable(self, mtype: int, frame: bytes) -> StatementRequest:
        """The request of a Query or Parse whose SQL text does not decode (to refuse)."""
        if mtype == Q:
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
        self.to_server.append(self._sentinel(mtype, request.statement_name, decision, pending))

    def _sentinel(
        self,
        mtype: int,
        statement_name: str,
        decision: Decision,
        pending: PendingStatement | None,
        *,
        suffix: str = "",
    ) -> bytes:
        """The message that makes the server fail in place of a refused request.

        ``suffix`` names a sentinel Parse of its own that fails in place of an Execute.
        """
        if suffix:
            message = self.policy.named_sentinel(suffix, decision)
        else:
            message = self.policy.sentinel(mtype, statement_name, decision)
        if mtype == P:
            self.owed.append(Owed(P, REFUSED, "", pending))
        else:
            self.owed.append(Owed(Q, "", "", pending))
            self._owed_ready += 1
            self._unsynced_execute = False
        return message

    def _track(
        self,
        mtype: int,
        data: bytes,
        pos: int,
        end: int,
        parse: codec.Parse | None,
        *,
        pending: PendingStatement | None = None,
        plan: MaskPlan | None = None,
    ) -> None:
        """Note what the server will owe for a message that is being forwarded."""
        owed = self.owed
        if mtype == B:
            # The unnamed portal and statement are by far the most common: skip decoding.
            if end - pos > 6 and data[pos + 5] == 0 and data[pos + 6] == 0:
                portal, statement = "", ""
            else:
                names = codec.decode_bind_names(data[pos:end], self.encoding)
                portal, statement = names.portal, names.statement
            record = self.records.bound(portal, statement)
            if self._observed:
                parameters = codec.decode_bind_parameters(data[pos:end])
                if self.masking.masked:
                    record.formats = parameters.result_formats
                if self.auditing is not None:
                    record.values = self.auditing.bind_values(parameters.values, parameters.formats)
            owed.append(Owed(B, portal, statement))
        elif mtype == E:
            portal = (
                ""
                if end - pos == 10 and data[pos + 5] == 0
                else codec.decode_execute_portal(data[pos:end], self.encoding)
            )
            owed.append(Owed(E, portal, "", pending))
            self._unsynced_execute = True
        elif mtype == S:
            # During COPY IN the server ignores Sync (and Flush): it owes nothing for it.
            if self.mode != "copy_in":
                owed.append(Owed(S))
                self._owed_ready += 1
                self._unsynced_execute = False
        elif mtype == P:
            assert parse is not None
            statement_record = self.records.parsed(parse.statement, parse.sql)
            if self.masking.masked:
                statement_record.plan = plan
            owed.append(Owed(P, parse.statement, parse.sql, pending))
        elif mtype in (D, C):
            kind, name = codec.decode_target(data[pos:end], self.encoding)
            owed.append(Owed(mtype, name, kind))
            if mtype == D and self.masking.masked:
                self.masking.describe_forwarded(kind, name, self.records)
        elif mtype in (Q, F):
            owed.append(Owed(mtype, "", "", pending, plan if self.masking.masked else None))
            self._owed_ready += 1
            self._unsynced_execute = False
        elif mtype == X:
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
        if self.auditing is not None:
            # The response digest covers every byte this session sent its client so far.
            self.auditing.sent(self.to_client[start:], self._masking_so_far)

    def _receive_server(self, data: bytes) -> None:
        masking = self.masking
        if masking.awaiting is not None:
            self._server_buf.append(data)  # the result waits for its new plan
            return
        out = self.to_client
        limiter = self.limiter
        if self._server_stream_left:
            n = min(self._server_stream_left, len(data))
            if not limiter.cut:
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
        masked = masking.masked  # (changed by client input only)
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
                    and not masked
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
            if mtype == _DATA_ROW and masked and masking.layout is not None:
                layout = masking.layout if self._rows_in_runs(hook) else None
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

    def _rows_in_runs(self, hook: ResultHook | None) -> bool:
        """Whether the DataRows from here on may be masked as a run by the layout.

        A run skips :meth:`_on_row` for each row: the result's layout must be known, and
        no row cut, counted against a limit, sampled or shown to a hook.
        """
        return (
            self.masking.layout_known
            and hook is None
            and not self.limiter.cut
            and self.limiter.limit is None
            and not (self._sampling and self._samples_row())
        )

    def _samples_row(self) -> bool:
        return self.auditing is not None and self.auditing.samples(self.owed.head())

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
        self.info.wire.transaction_status = status
        self.mode = "ready"
        owed = self.owed
        while owed:
            entry = owed.popleft()
            if entry.pending is not None and self.auditing is not None:
                self.auditing.answered(entry.pending)
            if entry.kind in (S, Q, F):
                self._owed_ready -= 1
                self.input_released = not self._owed_ready and bool(self._client_buf)
                break
        if status == b"I" and self.records.portals:
            self.records.transaction_ended(owed)
        if not owed:
            # Only once nothing is in flight: a refusal pipelined behind this Sync has
            # its error still to come.
            self.policy.settled()
        self.limiter.ready()
        if self.masking.masked:
            self.masking.end_result()
        return None

    def _on_error(self, data: bytes, pos: int, end: int) -> bytes | None:
        owed = self.owed
        masking = self.masking
        frame = data[pos:end]
        plan = masking.result_plan(owed.head(), self.records) if masking.masked else None
        self.mode = "ready"
        if b"VFATAL\0" in frame or b"VPANIC\0" in frame:
            # The server says why it is closing; the shell need not add its own FATAL.
            self.server_fatal = True
        replaced = self.limiter.error_arrived(frame)
        if replaced is None:
            replaced = self.policy.refusal_for(frame)
        if masking.masked:
            masking.end_result()
            if replaced is None:
                replaced = masking.scrub(frame, plan)
        if self.auditing is not None:
            self.auditing.errored(owed, replaced if replaced is not None else frame)
        if owed.extended_head():
            # In the extended protocol the server now discards everything up to Sync.
            owed.discard_until_sync()
        return replaced

    def _on_notice(self, data: bytes, pos: int, end: int) -> bytes | None:
        masking = self.masking
        if not masking.masked:
            return None
        return masking.scrub(data[pos:end], masking.result_plan(self.owed.head(), self.records))

    def _on_notification(self, data: bytes, pos: int, end: int) -> bytes | None:
        if not self.masking.masked:
            return None
        return self.masking.notification(data[pos:end])

    def _on_parse_complete(self, data: bytes, pos: int, end: int) -> bytes | None:
        entry = self.owed.pop_if(P)
        if entry is not None:
            self.records.parse_complete(entry.name, entry.extra)
            if entry.pending is not None and self.auditing is not None:
                entry.pending.command = "PARSE"
                self.auditing.answered(entry.pending)
        return None

    def _on_bind_complete(self, data: bytes, pos: int, end: int) -> bytes | None:
        entry = self.owed.pop_if(B)
        if entry is not None:
            self.records.bind_complete(entry.name)
        return None

    def _on_close_complete(self, data: bytes, pos: int, end: int) -> bytes | None:
        entry = self.owed.pop_if(C)
        if entry is not None:
            # Everything the session noted about the name goes with it, or a client that
            # prepares and closes statements under fresh names would grow the session for
            # as long as it is connected; a Parse (Bind) sent after the Close keeps it.
            if entry.extra == "S":
                self.records.statement_closed(entry.name, self.owed)
            else:
                self.records.portal_closed(entry.name, self.owed)
        return None

    def _on_describe_done(self, data: bytes, pos: int, end: int) -> bytes | None:
        # RowDescription or NoData ends a Describe; in a simple Query it is just a result.
        self.owed.pop_if(D)
        return None

    def _on_execute_done(self, data: bytes, pos: int, end: int) -> bytes | None:
        if self.mode != "ready":
            self.mode = "ready"  # CommandComplete ends a COPY
        owed = self.owed
        head = owed.head()
        auditing = self.auditing
        if auditing is not None:
            auditing.completed(head, data, pos, end)
        entry = owed.pop_if(E)
        if entry is not None and entry.pending is not None and auditing is not None:
            auditing.answered(entry.pending)
        if self.masking.masked:
            self.masking.end_result()
        error = self.limiter.execute_done(
            data[pos], entry.name if entry is not None else None, self.records
        )
        if error is not None and head is not None and head.pending is not None:
            # The client got an error, not this CommandComplete: so does the record.
            fields = codec.decode_fields(error)
            head.pending.sqlstate, head.pending.error = fields.get("C"), fields.get("M")
        return error

    # Rows: only sessions that mask, limit or sample rows have these handlers.

    def _on_row(self, data: bytes, pos: int, end: int) -> bytes | None:
        """A DataRow or COPY TO STDOUT row: counted against the limit, then masked."""
        kind = data[pos]
        if kind == _COPY_DATA and self.mode != "copy_out":
            return None
        limiter = self.limiter
        if limiter.cut:
            return b""  # also when a reload lifted the limit that cut this result
        masking = self.masking
        if masking.masked and not masking.layout_known and kind != _COPY_DATA:
            try:
                note = masking.start_result(self.owed.head(), None, self.records)
            except NeedsPlan:
                return _HOLD  # before the row is counted: it comes again
            if note is not None:
                # The client asked to be told what is masked: before the first row.
                row = self._row(data, pos, end, kind)
                return note + (data[pos:end] if row is None else row)
        return self._row(data, pos, end, kind)

    def _row(self, data: bytes, pos: int, end: int, kind: int) -> bytes | None:
        """The row counted against the limit, then masked (None: it goes as it is)."""
        limiter = self.limiter
        masking = self.masking
        masked = masking.masked
        if limiter.limit is not None and not limiter.count_row(self.owed, self.records):
            self._cancel_if_safe()
            return b""
        auditing = self.auditing
        if not masked:
            if auditing is not None and auditing.samples(self.owed.head()):
                auditing.sample(self.owed.head(), data[pos:end])
            return None
        if kind == _COPY_DATA:
            plan = masking.result_plan(self.owed.head(), self.records)
            if plan is None or plan.mask_all:
                # A COPY row is one line of text: it cannot be masked column by column,
                # so with no plan to say which values are safe, none is sent.
                self._cut(_unplanned_copy_error)
                return b""
            masked_row = masking.copy_row(data[pos:end], plan)
            if masked_row is not None and self._copy_binary:
                # A binary row's fields have lengths: a replacement would corrupt it.
                self._cut(_binary_copy_error)
                return b""
            return masked_row
        layout = masking.layout
        masked_row = layout.mask_row(data, pos, end) if layout is not None else None
        if auditing is not None:
            shown = masked_row if masked_row is not None else data[pos:end]
            auditing.sample(self.owed.head(), shown)
        return masked_row

    def _cut(self, error: Callable[[bool], bytes]) -> None:
        """Withhold the rest of the current result; it ends with ``error`` instead."""
        self.limiter.cut_result(error)
        self._cancel_if_safe()

    def _cancel_if_safe(self) -> None:
        """Ask the shell to cancel the statement whose result was just cut, if safe."""
        if not self.limiter.cancelled and self._cancel_is_safe():
            self.limiter.cancelled = self.cancel_wanted = self._cancel_in_flight = True

    def _cancel_is_safe(self) -> bool:
        """Whether a cancel can only stop what the client would see as one failed unit.

        That is the running simple Query, or the running Execute and what follows it up to
        the next Sync: an error anywhere there ends the unit for the client anyway. Client
        messages already sent past that point would be at risk, so then the session does
        not cancel (the statement runs to its end, and only the rows are withheld).
        """
        owed = self.owed
        if not owed:
            return False
        head = owed[0].kind
        if head == Q:
            return len(owed) == 1
        if head != E:
            return False
        for index, entry in enumerate(owed):
            if entry.kind == S:
                return index == len(owed) - 1
        return True  # no Sync yet: what the client sends next waits for the cancel

    def _on_copy_done(self, data: bytes, pos: int, end: int) -> bytes | None:
        return b"" if self.limiter.cut else None

    def _on_result_start(self, data: bytes, pos: int, end: int) -> bytes | None:
        self.limiter.result_started()
        if self.masking.masked:
            return self._on_description(data, pos, end)
        return self._on_describe_done(data, pos, end)

    def _on_description(self, data: bytes, pos: int, end: int) -> bytes | None:
        """RowDescription or NoData: a Describe's answer, or a simple Query's result."""
        masking = self.masking
        head = self.owed.head()
        fields = codec.decode_row_description(data[pos:end]) if data[pos] == ord("T") else []
        masking.end_result()
        if head is not None and head.kind == D:
            self.owed.popleft()
            return b"" if masking.description(head, fields, self.records) else None
        if head is not None and head.kind == Q:
            try:
                note = masking.start_result(head, fields, self.records)
            except NeedsPlan:
                return _HOLD
            if note is not None:
                return note + data[pos:end]
        return None

    def resume_result(self, decision: Decision) -> None:
        """Apply the plan :attr:`awaiting_result` made, and go on with the held result."""
        if self.masking.awaiting is None:
            raise RuntimeError("resume_result() without a held result")
        if not decision.allowed:
            # Under the catalog as it is now the statement is refused: its rows are not
            # sent, and its end is the refusal.
            self._cut(lambda completed: _replan_refusal(decision, completed))
        self.masking.replanned(decision, self.owed.head(), self.records)
        held = self._server_buf.take()
        if held:
            self.receive_server(held)

    def _on_copy_in(self, data: bytes, pos: int, end: int) -> bytes | None:
        self.mode = "copy_in"
        # Syncs the client pipelined behind this COPY reach the server in COPY IN mode,
        # where they are ignored: the server owes nothing for them.
        owed = self.owed
        if owed and owed[0].kind == E:
            head = owed.popleft()
            kept = [e for e in owed if e.kind != S]
            self._owed_ready -= len(owed) - len(kept)
            owed.clear()
            owed.append(head)
            owed.extend(kept)
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

    # Audit: what the core asks of the audit stage.

    def _audit_request(
        self, request: StatementRequest, decision: Decision
    ) -> tuple[Decision, PendingStatement | None]:
        assert self.auditing is not None
        return self.auditing.request(request, decision, self._masking_so_far())

    def _audit_execute(self, portal: str) -> PendingStatement | None:
        assert self.auditing is not None
        bound = self.records.portals.get(portal)
        statement = self.records.statements.get(bound.statement) if bound is not None else None
        masked = self.masking.masked
        plan = statement.plan if masked and statement is not None else None
        return self.auditing.execute(
            bound,
            statement,
            self._masking_so_far(),
            hide_values=masked and (plan is None or plan.scrub_errors),
        )

    def close_audit(self) -> None:
        """The session ended: record what was still unanswered, then the end."""
        if self.auditing is not None:
            self.auditing.close(self.owed, self._masking_so_far())

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
        return len(self.owed)


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


def _unplanned_copy_error(completed: bool) -> bytes:
    return codec.error_response(
        "42501",
        "querywarden: the gateway cannot tell which masking applies to this COPY's rows "
        "(the statement may run either of two texts, or was decided before masking "
        "applied to this session), and COPY rows cannot be masked whole; the rows were "
        "withheld",
        detail="the rest of the COPY was withheld"
        + ("; the statement finished on the server" if completed else ""),
        hint="prepare the statement again under a new name (or send it as a simple "
        "Query), so the gateway decides and masks exactly the text that runs",
    )


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

#: A handler's answer that stops the result here until :meth:`Session.resume_result`.
_HOLD: Final = b"\0querywarden: hold"

__all__ = ["LARGE_MESSAGE", "SENTINEL_PREFIX", "Mode", "RowLimit", "Session"]
