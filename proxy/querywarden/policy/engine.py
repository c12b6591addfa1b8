"""The policy engine: (Principal, database, analyzed statements) → Verdict. Sans-I/O.

Every element a statement touches (each operation, each relation read or written, each
function) gets an outcome, and the most restrictive wins: deny > review > allow. Nothing
is allowed unless a rule that applies to the Principal allows it (default deny); what a
rule lists under ``review`` is permitted once an approver says yes. Calling a function
with side effects (a volatile function of PostgreSQL's, or any function PostgreSQL does not
define itself) is the operation ``side_effects``; other functions are allowed unless a
built-in or rule denial names them. Reading a relation whose rows are other relations'
data (``pg_stats``) or other sessions' statements (``pg_stat_activity``) counts as reading
every table, since which rows it returns cannot be known before it runs.

Unqualified relation names are checked against every schema they could resolve to: each
schema of the session's ``search_path``, and ``pg_catalog`` (searched first by PostgreSQL)
when it holds a relation of that name (:mod:`querywarden.policy.relations`): a name is
refused if any candidate is denied, and allowed only if every candidate is allowed, so an
unqualified name can never reach a table the policy would refuse by its qualified name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Literal

from querywarden.analysis import MODELED_FUNCTIONS, QualifiedName, StatementSummary
from querywarden.identity import Principal
from querywarden.policy.functions import (
    HARMLESS_VOLATILE,
    KNOWN_SIDE_EFFECTS,
    builtin_functions,
)
from querywarden.policy.model import PolicyDocument, Rule
from querywarden.policy.relations import builtin_catalog_relations

Outcome = Literal["allow", "review", "deny"]
_RANK = {"allow": 0, "review": 1, "deny": 2}

_ROLE_SWITCH = (
    "a role switch changes which privileges the server enforces: the policy chose the "
    "role the gateway connects with (upstreamRole), and row security, column privileges "
    "and the gateway's own checks on its side connections hold for that role"
)
#: Operations refused, whatever a rule allows, unless a rule that applies names them in
#: allow.operations (``*`` does not), and what each protects against. Role switches
#: differ (:data:`ROLE_SWITCHES`).
BUILTIN_DENIED_OPERATIONS: dict[str, str] = {
    "copy_file": "it reads or writes files on the database server's host, outside every "
    "table the policy names",
    "copy_program": "it runs a program on the database server's host",
    "alter_system": "it changes the server's configuration for every session, the "
    "gateway's included, and can make the server run programs (archive_command)",
    "set_role": _ROLE_SWITCH,
    "set_session_authorization": _ROLE_SWITCH,
    "password": "identities come from tokens, not database passwords: you signed in with "
    "a token, and the gateway connects to the database with its own credentials, so a "
    "password set here changes nobody's way in through the gateway, and a new password "
    "for the gateway's own role would lock its next sessions out",
}
#: Statements that set a default for later sessions (ALTER ROLE / DATABASE ... SET x):
#: with the shared upstream role, other identities' sessions too.
SESSION_DEFAULTS = frozenset({"ddl:alter_role_set", "ddl:alter_database_set"})
_LATER_SESSIONS = (
    "; this one sets the role of every later session, other identities' included, "
    "which only a rule that names the operation may do"
)
#: Role switches: lifted also by ``*`` for an identity from which nothing is hidden
#: (:func:`_reads_everything`), and never for an identity whose results are masked.
ROLE_SWITCHES = frozenset({"set_role", "set_session_authorization"})
#: The operation of calling a function with side effects (see :func:`side_effects`).
SIDE_EFFECTS = "side_effects"
_SERVER_FILES = "it reads the database server's files or directories"
_SIGNAL = (
    "it signals another session's backend, which can be another identity's session on "
    "the same upstream role (your own, pg_backend_pid(), is not refused)"
)
_ADMINISTRATION = "it administers the whole server, beyond one database's data"
#: Functions refused unless a rule that applies names them in allow.functions (``*`` in
#: allow.operations does not), and what each protects against.
BUILTIN_DENIED_FUNCTIONS: dict[str, str] = {
    "pg_read_file": _SERVER_FILES,
    "pg_read_binary_file": _SERVER_FILES,
    "pg_ls_*": _SERVER_FILES,
    "pg_stat_file": _SERVER_FILES,
    "pg_file_*": "it writes, renames or removes the database server's files (adminpack)",
    "lo_import": "it reads a file on the database server's host into the database",
    "lo_export": "it writes a file on the database server's host",
    "dblink*": "it connects from the database server to another server and runs SQL "
    "there that querywarden cannot see",
    "pg_terminate_backend": _SIGNAL,
    "pg_cancel_backend": _SIGNAL,
    "pg_reload_conf": "it reloads the server's configuration into every session, the "
    "gateway's included",
    "pg_rotate_logfile*": _ADMINISTRATION,
    "pg_promote": _ADMINISTRATION,
}

_READ_ROWS = "use SELECT ... and read the rows (with LIMIT or an aggregate for large tables)"
_SERVER_SIDE = (
    "read rows with SELECT ... and write them with INSERT ...: the server's files and "
    "programs are not reachable through the gateway"
)
_DRIVER_PREPARED = (
    "use the protocol's prepared statements, which your driver does for you (parameters "
    "such as %s or $1), or send the statement itself"
)
_LEAVE_SETTINGS = (
    "leave the setting out: the session's settings are fixed by the gateway; put what you "
    "need in the statement itself (AT TIME ZONE, to_char, an explicit cast)"
)
_KEEP_ROLE = (
    "run what you need as the role the gateway connects with (RESET ROLE returns to it); "
    "ask an operator for a rule that names the role switch in allow.operations, or for a "
    "role that has the privileges"
)
#: What an agent can do instead of an operation it is refused (the first part of the hint).
INSTEAD: dict[str, str] = {
    "copy_out": _READ_ROWS,
    "copy_file": _SERVER_SIDE,
    "copy_program": _SERVER_SIDE,
    "copy_in": "use INSERT ... VALUES with parameters (your driver's executemany for many rows)",
    "prepare": _DRIVER_PREPARED,
    "execute": _DRIVER_PREPARED,
    "deallocate": _DRIVER_PREPARED,
    "do": "send the statements themselves, one at a time, instead of a DO block: each is "
    "then checked and run on its own",
    "set": _LEAVE_SETTINGS,
    "reset": _LEAVE_SETTINGS,
    "set_search_path": "write table names schema-qualified (public.orders) instead of "
    "changing search_path",
    "set_role": _KEEP_ROLE,
    "set_session_authorization": _KEEP_ROLE,
    "password": "to sign in, get a new token from your identity provider (querywarden "
    "token for the dev issuer); a database role's password is the database operator's: "
    "change it on a direct connection, or ask an operator for a rule that names password "
    "in allow.operations",
    "alter_system": "server settings are the database operator's: ask them",
    "declare_cursor": "use SELECT with LIMIT and a WHERE on a key to read rows page by page",
    "fetch": "use SELECT with LIMIT and a WHERE on a key to read rows page by page",
    "explain_analyze": "use EXPLAIN without ANALYZE: it shows the plan without running the "
    "statement",
}

_SAMPLED = "sampled values of the columns of every table the upstream role can read"
_STATEMENTS = "the statement text, constants included, of other sessions"
#: Relations whose rows are other relations' data or other sessions' statements, and what
#: they expose. Reading one counts as reading every table: it is refused unless a rule
#: names it exactly in ``allow.tables`` or nothing is hidden from the identity (a rule
#: allows ``*``, none denies or reviews a table, and masking does not apply to it). A
#: WHERE on ``tablename`` does not help: the gateway cannot prove what it filters
#: (``OR true``, a function, a view).
EXPOSING_RELATIONS: dict[str, str] = {
    "pg_catalog.pg_stats": _SAMPLED,
    "pg_catalog.pg_stats_ext": _SAMPLED,
    "pg_catalog.pg_stats_ext_exprs": _SAMPLED,
    "pg_catalog.pg_statistic": _SAMPLED,
    "pg_catalog.pg_statistic_ext_data": _SAMPLED,
    "pg_catalog.pg_stat_activity": _STATEMENTS,
    "*.pg_stat_statements": _STATEMENTS,
    "pg_catalog.pg_largeobject": "the contents of every large object in the database",
    "pg_toast.*": "the out-of-line values of other tables' columns (TOAST)",
}
#: Functions that return the same (lifted by ``allow.functions`` or reading every table).
EXPOSING_FUNCTIONS: dict[str, str] = {
    "pg_stat_get_activity": _STATEMENTS,
    "pg_stat_get_backend_activity": _STATEMENTS,
    "pg_stat_statements": _STATEMENTS,
    "pg_logical_slot_*_changes": "the rows every transaction wrote, decoded from the WAL",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The decision for one request, with what a client (often an agent) needs to adapt."""

    outcome: Outcome
    rule: str | None
    reason: str
    hint: str | None = None
    #: The rules that applied to the Principal (for audit).
    rules: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Limits that hold for a whole session (the most restrictive of its rules)."""

    statement_timeout: float | None = None  # seconds
    statement_timeout_rule: str | None = None
    max_rows: int | None = None
    max_rows_rule: str | None = None


def _operation_covered(listed: Iterable[str], operation: str) -> bool:
    for item in listed:
        if item in ("*", operation) or (item == "ddl" and operation.startswith("ddl")):
            return True
    return False


def _matches(patterns: Iterable[str], name: str) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _denied(patterns: Iterable[str], name: str) -> bool:
    """Whether a deny pattern covers ``name``.

    A wildcard name (``hr.*``, ``*.*``: a whole schema or database) is denied if any denied
    table could be inside it.
    """
    schema, _, relation = name.partition(".")
    if "*" not in relation and schema != "*":
        return _matches(patterns, name)
    return any(
        schema == "*" or fnmatchcase(schema, pattern.partition(".")[0]) for pattern in patterns
    )


def _allowed(patterns: Iterable[str], name: str) -> bool:
    """Whether an allow pattern covers ``name`` (a wildcard name needs one covering it all)."""
    schema, _, relation = name.partition(".")
    if "*" not in relation and schema != "*":
        return _matches(patterns, name)
    return any(p == "*" or (schema != "*" and p in (f"{schema}.*", "*.*")) for p in patterns)


def _function_matches(
    patterns: Iterable[str],
    function: QualifiedName,
    search_path: Sequence[str],
    *,
    every: bool = False,
) -> bool:
    """Whether the patterns cover a function call.

    A pattern without a schema covers the name in any schema. An unqualified call runs the
    function of whichever schema PostgreSQL finds first (pg_catalog, then the search_path),
    so it is checked as each of them, like a relation: a denial covers it when it covers
    any of them (``pg_catalog.pg_sleep`` denies ``pg_sleep(1)``); an allowance, which lifts
    a protection, only when it covers them all (``every``).
    """
    patterns = tuple(patterns)
    if not patterns:
        return False
    bare = [p for p in patterns if "." not in p]
    if any(fnmatchcase(function.name, p) for p in bare):
        return True
    qualified = [p for p in patterns if "." in p]
    names = candidates(function, search_path)
    found = (any(fnmatchcase(name, p) for p in qualified) for name in names)
    return all(found) if every else any(found)


def side_effects(function: QualifiedName) -> str | None:
    """Why calling ``function`` can change something, or ``None`` if it cannot.

    PostgreSQL's own functions are judged by their volatility (the table shipped in
    :mod:`querywarden.policy.functions`); a function PostgreSQL does not define is the
    user's or an extension's, and what it does cannot be seen. An unqualified name is
    PostgreSQL's when pg_catalog defines it: the gateway pins ``search_path`` and
    pg_catalog is searched first.
    """
    name = function.name
    if function.schema is None or function.schema in ("pg_catalog", "information_schema"):
        qualified = f"{function.schema or 'pg_catalog'}.{name}"
        known, volatile = builtin_functions()
        if qualified in known:
            if function.schema != "information_schema" and name in KNOWN_SIDE_EFFECTS:
                return KNOWN_SIDE_EFFECTS[name]
            if qualified in volatile and name not in HARMLESS_VOLATILE:
                if name in MODELED_FUNCTIONS:
                    return None  # the summary already says what it does
                return "PostgreSQL marks it volatile: it can change state"
            return None
    return "PostgreSQL does not define it, so querywarden cannot see what it does"


def candidates(
    relation: QualifiedName,
    search_path: Sequence[str],
    catalog: Collection[str] | None = None,
) -> list[str]:
    """The qualified names an (unqualified) relation or function name could resolve to.

    ``catalog`` holds the names pg_catalog defines: a name it does not hold cannot
    resolve there (nobody but initdb adds relations to pg_catalog). ``None`` (functions,
    or a catalog not known) keeps pg_catalog as a candidate for every name. Every schema
    of the search_path stays a candidate whether or not it has the name: tables come and
    go, and the check must hold for whichever exists when the statement runs.
    """
    if relation.schema is not None:
        return [f"{relation.schema}.{relation.name}"]
    name = relation.name
    rest = [f"{schema}.{name}" for schema in search_path if schema != "pg_catalog"]
    if catalog is None or name in catalog or "*" in name:
        return [f"pg_catalog.{name}", *rest]
    return rest


class PolicyEngine:
    """Evaluates analyzed statements against a policy document."""

    def __init__(
        self,
        policy: PolicyDocument,
        *,
        memo_entries: int = 10000,
        catalog_relations: Collection[str] | None = None,
    ) -> None:
        self.policy = policy
        #: The names of pg_catalog's relations (None: every name could be one). The
        #: shipped lists unless given; the gateway passes what its upstream says.
        self.catalog_relations: Collection[str] | None = (
            builtin_catalog_relations() if catalog_relations is None else catalog_relations
        )
        # Verdicts depend only on literal-independent parts of a summary, so repeated
        # statement shapes are decided by one dictionary lookup.
        self._memo: dict[tuple[object, ...], Verdict] = {}
        self._memo_entries = memo_entries
        self._applicable: dict[tuple[str, frozenset[str], str], list[Rule]] = {}
        # Per list of applicable rules: (the list, the rules' ids as a memo key, names).
        self._rules_keys: dict[int, tuple[list[Rule], tuple[int, ...], tuple[str, ...]]] = {}
        self._scan_reviews: dict[int, tuple[list[Rule], tuple[int, str] | None]] = {}

    def use_catalog_relations(self, names: Collection[str] | None) -> None:
        """Resolve unqualified names with this list of pg_catalog's relations from now on.

        ``None`` checks every unqualified name as pg_catalog's too (the strict reading,
        for a server whose list is not known).
        """
        self.catalog_relations = names
        self._memo.clear()

    def applicable(self, principal: Principal, database: str) -> list[Rule]:
        """The rules whose subjects include the Principal and whose databases match."""
        key = (principal.subject, principal.groups, database)
        found = self._applicable.get(key)
        if found is None:
            found = [
                rule
                for rule in self.policy.rules
                if (
                    principal.subject in rule.subjects.users
                    or not principal.groups.isdisjoint(rule.subjects.groups)
                )
                and _matches(rule.databases, database)
            ]
            if len(self._applicable) >= self._memo_entries:
                self._applicable.clear()
            self._applicable[key] = found
        return found

    def scan_review(self, principal: Principal, database: str) -> tuple[int, str] | None:
        """``(minRows, rule)`` of the strictest fullTableScan review that applies, if any."""
        rules = self.applicable(principal, database)
        cached = self._scan_reviews.get(id(rules))
        if cached is not None and cached[0] is rules:
            return cached[1]
        found = [
            (r.review.full_table_scan.min_rows, r.name)
            for r in rules
            if r.review.full_table_scan is not None
        ]
        review = min(found) if found else None
        if len(self._scan_reviews) >= self._memo_entries:
            self._scan_reviews.clear()
        self._scan_reviews[id(rules)] = (rules, review)
        return review

    def session_limits(self, principal: Principal, database: str) -> SessionLimits:
        """The most restrictive limits of the rules that apply to this identity."""
        rules = self.applicable(principal, database)
        timeouts = [
            (r.limits.statement_timeout.total_seconds(), r.name)
            for r in rules
            if r.limits.statement_timeout is not None
        ]
        rows = [(r.limits.max_rows, r.name) for r in rules if r.limits.max_rows is not None]
        timeout = min(timeouts) if timeouts else None
        max_rows = min(rows) if rows else None
        return SessionLimits(
            statement_timeout=timeout[0] if timeout else None,
            statement_timeout_rule=timeout[1] if timeout else None,
            max_rows=max_rows[0] if max_rows else None,
            max_rows_rule=max_rows[1] if max_rows else None,
        )

    def evaluate(
        self,
        principal: Principal,
        database: str,
        statements: Sequence[StatementSummary],
        *,
        search_path: Sequence[str] = ("public",),
    ) -> Verdict:
        """The verdict for a request made of these statements (most restrictive wins)."""
        rules = self.applicable(principal, database)
        if not rules:
            groups = ", ".join(sorted(principal.groups)) or "none"
            return Verdict(
                "deny",
                None,
                f"no rule of the policy applies to {principal.subject} (groups: {groups}) "
                f"on database {database}",
                hint="ask the gateway's operator for access; nothing is allowed by default",
            )
        rules_key = self._rules_keys.get(id(rules))
        if rules_key is None or rules_key[0] is not rules:
            if len(self._rules_keys) >= self._memo_entries:
                self._rules_keys.clear()
            rules_key = (rules, tuple(id(r) for r in rules), tuple(r.name for r in rules))
            self._rules_keys[id(rules)] = rules_key
        names = rules_key[2]
        masked = self._masked(principal)
        path_key = search_path if type(search_path) is tuple else tuple(search_path)
        memo = self._memo
        worst: Verdict | None = None
        for summary in statements:
            key = (
                rules_key[1],
                path_key,
                summary.operations,
                summary.reads,
                summary.writes,
                summary.functions,
                summary.unbounded_write,
                summary.opaque,
                summary.set_parameters,
                summary.own_backend,
                masked,
            )
            verdict = memo.get(key)
            if verdict is None:
                found = self._evaluate_one(rules, summary, search_path, masked)
                if found.outcome == "allow":
                    verdict = Verdict("allow", rules[0].name, "allowed", rules=names)
                else:
                    verdict = Verdict(found.outcome, found.rule, found.reason, found.hint, names)
                if len(memo) >= self._memo_entries:
                    memo.clear()
                memo[key] = verdict
            if worst is None or _RANK[verdict.outcome] > _RANK[worst.outcome]:
                worst = verdict
                if verdict.outcome == "deny":
                    break
        if worst is None:
            return Verdict("allow", rules[0].name, "allowed", rules=names)
        return worst

    def _masked(self, principal: Principal) -> bool:
        """Whether masking may apply to the identity (overrides aside: the stricter view)."""
        section = self.policy.masking
        exempt = section.exempt
        return bool(section.columns or section.detectors) and not (
            principal.subject in exempt.users or not principal.groups.isdisjoint(exempt.groups)
        )

    def _evaluate_one(
        self,
        rules: list[Rule],
        summary: StatementSummary,
        search_path: Sequence[str],
        masked: bool = False,
    ) -> Verdict:
        allowed_summary = _allowed_summary(rules)
        catalog = self.catalog_relations
        # 1. Built-in denials, unless a rule lifts them explicitly.
        if "*" in summary.set_parameters:
            # A setting change is decided by the setting's name (SET x, set_config('x')):
            # without it, every setting's decision would be a guess.
            return Verdict(
                "deny",
                "built-in",
                "changing a setting whose name querywarden cannot see (set_config with a "
                "name that is not a constant, UPDATE pg_settings) is refused by "
                "querywarden's built-in protections: a setting change is decided as the SET "
                "of the setting it names",
                hint="name the setting as a constant: SET name TO ..., or "
                f"set_config('name', $1, false); {allowed_summary}",
            )
        for operation in sorted(summary.operations & BUILTIN_DENIED_OPERATIONS.keys()):
            if operation in ROLE_SWITCHES and masked:
                return Verdict(
                    "deny",
                    "built-in",
                    f"{_op(operation)} is refused by querywarden's built-in protections: "
                    f"{BUILTIN_DENIED_OPERATIONS[operation]}; masking applies to you, and "
                    "the gateway does not let a masked identity switch role",
                    hint=f"{INSTEAD[operation]}; {allowed_summary}",
                )
            later = bool(summary.operations & SESSION_DEFAULTS)
            if not _lifted(operation, rules, masked, later_sessions=later):
                return Verdict(
                    "deny",
                    "built-in",
                    f"{_op(operation)} is refused by querywarden's built-in protections: "
                    f"{BUILTIN_DENIED_OPERATIONS[operation]}"
                    + (_LATER_SESSIONS if later and operation in ROLE_SWITCHES else ""),
                    hint=f"{INSTEAD[operation]}; {allowed_summary}",
                )
        for function in sorted(summary.functions, key=str):
            protection = _builtin_protection(function, summary.own_backend, search_path)
            if protection is not None and not any(
                _function_matches(r.allow.functions, function, search_path, every=True)
                for r in rules
            ):
                return Verdict(
                    "deny",
                    "built-in",
                    f"calling {function} is refused by querywarden's built-in protections: "
                    f"{protection}",
                    hint=f"leave {function}() out: it is not available through the gateway "
                    f"unless a rule names it in allow.functions; {allowed_summary}",
                )
        # Every qualified name each relation could be, computed once for steps 1-4.
        touched = [
            (access, relation, name)
            for access, relations in (("read", summary.reads), ("write", summary.writes))
            for relation in relations
            for name in candidates(relation, search_path, catalog)
        ]
        exposing = _exposing(rules, touched, summary.functions, masked, search_path)
        if exposing is not None:
            return Verdict(
                "deny",
                "built-in",
                exposing[0],
                # A rule may allow pg_catalog.*: say the summary does not cover this one.
                hint=f"{exposing[1]}; {allowed_summary}; but never {exposing[2]}, which the "
                "built-in protections refuse",
            )
        # SQL the analyzer cannot see (dynamic text run by a function): only a rule that
        # allows everything may run it.
        if (
            summary.opaque
            and "do" not in summary.operations
            and not any("*" in r.allow.operations for r in rules)
        ):
            return Verdict(
                "deny",
                "built-in",
                "the statement runs SQL text that querywarden cannot inspect "
                "(dynamic SQL in a function argument)",
                hint="write the query itself instead of passing it as text; " + allowed_summary,
            )
        changed = summary.set_parameters & {"statement_timeout", "all", "*"}
        if changed and "reset" not in summary.operations:
            fixed = [r for r in rules if r.limits.statement_timeout is not None]
            if fixed:
                limit = fixed[0].limits.statement_timeout
                assert limit is not None
                return Verdict(
                    "deny",
                    fixed[0].name,
                    f"statement_timeout is fixed at {limit.total_seconds():g}s by rule "
                    f"{fixed[0].name} and cannot be changed",
                    hint="keep statements within the limit; RESET statement_timeout restores it",
                )
        # A function with side effects is the operation side_effects (named in messages).
        effects = [
            (function, why)
            for function in sorted(summary.functions, key=str)
            if not any(
                _function_matches(r.allow.functions, function, search_path, every=True)
                for r in rules
            )
            and (why := side_effects(function)) is not None
        ]
        operations = summary.operations | {SIDE_EFFECTS} if effects else summary.operations
        calling = (
            f"calling {effects[0][0]}(), a function with side effects ({effects[0][1]}),"
            if effects
            else ""
        )

        def what(operation: str) -> str:
            return calling if operation == SIDE_EFFECTS else _op(operation)

        sole_rule = rules[0].name if len(rules) == 1 else None

        def refuse(rule: str | None, reason: str, operation: str | None = None) -> Verdict:
            # The most specific way out: SET search_path is both set and set_search_path.
            specific = [o for o in sorted(operations) if operation and o.startswith(operation)]
            instead = next((INSTEAD[o] for o in reversed(specific) if o in INSTEAD), None)
            hint = f"{instead}; {allowed_summary}" if instead else allowed_summary
            return Verdict("deny", rule, reason, hint=hint)

        def review(rule: str, reason: str) -> Verdict:
            return Verdict("review", rule, f"{reason} (rule {rule})", hint=allowed_summary)

        # 2. Rule denials.
        for rule in rules:
            for operation in sorted(operations):
                if _operation_covered(rule.deny.operations, operation):
                    return refuse(
                        rule.name, f"{what(operation)} is denied by rule {rule.name}", operation
                    )
            for _, _, name in touched:
                if _denied(rule.deny.tables, name):
                    return Verdict(
                        "deny",
                        rule.name,
                        f"{name} is denied by rule {rule.name}",
                        hint=f"leave {name} out: it is not available to you; {allowed_summary}",
                    )
            for function in summary.functions:
                if _function_matches(rule.deny.functions, function, search_path):
                    return Verdict(
                        "deny",
                        rule.name,
                        f"calling {function} is denied by rule {rule.name}",
                        hint=f"leave {function}() out: it is not available to you; "
                        f"{allowed_summary}",
                    )
        # 3. Allow: every operation and every relation must be allowed by some rule; what a
        # rule sends to review is permitted, once approved.
        for operation in sorted(operations - BUILTIN_DENIED_OPERATIONS.keys()):
            if not any(
                _operation_covered(r.allow.operations, operation)
                or _operation_covered(r.review.operations, operation)
                for r in rules
            ):
                if operation == SIDE_EFFECTS:
                    return Verdict(
                        "deny",
                        sole_rule,
                        f"{calling} is not allowed for you: no rule allows the operation "
                        "side_effects",
                        hint="leave the function out; if its effect is intended, ask for a "
                        "rule that allows side_effects or lists the function in "
                        f"allow.functions; {allowed_summary}",
                    )
                return refuse(
                    sole_rule, f"{_op(operation)} is not allowed for you by any rule", operation
                )

        def permitted(name: str) -> bool:
            return any(
                _allowed(r.allow.tables, name) or _allowed(r.review.tables, name) for r in rules
            )

        for access, relation, name in touched:
            if not permitted(name):
                if relation.schema is not None:
                    reason = f"{access} access to {name} is not allowed for you by any rule"
                    if relation.schema in ("pg_catalog", "information_schema"):
                        # Most often a client describing the schema (psql's \d).
                        return Verdict(
                            "deny",
                            sole_rule,
                            reason,
                            hint=f"describing the schema (psql's \\d, a driver's "
                            f"introspection) needs a rule that allows {relation.schema}.*: "
                            f"ask an operator; {allowed_summary}",
                        )
                    return refuse(sole_rule, reason)
                # An unqualified name is checked as everything PostgreSQL could resolve it
                # to; when another of those is allowed, qualifying the name is the way out.
                meant = next(
                    (n for _, r, n in touched if r == relation and n != name and permitted(n)),
                    None,
                )
                reason = (
                    f"{access} access to {relation} (as {name}) is not allowed for you by any rule"
                )
                if meant is None:
                    return refuse(sole_rule, reason)
                return Verdict(
                    "deny",
                    sole_rule,
                    reason,
                    hint=f"{_could_be(relation, name)}, which no rule lets you read; if you "
                    f"meant {meant}, write it schema-qualified; {allowed_summary}",
                )
        # 4. Review.
        for rule in rules:
            for operation in sorted(operations):
                if _operation_covered(rule.review.operations, operation):
                    return review(rule.name, f"{what(operation)} needs approval")
            for _, _, name in touched:
                if _denied(rule.review.tables, name):
                    return review(rule.name, f"access to {name} needs approval")
            if rule.review.unbounded_write and summary.unbounded_write:
                return Verdict(
                    "review",
                    rule.name,
                    f"UPDATE or DELETE without WHERE needs approval (rule {rule.name})",
                    hint="add a WHERE clause that bounds the rows, or ask an approver",
                )
        return Verdict("allow", None, "allowed")


def _lifted(
    operation: str, rules: list[Rule], masked: bool, *, later_sessions: bool = False
) -> bool:
    """Whether the applying rules lift the built-in denial of ``operation``.

    Naming it in allow.operations does. A role switch of the session itself is lifted
    by ``*`` as well when nothing is hidden from the identity: the policy lets it do and
    read everything, so the role's privileges guard nothing the policy wants guarded. A
    role default for ``later_sessions`` (ALTER ROLE ... SET role) would switch other
    identities' sessions too, so only naming it lifts it.
    """
    if any(operation in r.allow.operations for r in rules):
        return True
    return (
        operation in ROLE_SWITCHES
        and not later_sessions
        and any("*" in r.allow.operations for r in rules)
        and _reads_everything(rules, masked)
    )


def _builtin_protection(
    function: QualifiedName, own_backend: frozenset[QualifiedName], search_path: Sequence[str]
) -> str | None:
    """What the built-in denial covering ``function`` protects against, if one does."""
    if function in own_backend:
        # pg_terminate_backend(pg_backend_pid()): ending or cancelling oneself is what
        # closing the connection or a cancel request does.
        return None
    for pattern, protection in BUILTIN_DENIED_FUNCTIONS.items():
        if _function_matches((pattern,), function, search_path):
            return protection
    return None


def _reads_everything(rules: list[Rule], masked: bool) -> bool:
    """Whether nothing is hidden from the identity: it may read every table, unmasked.

    Masking redacts the statistics' values, but not the constants in another session's
    statement text, so a masked identity does not read everything.
    """
    return (
        not masked
        and any("*" in r.allow.tables or "*.*" in r.allow.tables for r in rules)
        and not any(r.deny.tables or r.review.tables for r in rules)
    )


def _is_wildcard(name: str) -> bool:
    schema, _, relation = name.partition(".")
    return schema == "*" or "*" in relation


def _could_hold(name: str, pattern: str) -> bool:
    """Whether relation ``name`` (maybe a whole schema, ``s.*``) is or holds ``pattern``."""
    if not _is_wildcard(name):
        return fnmatchcase(name, pattern)
    schema = name.partition(".")[0]
    pattern_schema = pattern.partition(".")[0]
    return schema == "*" or pattern_schema == "*" or fnmatchcase(schema, pattern_schema)


def _exposing(
    rules: list[Rule],
    touched: list[tuple[str, QualifiedName, str]],
    functions: Iterable[QualifiedName],
    masked: bool,
    search_path: Sequence[str],
) -> tuple[str, str, str] | None:
    """(reason, hint, what) if the statement reads what exposes other relations' data."""
    for access, relation, name in touched:
        if access != "read":  # writing one is an operation the rules decide on
            continue
        whole = _is_wildcard(name)
        for pattern, exposed in EXPOSING_RELATIONS.items():
            # A whole schema (schema_to_xml('pg_catalog')) holds what is in it; only an
            # exact name, never a glob, lifts the protection.
            if _could_hold(name, pattern) and (
                whole or not any(name in r.allow.tables for r in rules)
            ):
                if _reads_everything(rules, masked):
                    return None
                shown = name if relation.schema is not None else f"{relation} (as {name})"
                it = f"it holds {pattern}, which exposes" if whole else "it exposes"
                lift = (
                    "name the tables you need"
                    if whole
                    else f"an operator can allow it by naming {name} in a rule's allow.tables"
                )
                return (
                    f"reading {shown} is refused by querywarden's built-in protections: "
                    f"{it} {exposed}, beyond the tables your policy lets you read",
                    f"query the tables you may read directly (count, min, max, avg ...); {lift}",
                    f"all of {name} at once" if whole else name,
                )
    for function in sorted(functions, key=str):
        for pattern, exposed in EXPOSING_FUNCTIONS.items():
            if _function_matches((pattern,), function, search_path) and not any(
                _function_matches(r.allow.functions, function, search_path, every=True)
                for r in rules
            ):
                if _reads_everything(rules, masked):
                    return None
                return (
                    f"calling {function}() is refused by querywarden's built-in protections: "
                    f"it returns {exposed}, beyond the tables your policy lets you read",
                    "query the tables you may read directly; an operator can allow it by "
                    f"naming {function.name} in a rule's allow.functions",
                    f"{function}()",
                )
    return None


