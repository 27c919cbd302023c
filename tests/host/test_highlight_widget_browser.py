"""The HighlightScribbleGuide drawing widget (web/js/highlight_scribble.js) in the real ComfyUI page.

Headless Chromium (Debian's /usr/bin/chromium driven by the PyPI `playwright` package; no browser is ever
downloaded) opens the page of the session's headless ComfyUI (`comfy_server`, this repo loaded as the NoiseQuery
pack), adds the node, picks a phrase and drags strokes on the node's canvas with the mouse, then reads what the
frontend would queue (`app.graphToPrompt().output`): the node's `highlights` input must hold the strokes JSON
that noisequery_core/guidance/strokes.py parses, with points that follow the drag. Also: the phrase list following the
prompt, custom phrases, undo and clear, save and reload of the workflow, the canvas following the width/height
inputs, a drawing gesture moving neither the view nor the node, the same in the Nodes 2.0 (Vue) renderer, and a
run through the page's Run button with a `background` IMAGE that the widget then draws under the strokes.

Every test runs once per frontend (`frontend` fixture, tests/host/conftest.py): "pinned" is the
comfyui-frontend-package ComfyUI's requirements pin, on the session's `comfy_server`; "newest" is the newest
release on PyPI (downloaded by scripts/_host_setup.sh), on a second server started with --front-end-root.

A screenshot of the widget is kept as a test artifact (printed path; copied to $NQ_ARTIFACTS when set).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import comfy_harness
import pytest
from comfy_harness import ComfyServer, Frontend

pytestmark = pytest.mark.skipif(comfy_harness.find_comfyui() is None, reason=comfy_harness.SKIP_REASON)

CHROMIUM = "/usr/bin/chromium"
# Same flags as scripts/make_ui_workflows.py.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1400, "height": 1000}
NODE = "HighlightScribbleGuide"
PROMPT = "a cat, a red ball"
NODE_POS = [120, 160]  # canvas units; at zoom 1 and offset 0 this is right of the side bar, below the toolbars
TOL = 0.02  # normalised-coordinate tolerance for points that follow the mouse (about 5 px on a 250 px canvas)
# 404s every fresh ComfyUI user directory produces (no custom CSS, no saved workflows yet): not our problem.
BENIGN_404 = ("/api/userdata/user.css", "/user.css", "/api/userdata?dir=workflows", "/api/userdata?dir=subgraphs",
              "/api/userdata/comfy.templates.json")

JS_HELPERS = r"""
window.__nqh = {
  node: (id) => app.graph.getNodeById(id),
  // A fresh graph holding one HighlightScribbleGuide at `pos`, the view at zoom 1 with no pan; returns its id.
  // Nodes are removed one by one rather than by graph.clear(): that keeps node ids unique, since the Nodes 2.0
  // renderer keeps showing a removed node's DOM widgets for a new node that gets the same id in the same tick.
  add(pos, prompt) {
    for (const n of [...app.graph._nodes]) app.graph.remove(n);
    const n = LiteGraph.createNode('HighlightScribbleGuide');
    n.pos = pos;
    app.graph.add(n);
    const w = n.widgets.find(w => w.name === 'prompt');
    w.value = prompt;
    app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0];
    app.canvas.setDirty(true, true);
    return n.id;
  },
  set(id, name, value) {
    const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
    w.value = value; w.callback?.(value);
    app.canvas.setDirty(true, true);
  },
  get: (id, name) => app.graph.getNodeById(id).widgets.find(w => w.name === name)?.value,
  async output() { return JSON.stringify((await app.graphToPrompt()).output); },
  async workflow() { return JSON.stringify((await app.graphToPrompt()).workflow); },
  async load(text) { await app.loadGraphData(JSON.parse(text), true, true, 'highlight-test'); },
  view() { return { scale: app.canvas.ds.scale, offset: [...app.canvas.ds.offset] }; },
  // [r, g, b, a] of the widget canvas at normalised (x, y).
  pixel(id, x, y) {
    const c = document.querySelector(`.nq-highlight[data-node-id="${id}"] canvas`);
    const d = c.getContext('2d').getImageData(Math.floor(x * (c.width - 1)), Math.floor(y * (c.height - 1)), 1, 1).data;
    return Array.from(d);
  },
  // The highlights text box: hidden by the widget, still a serialized widget.
  textBox(id) {
    const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'highlights');
    const el = w.element ?? w.inputEl;
    return { hidden: !!w.hidden, serialize: w.serialize !== false && w.options?.serialize !== false,
             shown: !!el && el.getClientRects().length > 0 && getComputedStyle(el).visibility !== 'hidden' };
  },
  redPng() {
    const c = document.createElement('canvas'); c.width = 64; c.height = 64;
    const ctx = c.getContext('2d'); ctx.fillStyle = '#ff0000'; ctx.fillRect(0, 0, 64, 64);
    return c.toDataURL('image/png');
  },
};
"""


# --------------------------------------------------------------------------------------------------
# Fixtures: one browser page on the session's ComfyUI for the whole module
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(frontend_server: ComfyServer, frontend: Frontend) -> Iterator[Any]:
    """The ComfyUI page in headless Chromium, ready (app.vueAppReady), with __nqh helpers; records page errors.

    One page per frontend (see the module docstring); the page must report the frontend version it was served."""
    comfy_server = frontend_server
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright not installed: pip install -r requirements-dev.txt (the browser is /usr/bin/chromium)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y --no-install-recommends chromium")
    if NODE not in comfy_server.object_info():
        pytest.fail(f"the server does not know node {NODE}; is it in nodes/__init__.py NODE_CLASSES? log tail:\n"
                    f"{comfy_server.log_tail()}")
    sess = comfy_server._http()
    # First-visit templates dialog off; minimap and canvas info off so they do not cover the node.
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                       ("Comfy.Graph.CanvasInfo", False)):
        sess.post(f"{comfy_server.url}/settings/{key}", data=json.dumps(value), timeout=30).raise_for_status()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        context = browser.new_context(viewport=VIEWPORT)
        pg = context.new_page()
        problems: list[str] = []
        newer_noise: list[str] = []  # the newest frontend's known complaints about this older host: not the pack's

        def problem(text: str) -> None:
            if frontend.root is not None and comfy_harness.newer_frontend_noise(text):
                newer_noise.append(text)
            else:
                problems.append(text)

        pg.on("pageerror", lambda e: problem(f"pageerror: {e}"))
        pg.on("console", lambda m: problem(f"console.error: {m.text}")
              if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        pg.on("response", lambda r: problem(f"HTTP {r.status} {r.url}")
              if r.status >= 400 and not any(b in r.url for b in BENIGN_404) else None)
        pg.goto(comfy_server.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady === true",
                             timeout=90_000)
        served = pg.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
        print(f"frontend {frontend.name}: comfyui-frontend-package {frontend.version}, the page reports {served}")
        if frontend.version != "?":
            assert served == frontend.version, f"{frontend.name} frontend: page runs {served}, not {frontend.version}"
        pg.evaluate(JS_HELPERS)
        pg.wait_for_timeout(500)
        pg.nq_problems = problems  # type: ignore[attr-defined]
        yield pg
        context.close()
        browser.close()
        if newer_noise:
            kinds = sorted({str(comfy_harness.newer_frontend_noise(t)) for t in newer_noise})
            print(f"{frontend.name} frontend {frontend.version}: {len(newer_noise)} known newer-frontend complaints "
                  f"ignored ({'; '.join(kinds)})")


@pytest.fixture
def node_id(page: Any) -> int:
    """A fresh graph with one HighlightScribbleGuide whose prompt is PROMPT, its widget drawn and ready."""
    nid = page.evaluate("([p, t]) => __nqh.add(p, t)", [NODE_POS, PROMPT])
    _wait_phrases(page, nid, ["a cat", "a red ball"])
    return int(nid)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def _root(page: Any, nid: int) -> Any:
    return page.locator(f'.nq-highlight[data-node-id="{nid}"]')


def _wait_phrases(page: Any, nid: int, phrases: list[str]) -> None:
    """Wait until the node's phrase list shows `phrases` (then the custom entry); the widget polls on redraw."""
    page.wait_for_function(
        """([id, want]) => { app.canvas.setDirty(true, true);
             const s = document.querySelector(`.nq-highlight[data-node-id="${id}"] select.nq-hl-phrase`);
             if (!s) return false;
             const got = Array.from(s.options).map(o => o.value).slice(0, -1);
             return JSON.stringify(got) === JSON.stringify(want); }""",
        arg=[nid, phrases], timeout=15_000)


