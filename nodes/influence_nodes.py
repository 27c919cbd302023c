"""NoiseQuerySeedInfluence: how much the seed steers layout and colour on the connected model, before a build."""

from __future__ import annotations

from typing import Any

import comfy.samplers
import numpy as np
from comfy_api.latest import io, ui

from ..noisequery_core.exploration.influence import InfluenceError, measure_influence
from . import _host
from ._glue import SEED_MAX, to_image
from ._validate import check_numbers, require_numbers
from .sampling import SeedRenderer, model_family

DEFAULT_PROMPTS = "a portrait of a woman\na red sports car on a road\na bowl of fruit on a table\na mountain lake at dawn"
MAX_PROMPTS = 16
MAX_SEEDS = 32


def _prompts(text: str) -> list[str]:
    lines = [ln.strip() for ln in str(text).splitlines()]
    prompts = [ln for ln in lines if ln]
    if len(prompts) < 2 or len(prompts) > MAX_PROMPTS:
        raise InfluenceError(
            f"NoiseQuerySeedInfluence: `prompts` has {len(prompts)} non-empty line(s); give 2 to {MAX_PROMPTS} "
            "different prompts, one per line.")
    return prompts


def _encode(clip: Any, text: str, guidance: float) -> Any:
    # As CLIPTextEncode (+ FluxGuidance): "guidance" is read by guidance-distilled models (Flux) and ignored by others.
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return [[c[0], {**c[1], "guidance": float(guidance)}] for c in cond]


class NoiseQuerySeedInfluence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQuerySeedInfluence",
            display_name="Seed Influence Check",
            category="NoiseQuery/library",
            description=(
                "Before spending hours on a noise library: renders a few prompts x a few seeds with your model (each "
                "render is exactly KSampler at batch 1) and measures how much of the layout and colour the seed decides "
                "on its own, the same for every prompt, versus the prompt. A strong seed influence means a library's "
                "seeds carry their composition into your prompts; a weak one (typical of Flux) means the prompt "
                "decides and a library helps little. Use the sampler settings you will build with."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model you plan to build a library for."),
                io.Vae.Input("vae", tooltip="Its VAE: decodes every render."),
                io.Clip.Input("clip", tooltip="Its CLIP: encodes each prompt and the negative."),
                io.String.Input("prompts", default=DEFAULT_PROMPTS, multiline=True, tooltip=f"2 to {MAX_PROMPTS} clearly different prompts, one per line. Each is rendered with every seed."),
                io.String.Input("negative_prompt", default="", multiline=False, tooltip="Negative prompt for every render (used when cfg > 1)."),
                io.Int.Input("seed_start", default=0, min=0, max=SEED_MAX, control_after_generate=False, tooltip="First seed; the check uses `seeds` consecutive seeds from here."),
                io.Int.Input("seeds", default=4, min=2, max=MAX_SEEDS, tooltip="How many seeds each prompt is rendered with (renders = prompts x seeds; 4 x 4 gives a usable first answer)."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Render width (use your library's)."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Render height (use your library's)."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps per render."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance (1.0 skips the negative pass; Flux-dev uses 1.0 with `guidance`)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Noise schedule (Flux and SD3 usually use 'simple')."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1, tooltip="Distilled guidance for Flux-style models (as FluxGuidance); other models ignore it."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="Variance shares of layout and colour (seed / prompt / rest) and what they mean for a library."),
                io.Float.Output(display_name="seed_layout_share", tooltip="Fraction of layout variance the seed explains consistently across prompts (0..1)."),
                io.Float.Output(display_name="seed_colour_share", tooltip="Fraction of colour variance the seed explains consistently across prompts (0..1)."),
                io.Image.Output(display_name="renders", tooltip="All renders, prompt by prompt (row = prompt, seeds in order)."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, guidance: float | None = None) -> bool | str:
        # named so that NaN/inf are refused; check_numbers re-applies the ranges ComfyUI then skips
        return check_numbers(cls, locals())

    @classmethod
    def execute(cls, model: Any, vae: Any, clip: Any, prompts: str, negative_prompt: str, seed_start: int, seeds: int,
                width: int, height: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                guidance: float) -> io.NodeOutput:
        require_numbers(cls, {"cfg": cfg, "guidance": guidance})  # linked values are unchecked at queue time
        texts = _prompts(prompts)
        if seed_start + seeds - 1 > SEED_MAX:
            raise InfluenceError(f"NoiseQuerySeedInfluence: seed_start {seed_start} + seeds {seeds} runs past the largest "
                                 f"seed {SEED_MAX}; lower seed_start.")
        seed_list = list(range(int(seed_start), int(seed_start) + int(seeds)))
        negative = _encode(clip, negative_prompt, guidance)
        uid = cls.hidden.unique_id if cls.hidden else None
        work = _host.NodeWork(uid, len(texts) * len(seed_list) * steps)
        state = {"prompt": 0}
        per_prompt = len(seed_list) * steps

        def on_step(fraction: float) -> None:
            work.progress(int((state["prompt"] + fraction) * per_prompt), len(texts) * per_prompt)

        def render(i: int, batch: list[int]) -> list[np.ndarray]:
            state["prompt"] = i
            renderer = SeedRenderer(model, vae, _encode(clip, texts[i], guidance), negative, width=width, height=height,
                                    steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                    on_progress=on_step)
            images = renderer(batch)
            work.preview = ("JPEG", images[-1], 512)
            return [np.asarray(im) for im in images]

        report, renders = measure_influence(render, len(texts), seed_list, check_cancel=work.check_cancel)
        text = (f"model family: {model_family(model)}\n{report.text()}\nprompts: "
                + " | ".join(texts) + f"\nseeds: {seed_list[0]}..{seed_list[-1]}")
        images = to_image(list(renders.reshape(-1, *renders.shape[2:])))
        return io.NodeOutput(text, float(report.layout.seed), float(report.colour.seed), images,
                             ui={"text": [text], **ui.PreviewImage(images, cls=cls).as_dict()})


INFLUENCE_NODES: list[type] = [NoiseQuerySeedInfluence]
