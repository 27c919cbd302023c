"""NoiseQueryRefine: search a seed's neighbourhood for a noise that scores higher by a metric; replayable history.

Thin glue over noisequery_core.exploration.refine (the search) and refine_metric (the metric parts): this module
renders candidates with the connected model exactly as a batch-1 KSampler / SamplerCustomAdvanced would
(nodes/sampling.py's renderer, given the noise instead of seeds), loads CLIP and aesthetic heads the way
NoiseQueryRank does, and turns ComfyUI's Interrupt into the core's Cancelled, so a stopped walk returns its best.
"""

from __future__ import annotations

import json
from typing import Any

import comfy.model_management
import comfy.sample
import comfy.samplers
import numpy as np
import torch
from comfy_api.latest import io

from ..noisequery_core import ClipSpec
from ..noisequery_core.errors import Cancelled, NoiseQueryError
from ..noisequery_core.exploration.explore import STRENGTH_MAX, History, HistoryError
from ..noisequery_core.exploration.refine import (
    MAX_BATCH,
    MAX_BUDGET,
    RefineError,
    RefineResult,
    RefineSettings,
    history_json,
    refine,
    replay,
    restore_calibration,
)
from ..noisequery_core.exploration.refine_metric import MetricSpec, build_metric, curve_image
from ..noisequery_core.noise import seed_noise
from ..noisequery_core.search.query import Query
from . import _host
from ._glue import MadeNoise, seed_input, to_image, to_pil
from ._host import aesthetic_choices, aesthetic_head
from ._validate import numbers_problem, require_numbers
from .sampling import SeedRenderer, _sampler_with_noise, decode

METRICS = ("query terms", "CLIP text", "aesthetic", "mix")
# The wire type of the Noise Query nodes' `query` output (nodes/search_nodes.py QueryType; kept in sync by name, as
# node modules do not import each other).
QueryType = io.Custom("NOISEQUERY_QUERY")
# ui keys for headless clients (the walk's history, and every render's score as a JSON list, render order)
UI_HISTORY = "noisequery_refine_history"
UI_SCORES = "noisequery_refine_scores"


