// The playground's tokens: the API's per-token logprobs normalised (the merged alternatives and,
// with return_model_logprobs, each model's logprob and own alternatives), the attribution of an
// up-scaled token (log p_EFT − log p_base) and its colour, and the small tables of the inspector.
"use strict";
window.EftTokens = (() => {
  const FLOOR = -9999; // the API's stand-in for log 0 (JSON has no -inf)

  // Normalised tokens of a choice's `logprobs`: completions' parallel arrays or chat's `content`.
  function tokensOf(lp) {
    if (!lp) return [];
    if (lp.content) {
      return lp.content.map((e) => ({
        text: e.token, lp: e.logprob, top: (e.top_logprobs || []).map((a) => [a.token, a.logprob]), models: e.model_logprobs || null,
        modelTop: e.model_top_logprobs ? mapRoles(e.model_top_logprobs, (alts) => alts.map((a) => [a.token, a.logprob])) : null,
      }));
    }
    return (lp.tokens || []).map((text, i) => ({
      text,
      lp: lp.token_logprobs[i],
      top: ranked((lp.top_logprobs || [])[i]),
      models: lp.model_logprobs ? lp.model_logprobs[i] : null,
      modelTop: lp.model_top_logprobs ? mapRoles(lp.model_top_logprobs[i] || {}, ranked) : null,
    }));
  }

  // Completions' `{text: logprob}` alternatives as [text, logprob] rows, most likely first.
  function ranked(dict) { return Object.entries(dict || {}).sort((a, b) => b[1] - a[1]); }
  // `model_top_logprobs` of one token: each model's own alternatives, as rows.
  function mapRoles(byRole, rows) { return Object.fromEntries(Object.entries(byRole).map(([role, v]) => [role, rows(v)])); }

  function known(x) { return typeof x === "number" && x > FLOOR; }

  // log p_EFT − log p_base of the span's tokens: what the expert delta did, after renormalising.
  function delta(info, base) {
    let d = 0;
    for (const t of info.tokens) {
      if (!t.models || !known(t.lp) || !known(t.models[base])) return NaN;
      d += t.lp - t.models[base];
    }
    return info.tokens.length ? d : NaN;
  }

  function colour(span, d) {
    span.dataset.delta = Number.isFinite(d) ? d.toFixed(3) : "";
    if (!Number.isFinite(d)) { span.classList.add("attr-unknown"); return; }
    if (Math.abs(d) < 0.05) { span.classList.add("attr-zero"); return; }
    const a = 0.15 + 0.6 * Math.min(1, Math.abs(d) / 3);
    span.classList.add(d > 0 ? "attr-up" : "attr-down");
    span.style.backgroundColor = d > 0 ? `rgba(37, 99, 235, ${a.toFixed(2)})` : `rgba(234, 88, 12, ${a.toFixed(2)})`;
  }

  function visible(text) { return text.replace(/ /g, "␣").replace(/\n/g, "⏎"); }
  function fmt(lp) { return known(lp) ? `${lp.toFixed(2)} (${(100 * Math.exp(lp)).toFixed(1)}%)` : "—"; }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }

  function table(title, rows, chosen) {
    const box = el("div", undefined, "alts");
    box.append(el("div", title, "alts-title"));
    const t = el("table");
    for (const [text, lp] of rows) {
      const tr = el("tr", undefined, text === chosen ? "chosen" : "");
      tr.append(el("td", visible(text), "alt-text"), el("td", fmt(lp), "alt-lp"));
      t.append(tr);
    }
    box.append(t);
    return box;
  }

  return { tokensOf, known, delta, colour, visible, fmt, el, table };
})();
