"""HighlightScribbleGuide (stroke-placed phrases) and NoiseQueryHighlightMask (the same from masks, headless)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from comfy_api.latest import io

from ..noisequery_core.errors import HighlightError
from ..noisequery_core.guidance.joint import JointModel
from ..noisequery_core.guidance.preview import region_preview, summary_lines
from ..noisequery_core.guidance.regions import phrase_boxes
from ..noisequery_core.guidance.schedule import SCHEDULES, GuideSettings
from ..noisequery_core.guidance.strokes import EMPTY_HIGHLIGHTS, Highlight, check_masks, parse_strokes, read_highlights
from ..noisequery_core.guidance.tokens import phrase_token_columns, segment_token_columns
from ._glue import data_url
from ._validate import numbers_problem, require_numbers
from .guidance_runtime import HighlightRuntime, install

log = logging.getLogger("noisequery")

# A list of (phrase, [H, W] mask) pairs, built by chaining NoiseQueryHighlightMask nodes.
HighlightsType = io.Custom("NOISEQUERY_HIGHLIGHTS")


# ------------------------------------------------------------------ host-facing helpers


def tokenizer_rows(tokens: dict[str, Any]) -> list[list[int]]:
    """Token id rows (one per 77-token chunk) of ``clip.tokenize(text)``, as the conditioning lays them out."""
    key = "l" if "l" in tokens else next(iter(tokens))
    return [[int(t[0]) for t in row] for row in tokens[key]]


def phrase_tokenizer(clip: Any) -> Callable[[str], list[int]]:
    """phrase -> its token ids without start/end/padding tokens, with the CLIP's CLIP-L tokenizer."""
    tk = clip.tokenizer
    sub = getattr(tk, "clip_l", None) or getattr(tk, getattr(tk, "clip", ""), None)
    hf = getattr(sub, "tokenizer", None)
    if hf is None:
        raise HighlightError(f"HighlightScribbleGuide: this CLIP ({type(tk).__name__}) has no CLIP-L tokenizer; "
                             "the guide supports SD1.x and SDXL text encoders")
    return lambda phrase: [int(i) for i in hf(phrase)["input_ids"][1:-1]]


def check_model(model: Any) -> tuple[Any, JointModel | None]:
    """The model's model_sampling and, for a joint-attention transformer (SD3 MMDiT, Flux), its layout facts; after
    checking the diffusion model is one whose attention the guide can place phrases in."""
    try:
        import comfy.ldm.flux.model as flux
        import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
        import comfy.ldm.modules.diffusionmodules.openaimodel as oai
        net = model.model.diffusion_model
    except Exception as exc:  # not a ModelPatcher of a diffusion model
        raise HighlightError(f"HighlightScribbleGuide: the model input is not a diffusion model ({exc})") from exc
    joint: JointModel | None = None
    if isinstance(net, flux.Flux):
        if any(getattr(b, "flipped_img_txt", False) for b in getattr(net, "double_blocks", [])):
            raise HighlightError(f"HighlightScribbleGuide: {type(model.model).__name__} puts the image before the text "
                                 "in its joint attention; the guide knows Flux's text-then-image layout only")
        joint = JointModel("flux", int(net.patch_size))
    elif isinstance(net, mmdit.MMDiT):
        joint = JointModel("sd3", int(net.patch_size), int(getattr(net, "register_length", 0) or 0))
    elif not isinstance(net, oai.UNetModel) or getattr(net, "num_classes", None) not in (None, "sequential"):
        raise HighlightError(f"HighlightScribbleGuide: cannot guide a {type(model.model).__name__} "
                             f"({type(net).__name__}); it patches the cross-attention of SD1.x and SDXL UNets and the "
                             "joint attention of SD3 (MMDiT) and Flux. Connect one of those checkpoints' MODEL")
    ms = model.get_model_object("model_sampling")
    if joint is not None:
        if not hasattr(ms, "percent_to_sigma"):
            raise HighlightError(f"HighlightScribbleGuide: {type(ms).__name__} sampling has no percent_to_sigma; the "
                                 "guide cannot tell how far sampling is")
        return ms, joint
    if not hasattr(ms, "timestep") or not hasattr(ms, "sigmas"):
        raise HighlightError(f"HighlightScribbleGuide: {type(ms).__name__} sampling is not supported (needs the "
                             "discrete-timestep sampling of SD1.x / SDXL)")
    return ms, None


