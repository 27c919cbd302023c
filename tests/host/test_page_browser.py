"""The pack in the real ComfyUI page as a new user meets it (issue 13): edits survive a reload, reports never cover
other nodes, a library built a moment ago is offered at once, reports and the picker grid survive a tab switch, the
JSON box opens in Nodes 2.0.

Headless Chromium (Debian's /usr/bin/chromium driven by the PyPI `playwright` package) on one page per frontend
(`frontend` fixture: the pinned comfyui-frontend-package and the newest through --front-end-root), in the classic
renderer and in Nodes 2.0 (setting Comfy.VueNodes.Enabled). Runs go through the page's Run button on the session's
tiny random-weight SD1.5 checkpoint and random CLIP weights: the plumbing is tested, not the pictures.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comfy_harness
import pytest
from comfy_harness import ComfyServer, Frontend
from test_highlight_widget_browser import BENIGN_404, CHROMIUM, CHROMIUM_FLAGS

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO_ROOT / "example_workflows").glob("*.json"))
VIEWPORT = {"width": 1400, "height": 1000}
RENDERERS = ("classic", "nodes2")
LONG_REPORT = "\n".join(f"line {i}: a report long enough to need scrolling" for i in range(40))

JS = r"""
window.__nqp = {
  api: () => app.api ?? window.comfyAPI?.api?.api,
  async renderer(vue) {
    await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', vue);
  },
  async load(text, name) { await app.loadGraphData(JSON.parse(text), true, true, name); },
  clear() { for (const n of [...app.graph._nodes]) app.graph.remove(n); app.canvas.setDirty(true, true); },
  node: (id) => app.graph.getNodeById(isNaN(+id) ? id : +id),
  widget(id, name) { return __nqp.node(id)?.widgets?.find(w => w.name === name); },
  set(id, name, value) { const w = __nqp.widget(id, name); w.value = value; w.callback?.(value); },
  combo(id, name) {
    const w = __nqp.widget(id, name), v = w?.options?.values;
    return typeof v === 'function' ? v() : v;
  },
  // Every node's box on the page [id, x, y, w, h]: the DOM element in Nodes 2.0, the canvas geometry otherwise.
  boxes() {
    const vue = !!document.querySelector('[data-node-id] .lg-node-header, .lg-node[data-node-id]');
    return app.graph._nodes.map(n => {
      const el = document.querySelector(`.lg-node[data-node-id="${n.id}"]`)
        ?? (vue ? document.querySelector(`[data-node-id="${n.id}"]:not(.nq-highlight)`) : null);
      if (el) { const r = el.getBoundingClientRect(); return [String(n.id), r.x, r.y, r.width, r.height, 'dom']; }
      const b = n.getBounding ? Array.from(n.getBounding()) : [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
        n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT];
      return [String(n.id), ...b, 'canvas'];
    });
  },
  // Deliver `output` to node `id` the way a finished run does (the page's own "executed" handling).
  executed(id, output) {
    __nqp.api().dispatchCustomEvent('executed', { node: String(id), display_node: String(id), output, prompt_id: 'x' });
  },
  reportText(id) {
    const w = __nqp.widget(id, 'noisequery_report');
    return w ? (w.element?.value ?? w.value ?? '') : null;
  },
  // The report box's rectangle and whether it lies inside its node (not hidden, not spilling over).
  reportBox(id) {
    const w = __nqp.widget(id, 'noisequery_report'), el = w?.element;
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return { w: r.width, h: r.height, shown: r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== 'hidden'
      && getComputedStyle(el).display !== 'none', scrolls: el.scrollHeight > el.clientHeight };
  },
  strokes(id) { try { return JSON.parse(__nqp.widget(id, 'highlights').value).strokes.length; } catch { return -1; } },
  modified: () => !!app.extensionManager.workflow.activeWorkflow?.isModified,
  command: (id) => app.extensionManager.command.execute(id),
  workflowName: () => app.extensionManager.workflow.activeWorkflow?.filename ?? app.extensionManager.workflow.activeWorkflow?.path,
  fit() { app.canvas.ds.scale = 0.5; app.canvas.ds.offset = [120, 200]; app.canvas.setDirty(true, true); },
  run: () => app.queuePrompt(0, 1),
};
"""


# --------------------------------------------------------------------------------------------------
# Page fixture: one page per frontend for the module
# --------------------------------------------------------------------------------------------------

def _ready(pg: Any) -> None:
    pg.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady === true", timeout=90_000)
    pg.evaluate(JS)
    pg.wait_for_timeout(300)


@pytest.fixture(scope="module")
def page(frontend_server: ComfyServer, frontend: Frontend) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install -r requirements-dev.txt (the browser is /usr/bin/chromium)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y --no-install-recommends chromium")
    sess = frontend_server._http()
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                       ("Comfy.Graph.CanvasInfo", False), ("Comfy.VueNodes.Enabled", False)):
        sess.post(f"{frontend_server.url}/settings/{key}", data=json.dumps(value), timeout=30).raise_for_status()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        context = browser.new_context(viewport=VIEWPORT)
        pg = context.new_page()
        problems: list[str] = []
        warnings: list[str] = []

        def problem(text: str) -> None:
            if not (frontend.root is not None and comfy_harness.newer_frontend_noise(text)):
                problems.append(text)

        def console(m: Any) -> None:
            if m.type == "error" and not m.text.startswith("Failed to load resource"):
                problem(f"console.error: {m.text}")
            elif m.type == "warning":
                warnings.append(m.text)

        pg.on("pageerror", lambda e: problem(f"pageerror: {e}"))
        pg.on("console", console)
        pg.on("response", lambda r: problem(f"HTTP {r.status} {r.url}")
              if r.status >= 400 and not any(b in r.url for b in BENIGN_404) else None)
        pg.goto(frontend_server.url)
        _ready(pg)
        served = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        print(f"frontend {frontend.name}: comfyui-frontend-package {frontend.version}, the page reports {served}")
        pg.nq_problems = problems  # type: ignore[attr-defined]
        pg.nq_warnings = warnings  # type: ignore[attr-defined]
        yield pg
        pg.evaluate("() => __nqp.renderer(false)")
        context.close()
        browser.close()


def _no_problems(page: Any) -> None:
    problems = list(page.nq_problems)
    page.nq_problems.clear()
    assert not problems, f"the page reported problems: {problems}"


def _renderer(page: Any, renderer: str) -> None:
    page.evaluate("(v) => __nqp.renderer(v)", renderer == "nodes2")
    page.wait_for_timeout(600)


def _reload(page: Any) -> None:
    page.wait_for_timeout(400)  # let a debounced workflow save (newer frontends) go out; pagehide flushes it too
    page.reload()
    _ready(page)
    page.wait_for_timeout(800)


def _overlaps(boxes: list[list[Any]]) -> list[str]:
    bad = []
    for i, (a, ax, ay, aw, ah, _) in enumerate(boxes):
        for b, bx, by, bw, bh, _ in boxes[i + 1:]:
            dx = min(ax + aw, bx + bw) - max(ax, bx)
            dy = min(ay + ah, by + bh) - max(ay, by)
            if dx > 1 and dy > 1:  # a shared edge is no overlap
                bad.append(f"node {a} {[round(v) for v in (ax, ay, aw, ah)]} overlaps node {b} "
                           f"{[round(v) for v in (bx, by, bw, bh)]} by {dx:.0f}x{dy:.0f}")
    return bad


def _run(page: Any, server: ComfyServer, timeout: float = 300) -> dict[str, Any]:
    """Queue the page's graph as its Run button does; wait for the run to finish; return its history entry."""
    known = set(server.history())
    page.evaluate("() => __nqp.run()")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(server.history()) - known
        if new:
            entry = server.wait(new.pop(), timeout=timeout)
            err = comfy_harness.execution_error(entry)
            assert err is None, f"run failed: {json.dumps(err)[:2000]}"
            page.wait_for_timeout(800)  # the executed messages reach the page
            return entry
        time.sleep(0.2)
    raise AssertionError("the page queued nothing")