class NoiseRenderer(SeedRenderer):
    """Renders given noises, each exactly as SamplerCustomAdvanced renders a batch-1 NOISE whose ``.seed`` is
    ``step_seed`` (the per-step noise of ancestral/SDE samplers), batched where nodes/sampling.py batches seeds."""

    def __init__(self, *args: Any, step_seed: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.step_seed = int(step_seed)

    def _sample_noise(self, noise: torch.Tensor) -> torch.Tensor:
        n = int(noise.shape[0])
        latent = torch.zeros((n, *self.latent_shape))
        if self.strategy in ("batched", "per-seed"):
            return comfy.sample.sample(
                self.model, noise, self.steps, self.cfg, self.sampler_name, self.scheduler, self.positive,
                self.negative, latent, denoise=1.0, disable_pbar=True, seed=self.step_seed)
        ks = comfy.samplers.KSampler(
            self.model, steps=self.steps, device=self.model.load_device, sampler=self.sampler_name,
            scheduler=self.scheduler, denoise=1.0, model_options=self.model.model_options)
        # one per-step noise stream per item, each the one a batch-1 run with step_seed draws
        sampler = _sampler_with_noise(self.sampler_name, [self.step_seed] * n, ks.sigmas,
                                      latent.to(self.model.load_device))
        return comfy.sample.sample_custom(self.model, noise, self.cfg, sampler, ks.sigmas, self.positive,
                                          self.negative, latent, disable_pbar=True, seed=self.step_seed)

    def render(self, noises: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sampled latents [n, C, h, w], decoded IMAGE [n, H, W, 3]) for noises [n, C, h, w]."""
        if self.strategy == "per-seed":
            samples = torch.cat([self._sample_noise(noises[i:i + 1]) for i in range(noises.shape[0])])
        else:
            samples = self._sample_noise(noises)
        return samples, decode(self.vae, samples)


def _cancelled_on_interrupt(fn: Any) -> Any:
    """``fn`` with ComfyUI's Interrupt turned into the core's Cancelled (the walk then returns its best so far)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except comfy.model_management.InterruptProcessingException:
            raise Cancelled("refine was interrupted") from None

    return wrapped


class NoiseQueryRefine(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryRefine",
            display_name="Refine Noise (metric search)",
            category="NoiseQuery/explore",
            description=(
                "Searches around a seed (e.g. a Noise Query hit) for a noise that scores higher by a metric: each round "
                "renders `batch` candidates, the current noise slerped toward fresh seeds' noises, and keeps the best "
                "if it beats the current one (hill climbing; the step shrinks after failed rounds and restarts when "
                "it gets too small). The metric is the connected query's colour/statistic/region/layout terms, a CLIP "
                "score to `text`, an aesthetic head, or a weighted mix, computed on the renders. The result is never "
                "worse than the start. `budget` counts renders. Interrupt stops the search and returns the best so "
                "far. The walk comes out as a Variation Explorer history: paste it into `replay` to rebuild the best "
                "noise without searching (or into a Variation Explorer with the same seed to go on exploring)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to render candidates with (as KSampler)."),
                io.Vae.Input("vae", tooltip="VAE that decodes each candidate for scoring."),
                io.Conditioning.Input("positive", tooltip="The prompt to render with."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (unused at cfg 1.0)."),
                seed_input("seed", 0, "Where the search starts (e.g. a Noise Query's seed output); ignored when `noise` is connected."),
                io.Int.Input("width", default=512, min=16, max=16384, step=8, tooltip="Render width in pixels (the noise's size: use the size you will sample at)."),
                io.Int.Input("height", default=512, min=16, max=16384, step=8, tooltip="Render height in pixels."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps of every candidate render."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance of every candidate render."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler (as KSampler). Ancestral/SDE samplers draw their per-step noise from the start seed, as SamplerCustomAdvanced does with this node's NOISE."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Noise schedule."),
                io.Combo.Input("metric", options=list(METRICS), default="query terms", tooltip="What to maximise: the connected query's terms, the CLIP score to `text`, the aesthetic head, or 'mix' = every part with a weight other than 0 (as weighted standard deviations)."),
                QueryType.Input("query", optional=True, tooltip="A Noise Query node's `query` output: its colour, statistic, region and layout terms are scored on each render (its text parts are not: use `text`)."),
                io.Float.Input("query_weight", default=1.0, min=-10.0, max=10.0, step=0.1, tooltip="Weight of the query terms in 'mix' (negative: away from them)."),
                io.String.Input("text", multiline=True, default="", tooltip="For 'CLIP text' / 'mix': what the image should show, scored by CLIP cosine."),
                io.Combo.Input("clip_model", options=[c for c in _host.CLIP_CHOICES if c != "none"], default="ViT-B-32:openai", tooltip="CLIP model for the text score and the aesthetic head's embeddings (weights in models/noisequery_clip). The LAION aesthetic heads need ViT-L-14."),
                io.Float.Input("clip_weight", default=0.0, min=-10.0, max=10.0, step=0.1, tooltip="Weight of the CLIP score in 'mix' (0 leaves it out)."),
                io.Combo.Input("aesthetic_model", options=aesthetic_choices(), default="none", tooltip="An aesthetic head in models/noisequery_aesthetic, for 'aesthetic' / 'mix'."),
                io.Float.Input("aesthetic_weight", default=0.0, min=-10.0, max=10.0, step=0.1, tooltip="Weight of the aesthetic score in 'mix' (0 leaves it out)."),
                io.Int.Input("budget", default=16, min=1, max=MAX_BUDGET, tooltip="Renders in all, the start included (16-64 is typical)."),
                io.Int.Input("batch", default=4, min=1, max=MAX_BATCH, tooltip="Candidates rendered together per round."),
                io.Float.Input("strength", default=0.5, min=0.01, max=STRENGTH_MAX, step=0.01, tooltip="First (and restart) step: how far a candidate moves toward a fresh seed's noise (0 = same noise, 1 = the fresh seed)."),
                io.Float.Input("min_strength", default=0.05, min=0.01, max=STRENGTH_MAX, step=0.01, tooltip="Smallest step: failed rounds shrink the step down to this, then it restarts at `strength`."),
                seed_input("search_seed", 0, "Which fresh seeds the walk tries: another value gives another walk from the same start."),
                io.String.Input("replay", multiline=True, default="", tooltip="A history from an earlier run (the `history` output): rebuilds its best noise without searching (one render). Empty = search."),
                io.Noise.Input("noise", optional=True, tooltip="Optional start NOISE instead of `seed` (its first item), e.g. a Noise Query's or a Variation Explorer's current_noise."),
            ],
            outputs=[
                io.Noise.Output(display_name="noise", tooltip="The best noise, for SamplerCustomAdvanced (every latent item gets it; its per-step seed is the start seed)."),
                io.Latent.Output(display_name="latent", tooltip="The best render's sampled latent (e.g. for a KSampler hires pass); pair `noise` with an Empty Latent of width x height to render it again."),
                io.Image.Output(display_name="image", tooltip="The best render."),
                io.Image.Output(display_name="curve", tooltip="Score of every render (dots) and the best so far (line)."),
                io.String.Output(display_name="history", tooltip="The walk as a Variation Explorer history: paste into `replay` (or a Variation Explorer with the same seed) to rebuild the best noise bit for bit."),
                io.Float.Output(display_name="score", tooltip="The best score (raw for a single metric part, weighted standard deviations for a mix)."),
                io.String.Output(display_name="report", tooltip="Start and best scores, renders, moves, and each metric part."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, cfg: float | None = None, query_weight: float | None = None,
                        clip_weight: float | None = None, aesthetic_weight: float | None = None,
                        strength: float | None = None, min_strength: float | None = None,
                        budget: int | None = None, batch: int | None = None, replay: str | None = None,
                        seed: int | None = None) -> bool | str:
        # the numbers are named so that NaN/inf are refused; numbers_problem re-applies their schema ranges
        bad = numbers_problem(cls, {k: v for k, v in locals().items() if k != "replay"})
        if bad:
            return bad
        if strength is not None and min_strength is not None and min_strength > strength:
            return f"NoiseQueryRefine: min_strength {min_strength:g} is above strength {strength:g}; lower it."
        if replay is not None and replay.strip():
            try:
                doc = json.loads(replay)
                start = int(doc["start_seed"]) if isinstance(doc, dict) and "start_seed" in doc else 0
                History.parse(replay, start)
            except HistoryError as exc:
                return f"NoiseQueryRefine replay: {exc}"
            except (ValueError, TypeError) as exc:
                return f"NoiseQueryRefine replay is not a readable history ({exc}); clear it to search again."
        return True

    @classmethod
    def execute(cls, model: Any, vae: Any, positive: Any, negative: Any, seed: int, width: int, height: int,
                steps: int, cfg: float, sampler_name: str, scheduler: str, metric: str, query_weight: float,
                text: str, clip_model: str, clip_weight: float, aesthetic_model: str, aesthetic_weight: float,
                budget: int, batch: int, strength: float, min_strength: float, search_seed: int, replay: str,
                query: Query | None = None, noise: Any = None) -> io.NodeOutput:
        require_numbers(cls, {k: v for k, v in locals().items() if k in (
            "cfg", "query_weight", "clip_weight", "aesthetic_weight", "strength", "min_strength", "budget", "batch")})
        settings = RefineSettings(budget=budget, batch=batch, strength=strength, min_strength=min_strength,
                                  search_seed=search_seed)
        score_parts, metric_obj = build_metric(_metric_spec(metric, query, query_weight, text, clip_model, clip_weight,
                                                            aesthetic_model, aesthetic_weight))
        unique_id = cls.hidden.unique_id if cls.hidden else None
        work = _host.NodeWork(unique_id, 1 if replay.strip() else budget)
        renderer = NoiseRenderer(model, vae, positive, negative, width=width, height=height, steps=steps, cfg=cfg,
                                 sampler_name=sampler_name, scheduler=scheduler, step_seed=0)
        shape = renderer.latent_shape
        start_seed, start, exact_seed = _start(seed, noise, shape)
        renderer.step_seed = start_seed
        notes = []
        if not exact_seed:
            notes.append(f"note: the start NOISE is not seed {start_seed}'s KSampler noise: its history replays in this "
                         "node with the same NOISE connected, not in a Variation Explorer.")
        if query is not None and metric in ("query terms", "mix") and (query.text.strip() or query.negative_text.strip()):
            notes.append("note: the query's text parts are not scored on renders; put the text in `text` (CLIP).")

        def render(noises: torch.Tensor) -> list[tuple[Any, torch.Tensor, torch.Tensor]]:
            """(PIL image for the metric, IMAGE [1, H, W, 3], sampled latent [1, C, h, w]) per noise: the walk
            keeps the best one's (the IMAGE output is the decoded image itself, not its 8-bit copy)."""
            samples, images = renderer.render(noises)
            return [(im, images[i:i + 1].cpu(), samples[i:i + 1].cpu()) for i, im in enumerate(to_pil(images))]

        def score(renders: Any) -> Any:
            return score_parts([r[0] for r in renders])

        check = _cancelled_on_interrupt(work.check_cancel)
        if replay.strip():
            hist = History.parse(replay, start_seed)
            if not restore_calibration(replay, metric_obj):
                notes.append("note: the history holds no calibration for this mix of metric parts: the score is "
                             "standardised on the replayed render alone (0); the parts' raw values are below.")
            result = _replayed(hist, replay_picks(start, hist), render, score, metric_obj, check)
            mode = f"replayed {len(hist.picks)} move(s) from the history (no search)"
        else:
            try:
                result = refine(start, History(start_seed), _cancelled_on_interrupt(render), score, metric_obj,
                                settings, progress=_cancelled_on_interrupt(work.progress), check_cancel=check)
            except Cancelled:  # interrupted before the start was scored: nothing to return, ComfyUI's usual stop
                raise comfy.model_management.InterruptProcessingException() from None
            mode = "searched"
        _, best_image, best_latent = result.best_render
        latent = {"samples": best_latent}
        best_noise = result.best_noise.clone()
        out_noise = MadeNoise(start_seed, 1, lambda shp, dtype: _sized(best_noise, shp, dtype))
        curve = to_image([curve_image(result.scores, result.curve, stopped_at=result.renders if result.stopped else None)])
        history = history_json(result.history, metric_obj)
        report = "\n".join([result.report(1 if replay.strip() else budget), mode, *notes, f"history: {history}"])
        return io.NodeOutput(out_noise, latent, best_image, curve, history, float(result.best_score), report,
                             ui={"text": [report], UI_HISTORY: [history], UI_SCORES: [json.dumps(result.scores)]})


def _sized(noise: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if tuple(shape) != tuple(noise.shape):
        raise NoiseQueryError(f"the refined noise is for a latent of shape {tuple(noise.shape)}, but the sampler asks "
                              f"for {tuple(shape)}; use an Empty Latent of the refine node's width and height.")
    return noise.to(dtype)[None]


def _start(seed: int, noise: Any, shape: tuple[int, ...]) -> tuple[int, torch.Tensor, bool]:
    """(start seed, start noise [C, h, w], whether it is exactly that seed's KSampler noise)."""
    if noise is None:
        return int(seed), seed_noise(int(seed), shape), True
    seeds = list(getattr(noise, "seeds", []) or [])
    got = noise.generate_noise({"samples": torch.zeros((1, *shape))})
    if not isinstance(got, torch.Tensor) or got.ndim != 4 or tuple(got.shape[1:]) != tuple(shape):
        raise NoiseQueryError(f"the connected NOISE gave {getattr(got, 'shape', got)!r} for a latent item of shape "
                              f"{tuple(shape)}; connect a NOISE made for this size.")
    start = got[0].float().cpu()
    start_seed = int(seeds[0]) if seeds else int(getattr(noise, "seed", 0) or 0)
    return start_seed, start, bool(torch.equal(start, seed_noise(start_seed, shape)))


def replay_picks(start: torch.Tensor, hist: History) -> torch.Tensor:
    """The best noise of a saved walk: its moves applied to the start, exactly as the search built it."""
    return replay(start, hist.picks)


def _replayed(hist: History, best: torch.Tensor, render: Any, score_parts: Any, metric: Any, check: Any) -> RefineResult:
    """One render of a replayed history, as a RefineResult (its score is the only point of the curve)."""
    check()
    renders = render(best[None])
    parts = {k: np.asarray(v, np.float64) for k, v in score_parts(renders).items()}
    if not metric.calibrated:
        metric.calibrate(parts)
    s = float(metric.combine(parts)[0])
    return RefineResult(hist, best, renders[0], s, 0, [s], [s], {k: [float(v[0])] for k, v in parts.items()}, [])


def _metric_spec(metric: str, query: Query | None, query_weight: float, text: str, clip_model: str, clip_weight: float,
                 aesthetic_model: str, aesthetic_weight: float) -> MetricSpec:
    """The MetricSpec a `metric` choice asks for; the embedder and aesthetic head are loaded only when used."""
    if metric not in METRICS:
        raise RefineError(f"unknown refine metric {metric!r}; choose one of {', '.join(METRICS)}.")
    if metric == "query terms":
        if query is None:
            raise RefineError("metric 'query terms' needs a query: connect a Noise Query (Colour) node's `query` "
                              "output, or choose another metric.")
        return MetricSpec(query=query)
    if metric == "CLIP text":
        if not text.strip():
            raise RefineError("metric 'CLIP text' has an empty `text`: type what the image should show, or choose "
                              "another metric.")
        return MetricSpec(text=text, clip_weight=1.0, embedder=_host.embedder_for(ClipSpec.parse(clip_model)))
    if metric == "aesthetic":
        if aesthetic_model == "none":
            raise RefineError("metric 'aesthetic' needs an aesthetic_model (a head in models/noisequery_aesthetic).")
        return MetricSpec(aesthetic=aesthetic_head(aesthetic_model), aesthetic_weight=1.0,
                          embedder=_host.embedder_for(ClipSpec.parse(clip_model)))
    use_clip = clip_weight != 0
    use_aesthetic = aesthetic_model != "none" and aesthetic_weight != 0
    if use_clip and not text.strip():
        raise RefineError(f"metric 'mix' has clip_weight {clip_weight:g} but an empty `text`: type what the image "
                          "should show, or set clip_weight to 0.")
    return MetricSpec(
        query=query if query_weight != 0 else None, query_weight=query_weight, text=text, clip_weight=clip_weight,
        aesthetic=aesthetic_head(aesthetic_model) if use_aesthetic else None,
        aesthetic_weight=aesthetic_weight if use_aesthetic else 0.0,
        embedder=_host.embedder_for(ClipSpec.parse(clip_model)) if (use_clip or use_aesthetic) else None)