def sigma_to_percent_fn(ms: Any) -> Callable[[float], float]:
    """sigma -> sampling progress, the inverse of ComfyUI's percent_to_sigma (1 - timestep / 999)."""
    last = float(len(ms.sigmas) - 1)

    def f(sigma: float) -> float:
        t = float(ms.timestep(torch.tensor([sigma], dtype=torch.float32)).reshape(-1)[0])
        return min(max(1.0 - t / last, 0.0), 1.0)

    return f


def flow_sigma_to_percent_fn(ms: Any) -> Callable[[float], float]:
    """sigma -> sampling progress for any model_sampling with a decreasing ``percent_to_sigma`` (SD3's and Flux's
    flow sampling with their shifts): its inverse by bisection, remembered per sigma (every attention call of a step
    asks for the same one)."""
    memo: dict[float, float] = {}

    def f(sigma: float) -> float:
        got = memo.get(sigma)
        if got is not None:
            return got
        lo, hi = 0.0, 1.0
        for _ in range(40):  # 1e-12 of the range
            mid = 0.5 * (lo + hi)
            if float(ms.percent_to_sigma(mid)) > sigma:
                lo = mid
            else:
                hi = mid
        if len(memo) > 4096:
            memo.clear()
        memo[sigma] = 0.5 * (lo + hi)
        return memo[sigma]

    return f


def _hf_phrase_ids(sub: Any, what: str) -> Callable[[str], list[int]]:
    """phrase -> ids without start/end tokens, with one of ComfyUI's SDTokenizer wrappers (CLIP or T5)."""
    hf = getattr(sub, "tokenizer", None)
    if hf is None:
        raise HighlightError(f"HighlightScribbleGuide: this CLIP has no {what} tokenizer")
    start, end = getattr(sub, "start_token", None), getattr(sub, "end_token", None)

    def ids(phrase: str) -> list[int]:
        out = [int(i) for i in hf(phrase)["input_ids"]]
        if out and start is not None and out[0] == start:
            out = out[1:]
        if out and end is not None and out[-1] == end:
            out = out[:-1]
        return out

    return ids


def conditioning_segments(tokens: dict[str, Any], clip: Any, ctx_len: int
                          ) -> list[tuple[list[list[int]], Callable[[str], list[int]]]]:
    """The encoders' token rows in the order the conditioning lays them along the sequence, each with its tokenizer.

    SD1.x/SDXL: the CLIP rows (CLIP-L and CLIP-G side by side in the features, one set of positions). SD3: the
    CLIP rows, then the T5 rows (sd3_clip concatenates them along the tokens; either part is absent when its
    encoder is). Flux: the T5 rows only (CLIP-L gives the pooled vector). The layout is the one whose length is the
    conditioning's.

    Raises:
        HighlightError: no layout the guide knows has the conditioning's length.
    """
    tk = clip.tokenizer
    csm = getattr(clip, "cond_stage_model", None)
    segs: dict[str, tuple[list[list[int]], Callable[[str], list[int]]]] = {}
    clip_key = "l" if "l" in tokens else ("g" if "g" in tokens else None)
    has = {name: getattr(csm, attr, True) is not None for name, attr in (("clip", "clip_l"), ("t5", "t5xxl"))}
    has["clip"] = has["clip"] or getattr(csm, "clip_g", None) is not None
    if clip_key is not None and has["clip"]:
        sub = getattr(tk, f"clip_{clip_key}", None) or getattr(tk, getattr(tk, "clip", ""), None)
        segs["clip"] = (tokenizer_rows({clip_key: tokens[clip_key]}), _hf_phrase_ids(sub, "CLIP-L"))
    if "t5xxl" in tokens and has["t5"]:
        segs["t5"] = ([[int(t[0]) for t in row] for row in tokens["t5xxl"]], _hf_phrase_ids(tk.t5xxl, "T5"))
    layouts = [["clip", "t5"], ["t5"], ["clip"]] if "t5" in segs else [["clip"]]
    tried = []
    for names in layouts:
        if all(n in segs for n in names):
            parts = [segs[n] for n in names]
            total = sum(len(r) for rows, _ in parts for r in rows)
            if total == ctx_len:
                return parts
            tried.append(f"{'+'.join(names)} ({total})")
    raise HighlightError(f"HighlightScribbleGuide: the text encoder gave {ctx_len} tokens, but the tokenizer's layouts "
                         f"give {', '.join(tried) or 'none'}; this CLIP lays out tokens in a way the guide does not "
                         "know (it knows SD1.x/SDXL CLIP, SD3 CLIP+T5 and Flux T5)")


