// Talking to this server (the page's own origin, nothing else): the API key, JSON calls
// with the server's error body, and the sweep's Server-Sent Events read from a fetch body
// (EventSource cannot POST).

const KEY = "patchserve.apiKey";

/** A 4xx/5xx answer: `detail` is the server's {message, type, param, code}. */
export class ApiError extends Error {
  constructor(status, detail) {
    super(detail.message);
    this.name = "ApiError";
    this.status = status;
    this.detail = detail;
  }
}

function headers(json) {
  const out = json ? { "Content-Type": "application/json" } : {};
  const key = sessionStorage.getItem(KEY);
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorOf(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch {
    // not JSON: described below
  }
  if (!detail || typeof detail.message !== "string") {
    detail = {
      message: `HTTP ${response.status} ${response.statusText}`,
      type: "http_error",
      param: null,
      code: response.status,
    };
  }
  return new ApiError(response.status, detail);
}

/**
 * fetch(path) on this origin. On a 401 (a server started with --api-key) ask for the key,
 * keep it in sessionStorage for the rest of the session and retry; a cancelled prompt
 * leaves the 401 error. Any other 4xx/5xx is thrown as an ApiError.
 */
export async function call(path, { method = "GET", body, signal } = {}) {
  let asked = false;
  for (;;) {
    const init = { method, signal, headers: headers(body !== undefined) };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401 && !asked) {
      asked = true;
      const had = sessionStorage.getItem(KEY);
      const key = window.prompt(
        had ? "The API key was refused; enter the server's API key:" : "This server needs an API key (--api-key):",
        "",
      );
      if (key) {
        sessionStorage.setItem(KEY, key.trim());
        continue;
      }
    }
    if (!response.ok) throw await errorOf(response);
    return response;
  }
}

/** The parsed JSON answer of a call. */
export async function json(path, options) {
  return (await call(path, options)).json();
}

/**
 * The `data` payloads of a Server-Sent Events body, one string per event (multi-line data
 * joined with "\n", comments and other fields ignored, LF / CRLF / CR line ends).
 */
export async function* sseData(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      for (;;) {
        const match = /\r\n|\n|\r/.exec(buffer);
        // A trailing "\r" may be the first half of "\r\n": wait for the next chunk.
        if (!match || (match[0] === "\r" && match.index === buffer.length - 1)) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {}); // a consumer that stops early closes the connection
  }
}
