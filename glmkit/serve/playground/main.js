// Tabs, the server's status, the API key form.
import { getJSON, getKey, onAuthNeeded, setKey } from "./api.js";
import { setupChat } from "./chat.js";
import { setupCompare } from "./compare.js";
import { setupFill } from "./fill.js";
import { setupInside } from "./inside.js";

const $ = (id) => document.getElementById(id);

function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    $(t.getAttribute("aria-controls")).hidden = !on;
  }
  sessionStorage.setItem("glmkit-tab", tab.id);
}

function askKey(message) {
  $("key-form").hidden = false;
  $("status").textContent = message;
  $("key").focus();
}

async function checkServer() {
  try {
    const models = await getJSON("/v1/models");
    const card = models.data[0];
    $("status").textContent = card
      ? `model ${card.id}, ${card.max_model_len} KV positions${getKey() ? " (with your API key)" : ""}`
      : "the generation model is unloaded";
    $("key-form").hidden = true;
  } catch (e) {
    $("status").textContent = e.message;
    if (e.status === 503) setTimeout(checkServer, 2000);
  }
  $("forget-key").hidden = !getKey();
}

for (const tab of document.querySelectorAll('[role="tab"]')) tab.addEventListener("click", () => selectTab(tab));
const last = sessionStorage.getItem("glmkit-tab");
if (last && $(last)) selectTab($(last));
onAuthNeeded(askKey);
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setKey($("key").value.trim());
  $("key").value = "";
  checkServer();
});
$("forget-key").addEventListener("click", () => {
  setKey("");
  checkServer();
});
setupInside();
setupFill();
setupCompare();
setupChat();
checkServer();
