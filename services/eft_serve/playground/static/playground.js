// The EFT playground: one prompt through the up-scaled recipe and each single-model recipe side by
// side (the OpenAI routes of this server, streamed), the up-scaled tokens coloured by what the
// expert delta did to them, and a β sweep. No framework, no build step, no third-party origin.
// The API key lives in the key field only (this tab's memory): never stored, never sent elsewhere.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SWEEP_BETAS = [0, 0.5, 1, 1.5, 2];
  const ALTERNATIVES = 5; // top alternatives asked per token (completions allow at most 5)
  const state = { models: {}, defaultRecipe: null, controllers: new Set(), pinned: null, shown: null, lastChat: null };
  const { call, stream } = window.EftApi; // api.js
  const { tokensOf, known, delta, colour, visible, fmt, el, table } = window.EftTokens; // tokens.js


  // ---- controls ----------------------------------------------------------------------------

  // What was typed, as a number when it is one, else as typed: the API names a bad field
  // ("temperature: Input should be a valid number"), which is clearer than a page guessing.
  function typed(id) {
    const raw = $(id).value.trim();
    if (raw === "") return undefined;
    return /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(raw) ? Number(raw) : raw;
  }

  function put(body, field, value) { if (value !== undefined) body[field] = value; }

  function card(recipe) { return state.models[recipe] || {}; }
  function structure(recipe) { return card(recipe).eft || { base: recipe, experts: [], reference: null, default_weights: {} }; }
  function isUpscaled(recipe) { return structure(recipe).experts.length > 0; }
  function roles(recipe) {
    const s = structure(recipe);
    return [s.base, ...s.experts, ...(s.reference ? [s.reference] : [])];
  }
  // The recipe that is one model alone (base = role, no experts), if the server has one.
  function singleRecipe(role) {
    for (const [id, c] of Object.entries(state.models)) {
      if (c.eft && c.eft.base === role && c.eft.experts.length === 0) return id;
    }
    return null;
  }
  function formula(recipe) {
    const s = structure(recipe);
    if (!s.experts.length) return s.base;
    const terms = s.experts.map((e) => {
      const w = s.default_weights[e] ?? 1;
      return (w === 1 ? "" : `${w}·`) + `(${e} − ${s.reference})`;
    });
    return `${s.base} + β·${terms.length > 1 ? "[" + terms.join(" + ") + "]" : terms[0]}`;
  }

  // ---- chat turns: the earlier messages of a conversation, before the prompt box's message -----

  function addTurn(role, content) {
    const row = el("div", undefined, "turn");
    const select = document.createElement("select");
    select.className = "turn-role";
    for (const r of ["user", "assistant"]) {
      const opt = document.createElement("option");
      opt.value = r;
      opt.textContent = r;
      select.append(opt);
    }
    select.value = role;
    const text = document.createElement("textarea");
    text.className = "turn-content";
    text.rows = 1;
    text.spellcheck = false;
    text.value = content;
    const remove = el("button", "×", "turn-remove");
    remove.type = "button";
    remove.title = "Remove this turn";
    remove.addEventListener("click", () => row.remove());
    row.append(select, text, remove);
    $("turns").append(row);
  }

  function turns() {
    return [...document.querySelectorAll("#turns .turn")].map((row) => ({
      role: row.querySelector(".turn-role").value,
      content: row.querySelector(".turn-content").value,
    }));
  }

  // The chat so far: system message, earlier turns, then the prompt box as the next user message.
  function chatMessages(s) {
    const system = s.system.trim() ? [{ role: "system", content: s.system }] : [];
    return [...system, ...s.turns, { role: "user", content: s.prompt }];
  }

  // Keep the last run's exchange: the message sent and the up-scaled column's reply become turns.
  function continueChat() {
    const up = document.querySelector("#columns .pane.eft.finished");
    if (!up || !state.lastChat) return;
    addTurn("user", state.lastChat.prompt);
    addTurn("assistant", up.querySelector(".out").textContent);
    $("prompt").value = "";
    $("continue").disabled = true;
    $("prompt").focus();
  }

  function settings() {
    const mode = $("mode").value;
    return {
      mode,
      prompt: $("prompt").value,
      system: $("system").value,
      turns: turns(),
      recipe: $("recipe").value,
      beta: typed("beta"),
      weights: Object.fromEntries([...document.querySelectorAll("#weights input")].map((i) => [i.dataset.expert, typed(i.id)])),
      temperature: typed("temperature"),
      seed: typed("seed"),
      maxTokens: typed("max-tokens"),
      topK: $("merge").value === "exact" ? 0 : typed("top-k"),
      speculative: $("speculative").checked,
    };
  }

  function requestBody(s, recipe, extra = {}) {
    const body = { model: recipe, stream: true, stream_options: { include_usage: true } };
    put(body, "max_tokens", s.maxTokens);
    put(body, "temperature", s.temperature);
    put(body, "seed", s.seed);
    put(body, "logprob_top_k", s.topK);
    if (isUpscaled(recipe)) {
      put(body, "beta", s.beta);
      const weights = Object.fromEntries(Object.entries(s.weights).filter(([, w]) => w !== undefined));
      if (Object.keys(weights).length) body.expert_weights = weights;
      if (s.speculative) body.speculative = true;
      body.return_model_logprobs = true;
    }
    if (s.mode === "chat") {
      body.messages = chatMessages(s);
      body.logprobs = true;
      body.top_logprobs = ALTERNATIVES;
    } else {
      body.prompt = s.prompt;
      body.logprobs = ALTERNATIVES;
    }
    return Object.assign(body, extra);
  }

  function routeOf(s) { return s.mode === "chat" ? "/v1/chat/completions" : "/v1/completions"; }

  // ---- messages ------------------------------------------------------------------------------

  const errors = new Set();
  function showError(message) {
    errors.add(message);
    const box = $("error");
    box.textContent = [...errors].join("\n");
    box.hidden = false;
  }
  function clearErrors() { errors.clear(); $("error").hidden = true; $("error").textContent = ""; }

  // ---- recipes -------------------------------------------------------------------------------

  async function connect() {
    clearErrors();
    $("server").textContent = "connecting…";
    try {
      const list = await (await call("GET", "/v1/models")).json();
      state.models = Object.fromEntries(list.data.map((m) => [m.id, m]));
      state.defaultRecipe = (list.data.find((m) => m.default) || {}).id || null;
    } catch (e) {
      state.models = {};
      $("server").textContent = "not connected";
      showError(e.message);
      return false;
    }
    const select = $("recipe");
    const previous = select.value;
    select.replaceChildren();
    const ids = Object.keys(state.models);
    const upscaled = ids.filter(isUpscaled);
    for (const id of upscaled.length ? upscaled : ids) {
      const opt = document.createElement("option");
      opt.value = id;
      opt.textContent = id;
      opt.title = card(id).description || "";
      select.append(opt);
    }
    const preferred = [previous, state.defaultRecipe].find((r) => r && [...select.options].some((o) => o.value === r));
    if (preferred) select.value = preferred;
    $("server").textContent = `${ids.length} recipes`;
    renderWeights();
    return true;
  }

  function renderWeights() {
    const box = $("weights");
    box.replaceChildren();
    const s = structure($("recipe").value);
    for (const expert of s.experts) {
      const label = document.createElement("label");
      label.textContent = `w(${expert}) `;
      const input = document.createElement("input");
      input.id = "weight-" + expert;
      input.dataset.expert = expert;
      input.className = "num";
      input.type = "text";
      input.inputMode = "decimal";
      input.value = String(s.default_weights[expert] ?? 1);
      label.append(input);
      box.append(label);
    }
    $("legend-base").textContent = s.base;
  }

  // ---- one output pane: a column, or a row of the sweep ----------------------------------------

  class Pane {
    constructor(parent, title, subtitle, recipe, s, eft) {
      this.recipe = recipe;
      this.settings = s;
      this.eft = eft; // colour tokens by attribution, show per-model alternatives
      this.base = structure(recipe).base;
      this.spans = []; // {text, tokens, offset}
      this.pending = []; // tokens whose text has not arrived yet (half a character)
      this.text = "";
      this.count = 0;
      this.el = document.createElement("article");
      this.el.className = "pane" + (eft ? " eft" : "");
      this.el.dataset.recipe = recipe;
      const head = document.createElement("h3");
      head.textContent = title;
      const sub = document.createElement("div");
      sub.className = "muted formula";
      sub.textContent = subtitle;
      this.out = document.createElement("div");
      this.out.className = "out";
      this.foot = document.createElement("footer");
      this.foot.className = "usage muted";
      this.foot.textContent = "waiting…";
      this.el.append(head, sub, this.out, this.foot);
      parent.append(this.el);
    }

    async run(extra = {}) {
      const controller = new AbortController();
      state.controllers.add(controller);
      this.t0 = performance.now();
      this.el.classList.add("running");
      try {
        await stream(routeOf(this.settings), requestBody(this.settings, this.recipe, extra), (e) => this.event(e), controller.signal);
        this.done();
      } catch (e) {
        const message = e.name === "AbortError" ? "stopped" : e.message;
        this.foot.textContent = message;
        this.foot.classList.add("error");
        if (e.name !== "AbortError") showError(message);
      } finally {
        state.controllers.delete(controller);
        this.el.classList.remove("running");
      }
    }

    event(e) {
      if (e.usage) this.usage = e.usage;
      for (const choice of e.choices || []) {
        const text = choice.text ?? (choice.delta && choice.delta.content) ?? "";
        this.pending.push(...tokensOf(choice.logprobs));
        if (text) this.emit(text);
      }
      if (this.tFirst === undefined && this.count) this.tFirst = performance.now();
      this.live();
    }

    emit(text) {
      const tokens = this.pending;
      this.pending = [];
      this.count += tokens.length;
      // One span per token when the tokens spell the text; else (a character split across
      // tokens) one span for them all.
      const parts = tokens.length > 1 && tokens.map((t) => t.text).join("") === text ? tokens.map((t) => [t.text, [t]]) : [[text, tokens]];
      for (const [piece, toks] of parts) {
        const span = document.createElement("span");
        span.className = "tok";
        span.textContent = piece;
        span.dataset.index = String(this.spans.length);
        const info = { text: piece, tokens: toks, offset: this.text.length, pane: this };
        this.spans.push(info);
        this.text += piece;
        if (this.eft) colour(span, delta(info, this.base));
        span.paneInfo = info;
        this.out.append(span);
      }
    }

    live() {
      const secs = (performance.now() - (this.tFirst ?? this.t0)) / 1000;
      const rate = this.count > 1 && secs > 0 ? ` · ${((this.count - 1) / secs).toFixed(1)} tok/s` : "";
      this.foot.textContent = `${this.count} tokens${rate}`;
    }

    done() {
      const u = this.usage || {};
      const st = (u.eft && u.eft.choices && u.eft.choices[0]) || null;
      const now = performance.now();
      const clientTtft = this.tFirst !== undefined ? this.tFirst - this.t0 : NaN;
      const clientRate = this.count > 1 ? ((this.count - 1) * 1000) / (now - this.tFirst) : 0;
      const parts = [
        `TTFT ${Math.round(st ? st.time_to_first_token_ms : clientTtft)} ms`,
        `${(st ? st.tokens_per_s : clientRate).toFixed(1)} tok/s`,
        `${u.completion_tokens ?? this.count} tokens`,
      ];
      if (st && st.speculative_blocks > 0) {
        const rate = st.drafted_tokens ? (100 * st.accepted_tokens) / st.drafted_tokens : 0;
        parts.push(`accepted ${st.accepted_tokens}/${st.drafted_tokens} drafted (${rate.toFixed(0)}%, ${(st.accepted_tokens / st.speculative_blocks).toFixed(1)}/block)`);
      } else {
        parts.push(this.eft && this.settings.speculative ? "accepted — (no blocks)" : "not speculative");
      }
      this.foot.textContent = parts.join(" · ");
      this.foot.title = `server-side figures; in this browser: TTFT ${Math.round(clientTtft)} ms, ${clientRate.toFixed(1)} tok/s`;
      this.el.classList.add("finished");
    }
  }

  // ---- running -------------------------------------------------------------------------------

  function busy(on) {
    $("run").disabled = on;
    $("sweep").disabled = on;
    $("stop").disabled = !on;
  }

  async function ensureConnected() {
    if (Object.keys(state.models).length) return true;
    return connect();
  }

  async function run() {
    hideTip(true);
    clearErrors();
    if (!(await ensureConnected())) return;
    const s = settings();
    const columns = $("columns");
    columns.replaceChildren();
    const panes = [new Pane(columns, `${s.recipe} (up-scaled)`, formula(s.recipe), s.recipe, s, isUpscaled(s.recipe))];
    for (const role of isUpscaled(s.recipe) ? roles(s.recipe) : []) {
      const single = singleRecipe(role);
      if (single) panes.push(new Pane(columns, `${single} alone`, card(single).description || role, single, s, false));
      else {
        const missing = document.createElement("article");
        missing.className = "pane missing muted";
        missing.textContent = `${role}: this server has no single-model recipe for it`;
        columns.append(missing);
      }
    }
    busy(true);
    $("continue").disabled = true;
    try { await Promise.all(panes.map((p) => p.run())); } finally { busy(false); }
    state.lastChat = s.mode === "chat" ? s : null;
    $("continue").disabled = !(state.lastChat && panes[0].el.classList.contains("finished"));
  }

  async function sweep() {
    hideTip(true);
    clearErrors();
    if (!(await ensureConnected())) return;
    const s = settings();
    $("sweep-area").hidden = false;
    $("sweep-recipe").textContent = `${s.recipe}, greedy`;
    const rows = $("sweep-rows");
    rows.replaceChildren();
    const panes = SWEEP_BETAS.map((b) => new Pane(rows, `β = ${b}`, "", s.recipe, { ...s, beta: b, temperature: 0 }, isUpscaled(s.recipe)));
    busy(true);
    // One at a time: a key's concurrent-stream limit (often 4) stays free for the columns.
    try { for (const p of panes) await p.run(); } finally { busy(false); }
  }

  function stop() { for (const c of state.controllers) c.abort(); }

  // ---- the token inspector (hover; click pins) ---------------------------------------------

  function showTip(span) {
    const info = span.paneInfo;
    if (!info) return;
    const pane = info.pane;
    const tip = $("tip");
    state.shown = info;
    tip.replaceChildren();
    tip.append(el("div", `“${visible(info.text)}”`, "tip-token"));
    const t = info.tokens[0];
    if (t) {
      tip.append(el("div", `${pane.eft ? "merged" : pane.recipe}: log p = ${fmt(t.lp)}`));
      if (t.models) {
        const s = structure(pane.recipe);
        for (const role of roles(pane.recipe)) tip.append(el("div", `${role}: ${fmt(t.models[role])}`, "muted"));
        const d = delta(info, pane.base);
        if (Number.isFinite(d)) {
          tip.append(el("div", `Δ vs ${pane.base} alone: ${d >= 0 ? "+" : ""}${d.toFixed(2)} nats (×${Math.exp(d).toFixed(2)})`, "tip-delta"));
        }
        const beta = typeof pane.settings.beta === "number" ? pane.settings.beta : 1;
        const term = s.experts.reduce((acc, e) => {
          const w = beta * (typeof pane.settings.weights[e] === "number" ? pane.settings.weights[e] : s.default_weights[e] ?? 1);
          return acc + w * (t.models[e] - t.models[s.reference]);
        }, 0);
        if (s.experts.every((e) => known(t.models[e])) && known(t.models[s.reference])) {
          tip.append(el("div", `expert term β·Σw(log p_expert − log p_${s.reference}) = ${term.toFixed(2)}`, "muted"));
        }
      }
    }
    const grid = el("div", undefined, "alts-grid");
    if (t) grid.append(table(pane.eft ? "merged (EFT)" : "top alternatives", t.top, t.text));
    if (pane.eft) perModel(info, grid);
    tip.append(grid);
    place(tip, span);
  }

  // Each model's own top alternatives at this token's position, as the response gave them
  // (`model_top_logprobs`: each pool's own numbers at the prefix that model saw, chat included).
  function perModel(info, box) {
    const t = info.tokens[0];
    const byRole = (t && t.modelTop) || {};
    for (const role of roles(info.pane.recipe)) {
      if (byRole[role]) box.append(table(`${role} alone`, byRole[role], info.text));
      else box.append(el("div", `${role}: no alternatives in the response`, "muted"));
    }
  }

  function place(tip, span) {
    tip.hidden = false;
    const r = span.getBoundingClientRect();
    const w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = `${Math.max(4, Math.min(r.left, window.innerWidth - w - 8))}px`;
    tip.style.top = `${r.bottom + h + 8 < window.innerHeight ? r.bottom + 4 : Math.max(4, r.top - h - 4)}px`;
  }

  function hideTip(force) {
    if (state.pinned && !force) return;
    if (force && state.pinned) { state.pinned.classList.remove("pinned"); state.pinned = null; }
    $("tip").hidden = true;
    state.shown = null;
  }

  // ---- wiring --------------------------------------------------------------------------------

  function wire() {
    $("connect").addEventListener("click", connect);
    $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") connect(); });
    $("recipe").addEventListener("change", renderWeights);
    $("beta-range").addEventListener("input", () => { $("beta").value = $("beta-range").value; });
    $("beta").addEventListener("input", () => { const b = typed("beta"); if (typeof b === "number") $("beta-range").value = String(b); });
    $("merge").addEventListener("change", () => { $("top-k").disabled = $("merge").value === "exact"; });
    $("mode").addEventListener("change", () => {
      const chat = $("mode").value === "chat";
      for (const e of [$("system"), ...document.querySelectorAll(".chat-only")]) e.hidden = !chat;
    });
    $("add-turn").addEventListener("click", () => addTurn(turns().length % 2 ? "assistant" : "user", ""));
    $("continue").addEventListener("click", continueChat);
    $("run").addEventListener("click", run);
    $("sweep").addEventListener("click", sweep);
    $("stop").addEventListener("click", stop);
    $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); } });
    for (const area of [$("columns"), $("sweep-rows")]) {
      area.addEventListener("mouseover", (e) => { const s = e.target.closest(".tok"); if (s && !state.pinned) showTip(s); });
      area.addEventListener("mouseout", (e) => { if (e.target.closest(".tok")) hideTip(false); });
      area.addEventListener("click", (e) => {
        const s = e.target.closest(".tok");
        if (!s) return;
        if (state.pinned) state.pinned.classList.remove("pinned");
        if (state.pinned === s) { state.pinned = null; hideTip(true); return; }
        state.pinned = s;
        s.classList.add("pinned");
        showTip(s);
      });
    }
    document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTip(true); });
    connect();
  }

  wire();
})();
