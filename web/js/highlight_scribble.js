// Drawing widget of the HighlightScribbleGuide node: one canvas on the node where the user scribbles one stroke
// per phrase of the prompt. The strokes live as JSON in the node's `highlights` STRING widget (hidden here, so it
// is saved in the workflow and queued with the prompt like any widget value); this file only edits that text.
//
// Kept in sync with noisequery_core/guidance/strokes.py, which parses the same JSON:
//   {"version": 1, "strokes": [{"phrase": "a cat", "width": 0.06, "points": [[x, y], ...], "color": "#e6194b"}]}
// x, y are fractions of the image width / height (x right, y down), `width` a fraction of the image's shorter
// side, at least 2 points per stroke (a click gives a 2-point dot); `color` is for this widget only.
import { app } from "../../../scripts/app.js";

const NODE = "HighlightScribbleGuide";
const WIDGET = "noisequery_highlight_canvas";
const EMPTY = JSON.stringify({ version: 1, strokes: [] });
// Distinct colours (Trubetskoy's list), handed to phrases in prompt order.
const PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
  "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000",
  "#ffd8b1", "#000075", "#808080"];
const CUSTOM = "\u0000custom"; // <option> value of "type a phrase…"; cannot clash with a prompt phrase
const MIN_STEP_PX = 3; // pointer moves shorter than this (canvas CSS pixels) add no point: light decimation
const TOOLBAR_HEIGHT = 62; // the two control rows and the legend
const CANVAS_MIN_HEIGHT = 180;

// Words that join two objects inside one comma-separated part ("a red ball on a lawn"): each side is offered too.
const JOINERS = /\s+(?:in front of|next to|of|on|in|with|at|under|over|behind|beside|near)\s+/i;

/** Phrases a prompt offers: its parts between commas, periods, semicolons, new lines and " and ", each followed
 * by its sides around a preposition ("a photo of a cat" also gives "a photo" and "a cat"). */
function promptPhrases(prompt) {
  const seen = new Set();
  const out = [];
  const add = (text) => {
    const p = text.trim().replace(/\s+/g, " ");
    if (p && !seen.has(p)) { seen.add(p); out.push(p); }
  };
  for (const part of String(prompt ?? "").split(/[,.;\n]+|\s+and\s+/i)) {
    add(part);
    const sides = part.split(JOINERS);
    if (sides.length > 1) sides.forEach(add);
  }
  return out;
}

/** Whether `phrase` occurs word for word in `prompt` (case and punctuation ignored, as the CLIP tokenizer does). */
function inPrompt(phrase, prompt) {
  const words = (t) => ` ${String(t).toLowerCase().replace(/[^\p{L}\p{N}]+/gu, " ").trim()} `;
  return words(phrase).trim() !== "" && words(prompt).includes(words(phrase));
}

const round4 = (v) => Math.round(Math.min(1, Math.max(0, v)) * 10000) / 10000;

/** Parse the highlights text into a list of strokes; throws with a readable message when it is not ours. */
function parseStrokes(text) {
  if (text == null || String(text).trim() === "") return [];
  const data = JSON.parse(text);
  if (!data || typeof data !== "object" || !Array.isArray(data.strokes)) {
    throw new Error('expected {"version": 1, "strokes": [...]}');
  }
  return data.strokes.filter((s) => s && Array.isArray(s.points)).map((s) => ({
    phrase: String(s.phrase ?? ""),
    width: Number(s.width) || 0.06,
    points: s.points.filter((p) => Array.isArray(p) && p.length >= 2).map((p) => [Number(p[0]), Number(p[1])]),
    ...(s.color ? { color: String(s.color) } : {}),
  }));
}

// `hidden` hides a widget on the classic canvas, `options.hidden` in the Nodes 2.0 (Vue) renderer.
function setHidden(widget, hidden) {
  widget.hidden = hidden;
  widget.options ??= {};
  widget.options.hidden = hidden;
}

