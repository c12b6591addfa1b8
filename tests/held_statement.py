"""A statement the gateway holds for an approver, run in a thread while the test decides."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from typing import Any

import psycopg

from gateway_harness import POLICY, RunningGateway, token_for
from querywarden.policy import PolicyDocument

#: The gateway's hold notice: "...: held for approval as review ID; waiting up to ...".
_HOLD_NOTICE = re.compile(r"as review (\S+);")


class HeldStatement:
    """Runs ``sql`` on ``conn`` (autocommit) in a thread and collects the notices it gets."""

    def __init__(self, conn: psycopg.Connection[Any], sql: str) -> None:
        self.conn = conn
        #: (message, hint) of each NoticeResponse.
        self.notices: list[tuple[str, str]] = []
        self.error: psycopg.Error | None = None
        self.done = threading.Event()
        conn.add_notice_handler(
            lambda d: self.notices.append((d.message_primary or "", d.message_hint or ""))
        )
        self._thread = threading.Thread(target=self._run, args=(sql,), daemon=True)
        self._thread.start()

    def _run(self, sql: str) -> None:
        try:
            self.conn.execute(sql)
        except psycopg.Error as exc:
            self.error = exc
        finally:
            self.done.set()

    def hold_notice(self, timeout: float = 30) -> tuple[str, str]:
        """The review id and the hint of the hold notice (AssertionError if none comes)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message, hint in self.notices:
                found = _HOLD_NOTICE.search(message)
                if found:
                    return found[1], hint
            if self.done.is_set():
                break
            time.sleep(0.02)
        raise AssertionError(f"no hold notice; notices: {self.notices}, error: {self.error}")

    def review_id(self) -> str:
        """The id of the review the statement waits on."""
        return self.hold_notice()[0]

    def finish(self, timeout: float = 60) -> None:
        """Wait until the statement has an answer, then close the connection."""
        assert self.done.wait(timeout), "the held statement never finished"
        self.conn.close()


#: A policy's rules for approval tests: the agents' DELETEs are held, the DBAs may do all.
REVIEW_RULES: list[dict[str, Any]] = [
    {
        "name": "agents-write-reviewed",
        "subjects": {"groups": ["ai-agents"]},
        "allow": {"operations": ["select"], "tables": ["public.*", "pg_catalog.*"]},
        "review": {"operations": ["delete"]},
    },
    {
        "name": "dba-all",
        "subjects": {"groups": ["dba"]},
        "allow": {"operations": ["*"], "tables": ["*"]},
    },
]


def review_policy(hold: str, rules: list[dict[str, Any]] = REVIEW_RULES) -> PolicyDocument:
    """The test issuer's policy with ``rules`` and the DBAs as approvers, holding for ``hold``."""
    return PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": rules,
            "approvals": {"approvers": {"groups": ["dba"]}, "hold": hold, "grantTTL": "5m"},
        }
    )


def admin_call(
    gw: RunningGateway, method: str, path: str, user: str = "bob", body: Any = None
) -> Any:
    """Call the gateway's admin API as ``user`` (a DBA approver by default); the JSON answer."""
    address = gw.gateway.admin_address
    assert address is not None
    request = urllib.request.Request(
        f"http://{address[0]}:{address[1]}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token_for(user)}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())
