// The gateway's public REST API, as the page uses it. The API key travels only in the
// Authorization header: never in a URL (which proxies, logs and history keep) and never in a
// log line; the tab keeps it in sessionStorage, which dies with the tab.

const KEY_ITEM = "taskbus.apiKey";

export const session = {
  key: () => sessionStorage.getItem(KEY_ITEM),
  save: (key) => sessionStorage.setItem(KEY_ITEM, key),
  forget: () => sessionStorage.removeItem(KEY_ITEM),
};

/** An answer other than 2xx, with its RFC 9457 problem (`detail`, `conversation_status`, ...). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function parse(text) {
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text.slice(0, 200) };
  }
}

/** `api/<path>` relative to the page, so a gateway served under a path prefix works too. */
export async function request(
  path,
  { method = "GET", body, params, headers: extra = {}, key = session.key() } = {},
) {
  const headers = { ...extra, Authorization: `Bearer ${key}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const query = params ? `?${new URLSearchParams(params)}` : "";
  const response = await fetch(`api/${path}${query}`, init);
  const text = await response.text();
  const data = text ? parse(text) : null;
  if (!response.ok) throw new ApiError(response.status, data ?? {});
  return data;
}

/** A fresh Idempotency-Key, so a double-submitted form creates one conversation. */
export function idempotencyKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
