// Variation explorer in the UI: the Variant Picker shows the rendered variants as clickable images; a click
// writes the history that pick leads to (computed by the server, ui key "noisequery_choices") into the
// Variation Explorer's `history` widget and sets its `pick` to -1, so the next Run continues from that variant.
// After a run, the explorer's own history (ui key "noisequery_history") is written back into its widget, which
// is how a `pick` typed into the node is consumed. Kept in sync with nodes/exploration_variation_nodes.py (UI_* keys, widget
// names). No JSON is built here: the server computes every history, so replays stay bit for bit.
// The explorer's `history` text box is hidden behind a one-line summary (start seed, picks); its { } button shows
// the JSON (editable). The grid and the summary come back from the frontend's stored outputs after a tab switch.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { whenOutputRestored } from "./noisequery_report.js";

const EXPLORER = "NoiseQueryVariations";
const PICKER = "NoiseQueryVariantPicker";
const GRID = "noisequery_variants";

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function setWidget(node, name, value) {
  const w = widget(node, name);
  if (!w || w.value === value) return false;
  w.value = value;
  w.callback?.(value);
  node.nqHistoryView?.refresh();
  return true;
}

/** Tell ComfyUI the workflow changed (tab "modified" dot, the copy kept for a reload), as its widgets do. */
function markChanged(node) {
  node?.setDirtyCanvas?.(true, true);
  const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker
    ?? app.workflowManager?.activeWorkflow?.changeTracker;
  if (typeof tracker?.captureCanvasState === "function") tracker.captureCanvasState();
  else tracker?.checkState?.();
}

// `hidden` hides a widget on the classic canvas, `options.hidden` in the Nodes 2.0 (Vue) renderer.
function setHidden(w, hidden) {
  w.hidden = hidden;
  w.options ??= {};
  w.options.hidden = hidden;
}

/** One line saying where the walk stands, from the history JSON (never trusted: anything odd is said so). */
export function historySummary(text) {
  if (text == null || String(text).trim() === "") return "No picks yet: the walk starts at `seed`.";
  let doc;
  try {
    doc = JSON.parse(text);
  } catch {
    return "History is not readable JSON: Run reports the problem; { } shows the text.";
  }
  const picks = Array.isArray(doc?.picks) ? doc.picks : null;
  if (!picks || !Number.isFinite(Number(doc?.start_seed))) return "History has no start_seed/picks: { } shows the text.";
  if (!picks.length) return `Walk from seed ${doc.start_seed}: no picks yet.`;
  const shown = picks.slice(-6).map((p) => `#${Number(p?.index)}`).join(" \u2192 ");
  const last = picks[picks.length - 1] ?? {};
  const moves = picks.some((p) => Number(p?.cond_strength) > 0) ? ", prompt moves" : "";
  return `Walk from seed ${doc.start_seed}: ${picks.length} pick${picks.length === 1 ? "" : "s"} `
    + `(${picks.length > 6 ? "\u2026 " : ""}${shown}), last strength ${Number(last.strength)}${moves}.`;
}

/** The summary line (and the JSON behind it) that stands in for the explorer's `history` text box. */
function attachHistoryView(node) {
  if (node.nqHistoryView) return node.nqHistoryView;
  const hist = widget(node, "history");
  if (!hist || !node.addDOMWidget) return null;
  setHidden(hist, true);
  const root = document.createElement("div");
  root.className = "nq-history";
  Object.assign(root.style, { display: "flex", flexDirection: "column", gap: "3px", width: "100%",
    boxSizing: "border-box", fontSize: "11px" });
  const row = document.createElement("div");
  Object.assign(row.style, { display: "flex", gap: "4px", alignItems: "center" });
  const line = document.createElement("span");
  line.className = "nq-history-summary";
  Object.assign(line.style, { flex: "1", overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap",
    opacity: "0.85" });
  const button = document.createElement("button");
  button.className = "nq-history-json";
  button.textContent = "{ }";
  button.title = "Show or hide the history as JSON (editable; clear it to start a new walk)";
  Object.assign(button.style, { padding: "1px 6px", fontSize: "11px", cursor: "pointer" });
  const box = document.createElement("textarea");
  box.className = "nq-history-box";
  box.spellcheck = false;
  box.title = "The walk so far as JSON (edit and click outside to apply; empty = start over)";
  Object.assign(box.style, { display: "none", width: "100%", height: "80px", boxSizing: "border-box",
    resize: "none", fontSize: "10px", fontFamily: "monospace" });
  row.append(line, button);
  root.append(row, box);
  box.addEventListener("keydown", (e) => e.stopPropagation());
  const view = {
    refresh() {
      const text = String(hist.value ?? "");
      line.textContent = historySummary(text);
      line.title = text || "(empty history)";
      if (box.style.display !== "none" && document.activeElement !== box) box.value = text;
    },
  };
  button.addEventListener("click", () => {
    const show = box.style.display === "none";
    box.style.display = show ? "" : "none";
    button.style.fontWeight = show ? "bold" : "";
    if (show) box.value = String(hist.value ?? "");
    const size = node.computeSize?.();
    if (size && size[1] > node.size[1]) node.setSize([node.size[0], size[1]]);
    node.setDirtyCanvas?.(true, true);
  });
  box.addEventListener("change", () => {
    hist.value = box.value;
    hist.callback?.(box.value);
    view.refresh();
    markChanged(node);
  });
  const w = node.addDOMWidget("noisequery_history_view", "noisequery_history_view", root, {
    serialize: false, hideOnZoom: false,
    getMinHeight: () => (box.style.display === "none" ? 26 : 112),
    getMaxHeight: () => (box.style.display === "none" ? 26 : 112),
    getValue: () => undefined, setValue: () => {},
  });
  w.serialize = false;
  // the history changes by a run, a click in the picker, an edit or an undo: the line follows (cheap)
  const callback = hist.callback;
  hist.callback = function () {
    const result = callback?.apply(this, arguments);
    view.refresh();
    return result;
  };
  const timer = setInterval(() => {
    if (!node.graph && !root.isConnected) { clearInterval(timer); return; }
    view.refresh();
  }, 1000);
  node.nqHistoryView = view;
  view.refresh();
  return view;
}

