// Shows the text a NoiseQuery node returns (ui.text: query reports, build summaries) in a
// read-only box on the node. Kept in sync with nodes/*.py, which return ui={"text": [...]}.
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const NODES = new Set(["BuildNoiseLibrary", "NoiseQueryText", "NoiseQueryColor", "NoiseQueryLibraryInfo"]);
const WIDGET = "noisequery_report";

function showReport(node, text) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // never stored in the workflow: it is output, not input
    widget.options = { ...(widget.options ?? {}), serialize: false };
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = "0.85";
    }
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
