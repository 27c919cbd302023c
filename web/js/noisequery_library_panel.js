// Noise Libraries sidebar tab: browse a seed library in the page and take a seed into the workflow.
// Talks only to the pack's routes (nodes/server_routes.py → noisequery_core/search/service.py: request fields,
// limits and error messages are defined there): GET /noisequery/libraries, POST /noisequery/query (pages of 48),
// GET /noisequery/thumbnail?library=…&seed=…, POST /noisequery/example (an uploaded "like this image" example:
// its bytes → a handle the query names as like_image; the server may forget it, then it is uploaded again). A click on a hit writes its seed into the selected node's seed
// widget (control_after_generate → fixed); dragging a hit onto a node does the same for that node; "use this
// query" writes the query into Noise Query nodes (widget names of nodes/search_nodes.py) with rank_offset = the
// hit's rank, so the choice is saved with the workflow and reproduces headless.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const TAB_ID = "noisequery-libraries";
const PAGE = 48;
const DEBOUNCE_MS = 250;
const DRAG_TYPE = "application/x-noisequery-hit";
// Seed widgets the panel writes, in order of preference: KSampler(Advanced) seed / noise_seed, RandomNoise
// noise_seed, the pack's seed inputs (Variation Explorer seed, Seed Slerp seed_a).
const SEED_WIDGETS = ["seed", "noise_seed", "seed_a", "seed_b"];
// The statistics the Noise Query (Colour) node has inputs for (its stats_weight is shared, as here).
const NODE_STATS = ["brightness", "contrast", "saturation", "colorfulness", "sharpness"];
const PANEL_PROP = "noisequery_panel_query";
// = search/service.py EXAMPLE_FORMATS / EXAMPLE_BYTES_MAX (the server refuses anything else with a message)
const EXAMPLE_TYPES = ["image/png", "image/jpeg", "image/webp"];
const EXAMPLE_BYTES_MAX = 8 * 1024 * 1024; // marks the query nodes "use this query" made, to update them later

const state = {
  libraries: [], stats: [], regions: [], library: null, hits: [], hasMore: false, offset: 0,
  seq: 0, controller: null, timer: null, like: null, example: null, root: null, els: {},
};

// ------------------------------------------------------------------ small helpers

function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v !== undefined && v !== null) el[k] = v;
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

function currentLibrary() {
  return state.libraries.find((l) => l.name === state.library) ?? null;
}

function setStatus(text, isError = false) {
  const s = state.els.status;
  if (!s) return;
  s.textContent = text;
  s.style.color = isError ? "var(--error-text, #ff6b6b)" : "";
  s.dataset.error = isError ? "1" : "";
}

function thumbUrl(seed) {
  const lib = currentLibrary();
  const q = new URLSearchParams({ library: state.library, seed: String(seed), v: lib?.version ?? "" });
  return api.apiURL(`/noisequery/thumbnail?${q}`);
}

// ------------------------------------------------------------------ the query the panel shows

function readQuery() {
  const e = state.els;
  const q = { library: state.library, limit: PAGE };
  const lib = currentLibrary();
  if (lib?.text) {
    if (e.text.value.trim()) { q.text = e.text.value; q.text_weight = Number(e.textWeight.value); }
    if (e.negative.value.trim()) { q.negative_text = e.negative.value; q.negative_weight = Number(e.negWeight.value); }
  }
  if (lib?.color) {
    const colors = e.colors.map((c) => ({ color: c.hex.value.trim(), weight: Number(c.weight.value) }))
      .filter((c) => c.color);
    if (colors.length) q.colors = colors;
    const stats = [];
    for (const [name, input] of Object.entries(e.stats)) {
      const t = input.value.trim();
      if (!t) continue;
      const weight = Number(e.statsWeight.value);
      if (t.includes(":")) {
        const [lo, hi] = t.split(":", 2).map((s) => s.trim());
        stats.push({ name, lo: lo === "" ? null : Number(lo), hi: hi === "" ? null : Number(hi), weight });
      } else stats.push({ name, target: Number(t), weight });
    }
    if (stats.length) q.stats = stats;
    if (e.region.value !== "none" && (e.regionUseColor.checked || e.regionLight.value.trim())) {
      q.regions = [{ region: e.region.value, color: e.regionUseColor.checked ? e.regionColor.value : null,
        lightness: e.regionLight.value.trim() ? Number(e.regionLight.value) : null, weight: Number(e.regionWeight.value) }];
    }
  }
  if (state.like) q.like = { seed: state.like, weight: 1.0 };
  else if (state.example) q.like_image = { id: state.example.id, weight: Number(e.exampleWeight.value) };
  return q;
}

