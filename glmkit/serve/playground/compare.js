// Compare decoding: strategies of glmkit compare-decoding on one prompt, side by side, with its metrics.
// Sampling strategies stream from /v1/completions with logprobs (the model's own tokens and their log-likelihoods:
// the perplexity compare-decoding computes, the stop token left out as it does); beam search returns no logprobs,
// so its texts are scored through KServe v2 (glm_score) and split into tokens by /playground/layout.
import { ApiError, describe, number, postJSON, stream } from "./api.js";
import { distinctN, perplexity, repetitionRate, selfBleu } from "./metrics.js";

const $ = (id) => document.getElementById(id);
// compare.STRATEGIES in the request parameters of the OpenAI API
const STRATEGIES = {
  greedy: { temperature: 0 },
  "beam-4": { temperature: 0, num_beams: 4 },
  "top-k-40": { temperature: 1, top_k: 40 },
  "top-p-0.9": { temperature: 1, top_p: 0.9 },
  "top-p-0.95": { temperature: 1, top_p: 0.95 },
  "temp-0.7": { temperature: 0.7 },
  "temp-1.0": { temperature: 1 },
  "temp-1.3": { temperature: 1.3 },
};
const ON = ["greedy", "beam-4", "top-p-0.9", "temp-1.3"];
const METRICS = [
  ["distinct_1", "distinct-1"],
  ["distinct_2", "distinct-2"],
  ["self_bleu_4", "self-BLEU-4"],
  ["repetition_4", "rep-4"],
  ["mean_length", "mean len"],
  ["perplexity", "PPL"],
  ["latency_s", "latency s"],
  ["tokens_per_s", "tok/s"],
];
let controller = null;

function format(value, field) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return field === "mean_length" || field === "tokens_per_s" || value >= 100 ? value.toFixed(1) : value.toFixed(3);
}

function column(name) {
  const div = document.createElement("div");
  div.className = "column";
  const h = document.createElement("h3");
  h.textContent = name;
  const list = document.createElement("ol");
  div.append(h, list);
  $("compare-columns").append(div);
  return list;
}

function showTexts(list, texts) {
  list.replaceChildren(
    ...texts.map((t) => {
      const li = document.createElement("li");
      li.textContent = t;
      return li;
    }),
  );
}

function showTable(results) {
  const t = $("compare-table");
  t.replaceChildren();
  const head = document.createElement("tr");
  for (const title of ["strategy", ...METRICS.map(([, title]) => title)]) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  t.append(head);
  for (const r of results) {
    const tr = document.createElement("tr");
    tr.dataset.strategy = r.name;
    const name = document.createElement("td");
    name.textContent = r.name;
    name.className = "token";
    tr.append(name);
    for (const [field] of METRICS) {
      const td = document.createElement("td");
      td.textContent = format(r[field], field);
      td.dataset.metric = field;
      tr.append(td);
    }
    t.append(tr);
  }
}

async function sampled(prompt, settings, n, maxTokens, seed, list, signal) {
  const runs = Array.from({ length: n }, () => ({ text: "", tokens: [], nlls: [], finish: null }));
  const body = { prompt, max_tokens: maxTokens, n, seed, logprobs: 0, stream: true, ...settings };
  for await (const chunk of stream("/v1/completions", body, signal)) {
    for (const c of chunk.choices) {
      const run = runs[c.index];
      run.text += c.text;
      if (c.logprobs) {
        run.tokens.push(...c.logprobs.tokens);
        run.nlls.push(...c.logprobs.token_logprobs.map((lp) => -lp));
      }
      if (c.finish_reason) run.finish = c.finish_reason;
    }
    showTexts(list, runs.map((r) => r.text));
  }
  for (const r of runs) {
    if (r.finish === "stop" && r.tokens.length) {
      r.tokens.pop(); // the stop token (<eop>) ends the span; compare-decoding scores the span without it
      r.nlls.pop();
    }
  }
  return runs;
}

