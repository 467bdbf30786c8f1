// Taskbus web UI: sign in with an API key, the conversation list, one conversation live with
// its plan and controls, and a form to start a task. Plain ES modules, no build step.
//
// Live by polling, always with the key in a header:
// - the list: GET /api/conversations every 2 s. No stream covers all of a user's
//   conversations, and a WebSocket per listed row would spend the user's WebSocket allowance
//   (TASKBUS_WS_MAX_PER_USER) on a list.
// - the open conversation: GET /api/conversations/{id} and /events?start_id=<next> every
//   second. The WebSocket stream takes its key from a header or from `?api_key=` in its URL; a
//   browser can set no header on a WebSocket and the key must never be in a URL, so the page
//   reads the same events, in the same wire form and order, from /events.

import { ApiError, idempotencyKey, request, session } from "./api.js";
import { EventLog, describeAction, el, renderPlan } from "./render.js";

const LIST_MS = 2000;
const VIEW_MS = 1000;
const SETTLED_VIEW_MS = 3000; // an ended conversation changes only when a user acts
const LIST_LIMIT = 50;
const PAGE_LIMIT = 100;
const ENDED = new Set(["FINISHED", "ERROR", "STOPPED"]);

const $ = (id) => document.getElementById(id);

let commands = {}; // command -> statuses that accept it (the contracts' table)
let listTimer;
let view = null; // the open conversation
let draftKey = idempotencyKey(); // one per task draft: a retried submit creates one conversation

const formatCost = (cost) => `$${cost.toFixed(4)}`;
const formatTime = (iso) => new Date(iso).toLocaleString();

// --- signing in and out -------------------------------------------------------------------

function showLogin(message = "") {
  clearTimeout(listTimer);
  closeView();
  $("app").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("login-key").value = "";
  $("login-key").focus();
}

async function showApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = false;
  commands = await (await fetch("ui/commands.json", { cache: "no-store" })).json();
  refreshList();
}

/** A 401 anywhere (key revoked, gateway reconfigured) ends the session. */
function signedOut(error) {
  if (!(error instanceof ApiError && error.status === 401)) return false;
  session.forget();
  showLogin("Your API key is no longer accepted; sign in again.");
  return true;
}

$("login-form").addEventListener("submit", async (submit) => {
  submit.preventDefault();
  const key = $("login-key").value.trim();
  try {
    await request("conversations", { params: { limit: 1 }, key }); // proves the key
  } catch (error) {
    $("login-error").textContent =
      error.status === 401 ? "That API key is not valid." : `Could not sign in: ${error.message}`;
    return;
  }
  session.save(key);
  $("login-key").value = "";
  $("login-error").textContent = "";
  await showApp();
});

$("logout").addEventListener("click", () => {
  session.forget();
  showLogin();
});

// --- the conversation list ----------------------------------------------------------------

async function refreshList() {
  clearTimeout(listTimer);
  try {
    const page = await request("conversations", { params: { limit: LIST_LIMIT } });
    renderList(page.results);
    $("list-note").textContent = page.next_page_id ? `The ${LIST_LIMIT} most recent.` : "";
    $("connection").textContent = "";
  } catch (error) {
    if (signedOut(error)) return;
    $("connection").textContent = `Conversation list: ${error.message}`;
  }
  if (session.key()) listTimer = setTimeout(refreshList, LIST_MS);
}

function renderList(conversations) {
  $("conversations").replaceChildren(
    ...conversations.map((conversation) =>
      el(
        "li",
        {
          class: conversation.conversation_id === view?.id ? "selected" : "",
          dataset: { id: conversation.conversation_id, status: conversation.taskbus_status },
        },
        el(
          "button",
          { type: "button" },
          el("span", { class: "conv-title" }, conversation.title),
          el("span", { class: `status status-${conversation.taskbus_status}` },
            conversation.taskbus_status),
          el("span", { class: "conv-cost" }, formatCost(conversation.accumulated_cost)),
          el("time", { class: "conv-time" }, formatTime(conversation.last_updated_at)),
        ),
      ),
    ),
  );
}

$("conversations").addEventListener("click", (click) => {
  const row = click.target.closest("li[data-id]");
  if (row) openConversation(row.dataset.id);
});

// --- the open conversation ----------------------------------------------------------------

function closeView() {
  if (view) clearTimeout(view.timer);
  view = null;
  $("view-body").hidden = true;
  $("view-empty").hidden = false;
}

function openConversation(id) {
  closeView();
  view = {
    id,
    nextId: 0, // the first event id not yet shown
    info: null,
    iterations: 0, // one per LLM step (LLMMetrics), as session-manager counts them
    maxIterations: null,
    pending: null, // the last action proposed for confirmation
    busy: false,
    inFlight: false,
    again: false,
    timer: undefined,
    log: new EventLog($("events")),
  };
  view.log.clear();
  renderPlan($("plan"), []);
  $("plan-empty").hidden = false;
  $("view-error").textContent = "";
  $("view-title").textContent = "";
  $("view-empty").hidden = true;
  $("view-body").hidden = false;
  for (const row of $("conversations").children) {
    row.classList.toggle("selected", row.dataset.id === id);
  }
  poll(view);
}

