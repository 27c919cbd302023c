// Variation explorer in the UI: the Variant Picker shows the rendered variants as clickable images; a click
// writes the history that pick leads to (computed by the server, ui key "noisequery_choices") into the
// Variation Explorer's `history` widget and sets its `pick` to -1, so the next Run continues from that variant.
// After a run, the explorer's own history (ui key "noisequery_history") is written back into its widget, which
// is how a `pick` typed into the node is consumed. Kept in sync with nodes/exploration_variation_nodes.py (UI_* keys, widget
// names). No JSON is built here: the server computes every history, so replays stay bit for bit.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

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
  return true;
}

// The node connected to `inputName` (the Variation Explorer feeding a picker), or null.
function upstream(node, inputName) {
  const slot = node.inputs?.findIndex((i) => i.name === inputName) ?? -1;
  if (slot < 0) return null;
  if (node.getInputNode) return node.getInputNode(slot);
  const linkId = node.inputs[slot].link;
  const link = linkId == null ? null : (app.graph.getLink?.(linkId) ?? app.graph.links?.[linkId]);
  return link ? app.graph.getNodeById(link.origin_id) : null;
}

function imageUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder ?? "", type: img.type ?? "temp" });
  return api.apiURL(`/view?${q}`);
}

function showVariants(node, images, choices) {
  let w = widget(node, GRID);
  if (!w) {
    const el = document.createElement("div");
    Object.assign(el.style, { display: "flex", flexDirection: "column", gap: "4px", width: "100%", height: "100%" });
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
    const size = node.computeSize?.();
    if (size) node.setSize([Math.max(node.size[0], size[0], 360), Math.max(node.size[1], size[1])]);
  }
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
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const result = onExecuted?.apply(this, arguments);
        const history = message?.noisequery_history?.[0];
        if (typeof history === "string") {
          setWidget(this, "history", history);
          setWidget(this, "pick", -1);
        }
        return result;
      };
    } else if (nodeData.name === PICKER) {
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