# --------------------------------------------------------------------------------------------------
# 1. a stroke, Undo and Clear are workflow changes: kept by a page reload
# --------------------------------------------------------------------------------------------------

def _draw(page: Any, nid: int, x0: float, y0: float, x1: float, y1: float) -> None:
    canvas = page.locator(f'.nq-highlight[data-node-id="{nid}"] canvas.nq-hl-canvas')
    box = canvas.bounding_box()
    assert box and box["width"] > 50, f"no drawing canvas on node {nid}: {box}"
    page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=6)
    page.mouse.up()


@pytest.mark.parametrize("renderer", RENDERERS)
def test_reload_keeps_the_last_scribble_edit(page: Any, renderer: str) -> None:
    _renderer(page, renderer)
    try:
        page.evaluate("""() => { __nqp.clear(); const n = LiteGraph.createNode('HighlightScribbleGuide');
            n.pos = [120, 160]; app.graph.add(n); __nqp.set(n.id, 'prompt', 'a cat, a red ball');
            app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true); }""")
        nid = page.evaluate("() => app.graph._nodes.find(n => n.type === 'HighlightScribbleGuide').id")
        page.wait_for_timeout(600)
        # the page's workflow counts as saved; then each edit must set its "modified" flag and survive a reload
        _draw(page, nid, 0.2, 0.2, 0.6, 0.5)
        _draw(page, nid, 0.3, 0.3, 0.8, 0.45)  # the top half: the whole canvas may not fit the viewport
        assert page.evaluate("(i) => __nqp.strokes(i)", nid) == 2
        assert page.evaluate("() => __nqp.modified()") is True, "a stroke did not mark the workflow modified"
        _reload(page)
        assert page.evaluate("(i) => __nqp.strokes(i)", nid) == 2, "the strokes were lost by a reload"
        page.locator(f'.nq-highlight[data-node-id="{nid}"] button.nq-hl-undo').click()
        assert page.evaluate("(i) => __nqp.strokes(i)", nid) == 1
        _reload(page)
        assert page.evaluate("(i) => __nqp.strokes(i)", nid) == 1, "the undone stroke came back after a reload"
        if renderer == "classic":  # Clear takes the same path as Undo: one renderer is enough
            page.locator(f'.nq-highlight[data-node-id="{nid}"] button.nq-hl-clear').click()
            assert page.evaluate("(i) => __nqp.strokes(i)", nid) == 0
            _reload(page)
            assert page.evaluate("(i) => __nqp.strokes(i)", nid) == 0, "cleared strokes came back after a reload"
        # connectivity is read through node.isInputConnected where the frontend has it, never input.link (deprecated
        # in 1.5x): every read of `link` on the node's inputs while the widget refreshes is recorded
        reads = page.evaluate("""(i) => { const n = __nqp.node(i), seen = [], own = n.isInputConnected;
            let inside = false;  // the frontend's own isInputConnected may read it
            if (own) n.isInputConnected = function (...a) { inside = true; try { return own.apply(this, a); }
                                                           finally { inside = false; } };
            for (const inp of n.inputs) { let v = inp.link;
              Object.defineProperty(inp, 'link', { configurable: true, get() { if (!inside) seen.push(inp.name);
                                                   return v; }, set(x) { v = x; } }); }
            n.nqHighlight.refreshLegend(); n.nqHighlight.poll();
            return typeof n.isInputConnected === 'function' ? seen : []; }""", nid)
        assert reads == [], f"the widget read input.link of {reads}"
    finally:
        _renderer(page, "classic")
    _no_problems(page)