/** Tell ComfyUI the workflow changed, as its own widgets do after an edit: the tab gets its "modified" dot and the
 * workflow kept for a page reload is updated. The frontend's change tracker offers captureCanvasState (1.5x) or
 * checkState (older); without one, only the canvas is redrawn. */
function markChanged(node) {
  node.setDirtyCanvas?.(true, true);
  node.graph?.change?.();
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker
    ?? app.workflowManager?.activeWorkflow?.changeTracker;
  if (typeof tracker?.captureCanvasState === "function") tracker.captureCanvasState();
  else tracker?.checkState?.();
}

/** Whether the node's `highlights` input is fed by a link (then the drawing is not used). */
function highlightsLinked(node) {
  const slot = node.inputs?.findIndex((i) => i.widget?.name === "highlights" || i.name === "highlights") ?? -1;
  if (slot < 0) return false;
  if (typeof node.isInputConnected === "function") return node.isInputConnected(slot);
  return node.inputs[slot].link != null; // frontends before isInputConnected
}

function el(tag, props = {}, style = {}) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  Object.assign(e.style, style);
  return e;
}

class HighlightEditor {
  constructor(node) {
    this.node = node;
    this.strokes = [];
    this.current = null; // the stroke being drawn
    this.lastText = null; // highlights text last parsed or written
    this.lastPrompt = null;
    this.aspect = 1;
    this.background = null; // HTMLImageElement from the last run's `background` input
    this.hover = null; // [x, y] normalised, for the brush outline
    this.error = "";
    this.build();
  }

  widget(name) { return this.node.widgets?.find((w) => w.name === name); }

