// Shows the text a NoiseQuery node returns (ui.text: query reports, build summaries, NoiseCLR training) in a
// fixed-height, scrollable, read-only box on the node, the way ComfyUI's own output widgets keep their size: the
// box is there from the node's creation, so a run never grows the node over its neighbours.
//
// Which nodes get it is derived, not listed: every node of this pack (its python_module is this pack's folder,
// read from this file's URL) with a STRING output named `report` or `info`, plus the Variation Explorer (a report
// but no such output). Any other node of the pack that sends ui.text gets the box on its first run. A node type
// that draws its own text sets `nqOwnReport` on its prototype (the Highlight Scribble Guide).
//
// The box is output, not input: kept out of the workflow and the API prompt (serialize: false). It is filled
// again from the frontend's stored node outputs when the graph is loaded (switching workflow tabs and back).
import { app } from "../../../scripts/app.js";

const WIDGET = "noisequery_report";
const REPORT_HEIGHT = 96; // px: about six lines of 11 px text; longer reports scroll
const REPORT_OUTPUTS = new Set(["report", "info"]);
const EXTRA_NODES = new Set(["NoiseQueryVariations"]);
// The folder this pack is served from (/extensions/<pack>/js/...) is also its python_module, custom_nodes.<pack>.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/extensions/")[1]?.split("/")[0] ?? "");

export function isPackNode(nodeData) {
  const mod = String(nodeData?.python_module ?? "");
  return PACK !== "" && (mod === `custom_nodes.${PACK}` || mod.startsWith(`custom_nodes.${PACK}.`)
    || mod.startsWith(`custom_nodes.${PACK}@`));
}

function hasReport(nodeData) {
  if (EXTRA_NODES.has(nodeData.name)) return true;
  const names = nodeData.output_name ?? nodeData.output ?? [];
  return names.some((n, i) => REPORT_OUTPUTS.has(String(n)) && (nodeData.output?.[i] ?? "STRING") === "STRING");
}

/** The node's last outputs as the frontend stores them (kept across workflow tabs), or undefined. */
export function storedOutput(node) {
  const outputs = app.nodeOutputs ?? app._nodeOutputs;
  if (!outputs) return undefined;
  const graph = node.graph;
  const prefix = graph && graph !== app.graph?.rootGraph && graph.id && !graph.isRootGraph ? `${graph.id}:` : "";
  return outputs[`${prefix}${node.id}`] ?? outputs[node.id];
}

/** Calls `fn(output)` once the frontend has put back the node's stored outputs (after a load or a tab switch,
 * they are restored just after the graph is configured, which on a busy machine takes seconds); looks again for
 * about 8 s, then gives up quietly (a node that never ran has none). */
export function whenOutputRestored(node, fn) {
  let tries = 0;
  const look = () => {
    const out = storedOutput(node);
    if (out) { fn(out); return; }
    if (++tries < 13 && (node.graph || tries < 3)) setTimeout(look, 100 * tries);
  };
  setTimeout(look, 0);
}

// Nodes 2.0 (1.5x) lays a node's widgets out in a grid whose DOM-widget rows shrink to fit the node's saved size:
// there the box keeps its height (the node grows instead). The class is that renderer's; the classic canvas sizes
// the box itself (getMin/MaxHeight), so the rule never applies there.
const style = document.createElement("style");
style.textContent = `.lg-node-widget .nq-report { min-height: ${REPORT_HEIGHT}px; flex: none; }`;
document.head.append(style);

function reportWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const el = document.createElement("textarea");
  el.readOnly = true;
  el.spellcheck = false;
  el.className = "nq-report";
  el.placeholder = "The report appears here after a run.";
  el.title = "What this node reported on its last run (scroll for more; select to copy)";
  Object.assign(el.style, {
    // the classic canvas sets the box's height from getMin/MaxHeight below; Nodes 2.0 takes this one
    width: "100%", height: `${REPORT_HEIGHT}px`, boxSizing: "border-box", overflowY: "auto", resize: "none", opacity: "0.85", fontSize: "11px",
    fontFamily: "monospace", whiteSpace: "pre", lineHeight: "1.3",
  });
  // Scrolling the report must scroll it, not zoom the canvas.
  el.addEventListener("wheel", (e) => { if (el.scrollHeight > el.clientHeight) e.stopPropagation(); });
  // serialize: false keeps it out of the workflow and the API prompt: it is output, not input
  widget = node.addDOMWidget(WIDGET, "noisequery_report", el, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => REPORT_HEIGHT + 4,
    getMaxHeight: () => REPORT_HEIGHT + 4,
    getValue: () => el.value,
    setValue: (v) => { el.value = v ?? ""; },
  });
  widget.serialize = false;
  return widget;
}

function showReport(node, text) {
  const widget = reportWidget(node);
  const size = node.computeSize?.();
  // only a node that had no box yet (a new node type sending text) may need to grow
  if (size && size[1] > node.size[1]) node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  widget.value = text;
  const el = widget.element;
  if (el) { el.value = text; el.scrollTop = 0; }
  node.setDirtyCanvas?.(true, true);
}

/** After a run that returned images (the Build node's built batch), drop the node's live progress preview: the
 * frontend keeps showing a progress preview in place of the outputs until the node runs again. Through the
 * frontend's node-output store (1.3x to 1.5x: revokePreviewsByExecutionId; reached through the page's Pinia, which
 * extensions have no other handle on), else by removing the legacy app.nodePreviewImages entry. */
function dropProgressPreview(node) {
  const id = String(node.id);
  let store;
  try {
    store = document.querySelector("#vue-app")?.__vue_app__?.config?.globalProperties?.$pinia?._s?.get("nodeOutput");
  } catch {
    store = undefined;
  }
  if (typeof store?.revokePreviewsByExecutionId === "function") store.revokePreviewsByExecutionId(id);
  else if (app.nodePreviewImages?.[id]) delete app.nodePreviewImages[id];
  node.setDirtyCanvas?.(true, true);
}

const reportText = (message) => (Array.isArray(message?.text) ? message.text.join("\n") : "");

app.registerExtension({
  name: "NoiseQuery.Report",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isPackNode(nodeData)) return;
    const upfront = hasReport(nodeData);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (upfront && !this.nqOwnReport) {
        reportWidget(this);
        const size = this.computeSize?.();
        if (size) this.setSize([Math.max(this.size[0], size[0]), Math.max(this.size[1], size[1])]);
      }
      return result;
    };

    // After a load or a tab switch: the report of the last run, from the frontend's stored outputs.
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      if (!this.nqOwnReport) {
        whenOutputRestored(this, (out) => {
          const text = reportText(out);
          const w = this.widgets?.find((x) => x.name === WIDGET);
          if (text && (upfront || w) && w?.value !== text) showReport(this, text);
        });
      }
      return result;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = reportText(message);
      if (text && !this.nqOwnReport) showReport(this, text);
      if (message?.images?.length) dropProgressPreview(this);
      return result;
    };
  },
});
