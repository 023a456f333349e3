// Chat: streams /v1/chat/completions into the page, with stop, TTFT and tokens/s per answer,
// reasoning folded away, tool calls shown as calls.
import { headers, readEvents, Unauthorized } from "./api.js";

const history = [];
let controller = null;

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function setupChat(onTrace, onUnauthorized) {
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const stop = document.getElementById("chat-stop");
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  stop.addEventListener("click", () => controller?.abort());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    const model = document.getElementById("chat-model").value;
    if (!text || !model || controller) return;
    input.value = "";
    try { await send(model, text, onTrace); }
    catch (error) { if (error instanceof Unauthorized) onUnauthorized(); }
  });
}

async function send(model, text, onTrace) {
  const log = document.getElementById("chat-log");
  const stop = document.getElementById("chat-stop");
  const sendButton = document.getElementById("chat-send");
  log.append(element("div", "msg user", text));
  history.push({ role: "user", content: text });
  const answer = element("div", "msg assistant");
  const reasoning = element("details");
  reasoning.append(element("summary", "", "reasoning"));
  const reasoningText = element("div");
  reasoning.append(reasoningText);
  reasoning.hidden = true;
  const body = element("div", "content");
  const tools = element("div");
  const stats = element("div", "stats", "waiting for the first token…");
  answer.append(reasoning, body, tools, stats);
  log.append(answer);
  controller = new AbortController();
  stop.disabled = false;
  sendButton.disabled = true;
  const started = performance.now();
  let first = null, last = null, chunks = 0, content = "", id = null, usage = null;
  const calls = [];
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, messages: history, stream: true, stream_options: { include_usage: true } }),
      signal: controller.signal,
    });
    if (response.status === 401) throw new Unauthorized();
    if (!response.ok) {
      const data = await response.json().catch(() => null);
      throw new Error(data?.error?.message || `${response.status}`);
    }
    await readEvents(response, (_event, data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      id = chunk.id || id;
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta;
      if (!delta) return;
      const now = performance.now();
      if (delta.content || delta.reasoning_content || delta.reasoning || delta.tool_calls) {
        first ??= now; last = now; chunks += 1;
      }
      if (delta.content) { content += delta.content; body.textContent = content; }
      const thought = delta.reasoning_content || delta.reasoning;
      if (thought) { reasoning.hidden = false; reasoningText.textContent += thought; }
      for (const call of delta.tool_calls || []) {
        const index = call.index ?? 0;
        calls[index] ??= { name: "", arguments: "", node: element("div", "tool") };
        if (!calls[index].node.isConnected) tools.append(calls[index].node);
        if (call.function?.name) calls[index].name += call.function.name;
        if (call.function?.arguments) calls[index].arguments += call.function.arguments;
        calls[index].node.textContent = `call ${calls[index].name}(${calls[index].arguments})`;
      }
      stats.textContent = "streaming…";
    });
  } catch (error) {
    if (error instanceof Unauthorized) throw error;
    if (error.name !== "AbortError") stats.classList.add("error");
    if (error.name !== "AbortError") body.textContent = content || `error: ${error.message}`;
  } finally {
    const stopped = controller.signal.aborted;
    controller = null;
    stop.disabled = true;
    sendButton.disabled = false;
    const tokens = usage?.completion_tokens ?? chunks;
    const ttft = first === null ? null : first - started;
    const rate = first !== null && last > first && tokens > 1 ? ((tokens - 1) * 1000) / (last - first) : null;
    if (!stats.classList.contains("error")) {
      stats.textContent = [
        stopped ? "stopped" : null,
        ttft === null ? "no tokens" : `TTFT ${ttft.toFixed(0)} ms`,
        rate === null ? null : `${rate.toFixed(1)} tok/s`,
        `${tokens} tokens`,
      ].filter(Boolean).join(" · ");
      stats.dataset.ttftMs = ttft ?? "";
    }
    answer.dataset.done = "true";
    history.push({ role: "assistant", content });
    if (id) onTrace(id);
  }
}