  build() {
    const button = (text, cls, title) => el("button", { textContent: text, className: cls, title },
      { padding: "1px 6px", fontSize: "11px", cursor: "pointer" });
    this.root = el("div", { className: "nq-highlight" }, {
      display: "flex", flexDirection: "column", gap: "3px", width: "100%", height: "100%",
      minHeight: `${TOOLBAR_HEIGHT + CANVAS_MIN_HEIGHT}px`, // the Nodes 2.0 renderer sizes DOM widgets by their content
      boxSizing: "border-box", fontSize: "11px", color: "var(--input-text, #ddd)", overflow: "hidden",
    });
    this.root.dataset.nodeId = String(this.node.id);

    const row1 = el("div", {}, { display: "flex", gap: "4px", alignItems: "center", flexWrap: "wrap" });
    this.phraseSelect = el("select", { className: "nq-hl-phrase", title: "Phrase of the prompt the next stroke highlights" },
      { maxWidth: "45%", fontSize: "11px" });
    this.customInput = el("input", { className: "nq-hl-custom", type: "text", placeholder: "phrase as written in the prompt",
      title: "A phrase of your own; it must appear in the prompt when the workflow runs" },
    { display: "none", width: "40%", fontSize: "11px" });
    this.undoButton = button("Undo", "nq-hl-undo", "Remove the last stroke");
    this.clearButton = button("Clear", "nq-hl-clear", "Remove all strokes");
    this.jsonButton = button("{ }", "nq-hl-json", "Show or hide the strokes as JSON text (editable)");
    row1.append(this.phraseSelect, this.customInput, this.undoButton, this.clearButton, this.jsonButton);

    const row2 = el("div", {}, { display: "flex", gap: "4px", alignItems: "center" });
    this.widthInput = el("input", { className: "nq-hl-width", type: "range", min: "0.01", max: "0.3", step: "0.005",
      value: "0.06", title: "Width of the next stroke, as a fraction of the image's shorter side" }, { flex: "1", minWidth: "40px" });
    this.widthLabel = el("span", { className: "nq-hl-width-label" }, { minWidth: "74px" });
    this.status = el("span", { className: "nq-hl-status" }, { opacity: "0.8", whiteSpace: "nowrap", overflow: "hidden" });
    row2.append(el("span", { textContent: "width" }), this.widthInput, this.widthLabel, this.status);

    this.legend = el("div", { className: "nq-hl-legend" }, {
      display: "flex", gap: "2px 8px", flexWrap: "wrap", minHeight: "14px", maxHeight: "30px", overflow: "hidden",
    });

    this.stage = el("div", { className: "nq-hl-stage" }, {
      flex: "1", minHeight: `${CANVAS_MIN_HEIGHT - 20}px`, position: "relative", display: "flex", alignItems: "center", justifyContent: "center",
    });
    this.canvas = el("canvas", { className: "nq-hl-canvas" }, {
      touchAction: "none", cursor: "crosshair", background: "#222", outline: "1px solid #555",
    });
    this.stage.append(this.canvas);
    // What the node reported on its last run (ui.text: each phrase's tokens, centre and area).
    this.info = el("div", { className: "nq-hl-info" }, {
      opacity: "0.75", whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis", display: "none",
    });
    // The strokes as JSON text, editable; shown by the { } button. Our own box rather than the hidden `highlights`
    // widget, which the Nodes 2.0 renderer of some frontends never shows again once hidden.
    this.jsonBox = el("textarea", { className: "nq-hl-json-box", spellcheck: false,
      title: "The strokes as JSON (edit and click outside to apply)" },
    { display: "none", width: "100%", height: "90px", minHeight: "90px", boxSizing: "border-box", resize: "none",
      fontSize: "10px", fontFamily: "monospace" });
    this.root.append(row1, row2, this.legend, this.info, this.jsonBox, this.stage);

    // Pointer events stay here: in the Nodes 2.0 renderer the node element above would take a drawing gesture for
    // a drag of the node (tested); on the classic canvas nothing above reacts today, and this keeps it that way.
    for (const type of ["pointerdown", "pointermove", "pointerup", "pointercancel", "pointerleave", "wheel",
      "contextmenu", "dblclick", "mousedown", "mouseup", "click"]) {
      this.canvas.addEventListener(type, (e) => e.stopPropagation());
    }
    // Typing a phrase must not trigger ComfyUI's keyboard shortcuts.
    this.customInput.addEventListener("keydown", (e) => e.stopPropagation());
    this.jsonBox.addEventListener("keydown", (e) => e.stopPropagation());
    this.jsonBox.addEventListener("change", () => this.applyJson());
    this.canvas.addEventListener("pointerdown", (e) => this.onDown(e));
    this.canvas.addEventListener("pointermove", (e) => this.onMove(e));
    this.canvas.addEventListener("pointerup", (e) => this.onUp(e));
    this.canvas.addEventListener("pointercancel", (e) => this.onUp(e));
    this.canvas.addEventListener("pointerleave", () => { this.hover = null; this.draw(); });
    this.undoButton.addEventListener("click", () => this.undo());
    this.clearButton.addEventListener("click", () => this.clear());
    this.jsonButton.addEventListener("click", () => this.toggleJson());
    this.phraseSelect.addEventListener("change", () => this.onPhraseChosen());
    this.customInput.addEventListener("input", () => this.refreshLegend());
    this.widthInput.addEventListener("input", () => { this.updateWidthLabel(); this.draw(); });
    this.updateWidthLabel();
    new ResizeObserver(() => this.layout()).observe(this.stage);
  }

  // ---- state <-> the highlights widget ----

  /** Re-read the highlights text when it changed outside this editor (workflow load, JSON box, undo). */
  syncFromWidget() {
    const w = this.widget("highlights");
    if (!w) return;
    const text = w.value ?? "";
    if (text === this.lastText) return;
    this.lastText = text;
    try {
      this.strokes = parseStrokes(text);
      this.error = "";
    } catch (err) {
      this.strokes = [];
      this.error = `highlights JSON unreadable (${err.message}); drawing replaces it`;
    }
    this.refreshPhrases(true);
    this.draw();
  }