async function beams(prompt, settings, n, maxTokens, list, signal) {
  const body = { prompt, max_tokens: maxTokens, n: Math.min(n, settings.num_beams), ...settings };
  const answer = await postJSON("/v1/completions", body, signal);
  const texts = answer.choices.map((c) => c.text);
  showTexts(list, texts);
  const runs = [];
  for (const text of texts) {
    const clean = text.replace(/[{}]/g, "");
    let tokens = [];
    if (clean) {
      const layout = await postJSON("/playground/layout", { text: `${prompt}[gMASK]{${clean}}` }, signal);
      tokens = layout.tokens.slice(layout.sep + 1); // Part B after <sop>: the span's own tokens
    }
    runs.push({ text, tokens, nlls: [] });
  }
  const scored = runs.filter((r) => r.text);
  if (scored.length) {
    const k = scored.length;
    const infer = {
      inputs: [
        { name: "text_input", datatype: "BYTES", shape: [k, 1], data: scored.map(() => prompt) },
        { name: "continuation", datatype: "BYTES", shape: [k, 1], data: scored.map((r) => r.text) },
      ],
    };
    const out = await postJSON("/v2/models/glm_score/infer", infer, signal);
    const get = (name) => out.outputs.find((o) => o.name === name).data;
    const [logprob, numTokens] = [get("logprob"), get("num_tokens")];
    // pooled as compare-decoding pools: sum of NLLs over the number of scored tokens
    scored.forEach((r, i) => {
      r.nlls = Array(numTokens[i]).fill(-logprob[i] / numTokens[i]);
    });
  }
  return runs;
}

async function run() {
  $("compare-error").textContent = "";
  $("compare-columns").replaceChildren();
  controller = new AbortController();
  $("compare-run").disabled = true;
  $("compare-stop").disabled = false;
  const results = [];
  showTable(results);
  try {
    const prompt = $("compare-prompt").value;
    if (!prompt.trim()) throw new ApiError("Type a prompt to continue.", 0);
    const n = number("compare-samples", { min: 1, max: 8, integer: true });
    const maxTokens = number("compare-max-tokens", { min: 1, integer: true });
    const seed = number("compare-seed", { min: 0, integer: true });
    const chosen = Object.keys(STRATEGIES).filter((name) => $(`strategy-${name}`).checked);
    if (!chosen.length) throw new ApiError("Pick at least one strategy.", 0);
    for (const name of chosen) {
      const settings = STRATEGIES[name];
      const list = column(name);
      const start = performance.now();
      const runs = settings.num_beams
        ? await beams(prompt, settings, n, maxTokens, list, controller.signal)
        : await sampled(prompt, settings, n, maxTokens, seed, list, controller.signal);
      const seconds = (performance.now() - start) / 1000;
      const spans = runs.map((r) => r.tokens);
      const generated = spans.reduce((a, s) => a + s.length, 0);
      results.push({
        name,
        distinct_1: distinctN(spans, 1),
        distinct_2: distinctN(spans, 2),
        self_bleu_4: selfBleu(spans),
        repetition_4: repetitionRate(spans),
        mean_length: generated / spans.length,
        perplexity: perplexity(runs.flatMap((r) => r.nlls)),
        latency_s: seconds, // the request's wall time: its samples decode together
        tokens_per_s: seconds > 0 ? generated / seconds : null,
      });
      showTable(results);
    }
  } catch (e) {
    $("compare-error").textContent = describe(e) ?? "stopped";
  } finally {
    $("compare-run").disabled = false;
    $("compare-stop").disabled = true;
    controller = null;
  }
}

export function setupCompare() {
  const box = $("compare-strategies");
  for (const name of Object.keys(STRATEGIES)) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.id = `strategy-${name}`;
    input.checked = ON.includes(name);
    label.append(input, document.createTextNode(` ${name}`));
    box.append(label);
  }
  $("compare-run").addEventListener("click", run);
  $("compare-stop").addEventListener("click", () => controller && controller.abort());
}