function isEmptyQuery(q) {
  return !(q.text || q.negative_text || q.colors || q.stats || q.regions || q.like || q.like_image);
}

// ------------------------------------------------------------------ searching

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(() => search(0), DEBOUNCE_MS);
}

async function search(offset) {
  if (!state.library) return;
  const q = readQuery();
  if (isEmptyQuery(q)) {
    state.controller?.abort();
    state.hits = []; state.hasMore = false; renderHits(true);
    setStatus("Type a text, pick a colour or set a statistic to search.");
    return;
  }
  q.offset = offset;
  // a newer request makes the older one stale: abort it, and ignore its answer if it still arrives
  if (offset === 0) state.controller?.abort();
  const controller = new AbortController();
  state.controller = controller;
  const seq = ++state.seq;
  state.loading = true;
  if (offset === 0) setStatus("searching…");
  try {
    const r = await api.fetchApi("/noisequery/query", { method: "POST", body: JSON.stringify(q),
      headers: { "Content-Type": "application/json" }, signal: controller.signal });
    const body = await r.json();
    if (seq !== state.seq) return;
    if (!r.ok && body.code === "example_gone" && state.example && !state.example.retried) {
      // the server forgot the upload (restart, or many uploads since): send the file again, once, and re-ask
      state.example.retried = true;
      if (await sendExample(state.example.file)) search(offset);
      return;
    }
    if (!r.ok) { setStatus(body.error ?? `HTTP ${r.status}`, true); if (offset === 0) { state.hits = []; renderHits(true); } return; }
    if (state.example) state.example.retried = false; // answered: a later expiry may upload it again
    // a deeper search of a large (ANN-indexed) library can reorder the margin: never show a seed twice
    const shown = new Set(offset === 0 ? [] : state.hits.map((x) => x.seed));
    const added = body.hits.filter((x) => !shown.has(x.seed));
    state.hits = offset === 0 ? added : state.hits.concat(added);
    state.hasMore = body.has_more;
    state.offset = offset + body.hits.length;
    state.lastQuery = q;
    renderHits(offset === 0, added);
    const byName = { clip: "CLIP", colour: "colour layout", palette: "palette" };
    const by = (body.example_by ?? []).map((b) => byName[b] ?? b).join(" + ");
    setStatus(`${state.hits.length}${state.hasMore ? "+" : ""} of ${body.count} entries · ${body.elapsed_ms} ms`
      + (by ? ` · example compared by ${by}` : ""));
  } catch (err) {
    if (err?.name !== "AbortError" && seq === state.seq) setStatus(`Search failed: ${err}`, true);
  } finally {
    if (seq === state.seq) state.loading = false;
  }
}

// ------------------------------------------------------------------ results

function breakdown(hit) {
  const lines = [`seed ${hit.seed} · rank ${hit.rank} · score ${hit.score.toFixed(3)}`];
  for (const [name, t] of Object.entries(hit.terms)) {
    lines.push(`${name}: ${t.raw.toFixed(3)} (z ${t.z >= 0 ? "+" : ""}${t.z.toFixed(2)}, ×w ${t.weighted.toFixed(2)})`);
  }
  lines.push("click: seed → selected node · drag onto a node");
  return lines.join("\n");
}