def _canvas_box(page: Any, nid: int) -> dict[str, float]:
    """The widget canvas's box on the page, once it holds still: the Nodes 2.0 renderer of frontend 1.58 can still be
    laying the node out just after a change (a stroke dragged on a box read then lands ~5% off)."""
    canvas = _root(page, nid).locator("canvas.nq-hl-canvas")
    box = canvas.bounding_box()
    for _ in range(30):
        page.wait_for_timeout(100)
        again = canvas.bounding_box()
        if again == box:
            break
        box = again
    assert box and box["width"] > 50 and box["height"] > 50, f"widget canvas missing or tiny: {box}"
    return dict(box)


def _drag(page: Any, nid: int, path: list[tuple[float, float]], steps: int = 8) -> None:
    """Press at path[0], move through the other points (normalised canvas coordinates) and release."""
    box = _canvas_box(page, nid)

    def at(p: tuple[float, float]) -> tuple[float, float]:
        return box["x"] + p[0] * box["width"], box["y"] + p[1] * box["height"]

    page.mouse.move(*at(path[0]))
    page.mouse.down()
    for p in path[1:]:
        page.mouse.move(*at(p), steps=steps)
    page.mouse.up()
    after = _root(page, nid).locator("canvas.nq-hl-canvas").bounding_box()
    assert after and all(abs(after[k] - box[k]) < 1 for k in box), f"the widget canvas moved during the drag: {box} -> {after}"