  save() {
    const w = this.widget("highlights");
    const text = this.strokes.length ? JSON.stringify({ version: 1, strokes: this.strokes }) : EMPTY;
    this.lastText = text;
    this.error = "";
    if (w && w.value !== text) {
      w.value = text;
      w.callback?.(text);
    }
    if (this.jsonBox.style.display !== "none") this.jsonBox.value = text;
    markChanged(this.node); // a stroke, Undo or Clear is a workflow change like any widget edit
    this.refreshLegend();
  }

  undo() {
    if (!this.strokes.length) return;
    this.strokes.pop();
    this.save();
    this.draw();
  }

  clear() {
    if (!this.strokes.length) return;
    this.strokes = [];
    this.save();
    this.draw();
  }

  toggleJson() {
    const show = this.jsonBox.style.display === "none";
    this.jsonBox.style.display = show ? "" : "none";
    if (show) this.jsonBox.value = this.widget("highlights")?.value ?? EMPTY;
    this.jsonButton.style.fontWeight = show ? "bold" : "";
    this.layout();
    this.node.setDirtyCanvas?.(true, true);
  }

  /** Take the JSON box's text as the drawing (edited by hand); unreadable text is reported, not applied. */
  applyJson() {
    const text = this.jsonBox.value;
    try {
      this.strokes = parseStrokes(text);
    } catch (err) {
      this.error = `JSON box: ${err.message}; not applied`;
      this.refreshLegend();
      return;
    }
    this.save();
    this.refreshPhrases(true);
    this.draw();
  }

  // ---- phrases and colours ----

  phrase() {
    return this.phraseSelect.value === CUSTOM ? this.customInput.value.trim().replace(/\s+/g, " ")
      : this.phraseSelect.value;
  }

  /** phrase -> colour: colours already stored on strokes first, then the palette in prompt order. */
  colours() {
    const map = new Map();
    for (const s of this.strokes) if (s.color && !map.has(s.phrase)) map.set(s.phrase, s.color);
    const used = new Set(map.values());
    const names = [...promptPhrases(this.widget("prompt")?.value), ...this.strokes.map((s) => s.phrase)];
    const custom = this.phrase();
    if (custom) names.push(custom);
    for (const [i, p] of names.entries()) {
      if (map.has(p)) continue;
      let c = PALETTE[i % PALETTE.length];
      if (used.has(c)) c = PALETTE.find((x) => !used.has(x)) ?? c;
      map.set(p, c);
      used.add(c);
    }
    return map;
  }

  /** Refill the phrase list from the prompt (plus phrases strokes already use); keeps the current choice. */
  refreshPhrases(force = false) {
    const prompt = this.widget("prompt")?.value ?? "";
    if (!force && prompt === this.lastPrompt) return;
    this.lastPrompt = prompt;
    const chosen = this.phraseSelect.value;
    const fromPrompt = promptPhrases(prompt);
    const extra = [...new Set(this.strokes.map((s) => s.phrase))].filter((p) => !fromPrompt.includes(p));
    this.phraseSelect.replaceChildren();
    for (const p of fromPrompt) this.phraseSelect.append(el("option", { value: p, textContent: p }));
    for (const p of extra) {
      this.phraseSelect.append(el("option", { value: p, textContent: inPrompt(p, prompt) ? p : `${p} (not in prompt)` }));
    }
    this.phraseSelect.append(el("option", { value: CUSTOM, textContent: "type a phrase\u2026" }));
    const values = [...this.phraseSelect.options].map((o) => o.value);
    this.phraseSelect.value = values.includes(chosen) ? chosen : values[0];
    this.onPhraseChosen();
  }

  onPhraseChosen() {
    const custom = this.phraseSelect.value === CUSTOM;
    this.customInput.style.display = custom ? "" : "none";
    if (custom) this.customInput.focus?.();
    this.refreshLegend();
  }

