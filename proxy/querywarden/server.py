"""The asyncio server adapter: the only place where client sockets live.

For each client connection it drives the sans-I/O start-up (TLS, protocol negotiation,
password), asks the authenticator for a Principal, opens the gateway's own upstream
connection, and then relays bytes through a :class:`querywarden.session.Session`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import logging
import secrets
import socket
import ssl
import sys
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from querywarden import codec, encodings
from querywarden.approvals.api import AccessUnavailable, AdminApi, bearer_authenticate
from querywarden.approvals.model import Review
from querywarden.approvals.notify import Notifier
from querywarden.approvals.service import ApprovalService
from querywarden.approvals.store import SqliteReviewStore
from querywarden.audit.recorder import Auditor, AuditWriteError, SessionAudit
from querywarden.cancel import CancelCourier, CancelKey, CancelKeys
from querywarden.config import GatewaySettings
from querywarden.encodings import EncodingRefused
from querywarden.endpoint import ConnectionClosed, Endpoint
from querywarden.errors import (
    AuthenticationFailed,
    ProtocolViolation,
    QuerywardenError,
    TerminatedBeforeStartup,
    UpstreamError,
)
from querywarden.hooks import Decision, ResultHook, SessionInfo, StatementGate
from querywarden.identity import Authenticator, Credentials, Principal
from querywarden.identity.authenticator import TokenAuthenticator
from querywarden.masking import compiled
from querywarden.masking.catalog import (
    CatalogCache,
    SensitiveCatalog,
    load_catalog,
    read_fingerprint,
)
from querywarden.masking.plan import Masker
from querywarden.policy import PolicyDocument, load_policy
from querywarden.policy.access import AccessReport, AskedRelation, describe_access
from querywarden.policy.engine import PolicyEngine
from querywarden.policy.gate import PolicyGate
from querywarden.policy.plans import PlanEstimator
from querywarden.policy.prechecks import Check, Checked, ServerCheck
from querywarden.policy.relations import CATALOG_QUERY as CATALOG_RELATIONS_QUERY
from querywarden.policy.relations import builtin_catalog_relations
from querywarden.session import RowLimit, Session
from querywarden.startup import (
    CancelRequested,
    ClientStartup,
    GSSENCRequested,
    PasswordReceived,
    SSLRequested,
    StartupReceived,
    requested_annotations,
    upstream_parameters,
)
from querywarden.upstream import (
    UpstreamConnection,
    UpstreamTarget,
    connect,
    side_connection,
)

log = logging.getLogger("querywarden.server")

# Keep per-connection buffering small: a slow client pauses the upstream, not our memory.
_WRITE_HIGH_WATER = 256 * 1024
#: Beyond the exporter's drain time: for its last batch and for the process to exit.
_DRAIN_MARGIN = 2.0
#: How often a held statement polls a store that reports changes as they happen (the
#: Kubernetes watch, PostgreSQL's LISTEN): only the safety net for when that is down.
_SHARED_STORE_POLL = 5.0


class Gateway:
    """A running querywarden gateway: listener, sessions and cancel-key registry."""

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        policy: PolicyDocument | None = None,
        authenticator: Authenticator | None = None,
        gate: StatementGate | None = None,
        result_hook: ResultHook | None = None,
    ) -> None:
        self.settings = settings
        compiled.select(settings.performance.native)  # one row masker per process
        log.info("masking rows with the %s row masker", compiled.describe())
        if policy is None:
            # No policy trusts no issuer: every connection is refused (fail closed).
            policy = load_policy(settings.policy_file) if settings.policy_file else PolicyDocument()
        self.policy = policy
        self.catalog_relations: frozenset[str] | None = None
        self._catalog_reader: asyncio.Task[None] | None = None
        #: Set by close(): background work finishes what it has in hand and stops.
        self._stopping = asyncio.Event()
        self.engine = PolicyEngine(policy)
        self.authenticator = authenticator or TokenAuthenticator(policy.identity)
        # The policy's rules decide; without rules nothing is allowed (default deny).
        self.plans = PlanEstimator()
        self.checks = ServerCheck()
        self.catalogs = CatalogCache(self._load_catalog, fingerprinter=self._catalog_fingerprint)
        self.auditor = _auditor(settings)
        self.approvals = self._approval_service(policy)
        #: Posts review events to the policy's approvals.notify destinations (once started).
        self._notifier: Notifier | None = None
        self._admin: AdminApi | None = None
        #: Where the admin API listens, once started (None: no admin API).
        self.admin_address: tuple[str, int] | None = None
        self.gate: StatementGate = gate or PolicyGate(
            self.engine,
            estimator=self._largest_scan,
            masker=self._masker(policy),
            catalogs=self.catalogs,
            approvals=self.approvals,
            notify=self._notify,
            checker=self._server_check,
        )
        self.result_hook = result_hook
        #: Records up to here were written before this gateway started: sessions still
        #: open among them were cut off by a crash (the exporter closes them as such).
        self._audit_start_seq = self.auditor.log.last_seq if self.auditor else 0
        self._exporter: asyncio.Task[None] | None = None
        self._exporter_stop = asyncio.Event()
        self._drain_seconds = settings.audit.drain_timeout.total_seconds()
        self.tls_context = _server_tls_context(settings)
        #: The certificate and key files as last loaded (renewals replace them in place).
        self._tls_stamp = _tls_stamp(settings)
        if self.tls_context is None and settings.listen.plaintext == "never":
            raise ValueError("listen.plaintext is 'never' but no tls.certFile/tls.keyFile is set")
        up = settings.upstream
        self.upstream_target = UpstreamTarget(
            host=up.host,
            port=up.port,
            user=up.user,
            password=up.resolved_password(),
            sslmode=up.sslmode,
            sslrootcert=up.sslrootcert,
            connect_timeout=up.connect_timeout.total_seconds(),
        )
        self.connections: set[ClientConnection] = set()
        #: Open sessions by id (for messages a hook sends a client outside a response).
        self.sessions: dict[str, ClientConnection] = {}
        #: Every client and upstream socket still alive, for close() to wait on.
        self.endpoints: weakref.WeakSet[Endpoint] = weakref.WeakSet()
        self._cancel_keys: CancelKeys[ClientConnection] = CancelKeys()
        #: Delivers CancelRequests upstream (owned here, not by any connection).
        self._courier = CancelCourier()
        self._server: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._policy_stamp: tuple[int, int, int] | None = None
        # Until the upstream has said which relations its pg_catalog holds, every
        # unqualified name is checked as pg_catalog's too (the strict reading).
        self._use_catalog_relations(None)

    async def start(self) -> tuple[str, int]:
        """Start listening; return the bound address (port 0 picks a free port)."""
        loop = asyncio.get_running_loop()
        # Read before listening, so the first session already resolves names as the
        # server does; an upstream that is not up yet is asked again in the background.
        if not await self._read_catalog_relations():
            self._catalog_reader = loop.create_task(self._read_catalog_relations_until_read())
        listen = self.settings.listen
        self._server = await loop.create_server(
            lambda: ClientConnection(self), listen.host, listen.port, reuse_address=True
        )
        if self.settings.policy_file is not None:
            self._policy_stamp = _file_stamp(self.settings.policy_file)
        if self.settings.policy_file is not None or self.tls_context is not None:
            self._watcher = loop.create_task(self._watch_files())
        self.approvals.start()
        self._start_notifier(self.policy)
        admin = self.settings.admin
        if admin.port is not None:
            context = None
            if admin.cert_file and admin.key_file:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(admin.cert_file, admin.key_file)
            self._admin = AdminApi(
                self.approvals,
                self._admin_principal,
                host=admin.host,
                port=admin.port,
                ssl_context=context,
                audit_directory=self.auditor.directory if self.auditor is not None else None,
                metrics=self._metrics_text,
                access=self._describe_access,
            )
            self.admin_address = await self._admin.start()
        audit = self.settings.audit
        if self.auditor is not None and audit.otlp_endpoint:
            if audit.exporter == "process":
                self._exporter = loop.create_task(
                    self._run_export_process(self.auditor.directory, audit.otlp_endpoint)
                )
            else:
                from querywarden.audit.export import LogExporter

                exporter = LogExporter(
                    self.auditor.directory,
                    audit.otlp_endpoint,
                    instance_id=socket.gethostname(),
                    interrupted_through=self._audit_start_seq,
                    query_text=audit.export_query_text,
                )
                self._exporter = loop.create_task(
                    exporter.run(stop=self._exporter_stop, drain=self._drain_seconds)
                )
        sock = self._server.sockets[0].getsockname()
        log.info("querywarden listening on %s:%s", sock[0], sock[1])
        return str(sock[0]), int(sock[1])

    async def _run_export_process(self, directory: Path, endpoint: str) -> None:
        """The OTLP exporter as a child process, restarted if it dies, stopped at close.

        Turning records into spans costs CPU per statement; in its own process it does
        not hold the interpreter lock the relay's event loop needs.
        """
        command = [
            sys.executable,
            "-m",
            "querywarden.audit.export",
            str(directory),
            "--endpoint",
            endpoint,
            "--instance-id",
            socket.gethostname(),
            "--interrupted-through",
            str(self._audit_start_seq),
            "--query-text",
            self.settings.audit.export_query_text,
            "--drain",
            str(self._drain_seconds),
        ]
        while not self._exporter_stop.is_set():
            process = await asyncio.create_subprocess_exec(*command)
            stopping = asyncio.ensure_future(self._exporter_stop.wait())
            exited = asyncio.ensure_future(process.wait())
            await asyncio.wait({stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                stopping.cancel()
                log.warning("the audit exporter exited (%s); restarting it", process.returncode)
                await asyncio.sleep(1.0)
                continue
            # Stopping: let it finish its batch and drain what is left.
            process.terminate()
            try:
                await asyncio.wait_for(exited, timeout=self._drain_seconds + _DRAIN_MARGIN)
            except TimeoutError:
                process.kill()
                await exited

    def upstream_target_for(self, principal: Principal, database: str) -> UpstreamTarget:
        """The upstream credentials for this identity: its rules' ``upstreamRole``, if any."""
        rules = self.engine.applicable(principal, database)
        named = sorted({r.upstream_role for r in rules if r.upstream_role})
        if not named:
            return self.upstream_target
        if len(named) > 1:
            raise AuthenticationFailed(
                f"the rules that apply to you name different upstream roles ({', '.join(named)}); "
                "the gateway cannot choose: ask its operator to give your identity one",
                sqlstate="28000",
            )
        role = self.settings.upstream.roles.get(named[0])
        if role is None:
            raise UpstreamError(
                f"the policy names upstream role {named[0]!r}, which the gateway's settings "
                "do not define (upstream.roles); this is a gateway configuration problem",
                sqlstate="08004",
            )
        return dataclasses.replace(
            self.upstream_target, user=role.user, password=role.resolved_password()
        )

    def _approval_service(self, policy: PolicyDocument) -> ApprovalService:
        """Reviews of held statements (used while the policy names approvers).

        Always built, so that a policy reload that adds approvers holds statements at
        once; the stores open nothing until their first review.
        """
        chosen = self.settings.approvals
        if chosen.store == "kubernetes":
            from querywarden.approvals.kube_store import KubernetesReviewStore, default_namespace

            namespace = chosen.namespace or default_namespace(chosen.service_account_directory)
            if namespace is None:
                raise ValueError(
                    "approvals.store is 'kubernetes' but no namespace is known: set "
                    "approvals.namespace (or POD_NAMESPACE)"
                )
            assert chosen.policy is not None  # the settings validator requires it
            kube = KubernetesReviewStore(
                namespace,
                chosen.policy,
                kubeconfig=chosen.kubeconfig,
                service_account_directory=chosen.service_account_directory,
            )
            # The watch wakes held statements; the poll is only a safety net.
            return ApprovalService(
                kube,
                policy.approvals,
                on_event=self._review_event,
                poll_interval=_SHARED_STORE_POLL,
            )
        if chosen.store == "postgres":
            from querywarden.approvals.pg_store import PostgresReviewStore

            assert chosen.postgres is not None  # the settings validator requires it
            where = chosen.postgres
            store_role = urllib.parse.urlsplit(where.dsn).username
            upstream = self.settings.upstream
            if store_role in {upstream.user, *(r.user for r in upstream.roles.values())}:
                log.warning(
                    "approvals: the review store connects as %r, a role the gateway's client "
                    "sessions use too: a client the policy lets write the store's schema "
                    "could change reviews; give the store a role of its own in "
                    "approvals.postgres.dsn",
                    store_role,
                )
            shared = PostgresReviewStore(
                where.dsn,
                schema=where.schema_name,
                password=(
                    where.resolved_password
                    if where.password is not None or where.password_file is not None
                    else None
                ),
                pool_size=where.pool_size,
                connect_timeout=where.connect_timeout.total_seconds(),
                command_timeout=where.command_timeout.total_seconds(),
            )
            # LISTEN/NOTIFY wakes held statements; the poll is only a safety net.
            return ApprovalService(
                shared,
                policy.approvals,
                on_event=self._review_event,
                poll_interval=_SHARED_STORE_POLL,
            )
        store = SqliteReviewStore(self.settings.state_directory / "reviews.sqlite3")
        return ApprovalService(store, policy.approvals, on_event=self._review_event)

    def _metrics_text(self) -> str | None:
        """``GET /metrics``: the exposition text; None when nothing counts (no audit log)."""
        metrics = self.auditor.metrics if self.auditor is not None else None
        if metrics is None:
            return None
        # Imported here, as where the metrics are made: no OpenTelemetry SDK without them.
        from querywarden.audit.metrics import GatewayMetrics
        from querywarden.audit.prometheus import render

        if not isinstance(metrics, GatewayMetrics):
            return None

        return render(metrics.snapshot(), instance_id=metrics.instance_id)

    async def _admin_principal(self, token: str) -> Principal:
        """Who calls the admin API: by the policy's issuers in force (reloads included)."""
        return await bearer_authenticate(self.authenticator)(token)

    async def _describe_access(
        self, principal: Principal, database: str, relations: Sequence[AskedRelation]
    ) -> AccessReport:
        """``POST /access``: the gate's policy and masking in force, over the catalog cache.

        The catalog is read only when masking applies to the identity; a catalog that
        cannot be read is an error (AccessUnavailable), never a guess.
        """
        pinned = self.settings.upstream.database
        if pinned is not None and database != pinned:
            raise ValueError(
                f'database "{database}" is not served here: this gateway serves only '
                f'database "{pinned}"'
            )
        gate = self.gate
        if not isinstance(gate, PolicyGate):
            raise AccessUnavailable(
                "this gateway's statements are decided by a gate of its own, not by its policy"
            )
        # A reload while the catalog loads brings other masking (and invalidates the
        # catalogs): ask again with what the gate holds then.
        for _ in range(3):
            engine, masker, catalogs = gate.engine, gate.masker, gate.catalogs
            catalog = None
            if masker is not None and masker.section.columns and masker.applies_to(principal):
                if catalogs is None:
                    raise AccessUnavailable("no catalog source is configured")
                try:
                    catalog = await catalogs.get(database)
                except Exception as exc:  # fail closed: which columns are masked is unknown
                    raise AccessUnavailable(
                        f"the gateway could not read the catalog of database {database!r} to "
                        f"know which columns are masked ({type(exc).__name__}); retry shortly"
                    ) from exc
            if gate.engine is engine and gate.masker is masker:
                return describe_access(
                    principal, database, relations, engine=engine, masker=masker, catalog=catalog
                )
        raise AccessUnavailable("the policy is being reloaded; retry shortly")

    def _review_event(self, kind: str, review: Review) -> None:
        """Every review event goes to the audit log, and to whoever the policy notifies."""
        if self._notifier is not None:
            self._notifier.on_event(kind, review)  # queued: it never blocks the event
        if self.auditor is None:
            return
        try:
            self.auditor.write(
                f"review.{kind}",
                review_id=review.id,
                requester=review.requester.subject,
                database=review.database,
                statement=review.statement,
                rule=review.rule,
                reason=review.reason,
                decision=str(review.decision.value),
                approver=review.approver.subject if review.approver else None,
                comment=review.comment,
                grant_expires=review.grant_expires.isoformat() if review.grant_expires else None,
            )
        except AuditWriteError:
            log.error("audit: review event %s of %s could not be recorded", kind, review.id)

    def _start_notifier(self, policy: PolicyDocument) -> None:
        """Post review events as ``policy`` says, from now on (called on the loop).

        A reload replaces the notifier; the old one gets a moment to post what it has
        queued.
        """
        old, self._notifier = self._notifier, None
        if old is not None:
            asyncio.get_running_loop().create_task(old.close())
        approvals = policy.approvals
        if not approvals.notify:
            return
        self._notifier = Notifier(
            approvals.notify,
            pending_ttl=approvals.pending_ttl.total_seconds(),
            console_url=approvals.console_url,
            approve_command=self.approvals.approve_command,
            record=self._record_notification,
        )
        self._notifier.start()

    def _record_notification(self, type_: str, fields: dict[str, object]) -> None:
        """A delivered (or given up) notification goes to the audit log."""
        if self.auditor is None:
            return
        try:
            self.auditor.write(type_, **fields)
        except AuditWriteError:
            log.error(
                "audit: %s of review %s could not be recorded", type_, fields.get("review_id")
            )

    def _notify(self, session: SessionInfo, message: bytes) -> None:
        """Send a message (a NoticeResponse) to a session's client now."""
        connection = self.sessions.get(session.session_id)
        if connection is not None and not connection.closed:
            connection.write(message)

    def _masker(self, policy: PolicyDocument) -> Masker | None:
        if not (policy.masking.columns or policy.masking.detectors):
            return None
        return Masker(policy.masking, self.settings.masking.resolved_hash_key())

    async def _load_catalog(self, database: str) -> SensitiveCatalog:
        conn = await side_connection(self.upstream_target, database, "querywarden-catalog")
        try:
            return await load_catalog(conn, self.policy.masking)
        finally:
            await conn.close()

    async def _catalog_fingerprint(self, database: str) -> str:
        conn = await side_connection(self.upstream_target, database, "querywarden-catalog")
        try:
            return await read_fingerprint(conn)
        finally:
            await conn.close()

    async def _read_catalog_relations(self) -> bool:
        """Learn the names of the upstream's pg_catalog relations; False if it failed.

        They are the same in every database of a cluster (initdb made them, nobody else
        can add any), so one database is enough: the pinned one, else ``postgres`` or
        ``template1``, which every role may connect to unless revoked.
        """
        pinned = self.settings.upstream.database
        for database in [pinned] if pinned else ["postgres", "template1"]:
            try:
                conn = await side_connection(self.upstream_target, database, "querywarden-catalog")
                try:
                    rows = await conn.fetch(CATALOG_RELATIONS_QUERY)
                finally:
                    await conn.close()
            except Exception as exc:  # any failure: stay strict, and say why
                log.warning("cannot read pg_catalog's relations from %s: %s", database, exc)
                continue
            names = frozenset(row[0] for row in rows)
            if "pg_class" not in names:  # not a catalog we can trust to be complete
                log.warning("pg_catalog's relations read from %s lack pg_class", database)
                continue
            # With the shipped lists: a name one of them has stays a candidate, so the
            # server's answer can only add candidates, never remove one.
            self._use_catalog_relations(names | builtin_catalog_relations())
            return True
        return False

    async def _read_catalog_relations_until_read(self) -> None:
        """Read again, backing off to once a minute, until it works or the gateway closes.

        Never cancelled mid-read: an asyncpg connect cut off by a cancellation can leave
        its socket open; :meth:`close` sets ``_stopping`` and waits for the read in hand.
        """
        delay = 1.0
        while not await self._read_catalog_relations():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            delay = min(delay * 2, 60.0)

    def _use_catalog_relations(self, names: frozenset[str] | None) -> None:
        self.catalog_relations = names
        self.engine.use_catalog_relations(names)
        if isinstance(self.gate, PolicyGate) and self.gate.engine is not self.engine:
            self.gate.engine.use_catalog_relations(names)  # a gate given by the caller

    async def _largest_scan(self, session: SessionInfo, sql: str) -> int:
        target = self.upstream_target_for(session.principal, session.database)
        return await self.plans.largest_scan(target, session.database, sql)

    async def _server_check(self, session: SessionInfo, check: Check) -> Checked:
        # As the session's own connection: the same upstream, role and database.
        target = self.upstream_target_for(session.principal, session.database)
        return await self.checks.run(target, session.database, check)

    # policy reload ---------------------------------------------------------------------

    def reload_policy(self) -> bool:
        """Load the policy file again; on any error keep the last good policy.

        Rules apply at once to every session, open ones included; issuers apply to new
        connections.
        """
        path = self.settings.policy_file
        if path is None:
            return False
        try:
            policy = load_policy(path)
            masker = self._masker(policy)
        except Exception as exc:  # any failure: keep what works (and say why)
            log.error("policy reload from %s failed, keeping the last good policy: %s", path, exc)
            return False
        self.policy = policy
        self.engine = PolicyEngine(policy)
        self.engine.use_catalog_relations(self.catalog_relations)
        self.authenticator = TokenAuthenticator(policy.identity)
        self.catalogs.invalidate()
        # Approvers added or removed by the reload apply at once: the service is always
        # there, and the gate holds statements only while the policy names approvers.
        self.approvals.settings = policy.approvals
        self._start_notifier(policy)
        if isinstance(self.gate, PolicyGate):
            self.gate.reload(self.engine, masker)
        log.info(
            "policy reloaded from %s: %d issuers, %d rules",
            path,
            len(policy.identity.issuers),
            len(policy.rules),
        )
        return True

    def reload_tls(self) -> bool:
        """Load the serving certificate and key again; on any error keep the last good ones.

        New connections get the new certificate; open sessions keep the TLS session they
        negotiated (the context is only used at each connection's handshake).
        """
        try:
            context = _server_tls_context(self.settings)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("TLS certificate reload failed, keeping the last good one: %s", exc)
            return False
        if context is None:
            return False
        self.tls_context = context
        log.info("TLS certificate reloaded from %s", self.settings.tls.cert_file)
        return True

    async def _watch_files(self) -> None:
        """Poll the policy file and the TLS files, and reload what changed.

        A ConfigMap or Secret volume swaps a symlink, which changes the files' stamps; the
        operator renews the serving certificate in its Secret that way.
        """
        path = self.settings.policy_file
        interval = self.settings.policy_reload_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            if path is not None:
                stamp = _file_stamp(path)
                if stamp != self._policy_stamp:
                    self._policy_stamp = stamp
                    self.reload_policy()
            if self.tls_context is not None:
                tls_stamp = _tls_stamp(self.settings)
                if tls_stamp != self._tls_stamp:
                    # Stamped even when the load fails: a certificate written before its
                    # key fails once and loads when the key's write changes the stamp.
                    self._tls_stamp = tls_stamp
                    self.reload_tls()

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop listening, close every session, and wait until their sockets are closed.

        Sockets still open after ``grace`` seconds (a peer that never acknowledges a TLS
        close) are aborted, so the event loop can be closed safely afterwards.
        """
        if self._watcher is not None:
            self._watcher.cancel()
        self._stopping.set()
        if self._catalog_reader is not None:
            # Not cancelled (see _read_catalog_relations_until_read): it stops after the
            # read in hand, which its connect timeout bounds.
            await asyncio.gather(self._catalog_reader, return_exceptions=True)
        self._courier.close()
        with contextlib.suppress(Exception):
            await self.plans.close()
        with contextlib.suppress(Exception):
            await self.checks.close()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.shutdown("the gateway is shutting down", sqlstate="57P01")
        endpoints = [e for e in self.endpoints if not e.closed]
        if endpoints:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(e.wait_closed()) for e in endpoints], timeout=grace
            )
            for waiter in pending:
                waiter.cancel()
            for endpoint in endpoints:
                if not endpoint.closed:
                    endpoint.abort()
            await asyncio.sleep(0)  # let the aborts deliver connection_lost
        if self._server is not None:
            await self._server.wait_closed()
        if self._admin is not None:
            with contextlib.suppress(Exception):
                await self._admin.close()
        if self._exporter is not None:
            self._exporter_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self._exporter, timeout=self._drain_seconds + 2 * _DRAIN_MARGIN
                )
        if self._notifier is not None:
            with contextlib.suppress(Exception):
                await self._notifier.close()
        with contextlib.suppress(Exception):
            await self.approvals.store.close()
        if self.auditor is not None:
            self.auditor.close()

    # cancel keys -------------------------------------------------------------------

    def register_cancel_key(
        self, target: UpstreamTarget, upstream: UpstreamConnection, connection: ClientConnection
    ) -> CancelKey[ClientConnection]:
        """A key for the client: the backend's own pid, a secret the gateway made up."""
        return self._cancel_keys.issue(
            target, upstream.backend_pid, upstream.backend_secret, connection
        )

    def forget_cancel_key(self, key: CancelKey[ClientConnection]) -> None:
        """Drop a key when its session ends."""
        self._cancel_keys.forget(key)

    async def cancel(self, pid: int, secret: bytes) -> None:
        """Map a client CancelRequest to its upstream backend; unknown keys are ignored.

        Returns once the cancel is delivered (or failed). Cancelling the caller does not
        stop the delivery: a client that closes its socket right after a CancelRequest
        still gets its statement cancelled.
        """
        delivery = self.cancel_soon(pid, secret)
        if delivery is not None:
            await asyncio.shield(asyncio.wrap_future(delivery))

    def cancel_soon(self, pid: int, secret: bytes) -> concurrent.futures.Future[None] | None:
        """Start delivering a CancelRequest (None: nothing to send upstream).

        The delivery runs on the courier's threads, tied to no client connection and to
        no turn of the event loop (see :mod:`querywarden.cancel`).
        """
        key = self._cancel_keys.find(pid, secret)
        if key is None:
            log.info("ignored a CancelRequest with an unknown key")
            return None
        held = key.owner._decision
        if held is not None and not held.done():
            # The statement is in the gateway (held for approval), not upstream.
            held.cancel()
            return None
        return self._courier.deliver(key.target, key.pid, key.upstream_secret)


