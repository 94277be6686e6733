// The metrics of glmkit compare-decoding (glmkit/generate/metrics.py, same definitions; the browser tests check
// these functions against it): texts are lists of tokens.

function ngrams(tokens, n) {
  const grams = [];
  for (let i = 0; i + n <= tokens.length; i++) grams.push(tokens.slice(i, i + n).join("\u0000"));
  return grams;
}

function counts(grams) {
  const c = new Map();
  for (const g of grams) c.set(g, (c.get(g) || 0) + 1);
  return c;
}

// Distinct n-grams over all n-grams of the corpus (Li et al. 2016); 0 when no text has n tokens.
export function distinctN(texts, n) {
  const grams = texts.flatMap((t) => ngrams(t, n));
  return grams.length ? new Set(grams).size / grams.length : 0;
}

// Sentence BLEU with NLTK's method1 smoothing and the closest reference length (metrics.bleu).
export function bleu(hypothesis, references, maxN = 4) {
  if (!hypothesis.length || !references.length) return 0;
  let logPrecision = 0;
  for (let n = 1; n <= maxN; n++) {
    const hyp = counts(ngrams(hypothesis, n));
    const most = new Map();
    for (const ref of references) {
      for (const [g, c] of counts(ngrams(ref, n))) most.set(g, Math.max(most.get(g) || 0, c));
    }
    let matched = 0;
    let total = 0;
    for (const [g, c] of hyp) {
      matched += Math.min(c, most.get(g) || 0);
      total += c;
    }
    if (n === 1 && matched === 0) return 0;
    logPrecision += Math.log((matched || 0.1) / Math.max(1, total)) / maxN;
  }
  const h = hypothesis.length;
  let best = null;
  for (const ref of references) {
    const key = [Math.abs(ref.length - h), ref.length];
    if (best === null || key[0] < best[0] || (key[0] === best[0] && key[1] < best[1])) best = key;
  }
  const brevity = h > best[1] ? 1 : Math.exp(1 - best[1] / h);
  return brevity * Math.exp(logPrecision);
}

// Mean BLEU-4 of each text against the others (Zhu et al. 2018); null for fewer than two texts.
export function selfBleu(texts, maxN = 4) {
  if (texts.length < 2) return null;
  let sum = 0;
  texts.forEach((t, i) => {
    sum += bleu(t, [...texts.slice(0, i), ...texts.slice(i + 1)], maxN);
  });
  return sum / texts.length;
}

// Share of n-grams repeating an earlier n-gram of the same text, pooled (rep-4, Welleck et al. 2020).
export function repetitionRate(texts, n = 4) {
  let total = 0;
  let repeats = 0;
  for (const t of texts) {
    const grams = ngrams(t, n);
    total += grams.length;
    repeats += grams.length - new Set(grams).size;
  }
  return total ? repeats / total : 0;
}

// exp(mean NLL) over pooled token NLLs; NaN without tokens.
export function perplexity(nlls) {
  return nlls.length ? Math.exp(nlls.reduce((a, b) => a + b, 0) / nlls.length) : NaN;
}