def _could_be(relation: QualifiedName, name: str) -> str:
    """Why an unqualified name is also checked as ``name`` (for the qualify hint)."""
    if name.startswith("pg_catalog."):
        return f"unqualified, {relation} is {name} (PostgreSQL searches pg_catalog first)"
    return f"unqualified, {relation} could be {name} (a schema on your search_path)"


#: Operations whose name alone would not say what the statement does.
_OPERATION_NAMES = {"password": "setting a role's password (CREATE or ALTER ROLE ... PASSWORD)"}


def _op(operation: str) -> str:
    named = _OPERATION_NAMES.get(operation)
    return named or operation.replace("ddl:", "").replace("_", " ").upper()


def _allowed_summary(rules: list[Rule]) -> str:
    """What the rules allow, with their denied tables, so that no hint implies those are."""
    parts = []
    for rule in rules:
        ops = ", ".join(op.upper() for op in rule.allow.operations) or "nothing"
        tables = ", ".join(rule.allow.tables) or "no tables"
        parts.append(f"{ops} on {tables} (rule {rule.name})")
    # Any applying rule's denial holds whatever another rule allows, so it is listed once
    # for all of them.
    denied = dict.fromkeys(table for rule in rules for table in rule.deny.tables)
    tail = f", except {', '.join(denied)}" if denied else ""
    return "allowed for you: " + "; ".join(parts) + tail
