// Events as DOM nodes. Everything an agent, a sandbox or a user wrote is untrusted: it only
// ever becomes text (Node.append of a string makes a Text node, `textContent`), never markup
// (no HTML-parsing sink; no attribute but class and data-*). tests/ui/test_web_ui.py attacks it.

/** An element with attributes (`class`, `dataset`, plain ones) and children (strings: text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

const TASK_MARKS = { todo: "○", in_progress: "◐", done: "●" };

/** The plan (todo / in_progress / done) into `list`, replacing what it showed. */
export function renderPlan(list, tasks) {
  list.replaceChildren(
    ...tasks.map((task) =>
      el(
        "li",
        { dataset: { taskId: task.id, status: task.status } },
        el("span", { class: "mark" }, TASK_MARKS[task.status] ?? "?"),
        el("span", { class: "task-title" }, task.title),
        el("span", { class: "task-status" }, task.status),
        task.notes ? el("span", { class: "muted" }, ` — ${task.notes}`) : null,
      ),
    ),
  );
}

/** One line saying what an action (an ActionProposed's `proposed`, stored form) would do. */
export function describeAction(action) {
  switch (action.kind) {
    case "CmdRunAction":
      return `$ ${action.command}`;
    case "FileEditAction":
      return `${action.command} ${action.path}`;
    case "FileWriteAction":
      return `write ${action.path}`;
    case "MCPAction":
      return `${action.name} ${JSON.stringify(action.arguments ?? {})}`;
    default:
      return action.kind;
  }
}

function diffView(diff) {
  const lines = diff.split("\n").map((line) => {
    const kind = line.startsWith("@@")
      ? "hunk"
      : line.startsWith("+") && !line.startsWith("+++")
        ? "add"
        : line.startsWith("-") && !line.startsWith("---")
          ? "del"
          : "ctx";
    return el("span", { class: `diff-${kind}` }, `${line}\n`);
  });
  return el("pre", { class: "diff" }, ...lines);
}

function collapsed(summary, text) {
  return el("details", {}, el("summary", {}, summary), el("pre", {}, text));
}

/** The conversation's event list: appends each event once, in id order, as it arrives. A
 * command's output chunks stream into the command's own block (chunks name it as `cause`);
 * its observation then replaces them with the whole output and the exit code. */
export class EventLog {
  constructor(list) {
    this.list = list;
    this.outputs = new Map(); // command action id -> its output <pre>
  }

  clear() {
    this.list.replaceChildren();
    this.outputs.clear();
  }

  add(event) {
    const body = this.body(event);
    if (body === null) return;
    const item = el(
      "li",
      { class: `event source-${event.source}`, dataset: { id: event.id, kind: event.kind } },
      el("span", { class: "event-meta" }, `#${event.id} ${event.source}`),
      body,
    );
    this.list.append(item);
  }

  output(actionId) {
    let pre = this.outputs.get(actionId);
    if (pre === undefined) {
      pre = el("pre", { class: "output" });
      this.outputs.set(actionId, pre);
      this.list.append(el("li", { class: "event source-environment" }, pre));
    }
    return pre;
  }

  body(event) {
    const args = event.args ?? {};
    const extras = event.extras ?? {};
    switch (event.kind) {
      case "MessageAction":
        return el("div", { class: "message" }, args.content ?? "");
      case "CmdRunAction": {
        const pre = el("pre", { class: "output" });
        this.outputs.set(event.id, pre);
        return el(
          "div",
          {},
          args.thought ? el("p", { class: "thought" }, args.thought) : null,
          el("pre", { class: "command" }, `$ ${args.command}`),
          pre,
        );
      }
      case "CmdOutputChunk":
        this.output(event.cause).append(event.content ?? "");
        return null;
      case "CmdOutputObservation": {
        const pre = this.output(event.cause);
        pre.textContent = event.content ?? "";
        pre.after(el("p", { class: "exit" }, `exit code ${extras.exit_code}`));
        return null;
      }
      case "FileEditAction":
        return el("p", {}, `edit ${args.command} ${args.path}`);
      case "FileEditObservation":
        return extras.diff
          ? el("div", {}, el("p", {}, `diff ${extras.path}`), diffView(extras.diff))
          : el("p", {}, event.content ?? "");
      case "FileWriteAction":
        return collapsed(`write ${args.path}`, args.content ?? "");
      case "FileReadAction":
        return el("p", {}, `read ${args.path}`);
      case "FileReadObservation":
        return collapsed(`contents of ${extras.path}`, event.content ?? "");
      case "TaskTrackingAction":
        return args.thought ? el("p", { class: "thought" }, args.thought) : null;
      case "TaskTrackingObservation":
        return el("p", { class: "muted" }, extras.command === "plan" ? "plan updated" : "plan");
      case "ThinkAction":
        return el("p", { class: "thought" }, args.thought ?? "");
      case "AgentFinishAction":
        return el("div", { class: "message finish" }, args.final_thought || "Finished.");
      case "ErrorObservation":
        return el("p", { class: "error" }, event.content ?? "");
      case "ActionProposed":
        return el("p", { class: "proposed" }, `proposed: ${describeAction(event.proposed)}`);
      case "ConfirmationGiven":
        return el("p", { class: "muted" }, event.confirmed ? "confirmed" : "rejected");
      case "MCPAction":
        return el("p", {}, `${args.name} ${JSON.stringify(args.arguments ?? {})}`);
      case "MCPObservation":
        return collapsed(`${extras.name} answered`, event.content ?? "");
      case "LLMMetrics":
      case "ResourceUsage":
      case "ToolCallsQueued":
      case "ConfirmationRequested":
        return null; // shown as figures, or by the events they lead to
      case "AgentStateChanged":
        return el(
          "p",
          { class: "muted" },
          `agent ${extras.agent_state}`,
          extras.reason ? `: ${extras.reason}` : null,
        );
      default:
        return el("p", { class: "muted" }, event.message || event.kind);
    }
  }
}