  refreshLegend() {
    const colours = this.colours();
    const counts = new Map();
    for (const s of this.strokes) counts.set(s.phrase, (counts.get(s.phrase) ?? 0) + 1);
    const current = this.phrase();
    // the phrases drawn so far, and the one the next stroke gets
    const names = [...counts.keys()];
    if (current && !names.includes(current)) names.push(current);
    this.legend.replaceChildren();
    for (const p of names) {
      const item = el("span", { className: "nq-hl-legend-item", title: `Draw strokes for "${p}"` },
        { display: "inline-flex", alignItems: "center", gap: "3px", cursor: "pointer",
          fontWeight: p === current ? "bold" : "normal", opacity: counts.has(p) || p === current ? "1" : "0.6" });
      item.dataset.phrase = p;
      item.append(el("span", {}, { width: "10px", height: "10px", borderRadius: "2px", background: colours.get(p),
        display: "inline-block" }), el("span", { textContent: counts.has(p) ? `${p} (${counts.get(p)})` : p }));
      item.addEventListener("click", () => {
        if ([...this.phraseSelect.options].some((o) => o.value === p)) {
          this.phraseSelect.value = p;
        } else {
          this.phraseSelect.value = CUSTOM;
          this.customInput.value = p;
        }
        this.onPhraseChosen();
      });
      this.legend.append(item);
    }
    const linked = highlightsLinked(this.node);
    const note = this.error || (linked ? "highlights come from a link: this drawing is not used" : "");
    this.status.textContent = note || `${this.strokes.length} stroke${this.strokes.length === 1 ? "" : "s"}`;
    this.status.title = this.status.textContent;
    this.status.style.color = note ? "#f66" : "";
    this.linked = linked;
    this.undoButton.disabled = !this.strokes.length;
    this.clearButton.disabled = !this.strokes.length;
  }

  updateWidthLabel() {
    const [w, h] = this.imageSize();
    this.widthLabel.textContent = `${Number(this.widthInput.value).toFixed(3)} (${Math.round(this.widthInput.value * Math.min(w, h))} px)`;
  }

  // ---- geometry ----

  imageSize() {
    const w = Number(this.widget("width")?.value) || 512;
    const h = Number(this.widget("height")?.value) || 512;
    return [Math.max(1, w), Math.max(1, h)];
  }

