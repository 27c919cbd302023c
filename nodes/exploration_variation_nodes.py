"""NoiseQueryVariations and NoiseQueryVariantPicker: variants around the current noise/prompt, pick, repeat.

The walk's state is the `history` STRING widget of NoiseQueryVariations (JSON, noisequery_core.exploration.explore), so it
is saved with the workflow and sent with every prompt; the node replays it on each run. A pick reaches the
history either from the UI (clicking an image on NoiseQueryVariantPicker: web/js/noisequery_explore.js writes
the history that pick leads to, computed here, into the Variations node's widget) or headless (the `pick`
input: the node appends that variant itself and returns the new history, which a client sends next time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io, ui

from ..noisequery_core.errors import NoiseQueryError
from ..noisequery_core.exploration.explore import (
    COND_STRENGTH_MAX,
    STRENGTH_MAX,
    History,
    HistoryError,
    Pick,
    candidates,
    describe,
    replay_noise,
    replay_tokens,
    variant_noises,
    variant_tokens,
)
from ._glue import MadeNoise, empty_latent, latent_shape, latent_size_inputs, seed_input
from ._validate import numbers_problem, require_numbers

MAX_VARIANTS = 64
# ui keys read by web/js/noisequery_explore.js (kept in sync there).
UI_HISTORY = "noisequery_history"
UI_CHOICES = "noisequery_choices"
UI_VARIANTS = "noisequery_variants"  # not "images": the JS grid shows them, the frontend's own preview would double them

ExplorationType = io.Custom("NOISEQUERY_EXPLORATION")


@dataclass(frozen=True)
class Exploration:
    """What the picker needs: the history each variant's pick leads to, in variant order."""

    history_after: tuple[str, ...]
    start_seed: int
    round: int


def _variant_conditioning(history: History, offers: list[Pick], positive: list[Any], current_only: bool) -> list[Any]:
    out = []
    for tokens, d in positive:
        d2 = dict(d)
        pooled = d.get("pooled_output")
        if current_only:
            t2 = replay_tokens(history, tokens)
            if isinstance(pooled, torch.Tensor):
                d2["pooled_output"] = replay_tokens(history, pooled, "pooled")
        else:
            t2 = variant_tokens(history, offers, tokens)
            if isinstance(pooled, torch.Tensor):
                d2["pooled_output"] = variant_tokens(history, offers, pooled, "pooled")
        out.append([t2, d2])
    return out


def _moves_prompt(history: History, offers: list[Pick]) -> bool:
    return any(p.cond_strength for p in history.picks) or any(p.cond_strength for p in offers)


