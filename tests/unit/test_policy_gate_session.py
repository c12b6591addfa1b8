"""What the policy gate remembers per session: search_path schemas and PREPARE bodies."""

from __future__ import annotations

import asyncio
import inspect
import threading

from querywarden.analysis import Analyzer
from querywarden.hooks import Decision, SessionInfo, StatementRequest
from querywarden.identity import Principal
from querywarden.policy import PolicyDocument
from querywarden.policy.engine import PolicyEngine
from querywarden.policy.gate import ANALYZED_ON_THE_LOOP, PolicyGate


def _policy(denied: list[str]) -> PolicyDocument:
    return PolicyDocument.model_validate(
        {
            "rules": [
                {
                    "name": "agents",
                    "subjects": {"groups": ["ai-agents"]},
                    "allow": {
                        "operations": [
                            "select", "set", "set_search_path", "prepare", "execute",
                            "deallocate", "discard",
                        ],
                        "tables": ["*"],
                    },
                    "deny": {"tables": denied},
                }
            ]
        }
    )  # fmt: skip


ALICE = Principal("alice", groups=frozenset({"ai-agents"}))


def _decide(gate: PolicyGate, session: SessionInfo, sql: str) -> Decision:
    decision = gate.decide(session, StatementRequest("query", sql))
    assert isinstance(decision, Decision)
    return decision


def test_search_path_is_tracked_per_session() -> None:
    gate = PolicyGate(_policy(["hr.*"]), Analyzer())
    one = SessionInfo("s1", ALICE, "app", "127.0.0.1:1")
    two = SessionInfo("s2", ALICE, "app", "127.0.0.1:2")
    assert _decide(gate, one, "SET search_path = hr, public").allowed
    assert one.search_path == ["public", "hr"]
    assert not _decide(gate, one, "SELECT * FROM pay").allowed
    assert _decide(gate, two, "SELECT * FROM pay").allowed
    assert two.search_path == ["public"]
    # A refused SET changes nothing.
    assert not _decide(gate, two, "SET search_path = hr; SELECT * FROM pay").allowed
    assert two.search_path == ["public"]


def test_execute_is_decided_by_the_prepared_body_under_the_current_policy() -> None:
    gate = PolicyGate(_policy([]), Analyzer())
    session = SessionInfo("s1", ALICE, "app", "127.0.0.1:1")
    assert _decide(gate, session, "PREPARE q AS SELECT * FROM public.orders").allowed
    assert _decide(gate, session, "EXECUTE q").allowed
    # The policy changes (a reload): the statement prepared earlier is now refused.
    gate.engine = PolicyEngine(_policy(["public.orders"]))
    refused = _decide(gate, session, "EXECUTE q")
    assert not refused.allowed
    assert "public.orders" in refused.message
    assert not _decide(gate, session, "EXPLAIN EXECUTE q").allowed
    # Deallocated names are forgotten; DEALLOCATE ALL forgets them all.
    assert _decide(gate, session, "DEALLOCATE q").allowed
    assert session.prepared == {}
    gate.engine = PolicyEngine(_policy([]))
    assert _decide(gate, session, "PREPARE a AS SELECT 1; PREPARE b AS SELECT 2").allowed
    assert set(session.prepared) == {"a", "b"}
    assert _decide(gate, session, "DEALLOCATE ALL").allowed
    assert session.prepared == {}


def test_a_large_statement_is_analyzed_off_the_event_loop() -> None:
    # Megabytes of SQL take pglast a second or more: decided on the loop, that stalled
    # every other session. The gate hands back an awaitable whose analysis runs in a
    # worker thread, and decides as it would on the loop.
    gate = PolicyGate(_policy(["hr.*"]), Analyzer())
    session = SessionInfo("s1", ALICE, "app", "127.0.0.1:1")
    threads: list[int] = []
    analyze = gate._large_analyzer.analyze

    def spy(sql: str) -> object:
        threads.append(threading.get_ident())
        return analyze(sql)

    gate._large_analyzer.analyze = spy  # type: ignore[method-assign]
    ids = ",".join(str(i) for i in range(ANALYZED_ON_THE_LOOP // 4))

    def decided(sql: str) -> Decision:
        outcome = gate.decide(session, StatementRequest("query", sql))
        assert not isinstance(outcome, Decision), "decided on the loop"
        return asyncio.run(_await(outcome))

    allowed = decided(f"SELECT * FROM public.orders WHERE id IN ({ids})")
    assert allowed.allowed
    refused = decided(f"SELECT * FROM hr.pay WHERE id IN ({ids})")
    assert not refused.allowed and "hr.pay is denied by rule agents" in refused.message
    broken = decided(f"SELECT * FROM public.orders WHERE id IN ({ids}")
    assert not broken.allowed and broken.sqlstate == "42601"
    assert len(threads) == 3 and threading.get_ident() not in threads
    # A short statement is still decided at once, on the caller's thread.
    assert _decide(gate, session, "SELECT * FROM public.orders").allowed
    assert len(threads) == 3


async def _await(outcome: object) -> Decision:
    assert inspect.isawaitable(outcome)
    decision = await outcome
    assert isinstance(decision, Decision)
    return decision