def test_json_box_opens_in_nodes2(page: Any) -> None:
    _renderer(page, "nodes2")
    try:
        page.evaluate("""() => { __nqp.clear(); const n = LiteGraph.createNode('HighlightScribbleGuide');
            n.pos = [120, 160]; app.graph.add(n); __nqp.set(n.id, 'prompt', 'a cat');
            app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true); }""")
        nid = page.evaluate("() => app.graph._nodes[0].id")
        page.wait_for_timeout(600)
        root = page.locator(f'.nq-highlight[data-node-id="{nid}"]')
        canvas = root.locator("canvas.nq-hl-canvas").bounding_box()
        assert canvas and canvas["width"] > 250 and canvas["height"] > 250, f"canvas too small in Nodes 2.0: {canvas}"
        root.locator("button.nq-hl-json").click()
        box = root.locator(".nq-hl-json-box")
        box.wait_for(state="visible", timeout=5_000)
        assert json.loads(box.input_value()) == {"version": 1, "strokes": []}
        # an edit in the box is the drawing (and a workflow change)
        box.fill(json.dumps({"version": 1, "strokes": [{"phrase": "a cat", "width": 0.1, "points": [[0.1, 0.1], [0.5, 0.5]]}]}))
        root.locator(".nq-hl-status").click()  # focus leaves the box: "change"
        page.wait_for_function("(i) => __nqp.strokes(i) === 1", arg=nid, timeout=5_000)
        root.locator("button.nq-hl-json").click()
        box.wait_for(state="hidden", timeout=5_000)
    finally:
        _renderer(page, "classic")
    _no_problems(page)