def ground_with_gligen(conditioning: list[Any], clip: Any, gligen: Any, highlights: list[Highlight], width: int,
                       height: int, softness: float) -> list[Any]:
    """The conditioning with one GLIGEN position entry per phrase (its stroke's box), in the format ComfyUI's
    GLIGENTextBoxApply writes: ("position", model, [(pooled phrase, h, w, y, x) in latent cells])."""
    params = []
    for hl, (h, w, y, x) in zip(highlights, phrase_boxes(highlights, width, height, softness)):
        _, pooled = clip.encode_from_tokens(clip.tokenize(hl.phrase), return_pooled="unprojected")
        params.append((pooled, h, w, y, x))
    out = []
    for t in conditioning:
        extra = t[1].copy()
        prev = extra["gligen"][2] if "gligen" in extra else []
        extra["gligen"] = ("position", gligen, prev + params)
        out.append([t[0], extra])
    return out


# ------------------------------------------------------------------ nodes


class HighlightScribbleGuide(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HighlightScribbleGuide",
            display_name="Highlight Scribble Guide",
            category="NoiseQuery/guide",
            description=(
                "Place each phrase of the prompt where you scribble it: draw one stroke per phrase on the canvas "
                "(or connect mask highlights for headless runs). Returns a patched MODEL and the prompt's "
                "CONDITIONING for a standard KSampler / SamplerCustomAdvanced. Training-free: during the chosen "
                "range of sampling the phrase's cross-attention is raised inside its stroke's soft region and "
                "lowered outside (a bias on the attention logits, through ComfyUI's attention wrapper; it chains "
                "with other attention patches, but layers another pack has *replaced* with its own attention are "
                "not guided). Optional refocusing moves the latent along the gradient of an attention loss in the "
                "first steps (slower: one extra forward + backward per iteration). SD1.x and SDXL UNets (cross-attention); "
                "SD3 and Flux (joint attention: the image's attention to the phrase and the phrase's attention to the "
                "image are both raised inside the region, at every block; phrases are found in the T5 and CLIP tokens)."),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x / SDXL / SD3 / Flux model to guide (it is cloned; the input stays unpatched)."),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint: encodes the prompt and finds which tokens each phrase occupies."),
                io.String.Input("prompt", multiline=True, default="a cat and a red ball on a lawn",
                                tooltip="The positive prompt. Every highlighted phrase must appear in it word for word."),
                io.String.Input("highlights", multiline=True, default=EMPTY_HIGHLIGHTS,
                                tooltip="The strokes drawn on the canvas, as JSON (saved in the workflow): "
                                        '{"version": 1, "strokes": [{"phrase", "width", "points": [[x, y], ...]}]}, '
                                        "x/y as fractions of the image width/height."),
                io.Int.Input("width", default=512, min=64, max=16384, step=8,
                             tooltip="Width of the image you will generate; sets the canvas shape (strokes are stored "
                                     "resolution-independent, so they follow any latent size)."),
                io.Int.Input("height", default=512, min=64, max=16384, step=8,
                             tooltip="Height of the image you will generate; sets the canvas shape."),
                io.Float.Input("strength", default=1.0, min=0.0, max=4.0, step=0.05,
                               tooltip="How hard each phrase is pulled into its region (0 = off; 1 puts >= 80% of the "
                                       "phrase's attention inside a region covering a quarter of the image)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the guided part of sampling (0 = first step)."),
                io.Float.Input("end_percent", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the guided part of sampling; layout is decided early, so guiding the "
                                       "last steps mostly costs detail."),
                io.Combo.Input("schedule", options=list(SCHEDULES), default="cosine",
                               tooltip="How the strength decays over the guided range: cosine or linear from full to 0, "
                                       "or constant."),
                io.Float.Input("edge_softness", default=0.5, min=0.0, max=3.0, step=0.05,
                               tooltip="Falloff beyond the stroke's edge, as a multiple of half the stroke width "
                                       "(0 = hard edge)."),
                io.Float.Input("refocus_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Refocusing (loss-guided latent updates, as Attention Refocusing / BoxDiff) runs "
                                       "from start_percent for this share of sampling; 0 = off. Costs one forward and "
                                       "backward pass per iteration per step."),
                io.Int.Input("refocus_iterations", default=2, min=0, max=20,
                             tooltip="Gradient steps on the latent per refocused sampling step."),
                io.Float.Input("refocus_step_size", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Size of each refocusing step, relative to the current noise level."),
                HighlightsType.Input("mask_highlights", optional=True,
                                     tooltip="Highlights from masks (NoiseQuery Highlight Mask nodes), added to the strokes: "
                                             "the way to place phrases in headless API runs."),
                io.Image.Input("background", optional=True,
                               tooltip="An image to draw over (e.g. a previous result); shown under the strokes after "
                                       "the first run. Not used for sampling."),
                io.Gligen.Input("gligen", optional=True,
                                tooltip="Optional GLIGEN textbox model (GLIGENLoader, SD1.x): each phrase is also grounded "
                                        "with its stroke's bounding box, as GLIGENTextBoxApply would do with a drawn box."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with highlight guidance; use with the conditioning below."),
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The prompt encoded with this CLIP: the positive input of the sampler "
                                               "(the guide finds the phrases at these token positions)."),
                io.Image.Output(display_name="regions", tooltip="Preview of each phrase's soft region, in its colour."),
            ],
        )

    @classmethod
    def validate_inputs(cls, highlights: str | None = None, strength: float | None = None,
                        start_percent: float | None = None, end_percent: float | None = None,
                        edge_softness: float | None = None, refocus_percent: float | None = None,
                        refocus_step_size: float | None = None) -> bool | str:
        # Every number is named (so NaN/inf are refused); numbers_problem re-applies the schema ranges ComfyUI then
        # skips (nodes/_validate.py). None is a linked input, checked when the node runs.
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        try:
            parse_strokes(highlights)
        except HighlightError as exc:
            return str(exc)
        if start_percent is not None and end_percent is not None and end_percent <= start_percent:
            return f"end_percent ({end_percent}) must be greater than start_percent ({start_percent})"
        return True

    @classmethod
    def execute(cls, model: Any, clip: Any, prompt: str, highlights: str, width: int, height: int, strength: float,
                start_percent: float, end_percent: float, schedule: str, edge_softness: float,
                refocus_percent: float, refocus_iterations: int, refocus_step_size: float,
                mask_highlights: list[tuple[str, torch.Tensor]] | None = None,
                background: torch.Tensor | None = None, gligen: Any = None) -> io.NodeOutput:
        require_numbers(cls, locals())  # the arguments by name: linked values were not there to check at queue time
        if end_percent <= start_percent:
            raise HighlightError(f"end_percent ({end_percent}) must be greater than start_percent ({start_percent})")
        groups = read_highlights(highlights, list(mask_highlights or []))
        ms, joint = check_model(model)
        if joint is not None and joint.family == "flux" and refocus_percent > 0 and refocus_iterations > 0:
            # Checked by tests/host/test_highlight_joint.py, which fails once ComfyUI's Flux becomes differentiable.
            raise HighlightError("HighlightScribbleGuide: refocusing cannot run on Flux: ComfyUI's Flux blocks add to "
                                 "their activations in place and apply the rotary embedding with a kernel "
                                 "(comfy_kitchen) that has no backward, so there is no gradient of the attention maps "
                                 "with respect to the latent. Set refocus_percent to 0; the attention guidance itself "
                                 "works on Flux")
        tokens = clip.tokenize(prompt)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        ctx_len = int(conditioning[0][0].shape[1])
        if joint is None:
            columns, total = phrase_token_columns(groups, tokenizer_rows(tokens), phrase_tokenizer(clip), prompt)
            if ctx_len != total:
                raise HighlightError(f"HighlightScribbleGuide: the text encoder gave {ctx_len} tokens for {total} "
                                     "tokenizer positions; this CLIP lays out tokens in a way the guide does not know")
        else:
            columns, _ = segment_token_columns(groups, conditioning_segments(tokens, clip, ctx_len), prompt)
        if gligen is not None:
            conditioning = ground_with_gligen(conditioning, clip, gligen, groups, width, height, edge_softness)
        settings = GuideSettings(strength=strength, start_percent=start_percent, end_percent=end_percent,
                                 schedule=schedule, softness=edge_softness, refocus_steps_percent=refocus_percent,
                                 refocus_iterations=refocus_iterations, refocus_step_size=refocus_step_size)
        to_percent = sigma_to_percent_fn(ms) if joint is None else flow_sigma_to_percent_fn(ms)
        runtime = HighlightRuntime(groups, columns, ctx_len, settings, to_percent, width / height, joint=joint)
        patched = install(model, runtime)
        lines = summary_lines(groups, columns, width, height, edge_softness)
        log.info("HighlightScribbleGuide: %s", "; ".join(lines))
        ui: dict[str, list[Any]] = {"text": ["\n".join(lines)]}
        if background is not None:
            ui["highlight_background"] = [data_url(background)]
        preview = region_preview(groups, width, height, edge_softness, background)
        return io.NodeOutput(patched, conditioning, preview, ui=ui)


class NoiseQueryHighlightMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryHighlightMask",
            display_name="NoiseQuery Highlight Mask",
            category="NoiseQuery/guide",
            description=("Ties a phrase of the prompt to a MASK region for HighlightScribbleGuide: the stroke-free way "
                         "(headless API runs, masks painted elsewhere). Chain several through 'previous'."),
            inputs=[
                io.Mask.Input("mask", tooltip="Where the phrase goes (white = inside; soft edges allowed). A batch of "
                                              "masks is merged into one region."),
                io.String.Input("phrase", default="a cat", tooltip="A phrase that appears word for word in the guide's prompt."),
                HighlightsType.Input("previous", optional=True, tooltip="Highlights from earlier mask nodes, kept in order."),
            ],
            outputs=[HighlightsType.Output(display_name="highlights",
                                           tooltip="Connect to HighlightScribbleGuide's mask_highlights (or the next mask node).")],
        )

    @classmethod
    def validate_inputs(cls, phrase: str) -> bool | str:
        if not isinstance(phrase, str) or not phrase.strip():
            return "phrase is empty: type the part of the prompt this mask places"
        return True

    @classmethod
    def execute(cls, mask: torch.Tensor, phrase: str, previous: list[tuple[str, torch.Tensor]] | None = None
                ) -> io.NodeOutput:
        m = mask if mask.ndim == 3 else mask[None]
        region = m.float().amax(0).cpu()
        check_masks([(phrase.strip(), region)])
        return io.NodeOutput([*(previous or []), (phrase.strip(), region)])
