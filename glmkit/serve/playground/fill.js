// Blank filling: POST /v1/infill with stream=true; each blank of the text fills in place as its tokens arrive.
import { ApiError, describe, number, stream } from "./api.js";
import { follow } from "./inside.js";

const $ = (id) => document.getElementById(id);
const BLANK = /\[(MASK|sMASK|gMASK)\]/g;
let controller = null;

// The text as paragraphs of plain text nodes and one <mark> per blank (user text only ever as textContent).
function render(text) {
  const out = $("fill-output");
  out.replaceChildren();
  const marks = [];
  let cursor = 0;
  for (const m of text.matchAll(BLANK)) {
    out.append(document.createTextNode(text.slice(cursor, m.index)));
    const mark = document.createElement("mark");
    mark.className = "span pending";
    mark.textContent = m[0];
    mark.dataset.blank = String(marks.length);
    out.append(mark);
    marks.push({ mark, tag: m[0], text: "" });
    cursor = m.index + m[0].length;
  }
  out.append(document.createTextNode(text.slice(cursor)));
  return marks;
}

// The text Inside the model draws: blanks filled so far carry their span; braces would end explain's {span}.
function layoutText(text, marks) {
  let k = 0;
  return text.replace(BLANK, (tag) => {
    const blank = marks[k++];
    return blank && blank.text ? `${tag}{${blank.text.replace(/[{}]/g, "")}}` : tag;
  });
}

function body(prompt) {
  const mode = $("fill-mode").value;
  const b = { prompt, stream: true, max_tokens: number("fill-max-tokens", { min: 1, integer: true }) };
  if (mode === "greedy") return { ...b, temperature: 0 };
  if (mode === "beam") return { ...b, temperature: 0, num_beams: number("fill-beams", { min: 1, max: 16, integer: true }) };
  const topK = number("fill-top-k", { min: 0, integer: true });
  return {
    ...b,
    temperature: number("fill-temperature", { min: 0, max: 5 }),
    top_p: number("fill-top-p", { min: 0.01, max: 1 }),
    seed: number("fill-seed", { min: 0, integer: true }),
    ...(topK > 0 ? { top_k: topK } : {}),
  };
}

function showMode() {
  const mode = $("fill-mode").value;
  for (const id of ["fill-top-k", "fill-top-p", "fill-temperature", "fill-seed"]) $(id).disabled = mode !== "sample";
  $("fill-beams").disabled = mode !== "beam";
}

async function run() {
  const text = $("fill-text").value;
  $("fill-error").textContent = $("fill-meta").textContent = $("fill-result").textContent = "";
  controller = new AbortController();
  $("fill-run").disabled = true;
  $("fill-stop").disabled = false;
  const marks = render(text);
  let finished = false;
  try {
    if (!text.trim()) throw new ApiError("Type a text with at least one [MASK], [sMASK] or [gMASK] to fill.", 0);
    for await (const event of stream("/v1/infill", body(text), controller.signal)) {
      if (event.object === "infill.chunk") {
        const blank = marks[event.blank];
        if (!blank) continue;
        blank.text += event.text;
        blank.mark.textContent = blank.text;
        blank.mark.className = "span active";
        follow(layoutText(text, marks));
      } else {
        event.spans.forEach((span, k) => {
          if (!marks[k]) return;
          marks[k].text = span;
          marks[k].mark.textContent = span;
          marks[k].mark.className = "span";
        });
        $("fill-result").textContent = event.text;
        const u = event.usage;
        $("fill-meta").textContent =
          `finished: ${event.finish_reason}; ${u.prompt_tokens} prompt tokens, ${u.completion_tokens} generated`;
        finished = true;
        follow(layoutText(text, marks));
      }
    }
  } catch (e) {
    const message = describe(e);
    $("fill-error").textContent = message ?? "";
    if (message === null) $("fill-meta").textContent = "stopped";
  } finally {
    for (const m of marks) if (!finished) m.mark.className = m.text ? "span" : "span pending";
    $("fill-run").disabled = false;
    $("fill-stop").disabled = true;
    controller = null;
  }
}

export function setupFill() {
  $("fill-mode").addEventListener("change", showMode);
  showMode();
  $("fill-run").addEventListener("click", run);
  $("fill-stop").addEventListener("click", () => controller && controller.abort());
}
