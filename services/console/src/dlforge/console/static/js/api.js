// The API as the pages use it: the signed-in user's token on every request; a 401 sends the user
// to the sign-in page. Errors carry the server's message (its "detail").

const TOKEN_KEY = "dlforge.token";
const USER_KEY = "dlforge.user";

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function currentUser() {
  const raw = sessionStorage.getItem(USER_KEY);
  return raw ? JSON.parse(raw) : null;
}

export function signedIn(tokenValue, user) {
  sessionStorage.setItem(TOKEN_KEY, tokenValue);
  sessionStorage.setItem(USER_KEY, JSON.stringify(user));
}

export function signOut() {
  sessionStorage.removeItem(TOKEN_KEY);
  sessionStorage.removeItem(USER_KEY);
}

function headers(extra) {
  const out = new Headers(extra || {});
  const t = token();
  if (t) out.set("Authorization", `Bearer ${t}`);
  return out;
}

function detailOf(body, status) {
  if (body && typeof body === "object") {
    const d = body.detail ?? body.message ?? body.error;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
    if (d) return JSON.stringify(d);
  }
  return `HTTP ${status}`;
}

/** api("/runs") -> parsed JSON; api(path, {method, json, form, keepalive}) (keepalive: outlives the page) */
export async function api(path, { method = "GET", json, form, signal, raw = false, keepalive = false } = {}) {
  const init = { method, headers: headers(), signal, keepalive };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await fetch(path, init);
  if (response.status === 401 && !path.startsWith("/auth/login")) {
    signOut();
    if (!location.hash.startsWith("#/signin")) location.hash = `#/signin?next=${encodeURIComponent(location.hash)}`;
  }
  if (raw) {
    if (!response.ok) throw new ApiError(response.status, `HTTP ${response.status}`, null);
    return response;
  }
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!response.ok) throw new ApiError(response.status, detailOf(body, response.status), body);
  return body;
}

/** An image (or any bytes) fetched with the token, as an object URL for <img src>. */
export async function blobUrl(path) {
  const response = await api(path, { raw: true });
  return URL.createObjectURL(await response.blob());
}

/**
 * Server-sent events read with fetch (EventSource cannot send the Authorization header).
 * onEvent(name, data) for each event; onClose() when the server ends the stream; returns a function that
 * stops reading.
 */
export function stream(path, onEvent, onError, onClose) {
  const controller = new AbortController();
  (async () => {
    try {
      const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal: controller.signal });
      if (!response.ok) throw new ApiError(response.status, `HTTP ${response.status}`, null);
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        // lines may end in \r\n (sse-starlette's default), \n or \r: make them \n; a \r at the end may be
        // the first half of a \r\n split over two chunks, so it waits for the next one
        buffer += value;
        const held = buffer.endsWith("\r") ? "\r" : "";
        buffer = buffer.slice(0, buffer.length - held.length).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          let name = "message";
          const data = [];
          for (const line of block.split("\n")) {
            if (line.startsWith("event:")) name = line.slice(6).trim();
            else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
          }
          if (data.length) onEvent(name, JSON.parse(data.join("\n")));
        }
        buffer += held;
      }
      if (onClose) onClose();
    } catch (err) {
      if (err.name !== "AbortError" && onError) onError(err);
    }
  })();
  return () => controller.abort();
}
