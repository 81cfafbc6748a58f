// HAVOC chat page: multi-turn chat over the server's own /v1/chat/completions, streamed (SSE).
// Model text is only ever inserted as text nodes, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const turns = [];  // {role, content} of the conversation so far (the system prompt is added per request)
let model = null;
let controller = null;
let conversation = 0;  // bumped by "New chat": a reply still arriving must not touch the new one

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.append(span);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch {
    return response.status + " " + response.statusText;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("model").textContent = "this server needs an API key (Settings)";
    $("settings").open = true;
    return null;
  }
  if (!response.ok) throw new Error(await errorText(response));
  model = (await response.json()).data[0].id;
  $("model").textContent = model;
  return model;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns);
  const body = { model, messages, stream: true,
                 temperature: Number($("temperature").value), top_p: Number($("top-p").value) };
  const maxTokens = $("max-tokens").value;
  if (maxTokens) body.max_tokens = Number(maxTokens);
  return body;
}

// Yields the parsed JSON of every `data:` event of a server-sent-event response, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("input").disabled = on;
}

async function send(text) {
  if (!model && !(await loadModel())) return;
  const current = conversation;
  turns.push({ role: "user", content: text });
  const mine = bubble("user", text);
  const out = bubble("assistant streaming", "");
  let reply = "";
  let finish = null;
  controller = new AbortController();
  busy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        reply += delta;
        out.append(delta);  // a text node: markup in the model's output stays text
        out.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (current === conversation) turns.push({ role: "assistant", content: reply });
    if (finish === "length") note(out, "(stopped at the token limit)");
  } catch (e) {
    if (current !== conversation) {
      // "New chat" was pressed: this reply belongs to a conversation that is gone
    } else if (e.name === "AbortError") {
      turns.push({ role: "assistant", content: reply });
      note(out, "(stopped)");
    } else {
      turns.pop();  // the message was not answered: let it be edited and sent again
      mine.remove();
      out.remove();
      bubble("error", "error: " + e.message);
      $("input").value = text;
    }
  } finally {
    out.classList.remove("streaming");
    out.dataset.done = finish || "stopped";
    controller = null;
    busy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  conversation += 1;
  if (controller) controller.abort();
  turns.length = 0;
  $("log").replaceChildren();
  $("input").focus();
});
$("api-key").addEventListener("change", () => loadModel().catch((e) => bubble("error", "error: " + e.message)));
loadModel().catch((e) => bubble("error", "error: " + e.message));