# --------------------------------------------------------------------------------------------------
# 2. reports: fixed-height boxes, never over another node (every example, both renderers)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("renderer", RENDERERS)
def test_reports_do_not_cover_nodes_in_any_example(page: Any, renderer: str) -> None:
    """Every example, loaded, then every report node given a 40-line report through the page's own "executed"
    handling (as after a run): no two node boxes overlap, and every report box is shown, scrollable, at full size."""
    _renderer(page, renderer)
    failures: list[str] = []
    try:
        for path in EXAMPLES:
            page.evaluate("([t, n]) => __nqp.load(t, n)", [path.read_text(encoding="utf-8"), path.name])
            page.evaluate("() => __nqp.fit()")
            page.wait_for_timeout(500)
            before = page.evaluate("() => __nqp.boxes()")
            ids = page.evaluate("() => app.graph._nodes.filter(n => n.widgets?.some(w => w.name === 'noisequery_report'))"
                                ".map(n => String(n.id))")
            for nid in ids:
                page.evaluate("([i, t]) => __nqp.executed(i, { text: [t] })", [nid, LONG_REPORT])
            page.wait_for_timeout(500)
            after = page.evaluate("() => __nqp.boxes()")
            failures += [f"{path.stem}: {o}" for o in _overlaps(after)]
            grown = [f"{a[0]}: {round(a[4])} -> {round(b[4])}" for a, b in zip(before, after, strict=True)
                     if b[4] > a[4] + 2]
            if grown:
                failures.append(f"{path.stem}: nodes grew after the reports came in: {grown}")
            for nid in ids:
                if page.evaluate("(i) => __nqp.reportText(i)", nid) != LONG_REPORT:
                    failures.append(f"{path.stem}: node {nid} does not show its report")
                rb = page.evaluate("(i) => __nqp.reportBox(i)", nid)
                if not rb or not rb["shown"] or rb["h"] < 30 or not rb["scrolls"]:
                    failures.append(f"{path.stem}: node {nid} report box {rb} (want shown, >= 30 px high, scrolling)")
    finally:
        _renderer(page, "classic")
    assert not failures, "\n".join(failures)
    _no_problems(page)


# --------------------------------------------------------------------------------------------------
# 3.-5. a build through the page: its report and batch, the library list, a query, a tab switch
# --------------------------------------------------------------------------------------------------

def _example(name: str) -> str:
    return (REPO_ROOT / "example_workflows" / f"{name}.json").read_text(encoding="utf-8")


