// "Inside the model": Part A, Part B, each token's 2D position and the attention masks (GLM, GPT, BERT), from
// POST /playground/layout (glmkit explain and masks.py on the server).
import { describe, number, postJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
const GRID = 360; // px a grid may take
const COLORS = { on: "#2458c6", off: "#eef1f6", sep: "#d92d20" };
let pending = null; // the latest text asked for while a request runs: only the newest one is drawn next
let busy = false;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function table(element, title, layout, rows) {
  element.replaceChildren();
  const caption = document.createElement("caption");
  caption.textContent = title;
  const head = document.createElement("tr");
  for (const name of ["index", "token", "position", "block position"]) {
    const th = document.createElement("th");
    th.textContent = name;
    head.append(th);
  }
  element.append(caption, head);
  for (const i of rows) {
    const tr = document.createElement("tr");
    tr.append(
      cell(String(i)),
      cell(layout.tokens[i], "token"),
      cell(String(layout.position_ids[i])),
      cell(String(layout.block_position_ids[i])),
    );
    element.append(tr);
  }
}

function range(start, end) {
  return Array.from({ length: Math.max(0, end - start) }, (_, k) => start + k);
}

// One mask as a grid: row i attends to column j where the cell is dark; the GLM grid marks Part A's end.
function draw(canvas, rows, sep, tokens) {
  const n = rows.length;
  const size = Math.max(2, Math.floor(GRID / Math.max(n, 1)));
  canvas.width = canvas.height = n * size;
  canvas.dataset.n = String(n);
  canvas.dataset.cell = String(size);
  const g = canvas.getContext("2d");
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      g.fillStyle = rows[i][j] === "1" ? COLORS.on : COLORS.off;
      g.fillRect(j * size, i * size, size - (size > 4 ? 1 : 0), size - (size > 4 ? 1 : 0));
    }
  }
  if (sep > 0 && sep < n) {
    g.fillStyle = COLORS.sep;
    g.fillRect(sep * size - 1, 0, 1, n * size);
    g.fillRect(0, sep * size - 1, n * size, 1);
  }
  canvas.onmousemove = (event) => {
    const box = canvas.getBoundingClientRect();
    const j = Math.floor((event.clientX - box.left) / size);
    const i = Math.floor((event.clientY - box.top) / size);
    if (i < 0 || j < 0 || i >= n || j >= n) return;
    const sees = rows[i][j] === "1" ? "attends to" : "does not see";
    $("mask-cell").textContent = `row ${i} «${tokens[i]}» ${sees} column ${j} «${tokens[j]}»`;
  };
}

function show(layout) {
  const n = layout.tokens.length;
  if (layout.causal) {
    $("inside-info").textContent = `${n} tokens, ${layout.family}: a causal LM, every token sees itself and those before`;
    table($("part-a"), "prompt and answer (causal)", layout, range(0, n));
    $("part-b").replaceChildren();
  } else {
    $("inside-info").textContent =
      `${n} tokens: Part A ${layout.sep}, Part B ${n - layout.sep} ` +
      `(blanks at ${layout.blank_positions.join(", ")}; family ${layout.family})`;
    table($("part-a"), "Part A (the text, bidirectional)", layout, range(0, layout.sep));
    table($("part-b"), "Part B (the spans, in generation order)", layout, range(layout.sep, n));
  }
  draw($("mask-glm"), layout.masks.glm, layout.causal ? 0 : layout.sep, layout.tokens);
  draw($("mask-gpt"), layout.masks.gpt, 0, layout.tokens);
  draw($("mask-bert"), layout.masks.bert, 0, layout.tokens);
}

async function request(text) {
  if (busy) {
    pending = text;
    return;
  }
  busy = true;
  $("inside-error").textContent = "";
  try {
    if (!text.trim()) throw new Error("Type a text with at least one [MASK], [sMASK] or [gMASK].");
    const spanLength = number("inside-span-length", { min: 1, max: 64, integer: true });
    show(await postJSON("/playground/layout", { text, span_length: spanLength }));
  } catch (e) {
    $("inside-error").textContent = describe(e) ?? "";
  } finally {
    busy = false;
  }
  if (pending !== null) {
    const next = pending;
    pending = null;
    await request(next);
  }
}

// Called by blank filling as spans grow: the text with each filled blank written [MASK]{span so far}.
export function follow(text) {
  $("inside-text").value = text;
  return request(text);
}

export function setupInside() {
  $("inside-run").addEventListener("click", () => request($("inside-text").value));
  request($("inside-text").value);
}
