"""NoiseQuerySeedSlerp, NoiseQuerySeedGrid, NoiseQueryConditioningInterpolate: walk between seeds and prompts.

Thin glue over noisequery_core.exploration.interp. The noises are NOISE objects for SamplerCustomAdvanced: KSampler draws
its noise from a seed and cannot take a given one, so the in-between steps of a seed walk need
SamplerCustomAdvanced (the endpoints are just the seeds, and a KSampler with either seed reproduces them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from comfy_api.latest import io

from ..noisequery_core.exploration.interp import (
    MODES,
    InterpolationError,
    grid_coordinates,
    interpolate_pooled,
    interpolate_tokens,
    interpolation_ts,
    seed_grid_noise,
    seed_strip_noise,
)
from ._glue import MadeNoise, empty_latent, latent_shape, latent_size_inputs, seed_input
from ._validate import check_numbers, require_numbers
from .sampling import model_latent

MAX_STEPS = 256
T_LIMIT = 8.0
# The frontend rounds floats to the step's decimals: 0.0001 lets a factor move in tiny steps (a strip over a
# small t range goes finer still).
T_STEP = 0.0001


def _model_input() -> Any:
    return io.Model.Input(
        "model", optional=True,
        tooltip="Optional: the model you will sample with. The latent output then has its channels and size (e.g. "
                "16 channels for SD3/Flux); without it the latent is EmptyLatentImage's, which the samplers widen "
                "to the model's channels.")


def _walk_latent(batch: int, width: int, height: int, model: Any) -> dict[str, torch.Tensor]:
    if model is None:
        return empty_latent(batch, latent_shape(width, height))
    return empty_latent(batch, latent_shape(width, height, *model_latent(model)))


class NoiseQuerySeedSlerp(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQuerySeedSlerp",
            display_name="Seed Interpolation (slerp)",
            category="NoiseQuery/explore",
            description=(
                "A walk from seed A to seed B: a NOISE batch whose item i is the spherical interpolation of the two "
                "seeds' initial noises at factor t_i (t_start..t_end in `steps` even steps; beyond 0..1 it "
                "extrapolates). Every step keeps the noise statistics, so each is a valid start. Use with "
                "SamplerCustomAdvanced and the `latent` output: the item at t=0 is exactly KSampler's noise for "
                "seed A (at t=1 seed B), so with a deterministic sampler (euler, dpmpp_2m, ...) those items equal "
                "a KSampler run with that seed. KSampler itself cannot take a given noise: in-between steps need "
                "SamplerCustomAdvanced. Same seed on both ends = that seed's noise on every item (for a prompt walk)."
            ),
            inputs=[
                seed_input("seed_a", 0, "Seed at t=0 (connect a Noise Query seed to start from a library hit)."),
                seed_input("seed_b", 1, "Seed at t=1."),
                io.Int.Input("steps", default=8, min=1, max=MAX_STEPS, tooltip="How many noises (batch items) from t_start to t_end, both included."),
                io.Float.Input("t_start", default=0.0, min=-T_LIMIT, max=T_LIMIT, step=T_STEP, tooltip="Factor of the first item: 0 = seed A, 1 = seed B; below 0 extrapolates beyond A."),
                io.Float.Input("t_end", default=1.0, min=-T_LIMIT, max=T_LIMIT, step=T_STEP, tooltip="Factor of the last item; above 1 extrapolates beyond B. A small range gives arbitrarily small steps."),
                *latent_size_inputs(),
                _model_input(),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced: item i is the interpolated noise at t_i (items repeat if the latent batch is larger)."),
                io.Latent.Output(display_name="latent", tooltip="Empty latent with one item per step, for SamplerCustomAdvanced's latent_image."),
                io.String.Output(display_name="report", tooltip="The factor t of every item."),
            ],
        )

    @classmethod
    def validate_inputs(cls, t_start: float | None = None, t_end: float | None = None) -> bool | str:
        # named so that NaN/inf are refused; check_numbers re-applies the ranges ComfyUI then skips
        return check_numbers(cls, locals())

    @classmethod
    def execute(cls, seed_a: int, seed_b: int, steps: int, t_start: float, t_end: float, width: int,
                height: int, model: Any = None) -> io.NodeOutput:
        require_numbers(cls, {"t_start": t_start, "t_end": t_end})  # linked values are unchecked at queue time
        ts = interpolation_ts(steps, t_start, t_end)

        def make(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
            return seed_strip_noise(seed_a, seed_b, ts, shape, dtype)

        report = f"slerp seed {seed_a} -> seed {seed_b}, {steps} steps\n" + "\n".join(
            f"item {i}: t={t:.6g}" for i, t in enumerate(ts))
        return io.NodeOutput(MadeNoise(seed_a, len(ts), make), _walk_latent(len(ts), width, height, model), report,
                             ui={"text": [report]})


class NoiseQuerySeedGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQuerySeedGrid",
            display_name="Seed Grid (2-D slerp)",
            category="NoiseQuery/explore",
            description=(
                "A 2-D map between four corner seeds: a NOISE batch of rows x columns (row-major), cell (u, v) "
                "= slerp(slerp(top-left, top-right, u), slerp(bottom-left, bottom-right, u), v). The four corner "
                "cells are exactly KSampler's noises for the corner seeds; each edge is the seed walk between its "
                "corners. Use with SamplerCustomAdvanced and the `latent` output."
            ),
            inputs=[
                seed_input("seed_top_left", 0, "Seed of the top-left cell."),
                seed_input("seed_top_right", 1, "Seed of the top-right cell."),
                seed_input("seed_bottom_left", 2, "Seed of the bottom-left cell."),
                seed_input("seed_bottom_right", 3, "Seed of the bottom-right cell."),
                io.Int.Input("rows", default=3, min=1, max=16, tooltip="Cells from top to bottom."),
                io.Int.Input("columns", default=3, min=1, max=16, tooltip="Cells from left to right."),
                *latent_size_inputs(),
                _model_input(),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced: rows x columns noises, row by row."),
                io.Latent.Output(display_name="latent", tooltip="Empty latent with one item per cell."),
                io.String.Output(display_name="report", tooltip="(u, v) of every cell."),
            ],
        )

    @classmethod
    def execute(cls, seed_top_left: int, seed_top_right: int, seed_bottom_left: int, seed_bottom_right: int,
                rows: int, columns: int, width: int, height: int, model: Any = None) -> io.NodeOutput:
        corners = (seed_top_left, seed_top_right, seed_bottom_left, seed_bottom_right)

        def make(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
            return seed_grid_noise(corners, rows, columns, shape, dtype)

        coords = grid_coordinates(rows, columns)
        report = f"seed grid {rows} x {columns} over corners {corners}\n" + "\n".join(
            f"item {i} (row {i // columns}, column {i % columns}): u={u:.4g} v={v:.4g}" for i, (u, v) in enumerate(coords))
        return io.NodeOutput(MadeNoise(seed_top_left, len(coords), make), _walk_latent(len(coords), width, height, model),
                             report, ui={"text": [report]})


def interpolate_conditioning(cond_a: list[Any], cond_b: list[Any], ts: Sequence[float], mode: str) -> list[Any]:
    """CONDITIONING blended at each factor; entries paired in order (a one-entry side pairs with all).

    Token tensors and pooled outputs are blended (noisequery_core.exploration.interp); the other keys of each entry (areas,
    strengths, SDXL sizes, ...) are taken from A.
    """
    if len(cond_a) != len(cond_b) and 1 not in (len(cond_a), len(cond_b)):
        raise InterpolationError(
            f"conditioning_a has {len(cond_a)} entries and conditioning_b {len(cond_b)}; they can only be paired "
            "when equal or when one side has a single entry (combine them first, or interpolate one pair at a time).")
    n = max(len(cond_a), len(cond_b))
    out = []
    for i in range(n):
        ta, da = cond_a[i if len(cond_a) > 1 else 0]
        tb, db = cond_b[i if len(cond_b) > 1 else 0]
        d = dict(da)
        pa, pb = da.get("pooled_output"), db.get("pooled_output")
        if isinstance(pa, torch.Tensor) and isinstance(pb, torch.Tensor):
            d["pooled_output"] = interpolate_pooled(pa, pb, ts, mode)
        elif isinstance(pa, torch.Tensor) and len(ts) > 1:
            d["pooled_output"] = pa.reshape(-1, pa.shape[-1]).repeat(len(ts), 1)
        out.append([interpolate_tokens(ta, tb, ts, mode), d])
    return out


class NoiseQueryConditioningInterpolate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryConditioningInterpolate",
            display_name="Conditioning Interpolation",
            category="NoiseQuery/explore",
            description=(
                "Blends two prompts' conditionings, token by token: 'slerp' (spherical, keeps token norms) or "
                "'lerp' (straight line). Factors may leave 0..1 to extrapolate (t=1.5 pushes past B, away from "
                "A). steps=1 gives one conditioning at t_start; steps>1 a batch, item i at t_i, which pairs with "
                "a latent batch of the same size (item i of the latent gets item i of the conditioning). Prompts of "
                "different lengths are repeated to a common length as ComfyUI does when it batches them; pooled "
                "outputs (SDXL) are blended too; other settings come from A. For the same noise on every item use "
                "Seed Interpolation with seed_a = seed_b."
            ),
            inputs=[
                io.Conditioning.Input("conditioning_a", tooltip="The prompt at t=0 (CLIPTextEncode output)."),
                io.Conditioning.Input("conditioning_b", tooltip="The prompt at t=1, from the same CLIP."),
                io.Combo.Input("mode", options=list(MODES), default="slerp", tooltip="slerp: along the arc, keeps each token's norm; lerp: straight line, like ConditioningAverage but allowing any factor."),
                io.Float.Input("t_start", default=0.5, min=-T_LIMIT, max=T_LIMIT, step=T_STEP, tooltip="The factor (steps=1) or the first item's factor: 0 = A, 1 = B."),
                io.Float.Input("t_end", default=1.0, min=-T_LIMIT, max=T_LIMIT, step=T_STEP, tooltip="The last item's factor when steps > 1 (ignored for steps=1)."),
                io.Int.Input("steps", default=1, min=1, max=MAX_STEPS, tooltip="1 = a single conditioning at t_start; more = a batch from t_start to t_end."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning", tooltip="The blended conditioning (batch = steps)."),
                io.String.Output(display_name="report", tooltip="Factor per item and the token lengths used."),
            ],
        )

    @classmethod
    def validate_inputs(cls, t_start: float | None = None, t_end: float | None = None) -> bool | str:
        # named so that NaN/inf are refused; check_numbers re-applies the ranges ComfyUI then skips
        return check_numbers(cls, locals())

    @classmethod
    def execute(cls, conditioning_a: list[Any], conditioning_b: list[Any], mode: str, t_start: float, t_end: float,
                steps: int) -> io.NodeOutput:
        require_numbers(cls, {"t_start": t_start, "t_end": t_end})  # linked values are unchecked at queue time
        ts = interpolation_ts(steps, t_start, t_end)
        out = interpolate_conditioning(conditioning_a, conditioning_b, ts, mode)
        la = ", ".join(str(c[0].shape[1]) for c in conditioning_a)
        lb = ", ".join(str(c[0].shape[1]) for c in conditioning_b)
        report = (f"{mode}: tokens A [{la}], B [{lb}] -> [{', '.join(str(c[0].shape[1]) for c in out)}]\n"
                  + "\n".join(f"item {i}: t={t:.6g}" for i, t in enumerate(ts)))
        return io.NodeOutput(out, report, ui={"text": [report]})
