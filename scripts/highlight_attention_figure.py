#!/usr/bin/env python3
"""Draw docs/highlight_attention.png: where a phrase's cross-attention goes, without and with HighlightScribbleGuide.

    .venv/bin/python scripts/highlight_attention_figure.py [--size 256] [--out docs/highlight_attention.png]

Runs a real ComfyUI in-process ($COMFYUI_PATH or ~/ComfyUI) with the tiny random-weight SD1.5 test checkpoint
(tests/host/comfy_harness.py) and the strokes of example_workflows/api/highlight_scribble_guide.json. For each
phrase it records the attention of the phrase's tokens to every latent pixel during the first sampling step
(an attention override chained under the guide's, so it sees the guide's bias), averaged over layers and heads,
and prints the share of that attention inside the phrase's region. Panels per phrase: the region, unguided
attention, guided attention (strength 1). Random weights: the picture shows the mechanism, not image quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "host"))

import comfy_harness  # noqa: E402  (after the sys.path line above)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "highlight_attention.png")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nq_hl_figure_"))
    ckpt = comfy_harness.make_tiny_sd15_checkpoint(tmp / "ckpt" / comfy_harness.TINY_CKPT_NAME)
    nodes = comfy_harness.boot_inprocess(None, extra_model_dirs={"checkpoints": ckpt.parent},
                                         custom_node_paths={"NoiseQuery": ROOT}, io_dir=tmp / "io")
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    example = json.loads((ROOT / "example_workflows" / "api" / "highlight_scribble_guide.json").read_text())
    g_in = example["2"]["inputs"]
    guide = nodes.NODE_CLASS_MAPPINGS["HighlightScribbleGuide"]
    s = args.size
    with torch.inference_mode():
        model, clip = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt.name)[:2]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
    panels: dict[float, list[np.ndarray]] = {}
    regions: list[np.ndarray] = []
    lines = []
    shares: dict[tuple[float, int], float] = {}
    phrases: list[str] = []
    for strength in (0.0, 1.0):
        probe = comfy_harness.CrossAttentionProbe()
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = probe
        inputs = {k: v for k, v in g_in.items() if not isinstance(v, list)}
        inputs.update(width=s, height=s, strength=strength, end_percent=1.0)
        with torch.inference_mode():
            patched, cond = guide.execute(model=m, clip=clip, **inputs).args[:2]
            nodes.common_ksampler(patched, 42, 1, 7.0, "euler", "normal", cond, negative,
                                  {"samples": torch.zeros(1, 4, s // 8, s // 8)})
        rt = patched.model_options["transformer_options"]["optimized_attention_override"]
        h, w = s // 8, s // 8
        maps = []
        for i, cols in enumerate(rt.token_columns):
            acc = torch.zeros(h * w)
            for grid, cou, p in probe.records:
                if grid != (h, w) or p.shape[1] != h * w:
                    continue
                per = p.shape[0] // len(cou)
                for j in range(p.shape[0]):
                    if cou[j // per] == 0:
                        acc += p[j][:, cols].sum(-1)
            region = rt.regions(h, w)[i]
            share = float((acc * region).sum() / acc.sum())
            shares[(strength, i)] = share
            if strength == 0.0:
                phrases.append(rt.highlights[i].phrase)
            lines.append(f"{rt.highlights[i].phrase!r} strength {strength}: {share:.1%} of its attention inside its "
                         f"region ({float(region.mean()):.1%} of the image)")
            maps.append((acc / acc.max()).reshape(h, w).numpy())
            if strength == 0.0:
                regions.append(region.reshape(h, w).numpy())
        panels[strength] = maps
    for line in lines:
        print(line)

    cell, pad, top = 200, 12, 34
    rows = len(regions)
    fig = Image.new("RGB", (3 * cell + 4 * pad, rows * (cell + top) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(fig)

    def heat(a: np.ndarray) -> Image.Image:
        a = np.clip(a, 0, 1)
        rgb = np.stack([np.clip(3 * a, 0, 1), np.clip(3 * a - 1, 0, 1), np.clip(3 * a - 2, 0, 1)], -1)
        return Image.fromarray((rgb * 255).astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)

    for r in range(rows):
        y = pad + r * (cell + top) + top - 14
        titles = [f"region '{phrases[r]}'", f"unguided attention ({shares[(0.0, r)]:.0%} inside)",
                  f"guided, strength 1 ({shares[(1.0, r)]:.0%} inside)"]
        imgs = [heat(regions[r]), heat(panels[0.0][r]), heat(panels[1.0][r])]
        for c, (t, im) in enumerate(zip(titles, imgs)):
            x = pad + c * (cell + pad)
            fig.paste(im, (x, y))
            draw.text((x, y - 16), t, fill=(230, 230, 230))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