def _highlights(page: Any, nid: int) -> dict[str, Any]:
    """The node's `highlights` input as the frontend would queue it, parsed."""
    out = json.loads(page.evaluate("() => __nqh.output()"))
    text = out[str(nid)]["inputs"]["highlights"]
    assert isinstance(text, str), f"highlights input is not the JSON text: {text!r}"
    data: dict[str, Any] = json.loads(text)
    return data


def _dist_to_segment(p: list[float], a: tuple[float, float], b: tuple[float, float]) -> float:
    ax, ay = a
    bx, by = b
    t = ((p[0] - ax) * (bx - ax) + (p[1] - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2)
    t = min(1.0, max(0.0, t))
    return math.hypot(p[0] - (ax + t * (bx - ax)), p[1] - (ay + t * (by - ay)))


def _dist_to_path(p: list[float], path: list[tuple[float, float]]) -> float:
    return min(_dist_to_segment(p, a, b) for a, b in zip(path, path[1:], strict=False))


def _check_stroke(stroke: dict[str, Any], phrase: str, path: list[tuple[float, float]], width: float) -> None:
    assert stroke["phrase"] == phrase
    assert stroke["width"] == pytest.approx(width, abs=1e-9)
    pts = stroke["points"]
    assert len(pts) >= len(path), f"too few points for the drag: {pts}"
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in pts), pts
    assert math.dist(pts[0], path[0]) < TOL, f"first point {pts[0]} vs press at {path[0]}"
    assert math.dist(pts[-1], path[-1]) < TOL, f"last point {pts[-1]} vs release at {path[-1]}"
    far = [p for p in pts if _dist_to_path(p, path) > TOL]
    assert not far, f"points off the dragged path {path}: {far}"
    # the points come in drawing order: the distance along the path never goes back by more than the tolerance
    walked = [_arc_position(p, path) for p in pts]
    assert all(b >= a - TOL for a, b in zip(walked, walked[1:], strict=False)), walked


def _arc_position(p: list[float], path: list[tuple[float, float]]) -> float:
    """Distance along the polyline `path` of the projection of p on its nearest segment."""
    best, pos, run = math.inf, 0.0, 0.0
    for a, b in zip(path, path[1:], strict=False):
        seg = math.dist(a, b)
        d = _dist_to_segment(p, a, b)
        if d < best:
            t = ((p[0] - a[0]) * (b[0] - a[0]) + (p[1] - a[1]) * (b[1] - a[1])) / (seg * seg)
            best, pos = d, run + min(1.0, max(0.0, t)) * seg
        run += seg
    return pos