function tile(hit) {
  const img = h("img", { src: thumbUrl(hit.seed), alt: `seed ${hit.seed}`, draggable: true,
    style: { width: "100%", aspectRatio: "1", objectFit: "cover", display: "block", borderRadius: "4px",
      background: "#222", cursor: "pointer" } });
  const button = (label, title, fn) => h("button", { textContent: label, title, className: "nq-lib-act",
    onclick: (ev) => { ev.stopPropagation(); fn(hit); },
    style: { fontSize: "10px", padding: "0 4px", cursor: "pointer", background: "transparent",
      color: "inherit", border: "1px solid rgba(128,128,128,.5)", borderRadius: "3px" } });
  const el = h("div", { className: "nq-lib-hit", title: breakdown(hit), dataset: { seed: hit.seed, rank: hit.rank },
    style: { display: "flex", flexDirection: "column", gap: "2px", fontSize: "10px" } },
    img,
    h("div", { style: { display: "flex", justifyContent: "space-between", opacity: "0.85" } },
      h("span", { textContent: hit.seed }), h("span", { textContent: hit.score.toFixed(2) })),
    h("div", { style: { display: "flex", gap: "2px", flexWrap: "wrap" } },
      button("use query", "Write this query into a Noise Query node with this hit's rank (rank_offset), connected "
        + "to the selected node's seed: saved with the workflow, reproduces headless", useThisQuery),
      button("variations", "Send this seed to a Variation Explorer (its history starts over)", sendToVariations),
      button("more like", "Search for entries like this one", moreLikeThis)));
  el.addEventListener("click", () => seedIntoSelected(hit));
  img.addEventListener("dragstart", (ev) => {
    ev.dataTransfer.setData(DRAG_TYPE, JSON.stringify({ seed: hit.seed, rank: hit.rank }));
    ev.dataTransfer.setData("text/plain", String(hit.seed));
    ev.dataTransfer.effectAllowed = "copy";
  });
  return el;
}

function renderHits(reset, added = null) {
  const grid = state.els.grid;
  if (!grid) return;
  if (reset) grid.replaceChildren();
  for (const hit of added ?? (reset ? state.hits : [])) grid.append(tile(hit));
  state.els.sentinel.style.display = state.hasMore ? "block" : "none";
}

// ------------------------------------------------------------------ into the workflow

function seedWidgetOf(node) {
  for (const name of SEED_WIDGETS) {
    const w = node?.widgets?.find((x) => x.name === name);
    if (w) return w;
  }
  return null;
}

function setWidget(node, w, value) {
  w.value = value;
  w.callback?.(value, app.canvas, node);
}

function writeSeed(node, seed) {
  const w = seedWidgetOf(node);
  if (!w) return false;
  setWidget(node, w, Number(seed));
  // "control after generate" would change the seed after the next run: fix it
  const next = node.widgets[node.widgets.indexOf(w) + 1];
  const ctl = w.linkedWidgets?.find((c) => c.name === "control_after_generate")
    ?? (next?.name === "control_after_generate" ? next : null);
  if (ctl) setWidget(node, ctl, "fixed");
  node.setDirtyCanvas?.(true, true);
  app.graph.setDirtyCanvas?.(true, true);
  return true;
}

function selectedNodes() {
  // newer frontends keep the selection in selectedItems (nodes, groups, reroutes) and deprecate selected_nodes
  const items = app.canvas?.selectedItems;
  if (items) return [...items].filter((i) => i?.id != null && app.graph.getNodeById(i.id) === i);
  return Object.values(app.canvas?.selected_nodes ?? {});
}

function seedTarget() {
  return selectedNodes().find((n) => seedWidgetOf(n)) ?? null;
}

function seedIntoSelected(hit) {
  const node = seedTarget();
  if (!node) { setStatus("Select a KSampler (or another node with a seed) first, or drag the image onto it.", true); return; }
  writeSeed(node, hit.seed);
  setStatus(`seed ${hit.seed} → ${node.title ?? node.type} #${node.id} (control: fixed)`);
}

function nodeAtEvent(ev) {
  // Nodes 2.0 draws nodes as DOM elements over the canvas; the classic renderer only on the canvas
  const dom = ev.target?.closest?.("[data-node-id]");
  if (dom) {
    const n = app.graph.getNodeById(isNaN(+dom.dataset.nodeId) ? dom.dataset.nodeId : +dom.dataset.nodeId);
    if (n) return n;
  }
  const canvas = app.canvas?.canvas;
  if (!canvas) return null;
  const r = canvas.getBoundingClientRect();
  if (ev.clientX < r.left || ev.clientX > r.right || ev.clientY < r.top || ev.clientY > r.bottom) return null;
  const ds = app.canvas.ds;
  const x = (ev.clientX - r.left) / ds.scale - ds.offset[0];
  const y = (ev.clientY - r.top) / ds.scale - ds.offset[1];
  return app.graph.getNodeOnPos(x, y, app.graph._nodes) ?? null;
}

