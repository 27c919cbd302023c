#!/usr/bin/env python3
"""Regenerate the UI-format example workflows and the README screenshots from example_workflows/api/*.json.

    .venv/bin/python scripts/make_ui_workflows.py [--no-screenshots] [--only NAME] [--workdir DIR]

What it does, all against a real ComfyUI (tests/host/comfy_harness.py: ComfyServer, $COMFYUI_PATH or ~/ComfyUI)
and the real ComfyUI page in headless Chromium (Debian's /usr/bin/chromium driven by the PyPI `playwright`
package; no browser is ever downloaded):

1. writes a tiny random-weight SD1.5 checkpoint and starts ComfyUI with this repo loaded as the NoiseQuery pack;
2. builds a small noise library "sd15_empty_512" (64x64, 2 steps, 8 seeds, clip_model none) with the
   BuildNoiseLibrary node through POST /prompt, so the query nodes' `library` combos have a value;
3. for each example_workflows/api/<name>.json: loads it into the page with the frontend's own
   `app.loadApiJson(api, name)`, lays the nodes out, exports it the way the frontend's "Export" does
   (`(await app.graphToPrompt()).workflow`) and writes example_workflows/<name>.json;
4. re-loads every written file with `app.loadGraphData(...)` and checks that `app.graphToPrompt().output`
   gives the API twin's node ids, classes, widget values and links;
5. takes the README screenshots docs/workflow_*.png and the template-browser thumbnails example_workflows/<name>.jpg
   (what the frontend shows for a pack's example), then runs the colour-query workflow on the tiny model
   through the page's Run button and takes docs/nodes_after_run.png.

Widget values are kept exactly as in the API files (e.g. ckpt_name "v1-5-pruned-emaonly.safetensors", which
this machine does not have); if the page ever replaces one, it is put back and reported. Only the after-run
screenshot switches the loaded page's ckpt_name to the tiny checkpoint (the file on disk is not touched).
Exit status: 0 when every workflow round-trips, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))

import comfy_harness  # noqa: E402  (after the sys.path line above)

API_DIR = ROOT / "example_workflows" / "api"
UI_DIR = ROOT / "example_workflows"
DOCS = ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}
# Where nodes may be drawn in the screenshots, in CSS pixels: right of the side bar, below the tab bar, the
# workflow-name / Run toolbars and the "1 job completed" notice that stays under the Run button after a run.
FIT_RECT = (80, 140, 1585, 990)
MAX_ZOOM = 1.25
LIBRARY_NAME = "sd15_empty_512"
SCREENSHOTS = {
    "build_noise_library": "workflow_build.png",
    "text_query_ksampler": "workflow_text_query.png",
    "colour_query_sampler_custom_advanced": "workflow_colour_query.png",
    "highlight_scribble_guide": "workflow_highlight_scribble.png",
    "seed_interpolation_strip": "workflow_seed_interpolation.png",
    "variation_explorer": "workflow_variation_explorer.png",
    "noiseclr_train": "workflow_noiseclr_train.png",
    "noiseclr_apply": "workflow_noiseclr_apply.png",
}
# Close-ups of a node's drawing widget (web/js/highlight_scribble.js): workflow -> (node class, docs file). When the
# workflow's node holds no stroke, one is drawn with the mouse for the prompt's first phrase (the picture only;
# the written workflow keeps the API file's value).
WIDGET_SHOTS = {"highlight_scribble_guide": ("HighlightScribbleGuide", "highlight_widget.png")}
WIDGET_ZOOM = 1.5
RUN_WORKFLOW = "colour_query_sampler_custom_advanced"
RUN_SCREENSHOT = "nodes_after_run.png"
# Columns of node ids, left to right, each stacked top to bottom; ids the workflow lacks are skipped. A workflow
# not listed here, or with a node not placed here, keeps the frontend's own app.graph.arrange() layout.
LAYOUTS: dict[str, list[list[str]]] = {
    "build_noise_library": [["1", "2"], ["3"]],
    "text_query_ksampler": [["1", "4", "5", "2"], ["6", "8"], ["7", "9"], ["10", "11"]],
    "colour_query_sampler_custom_advanced": [["1", "4", "5", "2"], ["6"], ["8", "9", "7"], ["10", "11"],
                                             ["12", "13"]],
    "highlight_scribble_guide": [["1", "4", "3"], ["2"], ["5", "8"], ["6", "7"]],
    # two bands (BAND starts the next one below), so that the graph reads at fit-to-view
    "highlight_masks_headless": [["10", "11", "14"], ["12", "15"], ["13", "16"], ["1", "4", "3"], ["|"], ["2"],
                                 ["5", "8"], ["6", "7"]],
    "seed_interpolation_strip": [["1", "4", "5"], ["6"], ["7", "8", "9"], ["10", "11"], ["12"]],
    "prompt_interpolation_strip": [["1", "4", "13", "5"], ["14", "6"], ["7", "8", "9"], ["10", "11"], ["12"]],
    "variation_explorer": [["1", "4", "5"], ["6"], ["7", "8", "9"], ["10", "11"], ["12"]],
    "noiseclr_train": [["1"], ["2"], ["3"]],
    "noiseclr_apply": [["1", "5"], ["2", "3"], ["4"], ["6", "9"], ["7", "10"], ["8", "11"]],
    "query_refine_ksampler": [["1", "4", "5"], ["6"], ["7"], ["8", "9"], ["10", "11"], ["12", "13"]],
    "seed_invariant_prompt": [["1", "2", "3"], ["4", "5", "6"], ["7", "8"], ["9", "10"], ["11", "14"], ["12", "15"], ["13", "16"]],
}
# Node sizes [width, height] by class (height None = what the node needs); NoiseQuery nodes are widened.
SIZES: dict[str, list[float | None]] = {
    "CheckpointLoaderSimple": [400, None],
    "CLIPTextEncode": [380, 150],
    "PreviewImage": [440, 240],
    "SaveImage": [440, 240],
    "SamplerCustomAdvanced": [280, None],
    "VAEDecode": [180, None],
    "KSampler": [320, None],
    "CFGGuider": [260, None],
    "KSamplerSelect": [260, None],
    "BasicScheduler": [260, None],
    "EmptyLatentImage": [320, None],
    "HighlightScribbleGuide": [440, 860],  # room for the drawing canvas
    "NoiseQueryVariantPicker": [440, None],  # its whole title in the Nodes 2.0 renderer too
}
# Per workflow: class -> size, over SIZES (the headless guide's drawing is unused: it gets what it needs, no more).
WORKFLOW_SIZES: dict[str, dict[str, list[float | None]]] = {
    "highlight_masks_headless": {"HighlightScribbleGuide": [440, None]},
}
NQ_WIDTH = 340
# Template-browser thumbnails: example_workflows/<name>.jpg (what ComfyUI's frontend asks for a pack's example,
# /api/workflow_templates/<pack>/<name>.jpg), this wide, as JPEG of this quality.
THUMB_WIDTH = 480
THUMB_QUALITY = 80
# 404s every fresh ComfyUI user directory produces (no custom CSS, no saved workflows yet): not our problem.
BENIGN_404 = ("/api/userdata/user.css", "/user.css", "/api/userdata?dir=workflows", "/api/userdata?dir=subgraphs",
              "/api/userdata/comfy.templates.json")

JS_HELPERS = r"""
window.__nq = {
  title: () => LiteGraph.NODE_TITLE_HEIGHT,
  // Resize nodes, then place them in the given columns (node ids); false if the hint does not fit the graph.
  layout(columns, sizes, nqWidth, nqClasses) {
    const g = app.graph, T = LiteGraph.NODE_TITLE_HEIGHT;
    for (const n of g._nodes) {
      const s = sizes[n.type] ?? (nqClasses.includes(n.type) ? [nqWidth, null] : null);
      if (!s) continue;
      const need = n.computeSize();
      n.setSize([Math.max(s[0], need[0]), s[1] == null ? need[1] : Math.max(s[1], need[1])]);
    }
    const all = g._nodes.map(n => String(n.id));
    columns = (columns ?? []).map(c => c[0] === '|' ? c : c.filter(i => all.includes(i))).filter(c => c.length);
    if (!all.every(i => columns.some(c => c.includes(i)))) { g.arrange(); return false; }
    const gapX = 60, gapY = 40;
    let x = 0, top = T, bottom = T;  // a column ['|'] starts a new band of columns below the ones so far
    for (const col of columns) {
      if (col[0] === '|') { x = 0; top = bottom + gapY; continue; }
      let y = top, w = 0;
      for (const id of col) {
        const n = g.getNodeById(isNaN(+id) ? id : +id);
        n.pos = [x, y];
        // Nodes 2.0 draws each widget row a few pixels taller than the classic canvas: room for that below
        y += n.size[1] + T + gapY + 6 * (n.widgets?.length ?? 0);
        w = Math.max(w, n.size[0]);
      }
      bottom = Math.max(bottom, y - T - gapY);
      x += w + gapX;
    }
    app.canvas.setDirty(true, true);
    return true;
  },
  // Zoom and pan so that every node lies inside rect [x0, y0, x1, y1] (CSS pixels), centred, zoom <= maxZoom.
  fit(rect, maxZoom) {
    const g = app.graph, T = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;
    let minx = Infinity, miny = Infinity, maxx = -Infinity, maxy = -Infinity;
    for (const n of g._nodes) {
      minx = Math.min(minx, n.pos[0]); miny = Math.min(miny, n.pos[1] - T);
      maxx = Math.max(maxx, n.pos[0] + n.size[0]); maxy = Math.max(maxy, n.pos[1] + n.size[1]);
    }
    const [x0, y0, x1, y1] = rect, bw = maxx - minx, bh = maxy - miny;
    const scale = Math.min((x1 - x0) / bw, (y1 - y0) / bh, maxZoom);
    ds.scale = scale;
    ds.offset = [(x0 + ((x1 - x0) - bw * scale) / 2) / scale - minx, (y0 + ((y1 - y0) - bh * scale) / 2) / scale - miny];
    app.canvas.setDirty(true, true);
    return scale;
  },
  // Put API widget values back where the page changed them; returns [[node, input, page value], ...].
  restoreWidgets(api) {
    const changed = [];
    for (const [id, spec] of Object.entries(api)) {
      const n = app.graph.getNodeById(isNaN(+id) ? id : +id);
      if (!n) continue;
      for (const [name, v] of Object.entries(spec.inputs ?? {})) {
        if (Array.isArray(v)) continue;
        const w = n.widgets?.find(w => w.name === name);
        if (w && w.value !== v) { changed.push([id, name, w.value]); w.value = v; }
      }
    }
    return changed;
  },
  // A seed fed by a link ignores its "control after generate" widget; show "fixed", as the NoiseQuery
  // seed output's tooltip asks. Returns the node ids changed.
  // Example workflows are shared to reproduce a result: every "control after generate" is set to fixed
  // (the frontend defaults seeds to randomize, which would change them after the first run).
  fixSeedControls() {
    const changed = [];
    for (const n of app.graph._nodes) {
      for (const w of n.widgets ?? []) {
        const next = n.widgets[n.widgets.indexOf(w) + 1];
        const ctl = w.linkedWidgets?.find(c => c.name === 'control_after_generate')
          ?? (next?.name === 'control_after_generate' ? next : null);
        if (ctl && ctl.value !== 'fixed') { ctl.value = 'fixed'; changed.push(`${n.id}.${w.name}`); }
      }
    }
    return changed;
  },
  // What the frontend's Export writes (workflow) and queues (output), as JSON text: handing the objects
  // over directly would turn undefined members into nulls, which the frontend's schema then rejects.
  async exportBoth() { return JSON.stringify(await app.graphToPrompt()); },
  async load(text, name) { await app.loadGraphData(JSON.parse(text), true, true, name); },
  setWidget(nodeId, name, value) {
    const n = app.graph.getNodeById(nodeId);
    const w = n.widgets.find(w => w.name === name);
    w.value = value; w.callback?.(value);
    app.canvas.setDirty(true, true);
  },
  // Visible dialogs and toasts (the schema check of loadGraphData reports through a toast).
  openDialogs: () => Array.from(document.querySelectorAll('.p-dialog, [role=dialog], .p-toast-message'))
      .filter(d => d.offsetParent !== null || d.getClientRects().length).map(d => d.innerText.slice(0, 300)),
  // Zoom and pan so that the first node of class `type` fills rect (CSS pixels), zoom <= maxZoom; returns its
  // id and screen box [x, y, w, h] (title bar included).
  focusNode(type, rect, maxZoom) {
    const n = app.graph._nodes.find(n => n.type === type), T = LiteGraph.NODE_TITLE_HEIGHT, ds = app.canvas.ds;
    if (!n) return null;
    const [x0, y0, x1, y1] = rect, w = n.size[0], h = n.size[1] + T;
    const scale = Math.min((x1 - x0) / w, (y1 - y0) / h, maxZoom);
    ds.scale = scale;
    ds.offset = [(x0 + ((x1 - x0) - w * scale) / 2) / scale - n.pos[0], (y0 + ((y1 - y0) - h * scale) / 2) / scale - (n.pos[1] - T)];
    app.canvas.setDirty(true, true);
    const r = app.canvas.canvas.getBoundingClientRect();
    return { id: n.id, box: [r.left + (n.pos[0] + ds.offset[0]) * scale, r.top + (n.pos[1] - T + ds.offset[1]) * scale,
                             w * scale, h * scale] };
  },
  strokeCount(id) {
    const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'highlights');
    try { return JSON.parse(w.value).strokes.length; } catch { return -1; }
  },
  imagesShown(ids) {
    return ids.every(id => { const n = app.graph.getNodeById(id);
      return n && n.imgs && n.imgs.length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0); });
  },
};
"""


def log(msg: str) -> None:
    print(f"[make_ui_workflows {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Page:
    """One Chromium tab on the ComfyUI page, recording console errors/warnings, page errors and failed requests."""

    def __init__(self, browser: Any, url: str, label: str, problems: list[dict[str, str]]) -> None:
        self.label = label
        self.problems = problems
        self.context = browser.new_context(viewport=VIEWPORT)
        self.page = self.context.new_page()
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self._add("pageerror", str(e)))
        self.page.on("response", self._response)
        self.page.goto(url)
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady === true",
                                    timeout=90_000)
        self.page.evaluate(JS_HELPERS)
        self.page.wait_for_timeout(1000)

    def _add(self, kind: str, text: str) -> None:
        self.problems.append({"page": self.label, "kind": kind, "text": text})

    def _console(self, msg: Any) -> None:
        if msg.type in ("error", "warning"):
            loc = msg.location.get("url", "") if isinstance(msg.location, dict) else ""
            if msg.text.startswith("Failed to load resource") and msg.type == "error":
                return  # the failing URL is recorded by _response
            self._add(f"console.{msg.type}", f"{msg.text} ({loc})" if loc else msg.text)

    def _response(self, resp: Any) -> None:
        if resp.status >= 400:
            path = resp.url.split("://", 1)[-1].split("/", 1)[-1]
            kind = "http-benign" if any(("/" + path).startswith(b) for b in BENIGN_404) else "http"
            self._add(kind, f"{resp.status} {resp.request.method} /{path}")

    def js(self, expr: str, arg: Any = None) -> Any:
        return self.page.evaluate(expr, arg)

    def settle(self, ms: int = 800) -> None:
        self.page.wait_for_timeout(ms)

    def screenshot(self, path: Path, clip: dict[str, float] | None = None) -> None:
        self.page.mouse.move(2, VIEWPORT["height"] // 2)  # no hover highlight or tooltip on a node
        self.settle(600)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip=clip)
        dialogs = self.js("() => __nq.openDialogs()")
        if dialogs:
            self._add("dialog", f"dialog open in {path.name}: {dialogs}")
        log(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} ({path.stat().st_size // 1024} KB)")

    def close(self) -> None:
        self.context.close()


def compare(api: dict[str, Any], out: dict[str, Any]) -> list[str]:
    """Differences between an API-format file and what the page queues for its UI twin (titles ignored)."""
    diffs: list[str] = []
    if set(api) != set(out):
        diffs.append(f"node ids differ: only in API {sorted(set(api) - set(out))}, only in page {sorted(set(out) - set(api))}")
    for nid in sorted(set(api) & set(out), key=lambda s: (len(s), s)):
        a, o = api[nid], out[nid]
        if a["class_type"] != o["class_type"]:
            diffs.append(f"node {nid}: class {a['class_type']} vs {o['class_type']}")
        ai, oi = a.get("inputs", {}), o.get("inputs", {})
        for name in sorted(set(ai) | set(oi)):
            if name not in oi:
                diffs.append(f"node {nid} ({a['class_type']}): input {name} missing in page output (API {ai[name]!r})")
            elif name not in ai:
                diffs.append(f"node {nid} ({a['class_type']}): extra input {name}={oi[name]!r} in page output")
            elif ai[name] != oi[name] or type(ai[name]) is str and type(oi[name]) is not str:
                diffs.append(f"node {nid} ({a['class_type']}): {name} API {ai[name]!r} vs page {oi[name]!r}")
        at, ot = (a.get("_meta") or {}).get("title"), (o.get("_meta") or {}).get("title")
        if at is not None and at != ot:
            diffs.append(f"node {nid}: title API {at!r} vs page {ot!r}")
    return diffs


def build_library(server: comfy_harness.ComfyServer, ckpt: str) -> None:
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "3": {"class_type": "BuildNoiseLibrary", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "negative": ["2", 0],
            "library_name": LIBRARY_NAME, "width": 64, "height": 64, "seed_start": 0, "count": 8, "batch_size": 8,
            "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "clip_model": "none",
            "thumbnail_size": 64}},
    }
    entry = server.run(graph, timeout=600)
    err = comfy_harness.execution_error(entry)
    if err:
        raise SystemExit(f"BuildNoiseLibrary failed: {json.dumps(err)[:2000]}")


def tooltip_gaps(object_info: dict[str, Any], classes: list[str]) -> list[str]:
    gaps = []
    for cls in classes:
        info = object_info[cls]
        tips = info.get("input_tooltips") or {}
        for section in ("required", "optional"):
            for name, spec in (info.get("input", {}).get(section) or {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip") and not tips.get(name):
                    gaps.append(f"{cls}: input {name}")
        out_tips = info.get("output_tooltips") or []
        for i, name in enumerate(info.get("output_name") or []):
            if i >= len(out_tips) or not out_tips[i]:
                gaps.append(f"{cls}: output {name}")
        if not info.get("description"):
            gaps.append(f"{cls}: no node description")
    return gaps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append", help="workflow name (file stem) to process; repeatable")
    ap.add_argument("--no-screenshots", action="store_true", help="write and verify the workflows only")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint, library and server files here")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    t_start = time.perf_counter()
    api_files = sorted(API_DIR.glob("*.json"))
    if args.only:
        api_files = [p for p in api_files if p.stem in args.only]
    if not api_files:
        raise SystemExit(f"no API workflows to convert in {API_DIR}")
    if not Path(CHROMIUM).is_file():
        raise SystemExit(f"{CHROMIUM} missing: apt-get install -y --no-install-recommends chromium")
    comfy = comfy_harness.find_comfyui()
    if comfy is None:
        raise SystemExit(comfy_harness.SKIP_REASON)

    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="nq_ui_workflows_"))
    models = work / "models"
    ckpt = models / "checkpoints" / comfy_harness.TINY_CKPT_NAME
    if not ckpt.is_file():
        log("writing the tiny SD1.5 checkpoint")
        comfy_harness.make_tiny_sd15_checkpoint(ckpt, comfy)
    libs = models / "noise_libraries"
    shutil.rmtree(libs / LIBRARY_NAME, ignore_errors=True)
    libs.mkdir(parents=True, exist_ok=True)
    (models / "noisequery_clip").mkdir(parents=True, exist_ok=True)
    (models / "noiseclr_directions").mkdir(parents=True, exist_ok=True)

    problems: list[dict[str, str]] = []
    failures: list[str] = []
    notes: list[str] = []
    server = comfy_harness.ComfyServer(
        comfy, packs={"NoiseQuery": ROOT}, workdir=work / "server",
        model_dirs={"checkpoints": ckpt.parent, "noise_libraries": libs, "noisequery_clip": models / "noisequery_clip",
                    "noiseclr_directions": models / "noiseclr_directions"})
    try:
        with server:
            log(f"ComfyUI up at {server.url} after {server.startup_seconds:.1f}s")
            sess = server._http()
            # First-visit templates dialog off; minimap, canvas stats and zoom menu off so they do not cover nodes.
            for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                               ("Comfy.Graph.CanvasInfo", False), ("Comfy.Graph.CanvasMenu", False)):
                sess.post(f"{server.url}/settings/{key}", data=json.dumps(value), timeout=30).raise_for_status()
            t0 = time.perf_counter()
            build_library(server, ckpt.name)
            log(f"built noise library {LIBRARY_NAME} in {time.perf_counter() - t0:.1f}s")
            info = server.object_info()
            nq_classes = sorted(k for k, v in info.items() if "NoiseQuery" in str(v.get("python_module", "")))
            missing = {n["class_type"] for p in api_files for n in json.loads(p.read_text()).values()} - set(info)
            if missing:
                raise SystemExit(f"node classes unknown to this ComfyUI: {sorted(missing)}")

            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
                written: dict[str, Path] = {}
                # ---- 1. API -> UI ----
                page = Page(browser, server.url, "convert", problems)
                for path in api_files:
                    name = path.stem
                    api = json.loads(path.read_text(encoding="utf-8"))
                    page.js("([a, n]) => app.loadApiJson(a, n)", [api, path.name])
                    page.settle()
                    laid = page.js("([c, s, w, q]) => __nq.layout(c, s, w, q)",
                                   [LAYOUTS.get(name), {**SIZES, **WORKFLOW_SIZES.get(name, {})}, NQ_WIDTH,
                                    nq_classes])
                    if not laid:
                        notes.append(f"{name}: no layout hint matches its nodes; kept app.graph.arrange()")
                    changed = page.js("(a) => __nq.restoreWidgets(a)", api)
                    for nid, wname, got in changed:
                        notes.append(f"{name}: node {nid} widget {wname} was {got!r} in the page; put back to the API value")
                    for what in page.js("() => __nq.fixSeedControls()"):
                        notes.append(f"{name}: {what}: control_after_generate set to 'fixed' (UI-only widget, not in "
                                     "the API file)")
                    both = json.loads(page.js("() => __nq.exportBoth()"))
                    wf = both["workflow"]
                    wf.get("extra", {}).pop("ds", None)  # no saved view: ComfyUI fits the graph to the user's window
                    wf["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"noisequery/example_workflows/{name}"))
                    diffs = compare(api, both["output"])
                    if diffs:
                        notes.append(f"{name}: page graph right after loadApiJson differs from the API file: {diffs}")
                    out = UI_DIR / f"{name}.json"
                    out.write_text(json.dumps(wf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
                    written[name] = out
                    log(f"wrote {out.relative_to(ROOT)} ({len(wf['nodes'])} nodes, {len(wf['links'])} links)")
                page.close()

                # ---- 2. each UI file in a fresh page: loads cleanly, queues the API twin; README screenshot ----
                for name, out in written.items():
                    api = json.loads((API_DIR / f"{name}.json").read_text(encoding="utf-8"))
                    page = Page(browser, server.url, f"load:{name}", problems)
                    before = len(problems)
                    page.js("([t, n]) => __nq.load(t, n)", [out.read_text(encoding="utf-8"), out.name])
                    page.settle()
                    new = [p for p in problems[before:] if p["kind"] != "http-benign"]
                    dialogs = page.js("() => __nq.openDialogs()")
                    output = json.loads(page.js("async () => JSON.stringify((await app.graphToPrompt()).output)"))
                    diffs = compare(api, output)
                    status = "OK" if not (diffs or new or dialogs) else "FAILED"
                    log(f"re-load {out.name}: {status}" + (f" diffs={diffs}" if diffs else "")
                        + (f" errors={new}" if new else "") + (f" dialogs={dialogs}" if dialogs else ""))
                    if status != "OK":
                        failures.append(f"{out.name}: diffs={diffs} errors={new} dialogs={dialogs}")
                    if not args.no_screenshots:
                        page.js("([r, z]) => __nq.fit(r, z)", [list(FIT_RECT), MAX_ZOOM])
                        if name in SCREENSHOTS:
                            page.screenshot(DOCS / SCREENSHOTS[name])
                        thumbnail(page, UI_DIR / f"{name}.jpg", work)
                    if not args.no_screenshots and name in WIDGET_SHOTS:
                        widget_shot(page, *WIDGET_SHOTS[name], failures)
                    page.close()

                # ---- 3. run the colour query through the Run button ----
                if not args.no_screenshots:
                    if RUN_WORKFLOW in written:
                        run_and_shoot(browser, server, written[RUN_WORKFLOW], ckpt.name, problems, failures)
                browser.close()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    gaps = tooltip_gaps(info, nq_classes)
    print("\n==== summary ====")
    print(f"time: {time.perf_counter() - t_start:.0f}s; comfyui-frontend-package {frontend_version()}")
    print("NoiseQuery node classes:", ", ".join(nq_classes))
    print("inputs/outputs without a tooltip:", "; ".join(gaps) if gaps else "none")
    for n in notes:
        print("note:", n)
    real = [p for p in problems if p["kind"] != "http-benign"]
    benign = sorted({p["text"] for p in problems if p["kind"] == "http-benign"})
    print(f"page problems ({len(real)}):")
    for p in real:
        print(f"  [{p['page']}] {p['kind']}: {p['text']}")
    print(f"benign fresh-user-dir 404s (every page load): {', '.join(benign) if benign else 'none'}")
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


def frontend_version() -> str:
    try:
        from importlib.metadata import version
        return version("comfyui-frontend-package")
    except Exception:  # noqa: BLE001
        return "?"


def thumbnail(page: Page, out: Path, work: Path) -> None:
    """The fitted graph as the template browser's small JPEG thumbnail (example_workflows/<name>.jpg)."""
    from PIL import Image

    x0, y0, x1, y1 = FIT_RECT
    raw = work / f"{out.stem}_thumb.png"
    page.screenshot(raw, clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    with Image.open(raw) as im:
        small = im.convert("RGB").resize((THUMB_WIDTH, round(im.height * THUMB_WIDTH / im.width)), Image.LANCZOS)
        small.save(out, "JPEG", quality=THUMB_QUALITY, optimize=True)
    log(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")


def widget_shot(page: Page, node_type: str, filename: str, failures: list[str]) -> None:
    """Zoom onto the node's drawing widget, draw a stroke if it has none, and save a close-up in docs/."""
    focus = page.js("([t, r, z]) => __nq.focusNode(t, r, z)", [node_type, list(FIT_RECT), WIDGET_ZOOM])
    if focus is None:
        failures.append(f"{filename}: no {node_type} node in the workflow")
        return
    nid = focus["id"]
    page.settle()
    canvas = page.page.locator(f'.nq-highlight[data-node-id="{nid}"] canvas')
    if page.js("(i) => __nq.strokeCount(i)", nid) < 1:
        box = canvas.bounding_box()
        if not box:
            failures.append(f"{filename}: the drawing widget of node {nid} is not shown")
            return
        path = [(0.3, 0.35), (0.42, 0.3), (0.55, 0.38), (0.62, 0.55), (0.5, 0.68), (0.36, 0.62)]
        page.page.mouse.move(box["x"] + path[0][0] * box["width"], box["y"] + path[0][1] * box["height"])
        page.page.mouse.down()
        for x, y in path[1:]:
            page.page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=6)
        page.page.mouse.up()
        if page.js("(i) => __nq.strokeCount(i)", nid) < 1:
            failures.append(f"{filename}: drawing on node {nid} left no stroke")
    x, y, w, h = focus["box"]
    pad = 12
    page.screenshot(DOCS / filename, clip={"x": max(0, x - pad), "y": max(0, y - pad),
                                          "width": w + 2 * pad, "height": h + 2 * pad})


def run_and_shoot(browser: Any, server: comfy_harness.ComfyServer, ui_file: Path, ckpt_name: str,
                  problems: list[dict[str, str]], failures: list[str]) -> None:
    """Load the colour workflow, point it at the tiny checkpoint, press Run, wait, screenshot the outputs."""
    wf = json.loads(ui_file.read_text(encoding="utf-8"))
    page = Page(browser, server.url, "run", problems)
    page.js("([t, n]) => __nq.load(t, n)", [ui_file.read_text(encoding="utf-8"), ui_file.name])
    page.settle()
    loader = next(n["id"] for n in wf["nodes"] if n["type"] == "CheckpointLoaderSimple")
    page.js("([i, v]) => __nq.setWidget(i, 'ckpt_name', v)", [loader, ckpt_name])
    page.js("([r, z]) => __nq.fit(r, z)", [list(FIT_RECT), MAX_ZOOM])
    known = set(server.history())
    t0 = time.perf_counter()
    page.page.click(comfy_harness.RUN_BUTTON)
    deadline = time.monotonic() + 300
    entry = None
    while time.monotonic() < deadline:
        new = set(server.history()) - known
        if new:
            pid = new.pop()
            entry = server.wait(pid, timeout=300)
            break
        time.sleep(0.2)
    if entry is None:
        failures.append("run: the Run button queued nothing within 300 s")
        page.close()
        return
    err = comfy_harness.execution_error(entry)
    if err:
        failures.append(f"run: {json.dumps(err)[:1500]}")
    log(f"colour query ran through the Run button in {time.perf_counter() - t0:.1f}s "
        f"({'error' if err else 'success'})")
    image_nodes = [n["id"] for n in wf["nodes"] if n["type"] in ("PreviewImage", "SaveImage")]
    try:
        page.page.wait_for_function("(ids) => __nq.imagesShown(ids)", arg=image_nodes, timeout=30_000)
    except Exception:  # noqa: BLE001
        failures.append(f"run: the page did not show images in nodes {image_nodes}")
    page.screenshot(DOCS / RUN_SCREENSHOT)
    page.close()


if __name__ == "__main__":
    sys.exit(main())
