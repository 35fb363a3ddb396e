// The playground's calls to this server's OpenAI routes: the key header, errors as the API words
// them (status and message, the parameter named), and server-sent events read as they arrive.
"use strict";
window.EftApi = (() => {
  const $ = (id) => document.getElementById(id);
  const STATUS = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
  };

  // ---- talking to the API ------------------------------------------------------------------

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("key").value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function errorOf(resp) {
    let message = `${resp.status} ${STATUS[resp.status] || resp.statusText || "error"}`;
    try {
      const body = await resp.json();
      if (body && body.error) {
        message += ": " + body.error.message + (body.error.param ? ` (param: ${body.error.param})` : "");
      }
    } catch (_) { /* not JSON: the status says it */ }
    if (resp.status === 401) message += " — enter a valid API key above";
    return new ApiError(message, resp.status);
  }

  // Where this server's routes are: the page's own path less `/playground` ("" at the root; the
  // route prefix when the app is mounted under one, e.g. a second Serve application at /keyed).
  const BASE = location.pathname.replace(/\/playground\/?$/, "");

  async function call(method, path, body, signal) {
    const resp = await fetch(BASE + path, { method, headers: headers(), body: body && JSON.stringify(body), signal });
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  // Server-sent events: `data: {...}` blocks, `data: [DONE]` last; an error after the 200 arrives
  // as a `data: {"error": ...}` event.
  async function stream(path, body, onEvent, signal) {
    const resp = await call("POST", path, body, signal);
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          const event = JSON.parse(data);
          if (event.error) throw new ApiError("stream failed: " + event.error.message, 0);
          onEvent(event);
        }
      }
    }
  }

  return { ApiError, call, stream };
})();