function installDrop() {
  if (state.dropInstalled) return;
  state.dropInstalled = true;
  // capture phase: ComfyUI's own drop handler (files → workflows) must not see a hit being dropped
  document.addEventListener("dragover", (ev) => {
    if (ev.dataTransfer?.types?.includes(DRAG_TYPE)) { ev.preventDefault(); ev.dataTransfer.dropEffect = "copy"; }
  }, true);
  document.addEventListener("drop", (ev) => {
    if (!ev.dataTransfer?.types?.includes(DRAG_TYPE)) return;
    ev.preventDefault();
    ev.stopPropagation();
    const { seed } = JSON.parse(ev.dataTransfer.getData(DRAG_TYPE));
    const node = nodeAtEvent(ev);
    if (node && writeSeed(node, seed)) setStatus(`seed ${seed} → ${node.title ?? node.type} #${node.id} (control: fixed)`);
    else setStatus(node ? `${node.title ?? node.type} has no seed input.` : "Drop the image onto a node with a seed.", true);
  }, true);
}

// The Noise Query nodes that reproduce the panel's query: [{type, widgets}], head first (its `also` takes the next).
function nodePlan(q, rank) {
  const problems = [];
  if (q.like) problems.push("'more like this'");
  if (q.like_image) problems.push("an uploaded example image (give it to the Noise Query (Colour) node's layout_image instead)");
  if (q.stats?.some((s) => s.target == null)) problems.push("statistic ranges (the node takes targets)");
  if (q.stats?.some((s) => !NODE_STATS.includes(s.name))) problems.push("statistics the node has no input for");
  if ((q.regions?.length ?? 0) > 1) problems.push("more than one region");
  if (problems.length) return { problems };
  const common = { library: q.library, top_k: 1, rank_offset: rank, diversity: 0, exclude_seeds: "" };
  const plan = [];
  if (q.text || q.negative_text) {
    plan.push({ type: "NoiseQueryText", widgets: { ...common, text: q.text ?? "", negative_text: q.negative_text ?? "",
      text_weight: q.text_weight ?? 1, negative_weight: q.negative_weight ?? 0.5 } });
  }
  const colors = q.colors ?? [];
  const hasColorPart = colors.length || q.stats || q.regions;
  for (let i = 0; i < Math.max(colors.length, hasColorPart ? 1 : 0); i++) {
    const w = { ...common, color: colors[i]?.color ?? "", color_weight: colors[i]?.weight ?? 1, stats_weight: 1,
      region: "none", region_color: "", region_lightness: -1, region_weight: 1, layout_weight: 1 };
    for (const s of NODE_STATS) w[s] = -1;
    if (i === 0) {
      for (const s of q.stats ?? []) { w[s.name] = s.target; w.stats_weight = s.weight; }
      const r = q.regions?.[0];
      if (r) Object.assign(w, { region: r.region, region_color: r.color ?? "", region_lightness: r.lightness ?? -1,
        region_weight: r.weight });
    }
    plan.push({ type: "NoiseQueryColor", widgets: w });
  }
  return { plan };
}

function inputSlot(node, name) {
  return node.inputs?.findIndex((i) => i.name === name || i.widget?.name === name) ?? -1;
}

