#!/usr/bin/env python3
"""Check the Noise Libraries sidebar tab (web/js/noisequery_library_panel.js) in the real ComfyUI page; draw its pictures.

    .venv/bin/python scripts/library_panel_check.py [--no-pictures] [--workdir DIR] [--front-end-root DIR]
                                                    [--clip-dir DIR]

Against a real ComfyUI (tests/host/comfy_harness.py, tiny random SD1.5 checkpoint) and its page in headless
Chromium (Debian's /usr/bin/chromium through playwright; nothing is downloaded), driven by scripts/page_driver.py
(server, page, Run button, verdict: shared with the other page checks):

1. builds the library "panel/browse" (BuildNoiseLibrary through POST /prompt: 12 seeds, 64x64, 2 steps, CLIP
   ViT-B-32 with the RANDOM weights in --clip-dir/ViT-B-32/openai.safetensors, written there when missing) and
   loads a txt2img graph whose KSampler renders exactly as the library was built;
2. in the classic renderer and then in Nodes 2.0 (setting Comfy.VueNodes.Enabled): opens the tab with its
   sidebar button, picks the library, types a text, waits for the thumbnails; selects the KSampler and clicks
   hit #1 → the KSampler's seed must be that hit's seed with control_after_generate "fixed"; drags hit #2 onto
   the KSampler → its seed; adds a colour, presses "use query" on hit #3 → Noise Query (Text) + (Colour) nodes
   with rank_offset 3 feeding the KSampler's seed; presses Run → the image must equal the library's thumbnail
   of that hit's seed within the thumbnail's codec error (and be nearer to it than to any other entry's);
3. writes docs/library_panel.png (the tab with results) and docs/library_panel_use_query.png (after "use this
   query" and Run); with --no-pictures into the work folder. The tiny model's images are saturated noise and the
   CLIP weights are random: the pictures show the mechanics, not looks.
Prints one line per passed check; exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "host"))
sys.path.insert(0, str(ROOT))

import nq_graphs as G  # noqa: E402
import page_driver as pd  # noqa: E402
from page_driver import comfy_harness, mk  # noqa: E402

from noisequery_core import Library  # noqa: E402
from noisequery_core.library.storage import encode_thumbnail  # noqa: E402

LIBRARY = "panel/browse"
SEEDS = list(range(300, 312))
TAB_BUTTON = ".noisequery-libraries-tab-button, [data-testid='noisequery-libraries-tab-button']"
# Node-id prefix of the txt2img graph per renderer (<p>0 latent, <p>1 KSampler, <p>2 decode, <p>3 preview): each round
# gets ids of its own, since the Nodes 2.0 renderer can keep showing a removed node's DOM for a new node of its id.
PREFIX = {"classic": "4", "nodes2": "14"}
# Mean |difference| (0..255) allowed between the stored thumbnail and the run's image encoded the same way: the build
# rounds the decoded floats to 8 bits, PreviewImage truncates them, and the lossy webp turns 1-level changes into ~2.
CODEC_TOL = 4.0


log = pd.logger("library_panel_check")


def hits(page: mk.Page) -> list[dict[str, Any]]:
    return page.js("() => Array.from(document.querySelectorAll('.nq-lib-hit')).map(e => ({seed: e.dataset.seed,"
                   " rank: +e.dataset.rank, title: e.title}))")


def wait_thumbnails(page: mk.Page, at_least: int) -> None:
    try:
        page.page.wait_for_function(
            "(n) => { const im = Array.from(document.querySelectorAll('.nq-lib-hit img'));"
            " return im.length >= n && im.every(i => i.complete && i.naturalWidth > 0); }", arg=at_least, timeout=30_000)
    except Exception as exc:
        got = page.js("() => Array.from(document.querySelectorAll('.nq-lib-hit img')).map(i => [i.complete, i.naturalWidth])")
        raise SystemExit(f"thumbnails not shown ({exc.__class__.__name__}): status {status(page)!r}, images {got}, "
                         f"page problems {page.problems[-5:]}") from None


def status(page: mk.Page) -> str:
    return str(page.js("() => document.querySelector('.nq-lib-status')?.textContent ?? ''"))


def mean_abs_diff(a: bytes, b: bytes) -> float:
    import numpy as np
    from PIL import Image

    x = np.asarray(Image.open(io.BytesIO(a)).convert("RGB"), dtype=np.float32)
    y = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32)
    if x.shape != y.shape:
        return float("inf")
    return float(np.abs(x - y).mean())


def build_library(server: comfy_harness.ComfyServer, ckpt: str) -> None:
    graph = G.base(ckpt)
    graph["10"] = G.build(LIBRARY, seed_start=SEEDS[0], count=len(SEEDS), batch_size=4, clip_model="ViT-B-32:openai")
    entry = server.run(graph, timeout=600)
    err = comfy_harness.execution_error(entry)
    if err:
        raise SystemExit(f"BuildNoiseLibrary failed: {json.dumps(err)[:2000]}")


def check_renderer(page: mk.Page, server: comfy_harness.ComfyServer, libs: Path, ckpt: str, renderer: str,
                   failures: list[str], shots: Path | None) -> None:
    ok = lambda msg: log(f"{renderer}: {msg}")  # noqa: E731
    KSAMPLER, PREVIEW = int(PREFIX[renderer] + "1"), int(PREFIX[renderer] + "3")  # noqa: N806
    graph = {**G.base(ckpt), **G.ksampler_image(PREFIX[renderer], 0)}
    page.js("([a, n]) => app.loadApiJson(a, n)", [graph, f"library_panel_{renderer}"])
    page.settle()
    page.js("([r, z]) => __nq.fit(r, z)", [[420, 140, 1585, 990], 1.0])
    # open the tab with its sidebar button (twice closes it: open only when the panel is not shown)
    if not page.js("() => !!document.querySelector('.nq-library-panel')?.offsetParent"):
        page.page.locator(TAB_BUTTON).first.click()
    page.page.wait_for_selector(".nq-library-panel", state="visible", timeout=15_000)
    page.page.wait_for_function(f"() => Array.from(document.querySelectorAll('.nq-lib-select option')).some(o => o.value === '{LIBRARY}')",
                                timeout=15_000)
    page.page.locator(".nq-lib-select").select_option(LIBRARY)
    info = page.js("() => document.querySelector('.nq-lib-info').textContent")
    if f"{len(SEEDS)} entries" not in info or "64×64" not in info:
        failures.append(f"{renderer}: library info {info!r}")
    # clear what an earlier round typed (the grid empties), then type a text: results follow as you type
    page.js("() => { for (const i of document.querySelectorAll('.nq-lib-text, .nq-lib-color')) {"
            " i.value = ''; i.dispatchEvent(new Event('input')); } }")
    page.page.wait_for_function("() => document.querySelectorAll('.nq-lib-hit').length === 0", timeout=15_000)
    page.page.locator(".nq-lib-text").click()
    page.page.keyboard.type("a red apple", delay=30)
    wait_thumbnails(page, len(SEEDS) if len(SEEDS) < 48 else 48)
    shown = hits(page)
    if sorted(int(h["seed"]) for h in shown) != SEEDS:
        failures.append(f"{renderer}: the grid shows seeds {[h['seed'] for h in shown]}, not the library's {SEEDS}")
        return
    if "text:" not in shown[0]["title"]:
        failures.append(f"{renderer}: hover text has no per-term breakdown: {shown[0]['title']!r}")
    ok(f"typed a text: {len(shown)} thumbnails shown, hover breakdown {shown[0]['title'].splitlines()[1]!r}")
    if shots is not None and renderer == "classic":
        page.screenshot(shots / "library_panel.png")

    # click: the selected KSampler takes the seed, control fixed
    page.js("(i) => { app.canvas.deselectAll?.(); app.canvas.selectNode(app.graph.getNodeById(i)); }", KSAMPLER)
    page.js("(i) => { const w = app.graph.getNodeById(i).widgets.find(w => w.name === 'control_after_generate');"
            " if (w) w.value = 'randomize'; }", KSAMPLER)
    page.page.locator(".nq-lib-hit img").nth(1).click()
    seed, ctl = pd.widget(page, KSAMPLER, "seed"), pd.widget(page, KSAMPLER, "control_after_generate")
    if str(seed) != shown[1]["seed"] or ctl != "fixed":
        failures.append(f"{renderer}: click on hit #1 (seed {shown[1]['seed']}) left KSampler seed {seed}, control {ctl}")
    else:
        ok(f"click on hit #1 → KSampler seed {seed}, control_after_generate fixed")

    # drag hit #2 onto the KSampler (nothing selected: the drop point decides)
    page.js("() => app.canvas.deselectAll?.()")
    if renderer == "nodes2":
        target = page.page.locator(f"[data-node-id='{KSAMPLER}']").first
        pos = None
    else:
        box = page.js("(i) => { const n = app.graph.getNodeById(i), ds = app.canvas.ds;"
                      " const r = app.canvas.canvas.getBoundingClientRect();"
                      " return [r.left + (n.pos[0] + n.size[0] / 2 + ds.offset[0]) * ds.scale - r.left,"
                      "         r.top + (n.pos[1] + n.size[1] / 2 + ds.offset[1]) * ds.scale - r.top]; }", KSAMPLER)
        target = page.page.locator("canvas#graph-canvas").first
        pos = {"x": box[0], "y": box[1]}
    page.page.locator(".nq-lib-hit img").nth(2).drag_to(target, target_position=pos)
    page.settle(300)
    seed = pd.widget(page, KSAMPLER, "seed")
    if str(seed) != shown[2]["seed"]:
        failures.append(f"{renderer}: drag of hit #2 (seed {shown[2]['seed']}) onto the KSampler left seed {seed} "
                        f"(status {status(page)!r})")
    else:
        ok(f"dragged hit #2 onto the KSampler → seed {seed}")

    # a colour too, then "use this query" on hit #3, then Run
    page.page.locator(".nq-lib-color").first.fill("#ff8800")
    page.page.wait_for_function("() => /#ff8800/.test(document.querySelector('.nq-lib-hit')?.title ?? '')",
                                timeout=30_000)
    wait_thumbnails(page, len(SEEDS))
    shown = hits(page)
    pick = shown[3]
    page.js("(i) => { app.canvas.deselectAll?.(); app.canvas.selectNode(app.graph.getNodeById(i)); }", KSAMPLER)
    page.page.locator(".nq-lib-hit").nth(3).locator("button", has_text="use query").click()
    page.settle(400)
    made = page.js("""(ks) => app.graph._nodes.filter(n => n.type.startsWith('NoiseQuery')).map(n => ({type: n.type,
        id: n.id, rank: n.widgets.find(w => w.name === 'rank_offset')?.value,
        text: n.widgets.find(w => w.name === 'text')?.value, color: n.widgets.find(w => w.name === 'color')?.value,
        feedsSeed: (n.getOutputNodes ? (n.getOutputNodes(0) ?? []).map(t => t.id)
          : (n.outputs[0].links ?? []).map(l => (app.graph.links[l] ?? app.graph.getLink?.(l))?.target_id))
          .some(id => String(id) === String(ks))}))""", KSAMPLER)
    text_node = next((m for m in made if m["type"] == "NoiseQueryText"), None)
    colour_node = next((m for m in made if m["type"] == "NoiseQueryColor"), None)
    if not (text_node and colour_node and text_node["rank"] == 3 and text_node["text"] == "a red apple"
            and colour_node["color"] == "#ff8800" and text_node["feedsSeed"]):
        failures.append(f"{renderer}: 'use this query' made {made} (status {status(page)!r})")
        return
    ok("'use this query' on hit #3 → NoiseQueryText(rank_offset 3) + NoiseQueryColor feeding the KSampler seed")
    if shots is not None and renderer == "classic":
        page.js("([r, z]) => __nq.fit(r, z)", [[420, 140, 1585, 990], 1.0])
    entry = pd.run_button(page, server)
    err = comfy_harness.execution_error(entry)
    if err:
        failures.append(f"{renderer}: the queued workflow failed: {json.dumps(err)[:1500]}")
        return
    queued = entry["prompt"][2]
    if queued[str(text_node["id"])]["inputs"].get("rank_offset") != 3:
        failures.append(f"{renderer}: the queued prompt lost rank_offset: {queued[str(text_node['id'])]}")
    if queued[str(KSAMPLER)]["inputs"]["seed"] != [str(text_node["id"]), 0]:  # the seed comes from the query node
        failures.append(f"{renderer}: the queued KSampler seed is {queued[str(KSAMPLER)]['inputs']['seed']!r}, not a link "
                        f"from the Noise Query (Text) node {text_node['id']}")
    img = server.get_image(**comfy_harness.output_images(entry, str(PREVIEW))[0])
    # the run's image, thumbnailed as the library stores thumbnails, against every entry's stored thumbnail
    lib = Library.open(libs / LIBRARY)
    from PIL import Image

    as_thumb = encode_thumbnail(Image.open(io.BytesIO(img)).convert("RGB"), lib.features)
    diffs = {s: mean_abs_diff(as_thumb, (libs / LIBRARY / "thumbs" / f"{s}.webp").read_bytes()) for s in SEEDS}
    best = min(diffs, key=lambda s: diffs[s])
    want = int(pick["seed"])
    second = sorted(diffs.values())[1]
    if diffs[want] > CODEC_TOL or best != want or second < 3 * diffs[want]:
        failures.append(f"{renderer}: the rendered image differs from seed {want}'s thumbnail by {diffs[want]:.2f} "
                        f"(nearest entry: seed {best}, {diffs[best]:.2f}; next {second:.2f})")
    else:
        ok(f"Run → image equals the library entry of seed {want} (mean |Δ| {diffs[want]:.2f}/255 after the same "
           f"thumbnail encoding; next nearest entry {second:.2f})")
    if shots is not None and renderer == "classic":
        page.settle(800)
        page.screenshot(shots / "library_panel_use_query.png")
    check_example_upload(page, libs, renderer, failures)


def check_example_upload(page: mk.Page, libs: Path, renderer: str, failures: list[str]) -> None:
    """'upload image' with an entry's own thumbnail (text and colour cleared) → that entry first; × removes it."""
    page.js("() => { for (const i of document.querySelectorAll('.nq-lib-text, .nq-lib-color')) {"
            " i.value = ''; i.dispatchEvent(new Event('input')); } }")
    want = str(SEEDS[5])
    page.page.locator(".nq-lib-example-file").set_input_files(str(libs / LIBRARY / "thumbs" / f"{want}.webp"))
    try:
        page.page.wait_for_function("(s) => document.querySelector('.nq-lib-hit')?.dataset.seed === s"
                                    " && /example compared by CLIP \\+ colour layout \\+ palette/.test("
                                    "document.querySelector('.nq-lib-status')?.textContent ?? '')", arg=want, timeout=30_000)
    except Exception as exc:
        failures.append(f"{renderer}: uploaded seed {want}'s thumbnail as the example: first hits "
                        f"{[h['seed'] for h in hits(page)[:3]]}, status {status(page)!r} ({exc.__class__.__name__})")
        return
    if not page.js("() => (document.querySelector('.nq-lib-example-thumb')?.naturalWidth ?? 0) > 0"):
        failures.append(f"{renderer}: the uploaded example's thumbnail is not shown")
        return
    page.page.locator(".nq-lib-example-remove").click()
    page.page.wait_for_function("() => !document.querySelector('.nq-lib-example-thumb')"
                                " && document.querySelectorAll('.nq-lib-hit').length === 0", timeout=15_000)
    log(f"{renderer}: uploaded an entry's thumbnail as the example → that entry first (CLIP + colour), removed again")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pd.add_arguments(ap, "write the screenshots into the work folder, not docs/")
    ap.add_argument("--clip-dir", type=Path, help="the noisequery_clip folder (random ViT-B-32 weights are written "
                    "there when missing)")
    ap.add_argument("--renderers", default="classic,nodes2", help="comma-separated: classic, nodes2")
    args = ap.parse_args()
    folders = {"noisequery_clip": args.clip_dir.resolve()} if args.clip_dir else {}
    with pd.session(args, "nq_panel_ui_", log, model_dirs=folders, env={"HF_HUB_OFFLINE": "1"}) as s:
        weights = s.server.model_dirs["noisequery_clip"] / "ViT-B-32" / "openai.safetensors"
        if not weights.is_file():
            comfy_harness.write_random_open_clip_weights(weights, "ViT-B-32", seed=0)
        libs = s.server.model_dirs["noise_libraries"]
        shutil.rmtree(libs / LIBRARY, ignore_errors=True)
        t0 = time.perf_counter()
        build_library(s.server, s.ckpt.name)
        log(f"built {LIBRARY} ({len(SEEDS)} entries) in {time.perf_counter() - t0:.1f}s")
        with pd.page(s, "panel") as page:
            for renderer in args.renderers.split(","):
                page.js("(v) => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', v)", renderer == "nodes2")
                page.settle(500)
                check_renderer(page, s.server, libs, s.ckpt.name, renderer, s.failures, s.shots)
            page.js("() => app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
    # Chromium cancels the pointer when an HTML5 drag starts; litegraph logs that as a warning and resets its
    # pointer state (a user dragging a thumbnail gets it too): not a fault of the pack. The newer frontend's
    # panel-layout warning also comes with a fractional percentage when the sidebar opens.
    return pd.verdict(s, benign=lambda p: p["kind"] == "console.warning" and p["text"].startswith("Pointer cancel!"),
                      newer_benign=lambda p: bool(re.match(r"WARNING: Invalid layout total size: [\d.]+%", p["text"])))


if __name__ == "__main__":
    sys.exit(main())