class NoiseQueryVariations(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryVariations",
            display_name="Variation Explorer",
            category="NoiseQuery/explore",
            description=(
                "Explore around a seed: offers `variants` noises, each the current noise slerped toward a fresh seed "
                "by `strength` (and, with cond_strength > 0, the prompt moved in a random direction). Render them "
                "with SamplerCustomAdvanced (noise + latent + positive), show them in a Variant Picker, click the one "
                "you like and Run again: the walk continues from it. Headless: set `pick` to the variant's index "
                "(the new history comes back in the `history` output). The history of picks (seeds, strengths) is "
                "kept in the `history` widget, saved with the workflow, and replays the same noises bit for bit. "
                "current_noise/current_positive are where the walk stands, to render the final image at full size."
            ),
            inputs=[
                seed_input("seed", 0, "Where the walk starts (e.g. a Noise Query seed). Changing it with picks in the history is refused: clear the history to start over."),
                io.Conditioning.Input("positive", tooltip="The prompt to render with; moved only when cond_strength > 0."),
                io.Int.Input("variants", default=4, min=1, max=MAX_VARIANTS, tooltip="How many variants each round offers (the batch size to render)."),
                io.Float.Input("strength", default=0.3, min=0.0, max=STRENGTH_MAX, step=0.01, tooltip="How far each variant moves from the current noise: 0 = same noise, 1 = an unrelated seed's noise."),
                io.Float.Input("cond_strength", default=0.0, min=0.0, max=COND_STRENGTH_MAX, step=0.01, tooltip="How far each variant moves the prompt embedding: a random direction of this size relative to each token's norm (0 = prompt unchanged)."),
                *latent_size_inputs(),
                io.Int.Input("pick", default=-1, min=-1, max=MAX_VARIANTS - 1, tooltip="Headless: pick this variant of the round shown by the current history, then offer the next round. -1 = no pick (the UI picks by clicking the Variant Picker and resets this to -1)."),
                io.String.Input("history", multiline=True, default="", tooltip="The walk so far as JSON (written by the Variant Picker or the `pick` input). Keep it to replay the walk; clear it to start a new one."),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced: item j is variant j."),
                io.Conditioning.Output(display_name="positive", tooltip="The prompt per variant (batch = variants when the prompt moves, else the current prompt)."),
                io.Latent.Output(display_name="latent", tooltip="Empty latent with one item per variant."),
                io.Noise.Output(display_name="current_noise", tooltip="Where the walk stands (the last pick, or the start seed's KSampler noise): one noise for every latent item."),
                io.Conditioning.Output(display_name="current_positive", tooltip="The prompt where the walk stands."),
                io.String.Output(display_name="history", tooltip="The history after this run's pick: send it as `history` next time (headless)."),
                ExplorationType.Output(display_name="exploration", tooltip="Connect to a Variant Picker: clicking its image j continues the walk from variant j."),
            ],
        )

    @classmethod
    def validate_inputs(cls, history: str | None = None, strength: float | None = None,
                        cond_strength: float | None = None) -> bool | str:
        # Listing an input switches off ComfyUI's own min/max check for it: the numbers listed (so that NaN/inf
        # are refused) get their schema ranges back from numbers_problem. The INT inputs are left to ComfyUI.
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        if history is None or not history.strip():
            return True
        try:
            doc = json.loads(history)
            start = int(doc["start_seed"]) if isinstance(doc, dict) and "start_seed" in doc else 0
            History.parse(history, start)
        except HistoryError as exc:
            return str(exc)
        except (ValueError, TypeError) as exc:  # not JSON, or a start_seed that is not a number
            return f"history is not a readable exploration history ({exc}); clear the history widget to start a new walk."
        return True

    @classmethod
    def execute(cls, seed: int, positive: list[Any], variants: int, strength: float, cond_strength: float,
                width: int, height: int, pick: int, history: str) -> io.NodeOutput:
        require_numbers(cls, {"strength": strength, "cond_strength": cond_strength})  # linked values: unchecked so far
        hist = History.parse(history, seed)
        note = ""
        if pick >= 0:
            if pick >= variants:
                raise NoiseQueryError(f"pick {pick} is not one of the {variants} variants (0..{variants - 1}); lower "
                                      "pick or raise variants.")
            hist = hist.with_pick(candidates(hist, variants, strength, cond_strength)[pick])
            note = f"picked variant #{pick} of round {hist.round - 1}\n"
        offers = candidates(hist, variants, strength, cond_strength)

        def make_variants(shape: Any, dtype: torch.dtype) -> torch.Tensor:
            return variant_noises(hist, offers, shape, dtype)

        def make_current(shape: Any, dtype: torch.dtype) -> torch.Tensor:
            return replay_noise(hist, shape, dtype)[None]

        moves = _moves_prompt(hist, offers)
        variant_pos = _variant_conditioning(hist, offers, positive, current_only=False) if moves else positive
        current_pos = _variant_conditioning(hist, offers, positive, current_only=True) if moves else positive
        text = hist.to_json()
        after = tuple(hist.with_pick(p).to_json() for p in offers)
        report = note + describe(hist, offers)
        return io.NodeOutput(
            MadeNoise(seed, len(offers), make_variants), variant_pos, empty_latent(len(offers), latent_shape(width, height)),
            MadeNoise(seed, 1, make_current), current_pos, text, Exploration(after, seed, hist.round),
            ui={"text": [report], UI_HISTORY: [text]},
        )


class NoiseQueryVariantPicker(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryVariantPicker",
            display_name="Variant Picker",
            category="NoiseQuery/explore",
            description=(
                "Shows the rendered variants of a Variation Explorer; click one to pick it (the explorer's history "
                "gets the pick and its `pick` goes back to -1), then Run to see the next round around it. "
                "Connect the decoded images of the variants batch and the explorer's `exploration` output."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The decoded variants, one per variant, in order."),
                ExplorationType.Input("exploration", tooltip="The Variation Explorer whose variants these are."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images: torch.Tensor, exploration: Exploration) -> io.NodeOutput:
        n = len(exploration.history_after)
        if images.shape[0] != n:
            raise NoiseQueryError(
                f"Variant Picker got {images.shape[0]} images for {n} variants; connect the decoded images of the "
                "explorer's variants batch (noise + latent outputs through SamplerCustomAdvanced and VAEDecode).")
        saved = ui.PreviewImage(images, cls=cls).as_dict()["images"]
        return io.NodeOutput(ui={UI_VARIANTS: list(saved), UI_CHOICES: list(exploration.history_after)})