function useThisQuery(hit) {
  const q = state.lastQuery;
  if (!q) return;
  const { plan, problems } = nodePlan(q, hit.rank);
  if (problems) {
    setStatus(`"use this query": no Noise Query node input holds ${problems.join(", ")}. Remove those parts, or click `
      + "the hit to use its seed.", true);
    return;
  }
  const target = seedTarget();
  const old = app.graph._nodes.filter((n) => n.properties?.[PANEL_PROP]);
  // new nodes go below everything, the head under the seed's node and the colour nodes to its left
  const others = app.graph._nodes.filter((n) => !old.includes(n));
  const bottom = others.length ? Math.max(...others.map((n) => n.pos[1] + n.size[1])) : 0;
  const anchor = old[0]?.pos ?? [target ? target.pos[0] : 40, bottom + 80];
  const made = plan.map((p, i) => {
    let n = old[i]?.type === p.type ? old[i] : null;
    if (!n) {
      n = LiteGraph.createNode(p.type);
      n.pos = [anchor[0] - i * 400, anchor[1]];
      app.graph.add(n);
    }
    n.properties = { ...(n.properties ?? {}), [PANEL_PROP]: true };
    for (const [name, value] of Object.entries(p.widgets)) {
      const w = n.widgets?.find((x) => x.name === name);
      if (w) setWidget(n, w, value);
    }
    return n;
  });
  for (const n of old) if (!made.includes(n)) app.graph.remove(n);
  for (let i = 0; i + 1 < made.length; i++) {
    const also = inputSlot(made[i], "also");
    const out = made[i + 1].outputs.findIndex((o) => o.name === "query");
    if (also >= 0 && out >= 0) made[i + 1].connect(out, made[i], also);
  }
  const head = made[0];
  let where = `${head.title ?? head.type} #${head.id}`;
  if (target) {
    const slot = inputSlot(target, seedWidgetOf(target).name);
    if (slot >= 0) { head.connect(0, target, slot); where += ` → ${target.title ?? target.type} #${target.id} seed`; }
    else writeSeed(target, hit.seed);
  }
  app.graph.setDirtyCanvas(true, true);
  setStatus(`query written (rank_offset ${hit.rank}, seed ${hit.seed}): ${where}`);
}

function sendToVariations(hit) {
  let node = selectedNodes().find((n) => n.type === "NoiseQueryVariations")
    ?? app.graph._nodes.find((n) => n.type === "NoiseQueryVariations");
  if (!node) {
    node = LiteGraph.createNode("NoiseQueryVariations");
    const ds = app.canvas.ds;
    node.pos = [-ds.offset[0] + 100, -ds.offset[1] + 100];
    app.graph.add(node);
  }
  // a new start seed with picks in the history is refused by the node: the walk starts over
  for (const [name, value] of [["history", ""], ["pick", -1]]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (w) setWidget(node, w, value);
  }
  writeSeed(node, hit.seed);
  setStatus(`seed ${hit.seed} → Variation Explorer #${node.id} (history cleared)`);
}

function moreLikeThis(hit) {
  state.like = hit.seed;
  clearExample();
  const e = state.els;
  e.text.value = ""; e.negative.value = "";
  for (const c of e.colors) c.hex.value = "";
  for (const i of Object.values(e.stats)) i.value = "";
  e.region.value = "none";
  renderLike();
  search(0);
}

// ------------------------------------------------------------------ the panel

function renderLike() {
  const e = state.els.like;
  e.replaceChildren();
  if (state.like) {
    e.append(h("span", { textContent: `like seed ${state.like} ` }),
      h("button", { textContent: "×", title: "Stop searching by this entry", onclick: () => { state.like = null; renderLike(); schedule(); } }));
  }
  const x = state.example;
  state.els.exampleBox.replaceChildren(...(x ? [
    h("img", { src: x.url, alt: "example image", className: "nq-lib-example-thumb", title: `${x.name} (${x.width}×${x.height})`,
      style: { width: "40px", height: "40px", objectFit: "cover", borderRadius: "3px" } }),
    h("span", { textContent: "like this image", style: { flex: "1" } }), state.els.exampleWeight,
    h("button", { textContent: "×", title: "Remove the example image", className: "nq-lib-example-remove",
      onclick: () => { clearExample(); renderLike(); schedule(); } }),
  ] : [state.els.exampleButton, h("span", { textContent: "or drop an image here", style: { opacity: "0.7" } })]));
}

// ------------------------------------------------------------------ "like this image": an uploaded example

function clearExample() {
  if (state.example) URL.revokeObjectURL(state.example.url);
  state.example = null;
}

