// A library built a moment ago shows up in the query nodes' `library` list without pressing R: when a Build Noise
// Library run finishes with a name that some `library` combo on the page does not offer yet, the page re-reads
// the node definitions the way R does (app.refreshComboInNodes, on every frontend that has it); on a frontend
// without it, the `library` combos of this pack's nodes are refilled from /object_info.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const BUILD = "BuildNoiseLibrary";
const COMBO = "library";

function libraryCombos() {
  const out = [];
  const visit = (graph) => {
    for (const node of graph?._nodes ?? graph?.nodes ?? []) {
      const w = node.widgets?.find((x) => x.name === COMBO && x.type === "combo");
      if (w) out.push([node, w]);
      if (node.subgraph) visit(node.subgraph);
    }
  };
  visit(app.rootGraph ?? app.graph);
  return out;
}

const offers = (w, name) => {
  const values = typeof w.options?.values === "function" ? w.options.values() : w.options?.values;
  return Array.isArray(values) && values.includes(name);
};

async function refillFromServer(combos) {
  for (const type of new Set(combos.map(([node]) => node.type))) {
    const res = await api.fetchApi(`/object_info/${encodeURIComponent(type)}`);
    if (!res.ok) continue;
    const def = (await res.json())?.[type];
    const spec = def?.input?.required?.[COMBO] ?? def?.input?.optional?.[COMBO];
    const values = Array.isArray(spec?.[0]) ? spec[0] : spec?.[1]?.options;
    if (!Array.isArray(values)) continue;
    for (const [node, w] of combos) if (node.type === type) w.options.values = values;
  }
  app.graph?.setDirtyCanvas?.(true, true);
}

/** The `library` option lists of the registered node definitions (what a node added later will offer). */
function definedLists() {
  const lists = [];
  for (const type of Object.values(globalThis.LiteGraph?.registered_node_types ?? {})) {
    const spec = type?.nodeData?.input?.required?.[COMBO] ?? type?.nodeData?.input?.optional?.[COMBO];
    const values = Array.isArray(spec?.[0]) ? spec[0] : spec?.[1]?.options;
    if (Array.isArray(values)) lists.push(values);
  }
  return lists;
}

/** Make every `library` combo on the page, and of nodes added later, offer `name` (a library just built). */
export async function refreshLibraries(name) {
  const combos = libraryCombos();
  if (!name || (combos.every(([, w]) => offers(w, name)) && definedLists().every((v) => v.includes(name)))) return;
  try {
    if (typeof app.refreshComboInNodes === "function") await app.refreshComboInNodes();
    else await refillFromServer(combos);
  } catch (err) {
    console.warn(`NoiseQuery: could not refresh the library lists (${err}); press R to refresh them.`);
  }
}

app.registerExtension({
  name: "NoiseQuery.LibraryRefresh",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== BUILD) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const name = this.widgets?.find((w) => w.name === "library_name")?.value;
      // the name as typed; the combos list folder names, which are the same (check_library_name)
      refreshLibraries(typeof name === "string" ? name.trim() : "");
      return result;
    };
  },
});
