// Calls to this server's /v1 routes: the bearer key, OpenAI-shaped errors, and server-sent event streams.

/** A non-2xx answer or an in-stream error event: status (0 for in-stream), message and OpenAI code. */
export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

function headers(key, extra = {}) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`.trim();
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch {
    // not JSON (a proxy's error page): keep the status line
  }
  return new ApiError(response.status, message, code);
}

/** GET path (relative to the page, so a path prefix in front of the server works) as JSON. */
export async function getJSON(path, key, signal) {
  const response = await fetch(path, { headers: headers(key, { Accept: "application/json" }), signal });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** POST body to path and yield each JSON event of the SSE answer until [DONE]; abort through signal. */
export async function* streamJSON(path, body, key, signal) {
  const response = await fetch(path, {
    method: "POST",
    headers: headers(key, { "Content-Type": "application/json", Accept: "text/event-stream" }),
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      const events = done ? parser.end() : parser.push(value);
      for (const data of events) {
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event && event.error) throw new ApiError(0, event.error.message || "error", event.error.code || null);
        yield event;
      }
      if (done) throw new ApiError(0, "the stream ended before [DONE] (connection lost?)", "incomplete");
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Server-sent events (the WHATWG rules that matter here): lines end in \r\n, \n or \r; "data:" lines of one event
 * are joined with \n; a blank line ends the event; ":" lines are comments (keep-alive pings); other fields ignored.
 */
export class SSEParser {
  constructor() {
    this.buffer = "";
    this.data = [];
  }

  /** Feed decoded text; returns the data of every event it completed. */
  push(text) {
    this.buffer += text;
    const events = [];
    const eol = /\r\n|\r|\n/g;
    let start = 0;
    let match;
    while ((match = eol.exec(this.buffer)) !== null) {
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break; // may be half of a \r\n
      this.line(this.buffer.slice(start, match.index), events);
      start = eol.lastIndex;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /** The stream closed: a last event without its blank line still counts. */
  end() {
    const events = this.push("\n\n");
    this.buffer = "";
    return events;
  }

  line(line, events) {
    if (line === "") {
      if (this.data.length) events.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}
