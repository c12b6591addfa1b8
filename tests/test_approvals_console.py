"""The approvals console in a real browser: Debian's Chromium, headless, driven by Selenium.

An approver logs in with a bearer token, sees an agent's statement held by the real
gateway appear in the pending list, approves it with a comment, and the agent's client
(psycopg) completes; then replays the agent's session from the audit log. The page never
shows a masked value, an exempt session's sample, or the token; a non-approver's view is
read-only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from browser_helpers import chromium, console_log_in
from gateway_harness import POLICY, RunningGateway, token_for
from held_statement import REVIEW_RULES, HeldStatement
from querywarden.devcluster import EphemeralCluster
from querywarden.policy import PolicyDocument

SSN = "219-09-9999"

RULES = REVIEW_RULES


@pytest.fixture(scope="module")
def people(pg: EphemeralCluster) -> Iterator[None]:
    pg.psql(
        "DROP TABLE IF EXISTS qc_people; CREATE TABLE qc_people (id int, name text, ssn text);"
        "GRANT ALL ON qc_people TO PUBLIC;"
    )
    yield
    pg.psql("DROP TABLE qc_people")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with chromium() as driver:
        yield driver


def _gateway(make_gateway: Callable[..., RunningGateway], tmp_path: Path) -> RunningGateway:
    policy = PolicyDocument.model_validate(
        {
            "identity": POLICY.identity.model_dump(by_alias=True),
            "rules": RULES,
            "approvals": {"approvers": {"groups": ["dba"]}, "hold": "30s"},
            "masking": {
                "columns": [{"table": "public.qc_people", "column": "ssn", "strategy": "redact"}],
                "exempt": {"groups": ["dba"]},
            },
        }
    )
    return make_gateway(
        policy=policy,
        stateDirectory=str(tmp_path / "state"),
        admin={"port": 0},
        audit={"directory": str(tmp_path / "audit")},
    )


def _console(gw: RunningGateway) -> str:
    address = gw.gateway.admin_address
    assert address is not None
    return f"http://{address[0]}:{address[1]}/console"


def _log_in(driver: WebDriver, url: str, user: str) -> None:
    console_log_in(driver, url, token_for(user), user)


def test_an_approver_decides_in_the_console_and_replays_the_session(
    make_gateway: Callable[..., RunningGateway],
    people: None,
    pg: EphemeralCluster,
    tmp_path: Path,
    browser: WebDriver,
) -> None:
    pg.psql(
        f"TRUNCATE qc_people; INSERT INTO qc_people VALUES (1, 'Ada', '{SSN}'), (2, 'Bo', NULL)"
    )
    gw = _gateway(make_gateway, tmp_path)
    _log_in(browser, _console(gw), "bob")
    assert "(approver)" in browser.find_element(By.ID, "who").text

    conn = psycopg.connect(gw.dsn("alice"), autocommit=True)
    rows = conn.execute("SELECT id, ssn FROM qc_people ORDER BY id").fetchall()
    assert SSN not in str(rows)  # the agent's session is masked
    held = HeldStatement(conn, "DELETE FROM qc_people WHERE id = 2")
    review_id = held.review_id()
    noticed = time.monotonic()
    card = WebDriverWait(browser, 5, poll_frequency=0.05).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, f'article[data-review="{review_id}"]'))
    )
    assert time.monotonic() - noticed < 1.5  # the pending list polls twice a second
    assert "DELETE FROM qc_people WHERE id = 2" in card.text  # the exact text, to approve
    assert "alice" in card.text and "agents-write-reviewed" in card.text

    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    assert "comment is required" in card.find_element(By.CSS_SELECTOR, ".error").text
    assert not held.done.is_set()
    card.find_element(By.CSS_SELECTOR, "input.comment").send_keys("one test row, fine")
    card.find_element(By.CSS_SELECTOR, "button.approve").click()
    held.finish()
    assert held.error is None
    assert pg.psql("SELECT count(*) FROM qc_people").strip() == "1"
    decided = WebDriverWait(browser, 5).until(
        ec.visibility_of_element_located(
            (By.CSS_SELECTOR, f'#decided tr[data-review="{review_id}"]')
        )
    )
    assert "approved" in decided.text and "bob" in decided.text

    # Replay the agent's session from the audit log.
    browser.find_element(By.ID, "sessions-link").click()
    row = WebDriverWait(browser, 5).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#sessions tbody tr"))
    )
    assert "alice" in row.text
    row.find_element(By.TAG_NAME, "a").click()
    WebDriverWait(browser, 5).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, "#replay li"))
    )
    replay = browser.find_element(By.ID, "replay-view").text
    assert "SELECT id, ssn FROM qc_people ORDER BY id" in replay
    assert "DELETE FROM qc_people WHERE id = $1" in replay  # shapes, not constants
    assert "approved by bob" in replay
    assert "2 rows" in replay
    # The masked sample is what the agent saw; the real value never reaches the page.
    sample = browser.find_element(By.CSS_SELECTOR, "#replay table.sample").text
    assert sample.splitlines() == ["1 ****", "2 NULL"]
    page = browser.page_source
    assert SSN not in page and token_for("bob")[:40] not in page


def test_a_non_approver_sees_a_read_only_console(
    make_gateway: Callable[..., RunningGateway],
    people: None,
    pg: EphemeralCluster,
    tmp_path: Path,
    browser: WebDriver,
) -> None:
    pg.psql(f"TRUNCATE qc_people; INSERT INTO qc_people VALUES (1, 'Ada', '{SSN}')")
    gw = _gateway(make_gateway, tmp_path)
    held = HeldStatement(
        psycopg.connect(gw.dsn("alice"), autocommit=True), "DELETE FROM qc_people WHERE id = 1"
    )
    review_id = held.review_id()
    _log_in(browser, _console(gw) + f"/reviews/{review_id}", "alice")
    assert "(read only)" in browser.find_element(By.ID, "who").text
    card = WebDriverWait(browser, 5).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, f'article[data-review="{review_id}"]'))
    )
    assert "focused" in card.get_attribute("class")  # the link a notification carries
    assert not card.find_elements(By.CSS_SELECTOR, "button.approve")
    assert not browser.find_element(By.ID, "sessions-link").is_displayed()
    # And the API refuses what the page does not offer.
    browser.get(_console(gw) + "/sessions")
    status = WebDriverWait(browser, 5).until(ec.visibility_of_element_located((By.ID, "status")))
    WebDriverWait(browser, 5).until(lambda _: status.text)
    assert status.text == (
        "cannot list sessions: alice may not decide reviews: approvers are members of dba"
    )
    held.conn.close()