  /** Fit the canvas to the stage with the width/height inputs' aspect ratio (letterboxed), then redraw. */
  layout() {
    const [w, h] = this.imageSize();
    this.aspect = w / h;
    this.fitStageToWidth();
    const sw = this.stage.clientWidth, sh = this.stage.clientHeight;
    if (sw < 2 || sh < 2) return;
    let cw = sw - 2, ch = cw / this.aspect;
    if (ch > sh - 2) { ch = sh - 2; cw = ch * this.aspect; }
    cw = Math.max(1, Math.floor(cw)); ch = Math.max(1, Math.floor(ch));
    this.canvas.style.width = `${cw}px`;
    this.canvas.style.height = `${ch}px`;
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(cw * dpr) || this.canvas.height !== Math.round(ch * dpr)) {
      this.canvas.width = Math.round(cw * dpr);
      this.canvas.height = Math.round(ch * dpr);
    }
    this.updateWidthLabel();
    this.draw();
  }

  /** The Nodes 2.0 renderer gives a DOM widget the height of its content, not what is left of the node: there the
   * stage asks for the canvas's height at the full width (the width/height aspect), within bounds. On the classic
   * canvas the stage fills the node's height (flex), so nothing is asked. */
  fitStageToWidth() {
    const vue = !!this.root.parentElement?.closest("[data-node-id]");
    const base = `${CANVAS_MIN_HEIGHT - 20}px`;
    const want = vue && this.stage.clientWidth > 2
      ? `${Math.round(Math.min(720, Math.max(CANVAS_MIN_HEIGHT, (this.stage.clientWidth - 2) / this.aspect + 2)))}px` : base;
    if (this.stage.style.minHeight !== want) this.stage.style.minHeight = want;
  }

  /** Called on every frame ComfyUI draws the node: cheap checks for changes made elsewhere. */
  poll() {
    if (this.root.dataset.nodeId !== String(this.node.id)) this.root.dataset.nodeId = String(this.node.id);
    const linked = highlightsLinked(this.node);
    if (linked !== this.linked) this.refreshLegend();
    this.syncFromWidget();
    this.refreshPhrases();
    const [w, h] = this.imageSize();
    if (Math.abs(w / h - this.aspect) > 1e-9) this.layout();
  }

  toNormalised(e) {
    const r = this.canvas.getBoundingClientRect();
    return [round4((e.clientX - r.left) / r.width), round4((e.clientY - r.top) / r.height)];
  }

  // ---- drawing ----

  onDown(e) {
    if (e.button !== 0 || this.current) return; // one stroke at a time (a second finger is ignored)
    const phrase = this.phrase();
    if (!phrase) {
      this.error = "type a phrase first";
      this.refreshLegend();
      return;
    }
    this.canvas.setPointerCapture?.(e.pointerId);
    const p = this.toNormalised(e);
    this.current = { phrase, width: Number(this.widthInput.value), points: [p], color: this.colours().get(phrase) };
    this.pointerId = e.pointerId;
    this.lastPx = [e.clientX, e.clientY];
    this.draw();
  }

  onMove(e) {
    const p = this.toNormalised(e);
    this.hover = p;
    if (!this.current) { this.draw(); return; }
    if (e.pointerId !== this.pointerId) return;
    const scale = this.canvas.getBoundingClientRect().width / (this.canvas.offsetWidth || 1); // ComfyUI zoom
    if (Math.hypot(e.clientX - this.lastPx[0], e.clientY - this.lastPx[1]) < MIN_STEP_PX * scale) return;
    this.lastPx = [e.clientX, e.clientY];
    this.current.points.push(p);
    this.draw();
  }

  onUp(e) {
    if (!this.current || e.pointerId !== this.pointerId) return;
    const s = this.current;
    this.current = null;
    this.canvas.releasePointerCapture?.(e.pointerId);
    const p = this.toNormalised(e);
    const last = s.points[s.points.length - 1];
    if (s.points.length < 2 || p[0] !== last[0] || p[1] !== last[1]) s.points.push(p); // a click is a 2-point dot
    this.strokes.push(s);
    this.save();
    this.draw();
  }

  drawStroke(ctx, s, colour, alpha) {
    const { width: cw, height: ch } = this.canvas;
    ctx.save();
    ctx.globalAlpha = alpha;
    ctx.strokeStyle = colour;
    ctx.lineWidth = Math.max(1, s.width * Math.min(cw, ch));
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    s.points.forEach(([x, y], i) => (i ? ctx.lineTo(x * cw, y * ch) : ctx.moveTo(x * cw, y * ch)));
    if (s.points.length === 1) ctx.lineTo(s.points[0][0] * cw, s.points[0][1] * ch);
    ctx.stroke();
    ctx.restore();
  }

  draw() {
    const ctx = this.canvas.getContext("2d");
    const { width: cw, height: ch } = this.canvas;
    ctx.clearRect(0, 0, cw, ch);
    if (this.background?.complete && this.background.naturalWidth) {
      ctx.drawImage(this.background, 0, 0, cw, ch); // the image spans [0, 1] x [0, 1], as the strokes do
    } else {
      ctx.fillStyle = "#262626";
      ctx.fillRect(0, 0, cw, ch);
      ctx.strokeStyle = "#333";
      ctx.lineWidth = 1;
      for (let i = 1; i < 8; i++) { // a light grid so positions read without a background
        ctx.beginPath(); ctx.moveTo((i * cw) / 8, 0); ctx.lineTo((i * cw) / 8, ch); ctx.stroke();
        ctx.beginPath(); ctx.moveTo(0, (i * ch) / 8); ctx.lineTo(cw, (i * ch) / 8); ctx.stroke();
      }
    }
    const colours = this.colours();
    for (const s of this.strokes) this.drawStroke(ctx, s, colours.get(s.phrase) ?? PALETTE[0], 0.6);
    if (this.current) this.drawStroke(ctx, this.current, this.current.color ?? PALETTE[0], 0.6);
    if (this.hover && !this.current) { // brush outline under the pointer
      ctx.save();
      ctx.strokeStyle = colours.get(this.phrase()) ?? "#fff";
      ctx.lineWidth = 1;
      ctx.beginPath();
      ctx.arc(this.hover[0] * cw, this.hover[1] * ch, (Number(this.widthInput.value) * Math.min(cw, ch)) / 2, 0, 2 * Math.PI);
      ctx.stroke();
      ctx.restore();
    }
  }

  setInfo(text) {
    this.info.textContent = text.replace(/\n/g, " \u00b7 ");
    this.info.title = text;
    this.info.style.display = text ? "" : "none";
  }

  setBackground(url) {
    if (!url) return;
    const img = new Image();
    img.onload = () => this.draw();
    img.src = url;
    this.background = img;
  }
}