// The node connected to `inputName` (the Variation Explorer feeding a picker), or null.
function upstream(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0) return null;
  if (node.getInputNode) return node.getInputNode(slot);
  const linkId = node.inputs[slot].link; // frontends before getInputNode
  const link = linkId == null ? null : (app.graph.getLink?.(linkId) ?? app.graph.links?.[linkId]);
  return link ? app.graph.getNodeById(link.origin_id) : null;
}

function imageUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder ?? "", type: img.type ?? "temp" });
  return api.apiURL(`/view?${q}`);
}

/** The picker's grid widget, made at the node's creation so that the layout already holds it (a run fills it). */
function gridWidget(node) {
  let w = widget(node, GRID);
  if (!w) {
    const el = document.createElement("div");
    Object.assign(el.style, { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%",
      minHeight: "216px", boxSizing: "border-box" });
    const status = document.createElement("div");
    Object.assign(status.style, { fontSize: "11px", opacity: "0.85" });
    const grid = document.createElement("div");
    Object.assign(grid.style, { display: "grid", gap: "4px", gridTemplateColumns: "repeat(auto-fill, minmax(96px, 1fr))",
      overflowY: "auto", flex: "1" });
    el.append(status, grid);
    // serialize: false keeps the previews out of the workflow and the API prompt: they are output, not input
    w = node.addDOMWidget(GRID, "noisequery_variants", el, { serialize: false, getMinHeight: () => 220,
      getValue: () => undefined, setValue: () => {} });
    w.serialize = false;
    w.nqStatus = status;
    w.nqGrid = grid;
    status.textContent = "Run the workflow: the variants appear here; click one to continue the walk from it.";
    const size = node.computeSize?.();
    if (size) node.setSize([Math.max(node.size[0], size[0], 360), Math.max(node.size[1], size[1])]);
  }
  return w;
}

function showVariants(node, images, choices) {
  const w = gridWidget(node);
  if (w.nqShown === JSON.stringify([images, choices])) return; // the same round again (restored after a tab switch)
  w.nqShown = JSON.stringify([images, choices]);
  w.nqGrid.replaceChildren();
  w.nqStatus.textContent = "Click a variant to continue the walk from it, then Run.";
  images.forEach((img, j) => {
    const el = document.createElement("img");
    el.src = imageUrl(img);
    el.title = `variant #${j}`;
    el.dataset.variant = String(j);
    Object.assign(el.style, { width: "100%", cursor: "pointer", border: "3px solid transparent", borderRadius: "4px" });
    el.addEventListener("click", () => {
      const explorer = upstream(node, "exploration");
      if (!explorer || explorer.type !== EXPLORER || !widget(explorer, "history")) {
        w.nqStatus.textContent = "Cannot pick: connect this picker's `exploration` to a Variation Explorer whose " +
          "`history` is a widget (not an input link).";
        return;
      }
      setWidget(explorer, "history", choices[j]);
      setWidget(explorer, "pick", -1);
      markChanged(explorer); // a pick is a workflow change like any widget edit
      for (const other of w.nqGrid.children) other.style.borderColor = "transparent";
      el.style.borderColor = "#4a9eff";
      w.nqStatus.textContent = `Picked variant #${j}: press Run for the next round around it.`;
      app.graph.setDirtyCanvas(true, true);
    });
    w.nqGrid.append(el);
  });
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "NoiseQuery.Explore",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === EXPLORER) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        attachHistoryView(this);
        return result;
      };
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        attachHistoryView(this)?.refresh();
        return result;
      };
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = onExecuted?.apply(this, arguments);
        const history = message?.noisequery_history?.[0];
        // the run's history is a workflow change too: without it a tab switch restores the walk one pick short
        if (typeof history === "string") {
          const changed = [setWidget(this, "history", history), setWidget(this, "pick", -1)];
          if (changed.some(Boolean)) markChanged(this);
        }
        return result;
      };
    } else if (nodeData.name === PICKER) {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const result = onNodeCreated?.apply(this, arguments);
        gridWidget(this); // wide enough for its title and a row of variants in either renderer
        return result;
      };
      // After a load or a tab switch: the last round's grid, from the frontend's stored outputs.
      const onConfigure = nodeType.prototype.onConfigure;
      nodeType.prototype.onConfigure = function () {
        const result = onConfigure?.apply(this, arguments);
        whenOutputRestored(this, (out) => {
          const images = out?.noisequery_variants ?? [];
          const choices = out?.noisequery_choices ?? [];
          if (images.length && images.length === choices.length) showVariants(this, images, choices);
        });
        return result;
      };
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = onExecuted?.apply(this, arguments);
        const images = message?.noisequery_variants ?? [];
        const choices = message?.noisequery_choices ?? [];
        if (images.length && images.length === choices.length) showVariants(this, images, choices);
        return result;
      };
    }
  },
});
