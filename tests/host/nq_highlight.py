"""What the highlight-guide host tests and bench/bench_highlight.py share: the prompt and the cat stroke the tests
guide, the guide node's inputs, and seeded random diffusion models built from ComfyUI's own model configs (for the
architectures the harness has no checkpoint of)."""
from __future__ import annotations

import json
from typing import Any

PROMPT = "a cat and a red ball on a lawn"
# A diagonal stroke for "a cat" whose soft region covers < 25 % of the image.
CAT_STROKE = {"phrase": "a cat", "width": 0.16, "points": [[0.15, 0.78], [0.42, 0.62], [0.62, 0.45]]}


def strokes(*items: dict[str, Any]) -> str:
    """A highlights string (the widget's JSON, version 1) of ``items``."""
    return json.dumps({"version": 1, "strokes": list(items)})


def guide_inputs(width: int, height: int, **overrides: Any) -> dict[str, Any]:
    """HighlightScribbleGuide's widget inputs: PROMPT with CAT_STROKE on a width x height canvas, full strength,
    cosine schedule, no refocus; ``overrides`` replace any of them."""
    inputs: dict[str, Any] = {
        "prompt": PROMPT, "highlights": strokes(CAT_STROKE), "width": width, "height": height, "strength": 1.0,
        "start_percent": 0.0, "end_percent": 1.0, "schedule": "cosine", "edge_softness": 0.5,
        "refocus_percent": 0.0, "refocus_iterations": 2, "refocus_step_size": 0.05,
    }
    inputs.update(overrides)
    return inputs


def randomize(module: Any, seed: int) -> None:
    """Seeded random weights: matrices and kernels ~ N(0, 1/fan_in), norm weights and scales 1, biases 0; floating
    buffers (MMDiT's pos_embed is allocated empty, to be loaded from weights) ~ N(0, 0.01)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / max(p[0].numel(), 1)) ** 0.5)
            elif name.endswith("scale") or name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for _name, b in module.named_buffers():
            if b.is_floating_point():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)


def random_model(cfg: Any, seed: int, dtype: Any = None) -> Any:
    """A ModelPatcher around ``cfg``'s diffusion model (a comfy.supported_models config) with randomize(seed)
    weights, in ``dtype`` (default float32), on ComfyUI's torch device."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    cfg.set_inference_dtype(dtype or torch.float32, None)
    model = cfg.get_model({})
    randomize(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())