/** One poll of the open conversation; never two at once (a poke during one runs it again). */
async function poll(current) {
  if (current.inFlight) {
    current.again = true;
    return;
  }
  current.inFlight = true;
  clearTimeout(current.timer);
  let delay = VIEW_MS;
  try {
    const info = await request(`conversations/${current.id}`);
    await readEvents(current);
    current.info = info;
    if (view === current) renderInfo(current);
    const settled = ENDED.has(info.taskbus_status) && current.nextId > info.last_event_id;
    if (settled) delay = SETTLED_VIEW_MS;
  } catch (error) {
    if (signedOut(error)) return;
    if (error.status === 404) {
      $("view-error").textContent = "This conversation no longer exists.";
      return;
    }
    // e.g. a 503 while the event store catches up: the next poll asks again
    $("connection").textContent = `Conversation: ${error.message}`;
  } finally {
    current.inFlight = false;
  }
  if (view !== current) return;
  current.timer = setTimeout(() => poll(current), current.again ? 0 : delay);
  current.again = false;
}

async function readEvents(current) {
  for (;;) {
    const page = await request(`conversations/${current.id}/events`, {
      params: { start_id: current.nextId, limit: PAGE_LIMIT },
    });
    if (view !== current) return;
    for (const event of page.events) {
      if (event.id < current.nextId) continue;
      take(current, event);
      current.nextId = event.id + 1;
    }
    if (!page.has_more || page.next_start_id === null) return;
    current.nextId = Math.max(current.nextId, page.next_start_id);
  }
}

function take(current, event) {
  switch (event.kind) {
    case "ConversationCreated":
      current.maxIterations = event.spec?.max_iterations ?? null;
      break;
    case "LLMMetrics":
      current.iterations += 1;
      break;
    case "TaskTrackingObservation": {
      const tasks = event.extras?.task_list ?? [];
      renderPlan($("plan"), tasks);
      $("plan-empty").hidden = tasks.length > 0;
      break;
    }
    case "ActionProposed":
      current.pending = event.proposed;
      break;
  }
  current.log.add(event);
}

function renderInfo(current) {
  const info = current.info;
  if (info === null) return;
  $("view-title").textContent = info.title;
  const status = $("view-status");
  status.textContent = info.taskbus_status;
  status.className = `status status-${info.taskbus_status}`;
  status.dataset.status = info.taskbus_status;
  $("view-agent").textContent = info.agent_state ? `agent ${info.agent_state}` : "";
  $("view-agent").dataset.agentState = info.agent_state ?? "";
  $("view-cost").textContent = formatCost(info.accumulated_cost);
  $("view-iterations").textContent = current.maxIterations
    ? `${current.iterations} / ${current.maxIterations}`
    : String(current.iterations);
  $("view-events").textContent = String(info.event_count);
  $("view-updated").textContent = formatTime(info.last_updated_at);
  const awaiting = info.agent_state === "awaiting_user_confirmation";
  $("pending").hidden = !(awaiting && current.pending);
  $("pending-action").textContent = current.pending ? describeAction(current.pending) : "";
  for (const button of $("view-body").querySelectorAll("[data-command]")) {
    const command = button.dataset.command;
    const confirming = command === "confirm" || command === "reject";
    const statuses = commands[confirming ? "confirm" : command] ?? [];
    const allowed = statuses.includes(info.taskbus_status) && (!confirming || awaiting);
    button.disabled = current.busy || !allowed;
  }
}

/** A command on the open conversation; the answer is 202 once its events are in the log, so
 * the next poll (run at once) shows them. A refusal (409) says why and the current status. */
async function send(command, body) {
  const current = view;
  if (current === null || current.busy) return;
  current.busy = true;
  renderInfo(current);
  $("view-error").textContent = "";
  try {
    await request(`conversations/${current.id}/${command}`, { method: "POST", body });
    if (command === "message") $("message-text").value = "";
  } catch (error) {
    if (signedOut(error)) return;
    const status = error.problem?.conversation_status;
    $("view-error").textContent = status ? `${error.message} (now ${status})` : error.message;
  } finally {
    current.busy = false;
  }
  if (view === current) {
    renderInfo(current);
    poll(current);
  }
}

for (const button of document.querySelectorAll(".controls [data-command]")) {
  button.addEventListener("click", () => send(button.dataset.command));
}

$("message-form").addEventListener("submit", (submit) => {
  submit.preventDefault();
  const message = $("message-text").value;
  if (message.trim()) send("message", { message });
});

// --- starting a task ----------------------------------------------------------------------

$("task-form").addEventListener("input", () => {
  draftKey = idempotencyKey();
});

$("task-form").addEventListener("submit", async (submit) => {
  submit.preventDefault();
  const form = $("task-form");
  const spec = { initial_user_msg: $("task-text").value };
  const repository = $("task-repository").value.trim();
  if (repository) spec.repository = repository;
  const iterations = $("task-iterations").value;
  if (iterations) spec.max_iterations = Number(iterations);
  // Unticked leaves it to the user's settings (their default confirmation mode).
  if ($("task-confirm").checked) spec.confirmation_mode = true;
  const button = form.querySelector("button[type=submit]");
  button.disabled = true;
  $("task-error").textContent = "";
  try {
    const created = await request("conversations", {
      method: "POST",
      body: spec,
      headers: { "Idempotency-Key": draftKey },
    });
    form.reset();
    draftKey = idempotencyKey();
    openConversation(created.conversation_id);
    refreshList();
  } catch (error) {
    if (!signedOut(error)) $("task-error").textContent = error.message;
  } finally {
    button.disabled = false;
  }
});

// --- start ----------------------------------------------------------------------------------

if (session.key()) showApp();
else showLogin();
