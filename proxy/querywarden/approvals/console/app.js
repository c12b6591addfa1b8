// The approvals console: pending reviews with approve/deny, decided reviews, and session
// replay, over the admin API of the same origin. Every value is put on the page with
// textContent (never as HTML), and the token stays in this tab's sessionStorage.
"use strict";

const TOKEN_KEY = "querywarden.token";
const POLL_MS = 500; // a held statement shows within a second of its hold
let me = null;
let timer = null;

function $(id) {
  return document.getElementById(id);
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

async function api(method, path, body) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {
    method,
    headers: Object.assign(
      { Authorization: "Bearer " + token },
      body === undefined ? {} : { "Content-Type": "application/json" }
    ),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(data.error || response.status + " " + response.statusText);
    error.status = response.status;
    throw error;
  }
  return data;
}

function showLogin(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (timer !== null) clearInterval(timer);
  timer = null;
  $("app").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function logIn() {
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  await start();
}

async function start() {
  try {
    me = await api("GET", "/me");
  } catch (error) {
    showLogin(error.status === 401 ? "token refused: " + error.message : error.message);
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  $("who").textContent = me.subject + (me.approver ? " (approver)" : " (read only)");
  $("sessions-link").hidden = !me.approver;
  route();
}

function route() {
  const path = location.pathname.replace(/\/+$/, "");
  const session = path.match(/^\/console\/sessions\/([^/]+)$/);
  $("reviews-view").hidden = true;
  $("sessions-view").hidden = true;
  $("replay-view").hidden = true;
  if (timer !== null) clearInterval(timer);
  timer = null;
  if (session) {
    $("replay-view").hidden = false;
    showReplay(decodeURIComponent(session[1]));
  } else if (path === "/console/sessions") {
    $("sessions-view").hidden = false;
    showSessions();
  } else {
    $("reviews-view").hidden = false;
    refreshReviews();
    timer = setInterval(refreshReviews, POLL_MS);
  }
}

function go(path) {
  history.pushState(null, "", path);
  route();
}

async function refreshReviews() {
  let reviews;
  try {
    reviews = (await api("GET", "/reviews")).reviews;
    $("status").textContent = "";
  } catch (error) {
    if (error.status === 401) return showLogin("your token expired: log in again");
    $("status").textContent = "cannot list reviews: " + error.message;
    return;
  }
  const focus = location.pathname.match(/^\/console\/reviews\/([^/]+)$/);
  renderPending(reviews.filter((r) => r.decision === "pending"), focus && focus[1]);
  renderDecided(reviews.filter((r) => r.decision !== "pending"));
}

function renderPending(pending, focused) {
  const box = $("pending");
  $("pending-empty").hidden = pending.length > 0;
  const ids = new Set(pending.map((r) => r.id));
  for (const card of Array.from(box.children)) {
    if (!ids.has(card.dataset.review)) card.remove(); // decided or expired meanwhile
  }
  for (const review of pending) {
    if (box.querySelector('[data-review="' + CSS.escape(review.id) + '"]')) continue;
    box.appendChild(pendingCard(review, review.id === focused));
  }
}

function pendingCard(review, focused) {
  const card = el("article", null, "review" + (focused ? " focused" : ""));
  card.dataset.review = review.id;
  card.appendChild(el("h3", "Review " + review.id));
  card.appendChild(el("pre", review.statement, "statement"));
  const facts = el("dl");
  const add = (name, value) => {
    facts.appendChild(el("dt", name));
    facts.appendChild(el("dd", value));
  };
  add("Requester", review.requester.subject + " (" + review.requester.issuer + ")");
  add("Database", review.database);
  add("Rule", review.rule);
  add("Reason", review.reason);
  if (review.parameters && review.parameters.length) add("Parameters", review.parameters.join(", "));
  add("Opened", review.created);
  card.appendChild(facts);
  if (me && me.approver) {
    const comment = el("input", null, "comment");
    comment.placeholder = "why (the requester sees it)";
    comment.setAttribute("aria-label", "comment on review " + review.id);
    const approve = el("button", "Approve", "approve");
    const deny = el("button", "Deny", "deny");
    const outcome = el("span", null, "error");
    const decide = async (action) => {
      if (!comment.value.trim()) {
        outcome.textContent = "say why first: the comment is required";
        return;
      }
      approve.disabled = deny.disabled = true;
      try {
        await api("POST", "/reviews/" + encodeURIComponent(review.id) + "/" + action, {
          comment: comment.value.trim(),
        });
        card.remove();
        refreshReviews();
      } catch (error) {
        outcome.textContent = error.message;
        approve.disabled = deny.disabled = false;
      }
    };
    approve.addEventListener("click", () => decide("approve"));
    deny.addEventListener("click", () => decide("deny"));
    const row = el("p", null, "actions");
    row.append(comment, approve, deny, outcome);
    card.appendChild(row);
  }
  return card;
}

function renderDecided(decided) {
  const body = $("decided").querySelector("tbody");
  body.replaceChildren();
  for (const review of decided.slice(0, 100)) {
    const row = el("tr");
    row.dataset.review = review.id;
    row.append(
      el("td", review.id),
      el("td", review.decision, "state " + review.decision),
      el("td", review.requester.subject),
      el("td", review.statement, "statement"),
      el("td", review.approver ? review.approver.subject : "-"),
      el("td", review.comment),
      el("td", review.decided || "-")
    );
    body.appendChild(row);
  }
}

async function showSessions() {
  const body = $("sessions").querySelector("tbody");
  body.replaceChildren();
  let sessions;
  try {
    sessions = (await api("GET", "/sessions?limit=50")).sessions;
  } catch (error) {
    $("status").textContent = "cannot list sessions: " + error.message;
    return;
  }
  for (const session of sessions) {
    const row = el("tr");
    row.dataset.session = session.id;
    const link = el("a", session.id);
    link.href = "/console/sessions/" + encodeURIComponent(session.id);
    link.addEventListener("click", (event) => {
      event.preventDefault();
      go(link.getAttribute("href"));
    });
    const cell = el("td");
    cell.appendChild(link);
    row.append(
      cell,
      el("td", session.subject),
      el("td", session.database),
      el("td", session.connected),
      el("td", session.statements),
      el("td", session.refused),
      el("td", session.ended || "open")
    );
    body.appendChild(row);
  }
}

async function showReplay(id) {
  $("replay-id").textContent = id;
  const list = $("replay");
  list.replaceChildren();
  let replay;
  try {
    replay = await api("GET", "/sessions/" + encodeURIComponent(id));
  } catch (error) {
    $("status").textContent = "cannot replay: " + error.message;
    return;
  }
  const who = replay.session;
  $("replay-who").textContent = who
    ? who.subject + " to " + who.database + " from " + who.clientAddress + ", " + who.connected
    : "(the start of this session is no longer in the log)";
  for (const statement of replay.statements) {
    const item = el("li", null, "statement-replay " + (statement.outcome || ""));
    item.dataset.statement = statement.id;
    item.appendChild(el("pre", statement.text, "statement"));
    let decision = statement.outcome + (statement.rule ? " by rule " + statement.rule : "");
    if (statement.reason) decision += ": " + statement.reason;
    if (statement.approval && statement.approval.approver) {
      decision += " (approved by " + statement.approval.approver + ")";
    }
    item.appendChild(el("p", decision, "decision"));
    const result = statement.result;
    if (result) {
      let line = (result.command || "") + (result.rows !== null ? ", " + result.rows + " rows" : "");
      if (result.sqlstate) line += ", SQLSTATE " + result.sqlstate + (result.error ? ": " + result.error : "");
      if (result.durationMs !== null) line += ", " + result.durationMs + " ms";
      const masked = Object.entries(result.masking || {}).map(([k, v]) => k + " " + v);
      if (masked.length) line += "; masked: " + masked.join(", ");
      item.appendChild(el("p", line, "result"));
      if (result.sample && result.sample.length) {
        const table = el("table", null, "sample");
        for (const values of result.sample) {
          const row = el("tr");
          for (const value of values) row.appendChild(el("td", value === null ? "NULL" : value));
          table.appendChild(row);
        }
        item.appendChild(table);
      }
    }
    list.appendChild(item);
  }
}

window.addEventListener("popstate", () => {
  if (sessionStorage.getItem(TOKEN_KEY)) route();
});

document.addEventListener("DOMContentLoaded", () => {
  $("login-button").addEventListener("click", logIn);
  $("logout").addEventListener("click", () => showLogin(""));
  for (const link of document.querySelectorAll("nav a")) {
    link.addEventListener("click", (event) => {
      event.preventDefault();
      go(link.getAttribute("href"));
    });
  }
  if (sessionStorage.getItem(TOKEN_KEY)) start();
  else showLogin("");
});