def _server_tls_context(settings: GatewaySettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=str(tls.client_ca_file))
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _is_loopback(address: object) -> bool:
    if not isinstance(address, tuple) or not address:
        return isinstance(address, str)  # a Unix socket path
    try:
        return ipaddress.ip_address(str(address[0])).is_loopback
    except ValueError:
        return False


class ClientConnection(Endpoint):
    """One client connection: start-up, then the relay through a Session."""

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self.gateway = gateway
        self.session: Session | None = None
        self.upstream: Endpoint | None = None
        self.cancel_key: CancelKey[ClientConnection] | None = None
        self._task: asyncio.Task[None] | None = None
        self._deciding: asyncio.Task[None] | None = None
        self._cancelling: asyncio.Task[None] | None = None
        self._replanning: asyncio.Task[None] | None = None
        self._decision: asyncio.Future[Decision] | None = None
        self._finished = False
        # Reading the untyped packets before a StartupMessage: the start-up task then only
        # reads what is buffered, so a lost connection must not cancel it (a CancelRequest
        # followed at once by a close would be lost unread).
        self._untyped = True
        self._over_limit = False
        self._startup_params: dict[str, str] = {}
        self._audit: SessionAudit | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.gateway.endpoints.add(self)
        self.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        gateway = self.gateway
        # Over the limit, the client is still told why once it has sent its StartupMessage,
        # as PostgreSQL does: libpq discards an error that answers its SSLRequest. The
        # refusal is bounded by the startup timeout and holds no slot.
        self._over_limit = len(gateway.connections) >= gateway.settings.limits.max_connections
        if not self._over_limit:
            gateway.connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._finish()

    # start-up ----------------------------------------------------------------------

    async def _run(self) -> None:
        limits = self.gateway.settings.limits
        try:
            async with asyncio.timeout(limits.startup_timeout.total_seconds()):
                ready = await self._start_up()
            if ready is not None:
                self._start_relay(*ready)
        except TimeoutError:
            self._send_fatal("08006", "start-up timed out: authenticate within the startup timeout")
            self.close()
        except AuthenticationFailed as exc:
            log.info("authentication failed from %s: %s", self.peer_address(), exc.message)
            self._audit_auth_failure(exc)
            self._send_fatal(exc.sqlstate, exc.message)
            self.close()
        except TerminatedBeforeStartup as exc:
            # As PostgreSQL: logged, and the connection closed without a reply.
            log.info("start-up failed from %s: %s", self.peer_address(), exc.message)
            self.close()
        except QuerywardenError as exc:
            log.info("start-up failed from %s: %s", self.peer_address(), exc.message)
            self._send_fatal(exc.sqlstate, exc.message)
            self.close()
        except ConnectionClosed:
            self.close()
        except Exception:
            log.exception("unexpected error during start-up")
            self._send_fatal("XX000", "internal error in the gateway during start-up")
            self.close()
        finally:
            if self.session is None and (self.closed or self._transport_closing()):
                # Start-up ended without a session. connection_lost normally releases the
                # slot, but it never comes when a TLS handshake dies: release it here.
                self._finish()

    def _audit_auth_failure(self, exc: QuerywardenError) -> None:
        auditor = self.gateway.auditor
        if auditor is None:
            return
        params = self._startup_params
        try:
            auditor.auth_failed(
                client_address=self.peer_address(),
                user=params.get("user", ""),
                database=params.get("database", ""),
                reason=exc.message,
                sqlstate=exc.sqlstate,
            )
        except AuditWriteError:
            log.error("audit: an authentication failure could not be recorded")

    def _transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def _start_up(
        self,
    ) -> tuple[StartupReceived, SessionInfo, UpstreamTarget, UpstreamConnection] | None:
        gateway = self.gateway
        machine = ClientStartup()
        startup: StartupReceived | None = None
        forwarded: dict[str, str] = {}
        while True:
            event = machine.next_event()
            if event is None:
                machine.receive(await self.read())
                continue
            if isinstance(event, SSLRequested):
                if gateway.tls_context is None:
                    self.write(b"N")
                else:
                    self.write(b"S")
                    await self.start_tls(gateway.tls_context, server_side=True)
                    machine.tls = True
            elif isinstance(event, GSSENCRequested):
                self.write(b"N")
            elif isinstance(event, CancelRequested):
                # Delivered by a task of the gateway's, which outlives this connection:
                # clients close the socket right after sending the request.
                gateway.cancel_soon(event.pid, event.secret)
                # PostgreSQL never answers a CancelRequest; neither does the gateway (libpq
                # takes any reply on that connection for a failed cancel).
                self.close()
                return None
            elif isinstance(event, StartupReceived):
                startup = event
                # From here the start-up waits on others (authenticator, upstream): a
                # client that leaves cancels it.
                self._untyped = False
                self._startup_params = event.params
                if self._over_limit:
                    raise QuerywardenError("sorry, too many clients already", sqlstate="53300")
                self._check_startup(event, tls=machine.tls)
                # Refused here, before authentication, when a setting is not accepted.
                forwarded = upstream_parameters(event.params)
                annotations = requested_annotations(event.params)
                encodings.check_startup_settings(forwarded)
                if event.needs_negotiation:
                    self.write(codec.negotiate_protocol_version(0, list(event.unsupported_options)))
                self.write(codec.AUTHENTICATION_CLEARTEXT)
                machine.expect_password()
            elif isinstance(event, PasswordReceived):
                assert startup is not None
                break
        principal = await gateway.authenticator.authenticate(
            Credentials(
                startup.params["user"],
                event.secret,
                self.peer_address(),
                client_certificate=self._peer_certificate(),
            )
        )
        database = self._database(startup)
        limits = gateway.engine.session_limits(principal, database)
        if limits.statement_timeout is not None:
            # Enforced by the upstream itself, as the session's default: RESET returns to it.
            requested = _milliseconds(forwarded.get("statement_timeout"))
            ceiling = int(limits.statement_timeout * 1000)
            if requested is None or requested == 0 or requested > ceiling:
                forwarded["statement_timeout"] = f"{ceiling}ms"
        # The policy resolves unqualified names against public (after pg_catalog); pin the
        # upstream session to it, so neither a "$user" schema named after the upstream role
        # nor an ALTER ROLE / DATABASE ... SET search_path default makes the server read a
        # table the policy did not check. (Clients cannot set it at start-up.)
        forwarded["search_path"] = "public"
        target = gateway.upstream_target_for(principal, database)
        info = SessionInfo(
            session_id=secrets.token_hex(8),
            principal=principal,
            database=database,
            client_address=self.peer_address(),
            application_name=startup.params.get("application_name", ""),
            annotations=annotations,
        )
        audit = None
        if gateway.auditor is not None:
            try:
                audit = gateway.auditor.session(
                    info,
                    upstream_user=target.user,
                    tls=self._tls_details(),
                    server_address=f"{target.host}:{target.port}",
                )
            except AuditWriteError:
                # Fail closed: a session that cannot be recorded does not start.
                raise QuerywardenError(
                    "the gateway cannot write its audit log (full or unwritable), so it "
                    "accepts no sessions now; retry later",
                    sqlstate="58030",
                ) from None
        upstream = await connect(target, database, forwarded)
        try:
            # The server's own defaults (ALTER ROLE ... SET client_encoding) apply too.
            client_encoding = encodings.check_server_parameters(upstream.parameters)
        except EncodingRefused:
            upstream.endpoint.close()
            raise
        info = dataclasses.replace(info, client_encoding=client_encoding)
        leftover = machine.leftover()
        if leftover:
            self._buffer[:0] = leftover
        if audit is not None:
            # Counted from here: the session that ends it owns the connection now.
            audit.upstream_connected()
        self._audit = audit
        return startup, info, target, upstream

    def _tls_details(self) -> dict[str, str] | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return None
        cipher = ssl_object.cipher()
        return {"version": ssl_object.version() or "", "cipher": cipher[0] if cipher else ""}

    def _peer_certificate(self) -> bytes | None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        return bytes(der) if der else None

    def _check_startup(self, startup: StartupReceived, *, tls: bool) -> None:
        if "replication" in startup.params and startup.params["replication"] not in (
            "false",
            "0",
            "off",
            "no",
        ):
            raise ProtocolViolation(
                "replication connections are not supported through querywarden",
                sqlstate="0A000",
            )
        if not tls:
            mode = self.gateway.settings.listen.plaintext
            peer = self.transport.get_extra_info("peername") if self.transport else None
            if mode == "never" or (mode == "loopback" and not _is_loopback(peer)):
                raise AuthenticationFailed(
                    "the gateway requires TLS for this connection: connect with sslmode=require "
                    "(or verify-full)",
                    sqlstate="28000",
                )

    def _database(self, startup: StartupReceived) -> str:
        requested = startup.params.get("database") or startup.params["user"]
        pinned = self.gateway.settings.upstream.database
        if pinned is not None and requested != pinned:
            raise AuthenticationFailed(
                f'database "{requested}" is not served here: this gateway serves only '
                f'database "{pinned}"; connect with dbname={pinned}',
                sqlstate="3D000",
            )
        return requested

    # relay -------------------------------------------------------------------------

    def _start_relay(
        self,
        startup: StartupReceived,
        info: SessionInfo,
        target: UpstreamTarget,
        upstream: UpstreamConnection,
    ) -> None:
        gateway = self.gateway
        if self.closed:
            upstream.endpoint.close()
            return
        settings = gateway.settings.limits
        masked, row_limit = self._policy_settings(info)
        self.session = Session(
            info,
            gateway.gate,
            gateway.result_hook,
            max_client_message=int(settings.max_client_message),
            max_server_message=int(settings.max_server_message),
            expires_at=info.principal.expires_at,
            row_limit=row_limit,
            masked=masked,
            audit=self._audit,
            policy_settings=lambda: self._policy_settings(info),
        )
        self.session.transaction_status = upstream.transaction_status
        self.upstream = up = upstream.endpoint
        gateway.endpoints.add(up)
        assert up.transport is not None
        up.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.cancel_key = key = gateway.register_cancel_key(target, upstream, self)
        gateway.sessions[info.session_id] = self
        self.writelines(
            [
                codec.AUTHENTICATION_OK,
                *upstream.startup_frames,
                codec.backend_key_data(key.pid, key.secret),
                codec.ready_for_query(upstream.transaction_status),
            ]
        )
        log.info(
            "session %s: %s (issuer %s, groups %s) connected to database %s from %s",
            info.session_id,
            info.principal.subject,
            info.principal.issuer,
            ",".join(sorted(info.principal.groups)) or "-",
            info.database,
            info.client_address,
        )
        # Flow control: whichever side cannot keep up pauses the other side's reads.
        self.on_pause_writing = _pauser(up)
        self.on_resume_writing = _resumer(up)
        up.on_pause_writing = _pauser(self)
        up.on_resume_writing = _resumer(self)
        up.on_lost = self._upstream_lost
        pending_server = up.start_relay(self._on_server_data)
        pending_client = self.start_relay(self._on_client_data)
        if pending_server:
            self._on_server_data(pending_server)
        if pending_client:
            self._on_client_data(pending_client)
        if up.closed:
            self._upstream_lost(None)

    def _policy_settings(self, info: SessionInfo) -> tuple[bool, RowLimit | None]:
        """Whether the policy in force masks this session, and its row limit."""
        gateway = self.gateway
        limits = gateway.engine.session_limits(info.principal, info.database)
        row_limit = (
            RowLimit(limits.max_rows, limits.max_rows_rule or "?")
            if limits.max_rows is not None
            else None
        )
        return bool(getattr(gateway.gate, "masks", _never)(info)), row_limit

    def _on_client_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        if not self._step(session.receive_client, data):
            return
        # Client input only ever produces bytes for the upstream (refusals included).
        chunks = session.to_server
        if chunks:
            session.to_server = []
            _send(self.upstream, chunks)
        if session.terminated:
            self._flush()
        elif session.awaiting is not None:
            if self._deciding is None:
                self._deciding = asyncio.get_running_loop().create_task(self._await_decisions())
            elif session.buffered_client_bytes > _HELD_INPUT_LIMIT and self.transport:
                # What the client sends behind a held request waits in the session; past
                # this much, stop reading (TCP pushes back) until the decision is made.
                self.transport.pause_reading()
        elif session.held_for_answer > _HELD_INPUT_LIMIT and self.transport:
            # The same for SQL text pipelined behind a Query that is still running.
            self.transport.pause_reading()

    def _on_server_data(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        if not self._step(session.receive_server, data):
            return
        # Server input only ever produces bytes for the client.
        chunks = session.to_client
        if chunks:
            session.to_client = []
            _send(self, chunks)
        if session.input_released:
            # SQL text held until the server answered the Query before it (an encoding
            # change would have been reported first) goes on, as if just received.
            session.input_released = False
            self._on_client_data(b"")
            idle = self._deciding is None and self._cancelling is None
            if self.transport is not None and idle and not self.closed:
                self.transport.resume_reading()
        if session.cancel_wanted:
            session.cancel_wanted = False
            self._cancelling = asyncio.get_running_loop().create_task(self._cancel_statement())
        if session.awaiting_result is not None and self._replanning is None:
            self._replanning = asyncio.get_running_loop().create_task(self._await_result())

    async def _await_result(self) -> None:
        """Hold a result (and the upstream's input) while its mask plan is made again."""
        session, upstream = self.session, self.upstream
        assert session is not None and upstream is not None
        if upstream.transport is not None:
            upstream.transport.pause_reading()
        try:
            while session.awaiting_result is not None and not self.closed:
                decision = await _settle(session.awaiting_result)
                if not self._step(session.resume_result, decision):
                    return
                self._flush()
                if session.cancel_wanted:
                    session.cancel_wanted = False
                    self._cancelling = asyncio.get_running_loop().create_task(
                        self._cancel_statement()
                    )
        finally:
            self._replanning = None
            if not self.closed and upstream.transport is not None:
                with contextlib.suppress(RuntimeError):
                    upstream.transport.resume_reading()

    async def _cancel_statement(self) -> None:
        """Cancel the running statement upstream (a row limit), holding client input."""
        session = self.session
        assert session is not None and self.transport is not None
        self.transport.pause_reading()
        try:
            assert self.cancel_key is not None
            await self.gateway.cancel(self.cancel_key.pid, self.cancel_key.secret)
        except (OSError, QuerywardenError) as exc:
            # Not delivered: the statement runs to its end and the client still gets the
            # row-limit error; nothing can be hit by a late cancel.
            log.warning("session %s: cancel failed: %s", session.info.session_id, exc)
        finally:
            self._cancelling = None
        if self.closed:
            return
        if not self._step(session.cancel_delivered):
            return
        self._flush()
        if session.awaiting is not None and self._deciding is None:
            self._deciding = asyncio.get_running_loop().create_task(self._await_decisions())
        elif self._deciding is None:
            self.transport.resume_reading()

    async def _await_decisions(self) -> None:
        """Hold the client's input while a decision needs I/O, then carry on."""
        session = self.session
        assert session is not None and self.transport is not None
        # Reading goes on while a decision is awaited (a statement may be held for an
        # approver for minutes): that is how a disconnect is noticed, which withdraws
        # the review. Input behind the held request is buffered up to a bound.
        try:
            while session.awaiting is not None and not self.closed:
                # A task, so that a CancelRequest can end a statement held for approval.
                self._decision = asyncio.ensure_future(session.awaiting)
                try:
                    decision = await _settle(self._decision)
                finally:
                    self._decision = None
                if not self._step(session.resume, decision):
                    return
                self._flush()
        finally:
            self._deciding = None
            if not self.closed and self.transport is not None and self._cancelling is None:
                self.transport.resume_reading()

    def _flush(self) -> None:
        session = self.session
        assert session is not None and self.upstream is not None
        if session.to_server:
            chunks, session.to_server = session.to_server, []
            self.upstream.writelines(chunks)
        if session.to_client:
            chunks, session.to_client = session.to_client, []
            self.writelines(chunks)
        if session.terminated:
            self.upstream.close()
            self.close()

    def _upstream_lost(self, exc: Exception | None) -> None:
        session = self.session
        if self.closed or (session is not None and session.terminated):
            return
        log.warning(
            "session %s: upstream connection lost", session.info.session_id if session else "-"
        )
        if session is None or not session.server_fatal:
            self._send_fatal(
                "08006",
                "the connection to the upstream database was lost; reconnect to continue",
            )
        self.close()

    # ending --------------------------------------------------------------------------

    def _send_fatal(self, sqlstate: str, text: str) -> None:
        self.write(codec.error_response(sqlstate, text, severity="FATAL"))

    def _step(self, call: Callable[..., None], *args: object) -> bool:
        """Run one step of the session; False when it ended the session.

        The session's own errors carry what the client should see; anything else is a
        fault in the gateway (XX000, see :meth:`_internal_error`).
        """
        try:
            call(*args)
        except QuerywardenError as exc:
            self.shutdown(exc.message, sqlstate=exc.sqlstate)
            return False
        except Exception as exc:
            self._internal_error(exc)
            return False
        return True

    def _internal_error(self, exc: Exception) -> None:
        """A fault in the gateway itself (session, gate, hooks): end this session only.

        Whatever the session had produced for either side is dropped, not forwarded: its
        state is unknown. The client gets XX000 naming the session, so the operator can
        find the traceback logged here; other sessions carry on.
        """
        session_id = self.session.info.session_id if self.session is not None else "-"
        log.error("session %s: internal error in the gateway", session_id, exc_info=exc)
        auditor = self.gateway.auditor
        if auditor is not None and self.session is not None:
            try:
                # The exception's type only: its text may quote row data.
                auditor.write(
                    "session.error",
                    session_id=session_id,
                    sqlstate="XX000",
                    error=f"internal error in the gateway ({type(exc).__name__})",
                )
            except AuditWriteError:
                log.error("audit: the internal error of session %s was not recorded", session_id)
        if self.session is not None:
            self.session.to_server = []
            self.session.to_client = []
        self.shutdown(f"internal error in the gateway (session {session_id})", sqlstate="XX000")

    def shutdown(self, text: str, *, sqlstate: str) -> None:
        """End the session with a FATAL ErrorResponse to the client."""
        log.info("closing session of %s: %s (%s)", self.peer_address(), text, sqlstate)
        self._send_fatal(sqlstate, text)
        self.close()
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.session is not None:
            try:
                self.session.close_audit()
            except Exception:  # never let the record of an ending stop the cleanup
                log.exception("audit: could not record the end of a session")
        self.gateway.connections.discard(self)
        if self.session is not None:
            self.gateway.sessions.pop(self.session.info.session_id, None)
        if self.cancel_key is not None:
            self.gateway.forget_cancel_key(self.cancel_key)
        if self.upstream is not None and not self.upstream.closed:
            self.upstream.write(codec.TERMINATE)
            self.upstream.close()
        task = self._task
        if (
            task is not None
            and not task.done()
            and task is not asyncio.current_task()
            and not self._untyped
        ):
            task.cancel()
        if self._deciding is not None and not self._deciding.done():
            self._deciding.cancel()
        if self._cancelling is not None and not self._cancelling.done():
            self._cancelling.cancel()
        if self._replanning is not None and not self._replanning.done():
            self._replanning.cancel()


def _auditor(settings: GatewaySettings) -> Auditor | None:
    audit = settings.audit
    if audit.directory is None:
        return None
    metrics = None
    # Counted for the Collector, for the admin API's GET /metrics, or for both.
    if audit.otlp_endpoint or settings.admin.port is not None:
        from querywarden.audit.metrics import GatewayMetrics

        metrics = GatewayMetrics(
            audit.otlp_endpoint or None,
            scrape=settings.admin.port is not None,
            instance_id=socket.gethostname(),
        )
    return Auditor(
        audit.directory,
        fsync=audit.fsync,
        fsync_interval=audit.fsync_interval.total_seconds(),
        max_segment_bytes=int(audit.max_segment_size),
        max_segment_age=audit.max_segment_age.total_seconds(),
        retention=audit.retention.total_seconds(),
        sample_rows=audit.sample_rows,
        fail_open=audit.fail_open,
        redact_parameters=audit.redact_parameters,
        metrics=metrics,
    )


def _never(session: SessionInfo) -> bool:
    return False


def _send(endpoint: Endpoint | None, chunks: list[bytes]) -> None:
    """Write the relay's output: the hot path, so one C call for the common single chunk."""
    transport = endpoint.transport if endpoint is not None else None
    if transport is None or transport.is_closing():
        return
    if len(chunks) == 1:
        transport.write(chunks[0])
    else:
        transport.writelines(chunks)


#: Client input buffered behind a held request before the gateway stops reading.
_HELD_INPUT_LIMIT = 1024 * 1024

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60000.0, "h": 3600000.0, "d": 86400000.0}


