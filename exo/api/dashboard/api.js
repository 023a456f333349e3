// Talking to the node: the API key (kept in localStorage, sent as a bearer header, never in a URL)
// and the live feed, read with fetch() streaming because EventSource cannot send headers.
const KEY = "exo.apiKey";

export class Unauthorized extends Error {}

export function apiKey() { return localStorage.getItem(KEY) || ""; }
export function setApiKey(key) { localStorage.setItem(KEY, key); }

export function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

export async function call(method, path, body, signal) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (response.status === 401) throw new Unauthorized("API key needed");
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const message = data?.error?.message || data?.detail || `${response.status} ${response.statusText}`;
    const error = new Error(message);
    error.status = response.status;
    error.data = data;
    throw error;
  }
  return data;
}

// Server-sent events over a fetch() stream: calls onFrame(event, data) for each frame.
export async function readEvents(response, onFrame) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onFrame(event, data.join("\n"));
    }
  }
}

// The dashboard feed, reconnecting after a second when it drops.
export async function follow(onFrame, onLive) {
  for (;;) {
    try {
      const response = await fetch("/v1/dashboard/stream", { headers: headers() });
      if (response.status === 401) throw new Unauthorized("API key needed");
      if (!response.ok) throw new Error(`feed: ${response.status}`);
      onLive(true);
      await readEvents(response, (event, data) => onFrame(event, JSON.parse(data)));
    } catch (error) {
      if (error instanceof Unauthorized) throw error;
    }
    onLive(false);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}
