#!/usr/bin/env python3
"""Check the variation explorer's click-to-pick loop in the real ComfyUI page, and draw the README pictures.

    .venv/bin/python scripts/explore_ui_check.py [--no-pictures] [--workdir DIR] [--front-end-root DIR]

Against a real ComfyUI (tests/host/comfy_harness.py, tiny random SD1.5 checkpoint) and its page in headless
Chromium (Debian's /usr/bin/chromium through playwright; nothing is downloaded), reusing the page helpers of
scripts/make_ui_workflows.py:

1. loads example_workflows/variation_explorer.json, points it at the tiny checkpoint, 64x64 and 2 steps, and
   presses Run; the Variant Picker must show one clickable image per variant;
2. clicks variant #2: the explorer's `history` widget must become exactly the history the server offered for
   that variant (ui "noisequery_choices"), and `pick` -1; Run again: the server must replay that history
   (the explorer's returned history equals it) and the walk is one pick longer;
3. types pick = 1 in the node and Runs: the widget must take the returned history and `pick` go back to -1;
4. writes docs/explore_picker.png (the page after a pick; with --no-pictures into the work folder) and renders
   docs/seed_interpolation_strip.png (one seed walk, 8 steps, t 0..1) and docs/variant_grid.png (a start
   noise and 6 variants at strength 0.3) through POST /prompt. The tiny model's images are saturated noise:
   the pictures show the mechanics (smooth change along the walk, variants near their parent), not looks.
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "host"))

import comfy_harness  # noqa: E402
import make_ui_workflows as mk  # noqa: E402

EXPLORER, PICKER = "NoiseQueryVariations", "NoiseQueryVariantPicker"
PICTURE_SIZE = 128
PICTURE_STEPS = 4


def log(msg: str) -> None:
    print(f"[explore_ui_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_button(page: mk.Page, server: comfy_harness.ComfyServer, timeout: float = 300) -> dict[str, Any]:
    """Press Run and wait for the prompt it queued; returns its history entry."""
    known = set(server.history())
    page.page.click(comfy_harness.RUN_BUTTON)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = set(server.history()) - known
        if new:
            return server.wait(new.pop(), timeout=timeout)
        time.sleep(0.2)
    raise SystemExit("Run queued nothing")


def widget_value(page: mk.Page, node_id: int, name: str) -> Any:
    return page.js("([i, n]) => app.graph.getNodeById(i).widgets.find(w => w.name === n).value", [node_id, name])


def tile(images: list[bytes], columns: int, out: Path, label: str) -> None:
    import io

    from PIL import Image, ImageDraw

    ims = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    w, h = ims[0].size
    rows = (len(ims) + columns - 1) // columns
    pad, top = 4, 18
    sheet = Image.new("RGB", (columns * (w + pad) + pad, top + rows * (h + pad) + pad), (30, 30, 30))
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), label, fill=(230, 230, 230))
    for i, im in enumerate(ims):
        sheet.paste(im, (pad + (i % columns) * (w + pad), top + (i // columns) * (h + pad)))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    log(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")


def api_graph(name: str, ckpt: str, size: int, steps: int) -> dict[str, Any]:
    g = json.loads((mk.API_DIR / f"{name}.json").read_text(encoding="utf-8"))
    g = copy.deepcopy(g)
    for node in g.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = ckpt
        for key in ("width", "height"):
            if key in inputs:
                inputs[key] = size
        if node["class_type"] == "BasicScheduler":
            inputs["steps"] = steps
    return g


def pictures(server: comfy_harness.ComfyServer, ckpt: str, failures: list[str]) -> None:
    g = api_graph("seed_interpolation_strip", ckpt, PICTURE_SIZE, PICTURE_STEPS)
    entry = server.run(g, timeout=600)
    if comfy_harness.execution_error(entry):
        failures.append(f"strip picture: {comfy_harness.execution_error(entry)}")
        return
    imgs = [server.get_image(**i) for i in comfy_harness.output_images(entry, "12")]
    s = g["6"]["inputs"]
    tile(imgs, len(imgs), mk.DOCS / "seed_interpolation_strip.png",
         f"seed {s['seed_a']} -> seed {s['seed_b']}, slerp t = 0 .. 1 in {s['steps']} steps (tiny random model)")

    g = api_graph("variation_explorer", ckpt, PICTURE_SIZE, PICTURE_STEPS)
    # the start noise (current_noise) rendered next to its variants
    g["20"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["6", 3], "guider": ["7", 0],
               "sampler": ["8", 0], "sigmas": ["9", 0], "latent_image": ["21", 0]}}
    g["21"] = {"class_type": "EmptyLatentImage", "inputs": {"width": PICTURE_SIZE, "height": PICTURE_SIZE, "batch_size": 1}}
    g["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    g["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 0]}}
    entry = server.run(g, timeout=600)
    if comfy_harness.execution_error(entry):
        failures.append(f"variant picture: {comfy_harness.execution_error(entry)}")
        return
    start = [server.get_image(**i) for i in comfy_harness.output_images(entry, "23")]
    variants = [server.get_image(filename=v["filename"], subfolder=v["subfolder"], type=v["type"])
                for v in entry["outputs"]["12"]["noisequery_variants"]]
    e = g["6"]["inputs"]
    tile(start + variants, len(variants) + 1, mk.DOCS / "variant_grid.png",
         f"left: seed {e['seed']}; then {e['variants']} variants at strength {e['strength']} (tiny random model)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-pictures", action="store_true", help="check the click loop only")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint and server files here")
    ap.add_argument("--front-end-root", type=Path, help="serve this frontend (the static folder of an unzipped "
                    "comfyui-frontend-package wheel) instead of the installed one")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    comfy = comfy_harness.find_comfyui()
    if comfy is None:
        raise SystemExit(comfy_harness.SKIP_REASON)
    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="nq_explore_ui_"))
    models = work / "models"
    ckpt = models / "checkpoints" / comfy_harness.TINY_CKPT_NAME
    if not ckpt.is_file():
        comfy_harness.make_tiny_sd15_checkpoint(ckpt, comfy)
    for d in ("noise_libraries", "noisequery_clip"):
        (models / d).mkdir(parents=True, exist_ok=True)
    problems: list[dict[str, str]] = []
    failures: list[str] = []
    ui_file = mk.UI_DIR / "variation_explorer.json"
    wf = json.loads(ui_file.read_text(encoding="utf-8"))
    ids = {n["type"]: n["id"] for n in wf["nodes"]}
    exp, picker, loader = ids[EXPLORER], ids[PICKER], ids["CheckpointLoaderSimple"]
    sched = ids["BasicScheduler"]
    server = comfy_harness.ComfyServer(comfy, packs={"NoiseQuery": ROOT}, workdir=work / "server",
                                       model_dirs={"checkpoints": ckpt.parent, "noise_libraries": models / "noise_libraries",
                                                   "noisequery_clip": models / "noisequery_clip"},
                                       front_end_root=args.front_end_root)
    want_frontend = comfy_harness.frontend_version(args.front_end_root)
    try:
        with server:
            sess = server._http()
            for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                               ("Comfy.Graph.CanvasInfo", False)):
                sess.post(f"{server.url}/settings/{key}", data=json.dumps(value), timeout=30).raise_for_status()
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=mk.CHROMIUM, args=mk.CHROMIUM_FLAGS, headless=True)
                page = mk.Page(browser, server.url, "explore", problems)
                served = page.js("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
                log(f"frontend: the page runs comfyui-frontend-package {served}")
                if want_frontend != "?" and served != want_frontend:
                    failures.append(f"the page runs frontend {served}, not {want_frontend}")
                page.js("([t, n]) => __nq.load(t, n)", [ui_file.read_text(encoding="utf-8"), ui_file.name])
                page.settle()
                page.js("([i, v]) => __nq.setWidget(i, 'ckpt_name', v)", [loader, ckpt.name])
                for name, value in (("width", 64), ("height", 64)):
                    page.js("([i, n, v]) => __nq.setWidget(i, n, v)", [exp, name, value])
                page.js("([i, v]) => __nq.setWidget(i, 'steps', v)", [sched, 2])
                page.js("([r, z]) => __nq.fit(r, z)", [list(mk.FIT_RECT), mk.MAX_ZOOM])

                # 1. run: the picker shows clickable variants
                entry = run_button(page, server)
                err = comfy_harness.execution_error(entry)
                if err:
                    raise SystemExit(f"first run failed: {json.dumps(err)[:2000]}")
                choices = entry["outputs"][str(picker)]["noisequery_choices"]
                page.page.wait_for_function(f"() => document.querySelectorAll('img[data-variant]').length === {len(choices)}"
                                            " && Array.from(document.querySelectorAll('img[data-variant]'))"
                                            ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
                log(f"run 1: picker shows {len(choices)} variants")

                # 2. click variant #2: the widget holds exactly the server's history for it
                page.page.locator("img[data-variant='2']").click()
                page.settle(300)
                hist = widget_value(page, exp, "history")
                if hist != choices[2] or widget_value(page, exp, "pick") != -1:
                    failures.append(f"click: history widget {hist!r} != offered {choices[2]!r}")
                else:
                    log("click on variant #2 wrote the offered history into the explorer's widget")
                page.js("([r, z]) => __nq.fit(r, z)", [list(mk.FIT_RECT), mk.MAX_ZOOM])  # the picker grew
                page.screenshot((work if args.no_pictures else mk.DOCS) / "explore_picker.png")
                entry = run_button(page, server)
                got = entry["outputs"][str(exp)]["noisequery_history"][0]
                picks = json.loads(got)["picks"]
                if got != choices[2] or [p["index"] for p in picks] != [2]:
                    failures.append(f"run 2 replayed {got!r}, expected {choices[2]!r}")
                else:
                    log("run 2: the server replayed the clicked pick (walk: 1 pick)")

                # 3. a typed pick is consumed: widget takes the returned history, pick back to -1
                page.js("([i, v]) => __nq.setWidget(i, 'pick', v)", [exp, 1])
                entry = run_button(page, server)
                got = entry["outputs"][str(exp)]["noisequery_history"][0]
                page.settle(500)
                if [p["index"] for p in json.loads(got)["picks"]] != [2, 1]:
                    failures.append(f"typed pick: server history {got}")
                elif widget_value(page, exp, "history") != got or widget_value(page, exp, "pick") != -1:
                    failures.append("typed pick: the widget did not take the returned history / reset pick")
                else:
                    log("typed pick 1: history widget updated from the run, pick reset to -1 (walk: 2 picks)")

                # 4. the history reads as a summary line; another workflow tab and back keeps the grid and the line
                summary = page.page.locator(".nq-history-summary").inner_text()
                if "2 picks" not in summary:
                    failures.append(f"history summary line {summary!r} does not say '2 picks'")
                shown = page.js("() => document.querySelectorAll('img[data-variant]').length")
                page.js("() => app.extensionManager.command.execute('Comfy.NewBlankWorkflow')")
                page.settle(800)
                page.js("() => app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow')")
                try:
                    page.page.wait_for_function(
                        f"() => document.querySelectorAll('img[data-variant]').length === {shown}"
                        " && document.querySelector('.nq-history-summary')?.textContent.includes('2 picks')",
                        timeout=15_000)
                    log(f"tab switch and back: the picker still shows {shown} variants and the history line")
                except Exception:  # noqa: BLE001
                    now = page.js("() => [document.querySelectorAll('img[data-variant]').length,"
                                  " document.querySelector('.nq-history-summary')?.textContent ?? null,"
                                  " Object.keys(app.nodeOutputs ?? {}), app.graph._nodes.length]")
                    failures.append(f"tab switch and back: the picker grid ({shown} variants before) or the "
                                    f"history line is gone: [variants, line, stored outputs, nodes] = {now}")
                page.close()
                browser.close()
            if not args.no_pictures:
                pictures(server, ckpt.name, failures)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    real = [p for p in problems if p["kind"] != "http-benign"]
    if args.front_end_root is not None:  # a newer frontend than the host's: its known complaints are not the pack's
        noise = [p for p in real if comfy_harness.newer_frontend_noise(f"{p['kind']}: {p['text']}")]
        real = [p for p in real if p not in noise]
        if noise:
            kinds = sorted({str(comfy_harness.newer_frontend_noise(f"{p['kind']}: {p['text']}")) for p in noise})
            print(f"{len(noise)} known newer-frontend complaints ignored ({'; '.join(kinds)})")
    for p in real:
        print(f"page problem: [{p['page']}] {p['kind']}: {p['text']}")
    for f in failures:
        print("FAILED:", f)
    print("OK" if not (failures or real) else "FAILED")
    return 1 if failures or real else 0


if __name__ == "__main__":
    sys.exit(main())