def _save_artifact(page: Any, nid: int, tmp_path: Path, name: str) -> Path:
    """Screenshot of the node (and the whole page) into tmp_path and $NQ_ARTIFACTS; prints the paths."""
    page.mouse.move(5, VIEWPORT["height"] // 2)
    page.evaluate("() => app.canvas.setDirty(true, true)")
    page.wait_for_timeout(300)
    box = page.evaluate("""(id) => { const n = app.graph.getNodeById(id), ds = app.canvas.ds,
        T = LiteGraph.NODE_TITLE_HEIGHT, r = app.canvas.canvas.getBoundingClientRect();
        return { x: r.left + (n.pos[0] + ds.offset[0]) * ds.scale - 10, y: r.top + (n.pos[1] - T + ds.offset[1]) * ds.scale - 10,
                 width: n.size[0] * ds.scale + 20, height: (n.size[1] + T) * ds.scale + 20 }; }""", nid)
    node_png = tmp_path / f"{name}.png"
    page.screenshot(path=str(node_png), clip=box)
    page.screenshot(path=str(tmp_path / f"{name}_page.png"))
    saved = [node_png, tmp_path / f"{name}_page.png"]
    dest = os.environ.get("NQ_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        saved += [Path(shutil.copy(p, Path(dest) / p.name)) for p in saved[:2]]
    print("highlight widget screenshot:", ", ".join(str(p) for p in saved))
    return node_png


def _no_problems(page: Any) -> None:
    problems = list(page.nq_problems)
    page.nq_problems.clear()
    assert not problems, f"the page reported problems: {problems}"


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

def test_canvas_replaces_text_box(page: Any, node_id: int) -> None:
    """The raw JSON widget is hidden but still serialized; an untouched node queues the empty drawing."""
    box = page.evaluate("(id) => __nqh.textBox(id)", node_id)
    assert box == {"hidden": True, "serialize": True, "shown": False}, box
    assert _highlights(page, node_id) == {"version": 1, "strokes": []}
    # the { } button shows the strokes as JSON in the widget's own box (the hidden widget stays hidden), and hides it
    _root(page, node_id).locator("button.nq-hl-json").click()
    page.evaluate("() => app.canvas.setDirty(true, true)")
    box = _root(page, node_id).locator(".nq-hl-json-box")
    box.wait_for(state="visible", timeout=5_000)
    assert json.loads(box.input_value()) == {"version": 1, "strokes": []}
    _root(page, node_id).locator("button.nq-hl-json").click()
    box.wait_for(state="hidden", timeout=5_000)
    assert page.evaluate("(id) => __nqh.textBox(id)", node_id)["hidden"] is True
    _no_problems(page)


def test_drag_makes_a_stroke_for_the_phrase(page: Any, node_id: int, tmp_path: Path) -> None:
    root = _root(page, node_id)
    root.locator("select.nq-hl-phrase").select_option("a cat")
    root.locator("input.nq-hl-width").fill("0.1")
    view = page.evaluate("() => __nqh.view()")
    pos = page.evaluate("(id) => [...__nqh.node(id).pos]", node_id)
    path = [(0.2, 0.3), (0.5, 0.45), (0.8, 0.3)]
    _drag(page, node_id, path)

    data = _highlights(page, node_id)
    assert data["version"] == 1 and len(data["strokes"]) == 1, data
    stroke = data["strokes"][0]
    _check_stroke(stroke, "a cat", path, 0.1)
    assert stroke["color"] == "#e6194b"  # first phrase of the prompt, first palette colour
    # ComfyUI's canvas saw none of it: no pan, no node drag
    assert page.evaluate("() => __nqh.view()") == view
    assert page.evaluate("(id) => [...__nqh.node(id).pos]", node_id) == pos
    # the stroke is drawn where it was dragged, in its colour (alpha 0.6 over the dark background)
    r, g, b, _ = page.evaluate("([id, x, y]) => __nqh.pixel(id, x, y)", [node_id, 0.5, 0.45])
    assert r > 120 and r > 2 * g and r > 2 * b, (r, g, b)
    r, g, b, _ = page.evaluate("([id, x, y]) => __nqh.pixel(id, x, y)", [node_id, 0.5, 0.8])
    assert max(r, g, b) < 80, (r, g, b)

    # a second phrase, by a click: a 2-point dot in the second colour
    root.locator("select.nq-hl-phrase").select_option("a red ball")
    box = _canvas_box(page, node_id)
    page.mouse.click(box["x"] + 0.3 * box["width"], box["y"] + 0.75 * box["height"])
    strokes = _highlights(page, node_id)["strokes"]
    assert [s["phrase"] for s in strokes] == ["a cat", "a red ball"]
    dot = strokes[1]
    assert len(dot["points"]) == 2 and dot["points"][0] == dot["points"][1], dot
    assert math.dist(dot["points"][0], (0.3, 0.75)) < TOL
    assert dot["color"] == "#3cb44b"
    legend = root.locator(".nq-hl-legend").inner_text()
    assert "a cat (1)" in legend and "a red ball (1)" in legend, legend
    _save_artifact(page, node_id, tmp_path, "highlight_widget")
    _no_problems(page)


def test_custom_phrase(page: Any, node_id: int) -> None:
    root = _root(page, node_id)
    root.locator("select.nq-hl-phrase").select_option(label="type a phrase\u2026")
    root.locator("input.nq-hl-custom").fill("red  ball")
    _drag(page, node_id, [(0.1, 0.1), (0.4, 0.4)])
    strokes = _highlights(page, node_id)["strokes"]
    assert [s["phrase"] for s in strokes] == ["red ball"]
    _no_problems(page)


def test_phrases_follow_the_prompt(page: Any, node_id: int) -> None:
    """Editing the prompt refills the phrase list; a drawn phrase that left the prompt stays, marked."""
    root = _root(page, node_id)
    root.locator("select.nq-hl-phrase").select_option("a cat")
    _drag(page, node_id, [(0.1, 0.1), (0.3, 0.3)])
    page.evaluate("(id) => __nqh.set(id, 'prompt', 'a photo of a dog and a red ball on a lawn')", node_id)
    _wait_phrases(page, node_id, ["a photo of a dog", "a photo", "a dog", "a red ball on a lawn", "a red ball",
                                  "a lawn", "a cat"])
    labels = root.locator("select.nq-hl-phrase option").all_inner_texts()
    assert "a cat (not in prompt)" in labels, labels
    assert _highlights(page, node_id)["strokes"][0]["phrase"] == "a cat"  # the drawing itself is left alone
    _no_problems(page)


def test_undo_and_clear(page: Any, node_id: int) -> None:
    root = _root(page, node_id)
    root.locator("select.nq-hl-phrase").select_option("a cat")
    paths = [[(0.1, 0.1), (0.3, 0.2)], [(0.5, 0.5), (0.7, 0.9)], [(0.9, 0.1), (0.6, 0.3)]]
    for p in paths:
        _drag(page, node_id, p)
    strokes = _highlights(page, node_id)["strokes"]
    assert len(strokes) == 3
    root.locator("button.nq-hl-undo").click()
    strokes = _highlights(page, node_id)["strokes"]
    assert len(strokes) == 2
    for s, p in zip(strokes, paths[:2], strict=True):
        _check_stroke(s, "a cat", p, 0.06)
    root.locator("button.nq-hl-clear").click()
    assert _highlights(page, node_id) == {"version": 1, "strokes": []}
    assert root.locator("button.nq-hl-undo").is_disabled()
    _no_problems(page)


def test_save_and_reload_restores_strokes(page: Any, node_id: int) -> None:
    root = _root(page, node_id)
    root.locator("select.nq-hl-phrase").select_option("a red ball")
    path = [(0.25, 0.7), (0.75, 0.7)]
    _drag(page, node_id, path)
    before = _highlights(page, node_id)
    workflow = page.evaluate("() => __nqh.workflow()")
    saved = json.loads(workflow)
    node = next(n for n in saved["nodes"] if n["id"] == node_id)
    assert json.loads(node["widgets_values"][1]) == before  # widgets_values: prompt, highlights, width, ...
    page.evaluate("() => app.graph.clear()")
    page.evaluate("(t) => __nqh.load(t)", workflow)
    page.evaluate("([id, p]) => { const n = __nqh.node(id); n.pos = p; app.canvas.ds.scale = 1;"
                  " app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true); }", [node_id, NODE_POS])
    _wait_phrases(page, node_id, ["a cat", "a red ball"])
    assert _highlights(page, node_id) == before
    # drawn again after the load, in the phrase's colour (#3cb44b), and the text box is hidden again
    page.wait_for_function("(id) => { app.canvas.setDirty(true, true); const [r, g, b] = __nqh.pixel(id, 0.5, 0.7);"
                           " return g > 100 && g > 1.5 * r && g > 1.5 * b; }", arg=node_id, timeout=10_000)
    assert page.evaluate("(id) => __nqh.textBox(id)", node_id)["shown"] is False
    assert "1 stroke" in _root(page, node_id).locator(".nq-hl-status").inner_text()
    # and the restored drawing can be edited: undo empties it
    _root(page, node_id).locator("button.nq-hl-undo").click()
    assert _highlights(page, node_id)["strokes"] == []
    _no_problems(page)


def test_canvas_follows_width_and_height(page: Any, node_id: int) -> None:
    for w, h in ((768, 384), (384, 768), (512, 512)):
        page.evaluate("([id, w, h]) => { __nqh.set(id, 'width', w); __nqh.set(id, 'height', h); }",
                      [node_id, w, h])
        page.wait_for_function(
            """([id, a]) => { app.canvas.setDirty(true, true);
                 const r = document.querySelector(`.nq-highlight[data-node-id="${id}"] canvas`).getBoundingClientRect();
                 return Math.abs(r.width / r.height - a) < 0.03 * a; }""", arg=[node_id, w / h], timeout=10_000)
    # a stroke drawn on a wide canvas keeps its normalised coordinates
    page.evaluate("([id]) => { __nqh.set(id, 'width', 1024); __nqh.set(id, 'height', 256); }", [node_id])
    page.wait_for_function(
        """(id) => { app.canvas.setDirty(true, true);
             const r = document.querySelector(`.nq-highlight[data-node-id="${id}"] canvas`).getBoundingClientRect();
             return Math.abs(r.width / r.height - 4) < 0.12; }""", arg=node_id, timeout=10_000)
    _root(page, node_id).locator("select.nq-hl-phrase").select_option("a cat")
    path = [(0.1, 0.5), (0.9, 0.5)]
    _drag(page, node_id, path)
    _check_stroke(_highlights(page, node_id)["strokes"][0], "a cat", path, 0.06)
    _no_problems(page)


def test_run_with_background(page: Any, node_id: int, frontend_server: ComfyServer, tiny_ckpt_name: str,
                             tmp_path: Path) -> None:
    """Draw a stroke, press Run: the workflow runs with the strokes, and the `background` IMAGE shows in the widget."""
    comfy_server = frontend_server
    g = comfy_harness.txt2img_graph(tiny_ckpt_name, steps=2, width=64, height=64, save=False)
    del g["2"]
    g["8"] = {"class_type": NODE, "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT,
                                            "highlights": json.dumps({"version": 1, "strokes": []}),
                                            "width": 64, "height": 64, "background": ["9", 0]}}
    # a red that differs from run to run: an identical graph would be served from ComfyUI's cache, without ui
    g["9"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                     "color": 0xFF0000 | time.time_ns() % 32}}
    g["5"]["inputs"].update(model=["8", 0], positive=["8", 1])
    page.evaluate("(a) => app.loadApiJson(a, 'highlight-run')", g)
    # the guide on the left, the other nodes in two columns to its right, so that none covers the widget
    page.evaluate("""([p]) => { let i = 0;
        for (const n of app.graph._nodes) {
          if (String(n.id) === '8') { n.pos = p; continue; }  // ids are strings after loadApiJson in 1.58
          n.pos = [p[0] + 520 + (i % 2) * 420, p[1] + Math.floor(i / 2) * 300]; i++;
        }
        app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true); }""", [NODE_POS])
    _wait_phrases(page, 8, ["a cat", "a red ball"])
    _root(page, 8).locator("select.nq-hl-phrase").select_option("a cat")
    _drag(page, 8, [(0.3, 0.3), (0.6, 0.6)])
    assert len(_highlights(page, 8)["strokes"]) == 1

    known = set(comfy_server.history())
    page.click(comfy_harness.RUN_BUTTON)
    deadline = time.monotonic() + 120
    entry = None
    while entry is None and time.monotonic() < deadline:
        new = set(comfy_server.history()) - known
        if new:
            entry = comfy_server.wait(new.pop(), timeout=120)
        time.sleep(0.2)
    assert entry is not None, "the Run button queued nothing"
    err = comfy_harness.execution_error(entry)
    assert err is None, f"run failed: {json.dumps(err)[:2000]}"
    queued = entry["prompt"][2]["8"]["inputs"]["highlights"]
    assert json.loads(queued)["strokes"][0]["phrase"] == "a cat"
    ui = entry["outputs"].get("8", {})
    assert str(ui.get("highlight_background", [""])[0]).startswith("data:image/"), f"node 8 ui: {str(ui)[:300]}"
    # the red background is drawn under the strokes, away from the stroke
    page.wait_for_function("() => { app.canvas.setDirty(true, true); const [r, g, b] = __nqh.pixel(8, 0.9, 0.1);"
                           " return r > 200 && g < 60 && b < 60; }", timeout=15_000)
    # the node's run summary (ui.text) is shown on the widget
    assert "a cat" in str(ui.get("text", [""])[0]), f"node 8 ui has no run summary: {str(ui)[:300]}"
    info = _root(page, 8).locator(".nq-hl-info")
    page.wait_for_function("() => document.querySelectorAll('.nq-hl-info').length > 0", timeout=15_000)
    assert "a cat" in info.inner_text(), info.inner_text()
    _save_artifact(page, 8, tmp_path, "highlight_widget_after_run")
    _no_problems(page)


