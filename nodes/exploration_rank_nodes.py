"""NoiseQueryRank: order a batch of images by CLIP score against a prompt and/or an aesthetic predictor.

Thin glue over noisequery_core.exploration.rank; CLIP models come from the pack's cache (nodes/_host.embedder_for, the same
models the noise libraries are built with), aesthetic heads from models/noisequery_aesthetic.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from comfy_api.latest import io

from ..noisequery_core import ClipSpec, QueryError
from ..noisequery_core.exploration.rank import clip_scores, embed_images, rank
from ..noisequery_core.search.clip import spec_for_identity
from . import _host
from ._glue import MissingNoise, PickedNoise, to_pil
from ._host import aesthetic_choices, aesthetic_head
from ._validate import check_numbers, require_numbers

log = logging.getLogger("noisequery")

class NoiseQueryRank(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryRank",
            display_name="Rank Images (CLIP / aesthetic)",
            category="NoiseQuery/explore",
            description=(
                "Orders a batch of images by how well they match a prompt (CLIP cosine score, with the CLIP models "
                "the noise libraries use) and, optionally, by an aesthetic predictor from models/noisequery_aesthetic "
                "(a LAION improved-aesthetic-predictor MLP or linear head on CLIP embeddings, as .safetensors/.pth). "
                "Metrics are combined as weighted z-scores over the batch. Connect the NOISE that made the batch "
                "(a seed walk, the explorer's variants, a Noise Query) to get the winner back as best_noise, and as "
                "best_seed when the items are seeds (Noise Query hits). Works on a query's thumbnails too."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The batch to rank (decoded images, or a Noise Query's thumbnails)."),
                io.String.Input("text", multiline=True, default="", tooltip="The prompt to score against; empty = aesthetic only."),
                io.Combo.Input("clip_model", options=[c for c in _host.CLIP_CHOICES if c != "none"], default="ViT-B-32:openai", tooltip="CLIP model for the score (weights in models/noisequery_clip/<model>/<tag>.safetensors). The LAION aesthetic heads need ViT-L-14."),
                io.Float.Input("clip_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the CLIP score (in standard deviations over the batch)."),
                io.Combo.Input("aesthetic_model", options=aesthetic_choices(), default="none", tooltip="Optional score head in models/noisequery_aesthetic; 'none' to rank by CLIP score only."),
                io.Float.Input("aesthetic_weight", default=1.0, min=0.0, max=10.0, step=0.1, tooltip="Weight of the aesthetic score (in standard deviations over the batch)."),
                io.Noise.Input("noise", optional=True, tooltip="Optional: the NOISE that produced the batch (item i made image i), to return the winner's noise and seed."),
                io.Combo.Input("library", options=["none", *_host.library_names()], default="none", optional=True, tooltip="Optional: a noise library with CLIP features. Its CLIP model replaces clip_model, and when `noise` comes from a Noise Query on it, the hits' stored full-size image embeddings are used instead of embedding `images`."),
            ],
            outputs=[
                io.Image.Output(display_name="best_image", tooltip="The best-ranked image."),
                io.Int.Output(display_name="best_index", tooltip="Its index in the input batch (e.g. the explorer's `pick`)."),
                io.Int.Output(display_name="best_seed", tooltip="Its seed when the NOISE carries one per item (Noise Query hits); otherwise the NOISE's seed, or 0."),
                io.Noise.Output(display_name="best_noise", tooltip="The NOISE item that made the best image, for every latent item (needs `noise`)."),
                io.Image.Output(display_name="ranked", tooltip="The whole batch, best first."),
                io.String.Output(display_name="report", tooltip="Every image's rank, combined score and raw metrics."),
            ],
            hidden=[io.Hidden.unique_id],  # the progress bar's node
        )

    @classmethod
    def validate_inputs(cls, clip_weight: float | None = None, aesthetic_weight: float | None = None) -> bool | str:
        # named so that NaN/inf are refused; check_numbers re-applies the ranges ComfyUI then skips
        return check_numbers(cls, locals())

    @classmethod
    def execute(cls, images: torch.Tensor, text: str, clip_model: str, clip_weight: float, aesthetic_model: str,
                aesthetic_weight: float, noise: Any = None, library: str = "none") -> io.NodeOutput:
        require_numbers(cls, {"clip_weight": clip_weight, "aesthetic_weight": aesthetic_weight})  # linked values
        use_clip = bool(text.strip()) and clip_weight > 0
        use_aesthetic = aesthetic_model != "none" and aesthetic_weight > 0
        if not (use_clip or use_aesthetic):
            raise QueryError("NoiseQueryRank has nothing to rank by: type a prompt in `text` (CLIP score) and/or "
                             "choose an aesthetic_model, with a weight above 0.")
        n = images.shape[0]
        seeds = list(getattr(noise, "seeds", []) or [])
        embs, source = None, f"clip {clip_model}"
        if library and library != "none":
            lib = _host.open_library(library)
            if lib.features.clip is None:
                raise QueryError(f"library {library!r} has no CLIP features (built with clip_model 'none'); choose "
                                 "library 'none' to rank with clip_model, or rebuild the library with a CLIP model.")
            embedder = _host.embedder_for(spec_for_identity(lib.features.clip))
            source = f"clip of library {library} ({lib.features.clip.model}/{lib.features.clip.pretrained})"
            item_seeds = [seeds[i % len(seeds)] for i in range(n)] if seeds else []
            if item_seeds and bool(lib.contains(item_seeds).all()):
                embs = lib.column("clip")[lib.rows_of(item_seeds)].astype("float32")
                source += ", stored embeddings of the hits"
        else:
            embedder = _host.embedder_for(ClipSpec.parse(clip_model))
        if embs is None:
            work = _host.NodeWork(cls.hidden.unique_id if cls.hidden else None, n)
            embs = embed_images(embedder, to_pil(images), progress=work.progress, check_cancel=work.check_cancel)
        metrics, weights = {}, {}
        if use_clip:
            metrics["clip"] = clip_scores(embs, embedder.encode_text([text])[0])
            weights["clip"] = clip_weight
        if use_aesthetic:
            metrics["aesthetic"] = aesthetic_head(aesthetic_model)(embs)
            weights["aesthetic"] = aesthetic_weight
        ranking = rank(metrics, weights)
        best = ranking.best
        labels = [f"image {i}" + (f" (seed {seeds[i % len(seeds)]})" if seeds else "") for i in range(n)]
        if seeds:
            best_seed = int(seeds[best % len(seeds)])
        else:
            best_seed = int(getattr(noise, "seed", 0)) if noise is not None else 0
        best_noise = PickedNoise(noise, best, n) if noise is not None else MissingNoise(
            "NoiseQueryRank's best_noise is used but its `noise` input is not connected: connect the NOISE that "
            "produced the ranked images.")
        notes = []
        if noise is None:
            notes.append("note: no `noise` connected: best_noise is empty and best_seed is 0.")
        elif not seeds:
            notes.append("note: the connected NOISE has no per-item seeds (interpolated or explored noise): use "
                         "best_noise; best_seed is the NOISE's own seed.")
        report = "\n".join([source + (f", aesthetic {aesthetic_model}" if use_aesthetic else ""),
                            ranking.report(labels), *notes])
        ranked = images[ranking.order]
        return io.NodeOutput(images[best:best + 1], best, best_seed, best_noise, ranked, report, ui={"text": [report]})
