#!/usr/bin/env python3
"""Check the variation explorer's click-to-pick loop in the real ComfyUI page, and draw the README pictures.

    .venv/bin/python scripts/explore_ui_check.py [--no-pictures] [--workdir DIR] [--front-end-root DIR]

Against a real ComfyUI (tests/host/comfy_harness.py, tiny random SD1.5 checkpoint) and its page in headless
Chromium (Debian's /usr/bin/chromium through playwright; nothing is downloaded), driven by scripts/page_driver.py
(server, page, Run button, verdict: shared with the other page checks):

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
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import page_driver as pd  # noqa: E402
from page_driver import comfy_harness, mk  # noqa: E402

EXPLORER, PICKER = "NoiseQueryVariations", "NoiseQueryVariantPicker"
PICTURE_SIZE = 128
PICTURE_STEPS = 4
log = pd.logger("explore_ui_check")


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
    pd.add_arguments(ap, "check the click loop only (the picker screenshot goes into the work folder)")
    args = ap.parse_args()
    ui_file = mk.UI_DIR / "variation_explorer.json"
    wf = json.loads(ui_file.read_text(encoding="utf-8"))
    ids = {n["type"]: n["id"] for n in wf["nodes"]}
    exp, picker, loader = ids[EXPLORER], ids[PICKER], ids["CheckpointLoaderSimple"]
    sched = ids["BasicScheduler"]
    with pd.session(args, "nq_explore_ui_", log) as s:
        server, failures = s.server, s.failures
        with pd.page(s, "explore") as page:
            page.js("([t, n]) => __nq.load(t, n)", [ui_file.read_text(encoding="utf-8"), ui_file.name])
            page.settle()
            page.js("([i, v]) => __nq.setWidget(i, 'ckpt_name', v)", [loader, s.ckpt.name])
            for name, value in (("width", 64), ("height", 64)):
                page.js("([i, n, v]) => __nq.setWidget(i, n, v)", [exp, name, value])
            page.js("([i, v]) => __nq.setWidget(i, 'steps', v)", [sched, 2])
            page.js("([r, z]) => __nq.fit(r, z)", [list(mk.FIT_RECT), mk.MAX_ZOOM])

            # 1. run: the picker shows clickable variants
            entry = pd.run_button(page, server)
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
            hist = pd.widget(page, exp, "history")
            if hist != choices[2] or pd.widget(page, exp, "pick") != -1:
                failures.append(f"click: history widget {hist!r} != offered {choices[2]!r}")
            else:
                log("click on variant #2 wrote the offered history into the explorer's widget")
            page.js("([r, z]) => __nq.fit(r, z)", [list(mk.FIT_RECT), mk.MAX_ZOOM])  # the picker grew
            page.screenshot(s.shots / "explore_picker.png")
            entry = pd.run_button(page, server)
            got = entry["outputs"][str(exp)]["noisequery_history"][0]
            picks = json.loads(got)["picks"]
            if got != choices[2] or [p["index"] for p in picks] != [2]:
                failures.append(f"run 2 replayed {got!r}, expected {choices[2]!r}")
            else:
                log("run 2: the server replayed the clicked pick (walk: 1 pick)")

            # 3. a typed pick is consumed: widget takes the returned history, pick back to -1
            page.js("([i, v]) => __nq.setWidget(i, 'pick', v)", [exp, 1])
            entry = pd.run_button(page, server)
            got = entry["outputs"][str(exp)]["noisequery_history"][0]
            page.settle(500)
            if [p["index"] for p in json.loads(got)["picks"]] != [2, 1]:
                failures.append(f"typed pick: server history {got}")
            elif pd.widget(page, exp, "history") != got or pd.widget(page, exp, "pick") != -1:
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
        if not args.no_pictures:
            pictures(server, s.ckpt.name, failures)
    return pd.verdict(s)


if __name__ == "__main__":
    sys.exit(main())
