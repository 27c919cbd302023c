"""NoiseQueryText and NoiseQueryColor: retrieve seeds from a library, as seed / NOISE / LATENT / IMAGE."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from comfy_api.latest import io

from ..noisequery_core import Query, QueryError, RegionTarget, StatTarget
from ..noisequery_core.search import color
from ..noisequery_core.search.color import parse_hex_color
from ..noisequery_core.search.query import Hit, format_report
from . import _host
from ._glue import SEED_MAX, SeedNoise, empty_latent, load_thumbnails, to_uint8
from ._validate import numbers_problem, require_numbers

log = logging.getLogger("noisequery")

QueryType = io.Custom("NOISEQUERY_QUERY")
MAX_TOP_K = 64
STAT_OFF = -1.0


def _common_inputs() -> list[Any]:
    return [
        io.Int.Input("top_k", default=4, min=1, max=MAX_TOP_K, tooltip="How many hits go into the NOISE, LATENT and IMAGE batches."),
        io.Int.Input("rank_offset", default=0, min=0, max=10_000, tooltip="Skip this many best hits: the seed output is hit #rank_offset, the batches start there. Step it to page through results."),
        io.Float.Input("diversity", default=0.0, min=0.0, max=1.0, step=0.05, tooltip="0 = pure ranking; higher values trade score for variety among the hits (MMR)."),
        io.String.Input("exclude_seeds", default="", tooltip="Seeds never to return, separated by commas or spaces."),
        QueryType.Input("also", optional=True, tooltip="Constraints from another NoiseQuery node (e.g. colour), combined with this one's by weight."),
        io.Model.Input("model", optional=True, tooltip="Optional: the model you will sample with; a warning is shown if it differs from the library's."),
    ]


def _outputs() -> list[Any]:
    return [
        io.Int.Output(display_name="seed", tooltip="The hit at rank_offset: connect to KSampler's seed (set it to fixed)."),
        io.Noise.Output(display_name="noise", tooltip="For SamplerCustomAdvanced: item i is exactly KSampler's batch-1 noise for hit i."),
        io.Latent.Output(display_name="latent", tooltip="Empty latent of the library's size with one item per hit, so the resolution always matches."),
        io.Image.Output(display_name="thumbnails", tooltip="The hits' library thumbnails."),
        io.String.Output(display_name="report", tooltip="Seed, score and per-term breakdown of every hit."),
        QueryType.Output(display_name="query", tooltip="This node's constraints, to combine with another NoiseQuery node."),
    ]


def _parse_seeds(text: str) -> tuple[int, ...]:
    out = []
    for tok in text.replace(",", " ").split():
        try:
            value = int(tok)
        except ValueError:
            raise QueryError(f"exclude_seeds: {tok!r} is not a seed number (write e.g. '12, 345').") from None
        if not 0 <= value <= SEED_MAX:
            raise QueryError(f"exclude_seeds: {tok} is outside the seed range 0..{SEED_MAX}.")
        out.append(value)
    return tuple(out)


def merge_queries(a: Query, b: Query | None) -> Query:
    """Terms of both; the text of ``a`` wins where both have one."""
    if b is None:
        return a
    return replace(
        a,
        text=a.text or b.text,
        text_weight=a.text_weight if a.text else b.text_weight,
        negative_text=a.negative_text or b.negative_text,
        image_embedding=a.image_embedding if a.image_embedding is not None else b.image_embedding,
        colors=a.colors + b.colors,
        stats=a.stats + b.stats,
        regions=a.regions + b.regions,
        layout=a.layout if a.layout is not None else b.layout,
        layout_weight=a.layout_weight if a.layout is not None else b.layout_weight,
        palette=a.palette or b.palette,
        palette_weight=a.palette_weight if a.palette else b.palette_weight,
        exclude_seeds=a.exclude_seeds + b.exclude_seeds,
    )


def run_query(library: str, query: Query, rank_offset: int, model: Any) -> io.NodeOutput:
    lib = _host.open_library(library)
    if lib.count and rank_offset >= lib.count:
        raise QueryError(
            f"rank_offset {rank_offset} is past the last hit: library {library!r} has {lib.count} entries. Lower rank_offset."
        )
    searcher = _host.searcher_for(lib, need_text=bool(query.text.strip() or query.negative_text.strip()))
    hits: list[Hit] = searcher.search(replace(query, top_k=min(query.top_k + rank_offset, max(lib.count, 1))))
    if rank_offset >= len(hits):
        raise QueryError(f"rank_offset {rank_offset} is past the last hit: library {library!r} returned {len(hits)} hits.")
    window = hits[rank_offset : rank_offset + query.top_k]
    seeds = [h.seed for h in window]
    notes = []
    if model is not None and lib.generation.model_hash:
        got = _host.model_fingerprint(model)
        if got != lib.generation.model_hash:
            msg = (f"warning: the connected model (fingerprint {got}) differs from the one library {library!r} was built "
                   f"with ({lib.generation.model} {lib.generation.model_hash}); the seeds' tendencies may not carry over.")
            log.warning(msg)
            notes.append(msg)
    shape = lib.generation.latent_shape
    if not shape:
        shape = (4, 64, 64)
        notes.append("note: the library does not record a latent size (imported images); the latent output is 512×512.")
    latent = empty_latent(len(seeds), shape)
    report = "\n".join(notes + [f"library {library}: {lib.count} entries; showing hits {rank_offset}..{rank_offset + len(window) - 1}",
                                format_report(hits)])
    return io.NodeOutput(seeds[0], SeedNoise(seeds), latent, load_thumbnails(lib, seeds), report, query,
                         ui={"text": [report]})


class NoiseQueryText(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryText",
            display_name="Noise Query (Text)",
            category="NoiseQuery/query",
            description=(
                "Finds the seeds whose unconditional images best match a text (CLIP, the library's own model), "
                "optionally combined with colour constraints from a Noise Query (Colour) node. Feed `seed` to a "
                "KSampler (seed control 'fixed') or `noise` + `latent` to SamplerCustomAdvanced."
            ),
            inputs=[
                io.Combo.Input("library", options=_host.library_names(), tooltip="A library in models/noise_libraries (built with a CLIP model)."),
                io.String.Input("text", multiline=True, default="", tooltip="What the image should lean towards, e.g. 'a sunset over the sea'."),
                io.String.Input("negative_text", default="", tooltip="What it should lean away from (optional)."),
                io.Float.Input("text_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the text term (in standard deviations, like every term)."),
                io.Float.Input("negative_weight", default=0.5, min=0.0, max=10.0, step=0.1, tooltip="Weight of the negative text."),
                *_common_inputs(),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, library: str, **kwargs: Any) -> Any:
        return _host.library_fingerprint(library)

    @classmethod
    def validate_inputs(cls, exclude_seeds: str | None = None, text_weight: float | None = None,
                        negative_weight: float | None = None, diversity: float | None = None) -> bool | str:
        # the numbers are named so that NaN/inf are refused; numbers_problem re-applies their ranges
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        try:
            if exclude_seeds is not None:
                _parse_seeds(exclude_seeds)
        except QueryError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, library: str, text: str, negative_text: str, text_weight: float, negative_weight: float, top_k: int,
                rank_offset: int, diversity: float, exclude_seeds: str, also: Query | None = None, model: Any = None) -> io.NodeOutput:
        require_numbers(cls, locals())  # the arguments by name: linked values were not there to check at queue time
        if not text.strip() and also is None:
            raise QueryError("NoiseQueryText: the text is empty. Type what the image should show, or connect a colour query to 'also'.")
        q = Query(text=text, text_weight=text_weight, negative_text=negative_text, negative_weight=negative_weight,
                  top_k=top_k, diversity=diversity, exclude_seeds=_parse_seeds(exclude_seeds))
        return run_query(library, merge_queries(q, also), rank_offset, model)


def _example_of(image: torch.Tensor) -> tuple[np.ndarray, tuple[tuple[str, float], ...]]:
    """(layout, palette) of the first image of a batch (search/color.example_targets)."""
    return color.example_targets(to_uint8(image[:1])[0])


class NoiseQueryColor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        stat_inputs = [
            io.Float.Input(st.name, default=STAT_OFF, min=STAT_OFF, max=st.hi, step=0.01,
                           tooltip=f"Target {st.name}: {st.doc}. -1 ignores it.")
            for st in color.STATS if st.name in ("brightness", "contrast", "saturation", "colorfulness", "sharpness")
        ]
        return io.Schema(
            node_id="NoiseQueryColor",
            display_name="Noise Query (Colour)",
            category="NoiseQuery/query",
            description=(
                "Finds the seeds whose unconditional images have the colours, statistics or layout you ask for: a "
                "colour that covers much of the image, targets for brightness/contrast/saturation/colourfulness/sharpness, a colour or "
                "lightness in a region, or the colour layout of an example image. Works on colour-only libraries; "
                "connect its `query` to a Noise Query (Text) node's `also` to combine with text."
            ),
            inputs=[
                io.Combo.Input("library", options=_host.library_names(), tooltip="A library in models/noise_libraries."),
                io.String.Input("color", default="#FF8800", tooltip="A colour that should cover much of the image, as #RRGGBB: scored by the share of the image within CIEDE2000 20 of it. Empty to ignore."),
                io.Float.Input("color_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the colour term (in standard deviations, like every term)."),
                *stat_inputs,
                io.Float.Input("stats_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of each statistic target that is not -1."),
                io.Combo.Input("region", options=["none", *color.REGION_NAMES], default="none", tooltip="A region of the image that should have region_color and/or region_lightness."),
                io.String.Input("region_color", default="", tooltip="Colour of the region as #RRGGBB; empty to ignore."),
                io.Float.Input("region_lightness", default=STAT_OFF, min=STAT_OFF, max=1.0, step=0.01, tooltip="Lightness of the region, 0 (black) .. 1 (white); -1 ignores it."),
                io.Float.Input("region_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the region terms."),
                io.Image.Input("layout_image", optional=True, tooltip="Optional example image: its 8×8 colour layout becomes a target (layout_weight), and its palette too when palette_weight is above 0."),
                io.Float.Input("layout_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the layout of layout_image."),
                *_common_inputs(),
                # last, so that workflows saved before it load their widget values unchanged (and, at 0, rank the same)
                io.Float.Input("palette_weight", default=0.0, min=0.0, max=10.0, step=0.1, optional=True, tooltip="Weight of layout_image's palette: its colours in their proportions, wherever they are in the image (the library browser's 'upload image' uses the layout and the palette at equal weights). 0 ignores it."),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def fingerprint_inputs(cls, library: str, **kwargs: Any) -> Any:
        return _host.library_fingerprint(library)

    @classmethod
    def validate_inputs(cls, color: str | None = None, region_color: str | None = None, exclude_seeds: str | None = None,
                        color_weight: float | None = None, brightness: float | None = None,
                        contrast: float | None = None, saturation: float | None = None,
                        colorfulness: float | None = None, sharpness: float | None = None,
                        stats_weight: float | None = None, region_lightness: float | None = None,
                        region_weight: float | None = None, layout_weight: float | None = None,
                        diversity: float | None = None, palette_weight: float | None = None) -> bool | str:
        # the numbers are named so that NaN/inf are refused; numbers_problem re-applies their ranges
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        try:
            if color:
                parse_hex_color(color)
            if region_color:
                parse_hex_color(region_color)
            if exclude_seeds is not None:
                _parse_seeds(exclude_seeds)
        except QueryError as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, library: str, color: str, color_weight: float, brightness: float, contrast: float, saturation: float,
                colorfulness: float, sharpness: float, stats_weight: float, region: str, region_color: str,
                region_lightness: float, region_weight: float, layout_weight: float, top_k: int, rank_offset: int,
                diversity: float, exclude_seeds: str, layout_image: torch.Tensor | None = None, also: Query | None = None,
                model: Any = None, palette_weight: float = 0.0) -> io.NodeOutput:
        require_numbers(cls, locals())  # the arguments by name: linked values were not there to check at queue time
        stats = tuple(
            StatTarget(name, target=float(v), weight=stats_weight)
            for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation),
                            ("colorfulness", colorfulness), ("sharpness", sharpness))
            if v > STAT_OFF
        )
        regions: tuple[RegionTarget, ...] = ()
        if region != "none" and (region_color.strip() or region_lightness > STAT_OFF):
            regions = (RegionTarget(region, color=region_color.strip() or None,
                                    lightness=region_lightness if region_lightness > STAT_OFF else None, weight=region_weight),)
        layout, pal = _example_of(layout_image) if layout_image is not None else (None, ())
        q = Query(
            colors=((color.strip(), color_weight),) if color.strip() else (),
            stats=stats,
            regions=regions,
            layout=layout,
            layout_weight=layout_weight,
            palette=pal if palette_weight > 0 else (),
            palette_weight=palette_weight,
            top_k=top_k,
            diversity=diversity,
            exclude_seeds=_parse_seeds(exclude_seeds),
        )
        return run_query(library, merge_queries(q, also), rank_offset, model)

