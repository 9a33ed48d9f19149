// phitune portal: the API key in this tab's session storage, sent as a header on every request
// (htmx's and our own); live job events over a streamed fetch (EventSource cannot send headers);
// charts with uPlot. User text only ever goes in as textContent.
"use strict";
(function () {
  const KEY = "phitune.key";
  const page = document.body.dataset.page;
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const key = () => sessionStorage.getItem(KEY) || "";
  const authHeaders = () => (key() ? { Authorization: "Bearer " + key() } : {});

  function toSignin() {
    if (page !== "signin") location.href = "/signin?next=" + encodeURIComponent(location.pathname + location.search);
  }
  async function api(path, options = {}) {
    const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (response.status === 401) toSignin();
    return response;
  }
  async function errorOf(response) {
    try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
  }
  function say(text, isError) {
    const box = $("#notice");
    box.replaceChildren();
    const p = document.createElement("p");
    p.className = isError ? "error" : "ok";
    p.textContent = text;
    box.append(p);
  }

  // --- htmx: the key on every request; an API error shown, never swallowed -------------------
  document.addEventListener("htmx:configRequest", (e) => Object.assign(e.detail.headers, authHeaders()));
  document.addEventListener("htmx:responseError", async (e) => {
    const xhr = e.detail.xhr;
    if (xhr.status === 401) return toSignin();
    let text = xhr.status + " " + xhr.statusText;
    try { text = JSON.parse(xhr.responseText).error.message; } catch (err) { /* not the API's JSON */ }
    say(text, true);
  });
  document.addEventListener("htmx:sendError", () => say("The server cannot be reached; retrying.", true));
  document.addEventListener("htmx:afterSwap", (e) => {
    const target = e.detail.target;
    if (target.tagName === "SELECT") {
      const wanted = target.dataset.want;
      if (wanted && $$("option", target).some((o) => o.value === wanted)) target.value = wanted;
      target.dispatchEvent(new Event("options-loaded", { bubbles: true }));
    }
    if (target.id === "compare-table") compareCurves();
  });

  // --- sign in / out ---------------------------------------------------------------------------
  async function checkSignedIn() {
    if (page === "signin") return;
    const response = await api("/v1/models");
    if (!response.ok) return;
    $("#who").textContent = key() ? "signed in with a key" : "open server (no keys): organization local";
    $("#signout").hidden = !key();
  }
  // Where to go after signing in: a path of this server, never another origin. The browser's own
  // URL parser decides (`/\\host`, `/\thost` and `//host` all resolve elsewhere), not a prefix test.
  function sameOrigin(next) {
    try {
      const url = new URL(next || "/", location.origin);
      return url.origin === location.origin ? url.pathname + url.search + url.hash : "/";
    } catch (e) {
      return "/";
    }
  }
  function setupSignin() {
    const form = $("#signin-form");
    if (!form) return;
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const candidate = $("#api-key").value.trim();
      const response = await fetch("/v1/models", { headers: { Authorization: "Bearer " + candidate } });
      if (!response.ok) {
        $("#error-key").textContent = await errorOf(response);
        return;
      }
      sessionStorage.setItem(KEY, candidate);
      location.href = sameOrigin(new URLSearchParams(location.search).get("next"));
    });
  }
  $("#signout")?.addEventListener("click", () => { sessionStorage.removeItem(KEY); location.href = "/signin"; });

  // --- uploads and downloads -------------------------------------------------------------------
  function setupUploads() {
    $$("input[data-upload-for]").forEach((input) => input.addEventListener("change", async () => {
      const field = input.dataset.uploadFor;
      const error = $("#error-" + field);
      const select = $("#" + field);
      if (!input.files.length) return;
      const form = new FormData();
      form.append("purpose", "fine-tune");
      form.append("file", input.files[0]);
      error.textContent = "";
      const response = await api("/v1/files", { method: "POST", body: form });
      input.value = "";
      if (!response.ok) { error.textContent = await errorOf(response); return; }
      const file = await response.json();
      select.dataset.want = file.id;
      const optional = field === "validation_file" ? "&optional=true" : "";
      htmx.ajax("GET", "/portal/options/files?selected=" + encodeURIComponent(file.id) + optional, { target: select, swap: "innerHTML" });
    }));
  }
  document.addEventListener("click", async (e) => {
    const button = e.target.closest("[data-download], [data-download-url]");
    if (!button) return;
    // A result file by id, or an API path (a GGUF export: built on the first request, which can take a while).
    const path = button.dataset.downloadUrl || "/v1/files/" + encodeURIComponent(button.dataset.download) + "/content";
    if (button.dataset.downloadUrl) say("preparing " + button.dataset.filename + "…", false);
    const response = await api(path);
    if (!response.ok) return say(await errorOf(response), true);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = button.dataset.filename || button.dataset.download;
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
  });

  // --- server-sent events over fetch -----------------------------------------------------------
  async function readEvents(response, onMessage) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const message = { event: "message", data: "", id: null };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") message.data += (message.data ? "\n" : "") + value;
          else if (field === "event") message.event = value;
          else if (field === "id") message.id = value;
        }
        if (message.data) onMessage(message);
      }
    }
  }

  // --- charts ------------------------------------------------------------------------------------
  const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#1098ad"];
  function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
  function makePlot(el, series, data, { log, xLabel, markers }) {
    el.replaceChildren();
    const axis = { stroke: css("--fg"), grid: { stroke: css("--line") }, ticks: { stroke: css("--line") } };
    const options = {
      width: Math.max(el.clientWidth, 280),
      height: 320,
      scales: { x: { time: false }, y: { distr: log ? 3 : 1 } },
      axes: [{ ...axis, label: xLabel }, { ...axis }],
      series: [{ label: xLabel }, ...series.map((label, i) => ({
        label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true, points: { show: data[0].length < 60 },
      }))],
      hooks: { draw: [(u) => drawMarkers(u, markers ? markers() : [])] },
    };
    return new uPlot(options, data, el);
  }
  function drawMarkers(u, xs) {
    const ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = css("--muted");
    ctx.setLineDash([4, 4]);
    for (const x of xs) {
      const px = u.valToPos(x, "x", true);
      if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) continue;
      ctx.beginPath();
      ctx.moveTo(px, u.bbox.top);
      ctx.lineTo(px, u.bbox.top + u.bbox.height);
      ctx.stroke();
    }
    ctx.restore();
  }
  const positive = (v) => (v == null || !(v > 0) ? null : v);

  // --- job detail: history and live updates from one stream --------------------------------------
  function setupJob() {
    const el = $("#chart");
    if (!el) return;
    const jobId = el.dataset.job;
    const points = [];
    let lastId = null, plot = null, ended = false, shownKey = "";
    const x = (p) => ($("#axis").value === "epoch" ? p.epoch : p.step);
    const checkpointSteps = () => $$("#checkpoints tr[data-step]").map((tr) => Number(tr.dataset.step));
    function markers() {
      const steps = checkpointSteps();
      if ($("#axis").value === "step") return steps;
      return steps.map((s) => points.find((p) => p.step === s)).filter(Boolean).map((p) => p.epoch);
    }
    function offerMetrics() {
      // Every metric the run reports (loss, token accuracy, DPO's reward margin, ...), train and valid on one chart
      const select = $("#metric");
      const known = new Set($$("option", select).map((o) => o.value));
      for (const p of points.slice(-1)) {
        for (const name of Object.keys(p)) {
          const m = /^(?:train|valid)_(.+)$/.exec(name);
          if (!m || known.has(m[1]) || p[name] == null) continue;
          known.add(m[1]);
          const option = document.createElement("option");
          option.value = m[1];
          option.textContent = m[1].replace(/_/g, " ");
          select.append(option);
        }
      }
    }
    function draw() {
      offerMetrics();
      const metric = $("#metric").value;
      const log = $("#logscale").checked;
      const rows = points.filter((p) => x(p) != null);
      const series = ["training " + metric.replace(/_/g, " "), "validation " + metric.replace(/_/g, " ")];
      const pick = (p, which) => { const v = p[which + "_" + metric]; return log ? positive(v) : v ?? null; };
      const data = [rows.map(x), rows.map((p) => pick(p, "train")), rows.map((p) => pick(p, "valid"))];
      $("#points").textContent = String(points.length);
      const key = [metric, log, $("#axis").value].join("|");
      if (plot && key === shownKey) plot.setData(data);
      else { plot?.destroy(); plot = makePlot(el, series, data, { log, xLabel: $("#axis").value, markers }); shownKey = key; }
    }
    let pending = false;
    const redraw = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); } };
    ["#metric", "#axis", "#logscale"].forEach((s) => $(s).addEventListener("change", () => { shownKey = ""; draw(); }));
    window.addEventListener("resize", () => plot && plot.setSize({ width: Math.max(el.clientWidth, 280), height: 320 }));
    document.addEventListener("htmx:afterSwap", (e) => { if (e.detail.target.id === "checkpoints" && plot) plot.redraw(); });

    function logEvent(ev) {
      const li = document.createElement("li");
      li.className = ev.level === "error" ? "error" : "";
      li.dataset.event = ev.id;
      const time = document.createElement("time");
      time.textContent = new Date(ev.created_at * 1000).toISOString().replace("T", " ").slice(0, 19);
      li.append(time, document.createTextNode(ev.message));
      $("#events").prepend(li);
    }
    async function connect() {
      $("#chart-status").textContent = lastId ? "reconnecting…" : "loading history…";
      try {
        const headers = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await api("/v1/fine_tuning/jobs/" + encodeURIComponent(jobId) + "/events/stream", { headers });
        if (!response.ok) { $("#chart-status").textContent = await errorOf(response); return; }
        $("#chart-status").textContent = "live";
        await readEvents(response, (m) => {
          const data = JSON.parse(m.data);
          if (m.id) { lastId = m.id; logEvent(data); }
          if (m.event === "metrics" && data.data) { points.push(data.data); redraw(); }
          if (m.event === "end") { ended = true; $("#chart-status").textContent = "finished: " + data.status; }
        });
      } catch (err) { /* the connection dropped: reconnect below, from the last event seen */ }
      if (!ended) setTimeout(connect, 2000);
    }
    draw();
    connect();
  }

  // --- compare runs --------------------------------------------------------------------------------
  const runs = {};
  async function history(jobId) {
    if (!runs[jobId]) {
      const response = await api("/v1/fine_tuning/jobs/" + encodeURIComponent(jobId) + "/events?limit=10000");
      const body = response.ok ? await response.json() : { data: [] };
      runs[jobId] = body.data.filter((e) => e.type === "metrics" && e.data).map((e) => e.data).reverse();
    }
    return runs[jobId];
  }
  async function compareCurves() {
    const table = $("#compare-table table");
    const el = $("#compare-chart");
    if (!el) return;
    const ids = table ? table.dataset.jobs.split(",") : [];
    const metric = $("#compare-metric").value;
    const axis = $("#compare-axis").value;
    const log = $("#compare-logscale").checked;
    const tables = [];
    for (const id of ids) {
      const rows = (await history(id)).filter((p) => p[axis] != null && p[metric] != null);
      tables.push([rows.map((p) => p[axis]), rows.map((p) => (log ? positive(p[metric]) : p[metric]))]);
    }
    if (!tables.length) { el.replaceChildren(); return; }
    const data = uPlot.join(tables);
    makePlot(el, ids, data, { log, xLabel: axis });
    table?.classList.toggle("differences-only", $("#differences-only").checked);
  }
  function setupCompare() {
    if (page !== "compare") return;
    ["#compare-metric", "#compare-axis", "#compare-logscale"].forEach((s) => $(s).addEventListener("change", compareCurves));
    $("#differences-only").addEventListener("change", (e) =>
      $("#compare-table table")?.classList.toggle("differences-only", e.target.checked));
  }

  // --- playground: the same prompt to several models, streamed -------------------------------------
  function setupPlayground() {
    const form = $("#playground-form");
    if (!form) return;
    const wanted = new URLSearchParams(location.search).getAll("models");
    $$(".model-pick").forEach((select, i) => { if (wanted[i]) select.dataset.want = wanted[i]; });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      $("#error-playground").textContent = "";
      const messages = [];
      if ($("#system").value.trim()) messages.push({ role: "system", content: $("#system").value });
      messages.push({ role: "user", content: $("#prompt").value });
      $$(".model-pick").forEach((select, i) => {
        const box = $(`.answer[data-index="${i}"]`);
        box.hidden = !select.value;
        if (select.value) ask(select.value, messages, box);
      });
    });
  }
  async function ask(model, messages, box) {
    $(".answer-model", box).textContent = model;
    const text = $(".answer-text", box), stats = $(".answer-stats", box);
    text.textContent = "";
    stats.textContent = "waiting…";
    const body = {
      model, messages, stream: true, stream_options: { include_usage: true },
      temperature: Number($("#temperature").value), max_tokens: Number($("#max_tokens").value),
    };
    const started = performance.now();
    let first = null, usage = null;
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (!response.ok) {
      const message = await errorOf(response);
      stats.textContent = "";
      text.textContent = message;
      text.classList.add("error");
      $("#error-playground").textContent = model + ": " + message;
      return;
    }
    text.classList.remove("error");
    await readEvents(response, (m) => {
      if (m.data === "[DONE]") return;
      const chunk = JSON.parse(m.data);
      if (chunk.usage) usage = chunk.usage;
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) { first = first ?? performance.now(); text.textContent += piece; }
    });
    const total = (performance.now() - started) / 1000;
    const parts = [`first token ${first ? ((first - started) / 1000).toFixed(2) : "-"} s`, `total ${total.toFixed(2)} s`];
    if (usage) parts.push(`${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens`,
      `${(usage.completion_tokens / total).toFixed(1)} tokens/s`);
    stats.textContent = parts.join(" · ");
    box.dataset.done = "true";
  }

  checkSignedIn();
  setupSignin();
  setupUploads();
  setupJob();
  setupCompare();
  setupPlayground();
})();
