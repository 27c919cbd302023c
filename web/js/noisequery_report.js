// Shows the text a NoiseQuery node returns (ui.text: query reports, build summaries) in a
// read-only box on the node. Kept in sync with nodes/*.py, which return ui={"text": [...]}.
import { app } from "../../../scripts/app.js";

const NODES = new Set(["BuildNoiseLibrary", "NoiseQueryText", "NoiseQueryColor", "NoiseQueryLibraryInfo",
  "NoiseQuerySeedSlerp", "NoiseQuerySeedGrid", "NoiseQueryConditioningInterpolate", "NoiseQueryVariations",
  "NoiseQueryRank", "NoiseQuerySeedInfluence"]);
const WIDGET = "noisequery_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    const el = document.createElement("textarea");
    el.readOnly = true;
    el.spellcheck = false;
    Object.assign(el.style, { width: "100%", height: "100%", opacity: "0.85", fontSize: "11px", resize: "none" });
    // serialize: false keeps it out of the workflow and the API prompt: it is output, not input
    widget = node.addDOMWidget(WIDGET, "noisequery_report", el, {
      serialize: false,
      getMinHeight: () => 150,
      getValue: () => el.value,
      setValue: (v) => { el.value = v; },
    });
    widget.serialize = false;
    const size = node.computeSize?.();
    if (size) node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
  }
  widget.value = text;
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "NoiseQuery.Report",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      if (text) showReport(this, text);
      return result;
    };
  },
});