def test_build_query_and_tab_switch(page: Any, frontend_server: ComfyServer, tiny_ckpt_name: str,
                                    clip_weights: Path) -> None:
    server = frontend_server
    library = f"page_{uuid.uuid4().hex[:8]}"
    # -- the build example, made small; a query node on the same page already lists libraries
    page.evaluate("([t, n]) => __nqp.load(t, n)", [_example("build_noise_library"), "build_noise_library.json"])
    build = page.evaluate("() => app.graph._nodes.find(n => n.type === 'BuildNoiseLibrary').id")
    loader = page.evaluate("() => app.graph._nodes.find(n => n.type === 'CheckpointLoaderSimple').id")
    for name, value in (("library_name", library), ("width", 64), ("height", 64), ("count", 4), ("batch_size", 4),
                        ("steps", 2), ("clip_model", "ViT-B-32:openai"), ("thumbnail_size", 64)):
        page.evaluate("([i, n, v]) => __nqp.set(i, n, v)", [build, name, value])
    page.evaluate("([i, v]) => __nqp.set(i, 'ckpt_name', v)", [loader, tiny_ckpt_name])
    query = page.evaluate("""() => { const n = LiteGraph.createNode('NoiseQueryText'); n.pos = [0, 900];
        app.graph.add(n); return n.id; }""")
    assert library not in (page.evaluate("([i, n]) => __nqp.combo(i, n)", [query, "library"]) or [])
    _run(page, server)

    # 3. the report is on the Build node at its first build, and the node shows the batch, not a progress preview
    page.wait_for_function("(i) => (__nqp.reportText(i) ?? '').includes('entries in')", arg=build, timeout=15_000)
    assert library in page.evaluate("(i) => __nqp.reportText(i)", build)
    page.wait_for_function("(i) => !(app.nodePreviewImages?.[String(i)]?.length)", arg=build, timeout=15_000)
    # 4. the library just built is offered without pressing R: on the node already there, and on a new one
    page.wait_for_function("([i, n]) => (__nqp.combo(i, 'library') ?? []).includes(n)", arg=[query, library],
                           timeout=15_000)

    # -- the text query example with that library, run through the page
    page.evaluate("([t, n]) => __nqp.load(t, n)", [_example("text_query_ksampler"), "text_query_ksampler.json"])
    qid = page.evaluate("() => app.graph._nodes.find(n => n.type === 'NoiseQueryText').id")
    assert library in page.evaluate("(i) => __nqp.combo(i, 'library')", qid), "a newly loaded query node lacks it"
    page.evaluate("([i, v]) => __nqp.set(i, 'library', v)", [qid, library])
    for n in page.evaluate("() => app.graph._nodes.map(n => [n.id, n.type])"):
        if n[1] == "CheckpointLoaderSimple":
            page.evaluate("([i, v]) => __nqp.set(i, 'ckpt_name', v)", [n[0], tiny_ckpt_name])
        if n[1] == "EmptyLatentImage":
            page.evaluate("([i]) => { __nqp.set(i, 'width', 64); __nqp.set(i, 'height', 64); }", [n[0]])
        if n[1] == "KSampler":
            page.evaluate("([i]) => __nqp.set(i, 'steps', 2)", [n[0]])
    _run(page, server)
    page.wait_for_function("(i) => (__nqp.reportText(i) ?? '').length > 0", arg=qid, timeout=15_000)
    report = page.evaluate("(i) => __nqp.reportText(i)", qid)
    page.evaluate("() => __nqp.fit()")
    page.wait_for_timeout(300)
    assert not _overlaps(page.evaluate("() => __nqp.boxes()")), "nodes overlap after the run"

    # 5. another tab and back: the report is still there
    page.evaluate("() => __nqp.command('Comfy.NewBlankWorkflow')")
    page.wait_for_timeout(800)
    assert page.evaluate("() => app.graph._nodes.some(n => n.type === 'NoiseQueryText')") is False
    page.evaluate("() => __nqp.command('Workspace.PreviousOpenedWorkflow')")
    page.wait_for_function("() => app.graph._nodes.some(n => n.type === 'NoiseQueryText')", timeout=10_000)
    qid = page.evaluate("() => app.graph._nodes.find(n => n.type === 'NoiseQueryText').id")
    page.wait_for_function("([i, t]) => __nqp.reportText(i) === t", arg=[qid, report], timeout=10_000)
    _no_problems(page)


def test_every_example_has_its_template_thumbnail(frontend_server: ComfyServer) -> None:
    """ComfyUI lists the examples for the template browser, which shows <name>.jpg next to each: all are served."""
    sess = frontend_server._http()
    listed = sess.get(f"{frontend_server.url}/api/workflow_templates", timeout=30).json()
    pack = next(k for k, v in listed.items() if "text_query_ksampler" in v)
    assert sorted(listed[pack]) == sorted(p.stem for p in EXAMPLES), listed[pack]
    for path in EXAMPLES:
        r = sess.get(f"{frontend_server.url}/api/workflow_templates/{pack}/{path.stem}.jpg", timeout=30)
        assert r.status_code == 200, f"{path.stem}.jpg: HTTP {r.status_code}"
        assert r.content[:3] == b"\xff\xd8\xff", f"{path.stem}.jpg is not a JPEG"
        assert len(r.content) < 60_000, f"{path.stem}.jpg is {len(r.content)} bytes: keep thumbnails small"