function attach(node) {
  if (node.nqHighlight) return node.nqHighlight;
  const editor = new HighlightEditor(node);
  node.nqHighlight = editor;
  const text = node.widgets?.find((w) => w.name === "highlights");
  if (text) setHidden(text, true); // the canvas replaces the raw text box; the { } button shows it again
  // serialize: false keeps the canvas out of widgets_values and the API prompt: the highlights widget holds the
  // data. Added last, so the other widgets keep their widgets_values positions.
  const widget = node.addDOMWidget(WIDGET, "noisequery_highlight", editor.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => TOOLBAR_HEIGHT + CANVAS_MIN_HEIGHT,
    getValue: () => undefined,
    setValue: () => {},
    onDraw: () => editor.poll(),
  });
  widget.serialize = false;
  // React to edits at once; the canvas renderer also polls on every frame (onDraw), but the Nodes 2.0 renderer
  // draws no frames for DOM nodes, so a slow timer covers changes no callback reports (links, undo, API).
  for (const name of ["prompt", "highlights", "width", "height"]) {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function () {
      const result = callback?.apply(this, arguments);
      editor.poll();
      return result;
    };
  }
  let added = false;
  const timer = setInterval(() => {
    const live = !!node.graph || editor.root.isConnected;
    if (!live && added) { clearInterval(timer); return; } // the node was removed
    added ||= live;
    if (live) editor.poll();
  }, 500);
  editor.syncFromWidget();
  editor.refreshPhrases(true);
  return editor;
}

app.registerExtension({
  name: "NoiseQuery.HighlightScribble",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    nodeType.prototype.nqOwnReport = true; // its run summary is shown in the widget (noisequery_report.js skips it)

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      attach(this);
      const need = this.computeSize();
      this.setSize([Math.max(this.size[0], 400), Math.max(this.size[1], need[1] + 120)]);
      return result;
    };

    // Widget values are in place once configure has run: show the saved strokes.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const editor = attach(this);
      editor.syncFromWidget();
      editor.refreshPhrases(true);
      editor.layout();
      return result;
    };

    // After a run with a `background` IMAGE the node sends {highlight_background: [data URL]}: draw it under the strokes.
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const editor = attach(this);
      const url = message?.highlight_background?.[0];
      if (url) editor.setBackground(url);
      if (message?.text) editor.setInfo(message.text.join("\n"));
      return result;
    };

    const onResize = nodeType.prototype.onResize;
    nodeType.prototype.onResize = function () {
      const result = onResize?.apply(this, arguments);
      this.nqHighlight?.layout();
      return result;
    };
  },
});
