"""BuildNoiseLibrary (fill a library from the user's model) and NoiseQueryLibraryInfo."""

from __future__ import annotations

import logging
from typing import Any

import comfy.samplers
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..noisequery_core import (
    NOISE_COMFYUI_CPU,
    ClipSpec,
    FeatureExtractor,
    GenerationKey,
    IncompatibleLibraryError,
    Library,
    ModelError,
    NoiseQueryError,
    feature_set,
)
from ..noisequery_core.library.build import build_seeds
from ..noisequery_core.library.paths import check_library_name, resolve_library
from . import _host
from ._glue import SEED_MAX, load_thumbnails, to_image
from ._validate import numbers_problem, require_numbers
from .sampling import SeedRenderer, model_latent

log = logging.getLogger("noisequery")

MAX_COUNT = 1_000_000


class BuildNoiseLibrary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BuildNoiseLibrary",
            display_name="Build Noise Library",
            category="NoiseQuery/library",
            description=(
                "Generates one image per seed with your model and stores its features (CLIP embedding, colour "
                "statistics, layout, thumbnail) in a noise library under models/noise_libraries. Seeds already in "
                "the library are skipped, so re-queueing continues an interrupted build. Every entry equals what a "
                "standard KSampler gives for that seed at batch size 1 with these settings. The NoiseQuery convention "
                "is an empty positive and negative prompt with low cfg (1.0 = unconditional, the paper uses guidance 0)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model whose initial noise you want to index."),
                io.Vae.Input("vae", tooltip="VAE used to decode each sample before its features are computed."),
                io.Conditioning.Input("positive", tooltip="Usually the encoding of an empty prompt (the NoiseQuery convention)."),
                io.Conditioning.Input("negative", tooltip="Usually the encoding of an empty prompt."),
                io.String.Input("library_name", default="my_model_empty_512", tooltip="Folder name inside models/noise_libraries (letters, digits, _ - . and / for sub-folders). An existing library with the same settings is extended."),
                io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width; must match the width you will sample at."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height; must match the height you will sample at."),
                io.Int.Input("seed_start", default=0, min=0, max=SEED_MAX, tooltip="First seed of the range to add."),
                io.Int.Input("count", default=1000, min=1, max=MAX_COUNT, tooltip="How many consecutive seeds, starting at seed_start, the library should contain."),
                io.Int.Input("batch_size", default=8, min=1, max=256, tooltip="Seeds sampled together; each is still exactly its own batch-1 image. Larger is faster until memory runs out."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps (part of the library's generation key)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="Classifier-free guidance; 1.0 samples the unconditional model and skips the negative pass."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler", tooltip="Sampler. Deterministic and the common ancestral/SDE samplers are batched; others run one seed at a time."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal", tooltip="Noise schedule."),
                io.Combo.Input("clip_model", options=_host.CLIP_CHOICES, default="ViT-B-32:openai", tooltip="CLIP model for text search (weights go in models/noisequery_clip/<model>/<tag>.safetensors); 'none' builds a colour-only library."),
                io.Int.Input("thumbnail_size", default=256, min=0, max=2048, step=16, tooltip="Longer side of the stored thumbnails in pixels; 0 stores none."),
            ],
            outputs=[
                io.String.Output(display_name="library_name", tooltip="The library's name, to type into the query nodes."),
                io.Image.Output(display_name="last_batch", tooltip="The last batch rendered in this run (empty if nothing was missing)."),
                io.String.Output(display_name="report", tooltip="What was added, how fast, and the library's generation key."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
            is_output_node=True,
        )

    # Only the inputs checked here are in the signature: ComfyUI skips its own range/list checks
    # for inputs a validate_inputs names (and for all of them with **kwargs); numbers_problem
    # re-applies the schema's ranges to the numbers named here, and refuses NaN/inf (nodes/_validate.py).
    @classmethod
    def validate_inputs(cls, library_name: str | None = None, cfg: float | None = None) -> bool | str:
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        if library_name is not None:
            try:
                check_library_name(library_name)
            except Exception as exc:
                return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, **_: Any) -> Any:
        # Always run: the node syncs the library on disk with the requested range, and the disk
        # can change between queues (deleted, extended elsewhere) in ways a cache key taken
        # before the run cannot see. A run over a complete library only checks the seeds.
        return float("nan")

    @classmethod
    def execute(
        cls, model: Any, vae: Any, positive: Any, negative: Any, library_name: str, width: int, height: int,
        seed_start: int, count: int, batch_size: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
        clip_model: str, thumbnail_size: int,
    ) -> io.NodeOutput:
        require_numbers(cls, {"cfg": cfg})  # a linked value was not there to check at queue time
        _, f = model_latent(model, vae)
        if width % f or height % f:
            raise NoiseQueryError(f"BuildNoiseLibrary: width {width} and height {height} must be multiples of {f} (this "
                                  f"model's latent is 1/{f} of the image); use e.g. "
                                  f"{width - width % f or f}x{height - height % f or f}.")
        if seed_start + count - 1 > SEED_MAX:
            raise NoiseQueryError(f"BuildNoiseLibrary: seed_start {seed_start} + count {count} runs past the largest seed "
                                  f"{SEED_MAX}; lower seed_start or count.")
        path = resolve_library(_host.library_roots(), library_name, must_exist=False)
        uid = cls.hidden.unique_id if cls.hidden else None
        dyn = cls.hidden.dynprompt if cls.hidden else None
        renderer = SeedRenderer(model, vae, positive, negative, width=width, height=height, steps=steps, cfg=cfg,
                                sampler_name=sampler_name, scheduler=scheduler)
        gen = GenerationKey(
            model=_host.upstream_model_name(dyn, uid) or "unknown",
            model_hash=_host.model_fingerprint(model),
            latent_shape=tuple(int(x) for x in renderer.latent_shape),  # type: ignore[arg-type]
            noise=NOISE_COMFYUI_CPU,
            sampler=sampler_name,
            scheduler=scheduler,
            steps=int(steps),
            cfg=float(cfg),
            prompt=_host.upstream_text(dyn, uid, "positive"),
            negative_prompt=_host.upstream_text(dyn, uid, "negative"),
            denoise=1.0,
            family=renderer.family,
            extra=tuple(sorted({
                "positive_cond": _host.conditioning_fingerprint(positive),
                "negative_cond": _host.conditioning_fingerprint(negative),
                "image_size": f"{width}x{height}",
            }.items())),
        )
        spec = ClipSpec.parse(clip_model)
        try:
            embedder = None if spec.is_none else _host.embedder_for(spec)
        except ModelError as exc:  # a first build offline: a colour-only library needs no CLIP at all
            raise ModelError(f"{exc} Or set clip_model to 'none' to build a colour-only library right now (colour "
                             "queries work on it; rebuild with a CLIP model later for text queries).") from exc
        features = feature_set(embedder, thumbnail_size=thumbnail_size)
        lib = Library.create(path, gen, features)
        if lib.generation.family and lib.generation.family != gen.family:
            # The family is not part of key equality (older libraries record none), so say it here.
            raise IncompatibleLibraryError(
                f"BuildNoiseLibrary: library {lib.path} was built with a {lib.generation.family} model but the "
                f"connected model is {gen.family}; build into a new library_name.")
        extractor = FeatureExtractor(lib.features, embedder)
        seeds = range(int(seed_start), int(seed_start) + int(count))
        todo = len(seeds) - int(lib.contains(np.fromiter(seeds, dtype=np.uint64, count=len(seeds))).sum())
        # Progress in sampling steps over the whole run, updated at every step (in ComfyUI's server each
        # update is also an interrupt point); the last finished batch is the preview.
        work = _host.NodeWork(uid, todo * steps)
        state: dict[str, Any] = {"done": 0, "batch": 0}

        def on_step(fraction: float) -> None:
            work.progress(int((state["done"] + fraction * state["batch"]) * steps), todo * steps)

        def render(batch: list[int]) -> Any:
            state["batch"] = len(batch)
            return renderer(batch)

        renderer.on_progress = on_step
        last: dict[str, Any] = {}

        def on_batch(batch: list[int], images: Any) -> None:
            state["done"] += len(batch)
            last["images"] = images
            work.preview = ("JPEG", images[-1], 512)
            work.progress(state["done"] * steps, todo * steps, f"{state['done']}/{todo} seeds")

        # An interrupt raises ComfyUI's own exception out of build_seeds once the finished batches are
        # committed, so ComfyUI reports "interrupted" and a re-queue continues.
        rep = build_seeds(lib, seeds, render, extractor, batch_size=batch_size, check_cancel=work.check_cancel,
                          on_batch=on_batch)
        report = (
            f"{library_name}: {rep.summary()}\n{lib.count} entries in {lib.path}\n"
            f"sampling strategy: {renderer.strategy}\ngeneration key: {lib.generation.describe()}\n"
            f"features: {lib.features.describe()}"
        )
        log.info("BuildNoiseLibrary %s", report.replace("\n", " | "))
        if "images" in last:
            images = to_image(last["images"])
            # the built batch and the report together (the report alone was missing on a first build)
            shown = ui.PreviewImage(images, cls=cls).as_dict()
            return io.NodeOutput(library_name, images, report, ui={**shown, "text": [report]})
        return io.NodeOutput(library_name, torch.zeros((1, 64, 64, 3)), report, ui={"text": [report]})


class NoiseQueryLibraryInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseQueryLibraryInfo",
            display_name="Noise Library Info",
            category="NoiseQuery/library",
            description="Shows a noise library's size, generation key and features, with a grid of sample thumbnails.",
            inputs=[
                io.Combo.Input("library", options=_host.library_names(), tooltip="A library in models/noise_libraries."),
                io.Int.Input("preview_count", default=16, min=0, max=256, tooltip="How many thumbnails (evenly spread over the library) to output."),
            ],
            outputs=[
                io.String.Output(display_name="info", tooltip="Entries, seed range, generation key and features."),
                io.Image.Output(display_name="thumbnails", tooltip="Sample thumbnails of the library."),
            ],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, library: str, preview_count: int) -> Any:
        return (_host.library_fingerprint(library), preview_count)

    @classmethod
    def execute(cls, library: str, preview_count: int) -> io.NodeOutput:
        lib = _host.open_library(library)
        info = lib.info()
        text = (
            f"{library}: {lib.count} entries (seeds {info['seed_min']}..{info['seed_max']})\n"
            f"generation key: {lib.generation.describe()}\nfeatures: {lib.features.describe()}\nfolder: {lib.path}"
        )
        n = min(preview_count, lib.count)
        seeds = [int(lib.seeds[r]) for r in np.linspace(0, lib.count - 1, num=n).astype(int)] if n else []
        images = load_thumbnails(lib, seeds)
        return io.NodeOutput(text, images, ui={"text": [text]})