// POST the file's bytes; on success it becomes the example (the server's handle + a local preview). True if sent.
async function sendExample(file) {
  if (!EXAMPLE_TYPES.includes(file.type)) {
    setStatus(`${file.name}: not a PNG, JPEG or WebP image (${file.type || "unknown type"}).`, true);
    return false;
  }
  if (file.size > EXAMPLE_BYTES_MAX) {
    setStatus(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB; example images may be at most 8 MB.`, true);
    return false;
  }
  try {
    const r = await api.fetchApi("/noisequery/example", { method: "POST", body: file, headers: { "Content-Type": file.type } });
    const body = await r.json();
    if (!r.ok) { setStatus(`${file.name}: ${body.error ?? `HTTP ${r.status}`}`, true); return false; }
    const retried = state.example?.file === file && state.example.retried;
    clearExample();
    state.example = { id: body.id, file, name: file.name, width: body.width, height: body.height, retried,
      url: URL.createObjectURL(file) };
    return true;
  } catch (err) {
    setStatus(`Uploading ${file.name} failed: ${err}`, true);
    return false;
  }
}

async function useExampleFile(file) {
  if (!file) return;
  setStatus(`uploading ${file.name}…`);
  if (!(await sendExample(file))) return;
  state.like = null; // one example at a time: a hit or an uploaded image
  renderLike();
  search(0);
}

function colorRow(hex = "#ff8800", weight = 1) {
  const row = {};
  row.picker = h("input", { type: "color", value: hex, title: "Pick a colour that should cover much of the image" });
  row.hex = h("input", { type: "text", value: hex, size: 8, className: "nq-lib-color", title: "Colour as #RRGGBB (empty: off)" });
  row.weight = h("input", { type: "number", value: weight, min: 0, max: 10, step: 0.1, style: { width: "4em" },
    title: "Weight of this colour (standard deviations)" });
  row.picker.addEventListener("input", () => { row.hex.value = row.picker.value; schedule(); });
  row.hex.addEventListener("input", () => { if (/^#[0-9a-fA-F]{6}$/.test(row.hex.value.trim())) row.picker.value = row.hex.value.trim(); schedule(); });
  row.weight.addEventListener("input", schedule);
  row.el = h("div", { style: { display: "flex", gap: "4px", alignItems: "center" } }, row.picker, row.hex, row.weight,
    h("button", { textContent: "×", title: "Remove this colour", onclick: () => {
      state.els.colors = state.els.colors.filter((r) => r !== row); row.el.remove(); schedule(); } }));
  return row;
}

function applyLibraryState() {
  const lib = currentLibrary();
  const e = state.els;
  e.info.textContent = lib ? (lib.status === "error" ? "cannot be opened"
    : `${lib.count} entries · ${lib.model} · ${lib.width ?? "?"}×${lib.height ?? "?"} · ${lib.clip ?? "colour-only"}`) : "";
  const notes = lib ? (lib.status === "error" ? [lib.message] : lib.notes) : ["No noise library yet: build one with "
    + "BuildNoiseLibrary (models/noise_libraries), then reopen this tab."];
  e.notes.replaceChildren(...notes.map((n) => h("div", { textContent: n })));
  const textOk = !!lib?.text && lib.count > 0, colorOk = !!lib?.color && lib.count > 0;
  for (const el of [e.text, e.negative, e.textWeight, e.negWeight]) {
    el.disabled = !textOk;
    el.title = textOk ? el.dataset.tip : (lib?.count ? "This library has no CLIP features: no text search." : "");
  }
  e.colorBox.style.opacity = colorOk ? "1" : "0.4";
  e.colorBox.inert = !colorOk;
}

async function loadLibraries() {
  try {
    const r = await api.fetchApi("/noisequery/libraries");
    const body = await r.json();
    if (!r.ok) { setStatus(body.error ?? `HTTP ${r.status}`, true); return; }
    state.libraries = body.libraries;
    const sel = state.els.library;
    sel.replaceChildren(...state.libraries.map((l) => h("option", { value: l.name,
      textContent: l.status === "error" ? `${l.name} (cannot be opened)` : `${l.name} (${l.count})` })));
    if (!state.libraries.some((l) => l.name === state.library)) state.library = state.libraries[0]?.name ?? null;
    sel.value = state.library ?? "";
    applyLibraryState();
  } catch (err) {
    setStatus(`Cannot list libraries: ${err}`, true);
  }
}

function build() {
  const e = state.els;
  const num = (value, tip, attrs = {}) => h("input", { type: "number", value, min: 0, max: 10, step: 0.1, title: tip,
    dataset: { tip }, style: { width: "4em" }, oninput: schedule, ...attrs });
  e.library = h("select", { className: "nq-lib-select", title: "The library to search (models/noise_libraries)",
    style: { flex: "1", minWidth: "0" },
    onchange: () => { state.library = e.library.value; state.like = null; renderLike(); applyLibraryState(); search(0); } });
  e.info = h("div", { className: "nq-lib-info", style: { fontSize: "11px", opacity: "0.8" } });
  e.notes = h("div", { className: "nq-lib-notes", style: { fontSize: "11px", color: "var(--p-yellow-400, #e0b040)" } });
  e.text = h("input", { type: "search", placeholder: "text, e.g. a sunset over the sea", className: "nq-lib-text",
    dataset: { tip: "What the image should lean towards (CLIP)" }, oninput: schedule, style: { flex: "1", minWidth: "0" } });
  e.negative = h("input", { type: "search", placeholder: "negative text", className: "nq-lib-negative",
    dataset: { tip: "What it should lean away from" }, oninput: schedule, style: { flex: "1", minWidth: "0" } });
  e.textWeight = num(1, "Weight of the text");
  e.negWeight = num(0.5, "Weight of the negative text");
  e.colors = [];
  e.colorRows = h("div", { style: { display: "flex", flexDirection: "column", gap: "2px" } });
  const addColor = h("button", { textContent: "+ colour", title: "Add a colour the image should hold",
    onclick: () => { const r = colorRow(); e.colors.push(r); e.colorRows.append(r.el); schedule(); } });
  e.stats = {};
  const statRows = NODE_STATS.map((name) => {
    const spec = state.stats.find((s) => s.name === name);
    e.stats[name] = h("input", { type: "text", size: 9, placeholder: "0.7 or 0.6:0.9", className: `nq-lib-stat-${name}`,
      title: `${name}: ${spec?.doc ?? ""}. A target (0.7) or a range (0.6:0.9, :0.3, 0.5:); empty: off`, oninput: schedule });
    return h("label", { style: { display: "flex", justifyContent: "space-between", gap: "4px" } },
      h("span", { textContent: name }), e.stats[name]);
  });
  e.statsWeight = num(1, "Weight of each statistic");
  e.region = h("select", { title: "A region that should have a colour and/or lightness", onchange: schedule },
    ...["none", ...state.regions].map((r) => h("option", { value: r, textContent: r })));
  e.regionUseColor = h("input", { type: "checkbox", title: "Use the region colour", onchange: schedule });
  e.regionColor = h("input", { type: "color", value: "#3366ff", title: "The region's colour", oninput: schedule });
  e.regionLight = h("input", { type: "text", size: 5, placeholder: "0..1", title: "The region's lightness, 0 (black) .. 1 (white); empty: off", oninput: schedule });
  e.regionWeight = num(1, "Weight of the region terms");
  e.like = h("div", { className: "nq-lib-like", style: { fontSize: "11px" } });
  const fileInput = h("input", { type: "file", accept: EXAMPLE_TYPES.join(","), className: "nq-lib-example-file",
    style: { display: "none" }, onchange: () => { useExampleFile(fileInput.files?.[0]); fileInput.value = ""; } });
  e.exampleButton = h("button", { textContent: "upload image", className: "nq-lib-example-upload",
    title: "Search for entries like an image of yours (PNG, JPEG or WebP, at most 8 MB): by CLIP where the library "
      + "has it, and by colour layout", onclick: () => fileInput.click() });
  e.exampleWeight = num(1, "Weight of the example image");
  e.exampleBox = h("div", { className: "nq-lib-example", title: "Drop an image here to search for entries like it",
    style: { display: "flex", gap: "4px", alignItems: "center", fontSize: "11px", padding: "2px",
      border: "1px dashed rgba(128,128,128,.5)", borderRadius: "4px" } });
  // a dropped file: handled here and stopped, so ComfyUI does not also open it as a workflow
  e.exampleBox.addEventListener("dragover", (ev) => {
    if (ev.dataTransfer?.types?.includes("Files")) { ev.preventDefault(); ev.stopPropagation(); ev.dataTransfer.dropEffect = "copy"; }
  });
  e.exampleBox.addEventListener("drop", (ev) => {
    if (!ev.dataTransfer?.files?.length) return;
    ev.preventDefault();
    ev.stopPropagation();
    useExampleFile(ev.dataTransfer.files[0]);
  });
  e.colorBox = h("div", { style: { display: "flex", flexDirection: "column", gap: "4px" } },
    e.colorRows, h("div", {}, addColor),
    h("details", {}, h("summary", { textContent: "statistics" }),
      h("div", { style: { display: "flex", flexDirection: "column", gap: "2px" } }, ...statRows,
        h("label", {}, "weight ", e.statsWeight))),
    h("details", {}, h("summary", { textContent: "region" }),
      h("div", { style: { display: "flex", flexWrap: "wrap", gap: "4px", alignItems: "center" } },
        e.region, e.regionUseColor, e.regionColor, "lightness", e.regionLight, "w", e.regionWeight)));
  e.status = h("div", { className: "nq-lib-status", style: { fontSize: "11px", minHeight: "1.2em", whiteSpace: "pre-wrap" } });
  e.grid = h("div", { className: "nq-lib-grid", style: { display: "grid", gap: "6px",
    gridTemplateColumns: "repeat(auto-fill, minmax(96px, 1fr))" } });
  e.sentinel = h("div", { className: "nq-lib-more", textContent: "loading more…", style: { fontSize: "11px", opacity: "0.7", display: "none" } });
  e.scroll = h("div", { style: { flex: "1", overflowY: "auto", minHeight: "0" } }, e.grid, e.sentinel);
  // infinite scroll: the sentinel under the grid coming into view loads the next page
  new IntersectionObserver((entries) => {
    if (entries.some((x) => x.isIntersecting) && state.hasMore && !state.loading) search(state.offset);
  }, { root: e.scroll, rootMargin: "200px" }).observe(e.sentinel);
  const row = (...c) => h("div", { style: { display: "flex", gap: "4px", alignItems: "center" } }, ...c);
  state.root = h("div", { className: "nq-library-panel", style: { display: "flex", flexDirection: "column", gap: "6px",
    padding: "8px", height: "100%", boxSizing: "border-box", fontSize: "12px" } },
    h("div", { textContent: "Noise Libraries", style: { fontWeight: "bold", fontSize: "14px" } }),
    row(e.library, h("button", { textContent: "⟳", title: "Reload the library list", onclick: loadLibraries })),
    e.info, e.notes,
    row(e.text, e.textWeight), row(e.negative, e.negWeight),
    e.exampleBox, fileInput, e.colorBox, e.like, e.status, e.scroll);
  renderLike();
  const first = colorRow("", 1);
  first.picker.value = "#ff8800";
  e.colors.push(first);
  e.colorRows.append(first.el);
}

async function mount(container) {
  if (!state.root) {
    try {
      const r = await api.fetchApi("/noisequery/libraries");
      const body = await r.json();
      state.stats = body.stats ?? [];
      state.regions = body.regions ?? [];
    } catch (err) {
      console.warn("NoiseQuery: library list unavailable", err);
    }
    build();
    installDrop();
  }
  container.replaceChildren(state.root);
  container.style.height = "100%";
  await loadLibraries();
}

app.registerExtension({
  name: "NoiseQuery.LibraryPanel",
  setup() {
    if (typeof app.extensionManager?.registerSidebarTab !== "function") {
      console.warn("NoiseQuery: this ComfyUI frontend has no sidebar tabs (extensionManager.registerSidebarTab)");
      return;
    }
    app.extensionManager.registerSidebarTab({
      id: TAB_ID,
      icon: "pi pi-th-large",
      title: "Noise Libraries",
      tooltip: "Noise Libraries: search a seed library and pick a seed",
      type: "custom",
      render: (el) => { mount(el); },
    });
  },
});
