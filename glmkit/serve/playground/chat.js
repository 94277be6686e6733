// Chat: /v1/chat/completions streamed, the history kept in this page, a stop button that ends the stream.
import { describe, number, stream } from "./api.js";

const $ = (id) => document.getElementById(id);
let history = [];
let controller = null;

function message(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role === "user" ? "You:" : "Model:";
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(who, body);
  $("chat-log").append(div);
  return div;
}

function note(div, text) {
  const span = document.createElement("span");
  span.className = "note";
  span.textContent = text;
  div.append(span);
}

async function send() {
  const text = $("chat-input").value;
  $("chat-error").textContent = "";
  if (!text.trim()) {
    $("chat-error").textContent = "Type a message first.";
    return;
  }
  let maxTokens;
  let temperature;
  try {
    maxTokens = number("chat-max-tokens", { min: 1, integer: true });
    temperature = number("chat-temperature", { min: 0, max: 5 });
  } catch (e) {
    $("chat-error").textContent = e.message;
    return;
  }
  $("chat-input").value = "";
  message("user", text);
  const system = $("chat-system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, { role: "user", content: text }];
  const div = message("assistant", "");
  const body = div.querySelector(".content");
  controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  let answer = "";
  let finish = null;
  try {
    const request = { messages, stream: true, max_tokens: maxTokens, temperature };
    for await (const chunk of stream("/v1/chat/completions", request, controller.signal)) {
      for (const c of chunk.choices) {
        if (c.delta && c.delta.content) answer += c.delta.content;
        if (c.finish_reason) finish = c.finish_reason;
      }
      body.textContent = answer;
    }
    if (finish === "length") note(div, "(cut at max tokens)");
  } catch (e) {
    const why = describe(e);
    if (why === null) note(div, "(stopped)");
    else {
      $("chat-error").textContent = why;
      note(div, "(failed)");
    }
  } finally {
    // the turn stays in the history with what arrived, as the page shows it
    history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    controller = null;
  }
}

export function setupChat() {
  $("chat-send").addEventListener("click", send);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !controller) {
      event.preventDefault();
      send();
    }
  });
  $("chat-stop").addEventListener("click", () => controller && controller.abort());
  $("chat-clear").addEventListener("click", () => {
    if (controller) controller.abort();
    history = [];
    $("chat-log").replaceChildren();
    $("chat-error").textContent = "";
  });
}