def test_nodes2_renderer(page: Any) -> None:
    """The same drawing works when ComfyUI renders nodes as DOM (setting "Modern Node Design (Nodes 2.0)")."""
    page.evaluate("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
    try:
        page.wait_for_timeout(500)
        nid = int(page.evaluate("([p, t]) => __nqh.add(p, t)", [NODE_POS, PROMPT]))
        _wait_phrases(page, nid, ["a cat", "a red ball"])
        assert page.evaluate("(id) => __nqh.textBox(id)", nid)["shown"] is False
        _root(page, nid).locator("select.nq-hl-phrase").select_option("a red ball")
        pos = page.evaluate("(id) => [...__nqh.node(id).pos]", nid)
        path = [(0.2, 0.2), (0.7, 0.6)]
        _drag(page, nid, path)
        # the DOM node did not take the drag for a move of itself
        assert page.evaluate("(id) => [...__nqh.node(id).pos]", nid) == pos
        strokes = _highlights(page, nid)["strokes"]
        assert len(strokes) == 1, strokes
        _check_stroke(strokes[0], "a red ball", path, 0.06)
        # saved and loaded again in this renderer: the stroke is back, and drawing goes on from it
        workflow = page.evaluate("() => __nqh.workflow()")
        page.evaluate("(t) => __nqh.load(t)", workflow)
        page.evaluate("([id, p]) => { const n = __nqh.node(id); n.pos = p; app.canvas.ds.scale = 1;"
                      " app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true); }", [nid, NODE_POS])
        _wait_phrases(page, nid, ["a cat", "a red ball"])
        assert _highlights(page, nid)["strokes"] == strokes
        _root(page, nid).locator("select.nq-hl-phrase").select_option("a cat")
        _drag(page, nid, [(0.8, 0.2), (0.8, 0.8)])
        assert [s["phrase"] for s in _highlights(page, nid)["strokes"]] == ["a red ball", "a cat"]
    finally:
        page.evaluate("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
        page.wait_for_timeout(500)
    _no_problems(page)