def _tls_stamp(settings: GatewaySettings) -> tuple[tuple[int, int, int] | None, ...]:
    """The stamps of the serving certificate and key files (empty without TLS)."""
    tls = settings.tls
    if tls.cert_file is None or tls.key_file is None:
        return ()
    return _file_stamp(Path(tls.cert_file)), _file_stamp(Path(tls.key_file))


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What identifies a file's current content cheaply (through symlinks)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _milliseconds(value: str | None) -> int | None:
    """A statement_timeout setting in milliseconds (None when absent or unreadable)."""
    if value is None:
        return None
    text = value.strip().lower()
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz").strip()
    unit = text[len(number) :].strip() or "ms"
    try:
        return int(float(number) * _UNITS_MS[unit])
    except (ValueError, KeyError):
        return None


async def _settle(awaitable: Awaitable[Decision]) -> Decision:
    """Await a decision; a hook that fails refuses the statement (fail closed)."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the session itself is ending
        # The decision alone was cancelled: the client's CancelRequest.
        return Decision.refuse(
            "canceling statement due to user request (it was not run)",
            sqlstate="57014",
        )
    except Exception as exc:
        log.exception("decision hook failed")
        return Decision.refuse(
            f"the gateway could not decide on this statement ({type(exc).__name__}); "
            "it was not run",
            sqlstate="58000",
            hint="retry; if it persists, ask the gateway's operator to check its logs",
        )


def _pauser(endpoint: Endpoint) -> _Toggle:
    return _Toggle(endpoint, pause=True)


def _resumer(endpoint: Endpoint) -> _Toggle:
    return _Toggle(endpoint, pause=False)


class _Toggle:
    """Pauses or resumes reading on an endpoint (a callable, for flow-control hooks)."""

    __slots__ = ("_endpoint", "_pause")

    def __init__(self, endpoint: Endpoint, *, pause: bool) -> None:
        self._endpoint = endpoint
        self._pause = pause

    def __call__(self) -> None:
        transport = self._endpoint.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(RuntimeError):
            if self._pause:
                transport.pause_reading()
            else:
                transport.resume_reading()
