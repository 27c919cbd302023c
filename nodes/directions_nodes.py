"""NoiseCLR nodes: train interpretable directions from unlabeled images, and apply several at once.

Thin V3 glue: the ComfyUI-facing work is in nodes/directions_runtime.py, the algorithm in
noisequery_core/directions/noiseclr.py.
"""

from __future__ import annotations

import logging
from typing import Any

import comfy.samplers
import folder_paths
import torch
from comfy_api.latest import io

from ..noisequery_core.directions.noiseclr import (
    TrainSettings,
    load_directions,
    parse_names,
    rename_directions,
)
from ..noisequery_core.errors import NoiseCLRError
from . import _host
from ._glue import SEED_MAX
from ._validate import check_numbers, numbers_problem, require_numbers
from .directions_runtime import (
    FOLDER,
    MAX_INDEX,
    SLOTS,
    apply_directions,
    directions_files,
    directions_path,
    empty_prompt_conditioning,
    family_label,
    gather_images,
    loss_plot,
    output_path,
    register_folder,
    run_training,
)

log = logging.getLogger("noisequery")

# ------------------------------------------------------------------ nodes


class NoiseCLRTrainDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseCLRTrainDirections",
            display_name="NoiseCLR Train Directions",
            category="NoiseQuery/noiseclr",
            description=(
                "Discovers K editing directions in your model from a set of unlabeled images of one domain (faces, "
                "cats, paintings), without prompts (NoiseCLR, CVPR 2024). Each direction is a few learned "
                "conditioning tokens; the edits one direction makes to different images are pulled together, those "
                "different directions make to one image pushed apart. The model is frozen and left unchanged. Saves "
                "models/noiseclr_directions/<name>.safetensors; checkpoints as it goes, and re-queueing resumes an "
                "interrupted run (or extends it when you raise iterations). Long runs: scripts/noiseclr_train.py. "
                "Families: SD1.x/SD2.x, SDXL, SD3/SD3.5 and Flux.1; on SDXL, SD3 and Flux a direction also has a "
                "pooled part (the prompt's pooled vector), trained with its tokens."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.x/SD2.x, SDXL, SD3/SD3.5 or Flux.1 model to find directions in (frozen). The directions only apply to models of this family."),
                io.Clip.Input("clip", tooltip="Its CLIP: encodes the empty prompt the directions start from (tokens, and the pooled vector on SDXL, SD3 and Flux)."),
                io.Vae.Input("vae", tooltip="Its VAE: encodes the training images once."),
                io.String.Input("image_folder", default="", tooltip="A folder inside ComfyUI's input directory with the training images (20-100 of one domain work well). Leave empty to use only the images input."),
                io.String.Input("name", default="my_directions", tooltip="File name in models/noiseclr_directions (without .safetensors)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64, tooltip="Images are scaled and centre-cropped to this square size before encoding (512 for SD1.5, 1024 for SDXL, SD3 and Flux)."),
                io.Int.Input("num_directions", default=8, min=2, max=64, tooltip="K: how many directions to discover."),
                io.Int.Input("directions_per_iteration", default=4, min=2, max=64, tooltip="Directions sampled per iteration (<= num_directions). Cost grows linearly with it."),
                io.Int.Input("iterations", default=500, min=0, max=1_000_000, tooltip="Training iterations. Raise it and re-queue to continue a finished run."),
                io.Int.Input("batch_size", default=4, min=2, max=64, tooltip="Images per iteration (>= 2: positives are one direction on two images). UNet rows per iteration = batch_size x (directions_per_iteration + 1)."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6, tooltip="Adam learning rate of the direction tokens."),
                io.Float.Input("temperature", default=0.5, min=0.01, max=10.0, step=0.01, tooltip="Contrastive temperature τ: lower sharpens the push between directions."),
                io.Int.Input("t_min", default=100, min=0, max=999, tooltip="Smallest training timestep (of 1000): low values teach fine detail."),
                io.Int.Input("t_max", default=900, min=0, max=999, tooltip="Largest training timestep: high values teach layout and global attributes."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=False, tooltip="Seed of the whole run (initialisation and every iteration's images, timesteps and noise)."),
                io.Int.Input("token_count", default=77, min=1, max=512, tooltip="Tokens per direction, taken from the start of the empty prompt's encoded rows (77 on SD1.x/SDXL; 154 on SD3: 77 CLIP then 77 T5; 256 T5 rows on Flux). At most that many. On SD1.x/SDXL 77 batches best with prompts when applied."),
                io.Int.Input("checkpoint_every", default=50, min=1, max=100_000, tooltip="Write a resumable checkpoint every this many iterations (and when interrupted)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from this name's checkpoint when its settings, model and images match; off starts over."),
                io.String.Input("names", default="", tooltip="Optional names, by position ('smile, age, ...') or by index ('0=smile, 3=age')."),
                io.Image.Input("images", optional=True, tooltip="Training images as an IMAGE batch (added to image_folder's)."),
            ],
            outputs=[
                io.String.Output(display_name="directions", tooltip="The file name, for NoiseCLR Apply Directions."),
                io.Image.Output(display_name="loss_curve", tooltip="The contrastive loss per iteration (orange: running mean)."),
                io.String.Output(display_name="report", tooltip="What was trained, the loss, the base model's fingerprint."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.dynprompt],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name: str | None = None, directions_per_iteration: int | None = None,
                        num_directions: int | None = None, t_min: int | None = None, t_max: int | None = None,
                        names: str | None = None, learning_rate: float | None = None,
                        temperature: float | None = None) -> bool | str:
        # ComfyUI skips its min/max checks for every input named here: numbers_problem re-applies the schema's
        # ranges to the numbers (and refuses NaN/inf in the floats).
        bad = numbers_problem(cls, locals())
        if bad:
            return bad
        try:
            if name is not None:
                output_path(name)
            if names:
                parse_names(names, num_directions)
        except NoiseCLRError as exc:
            return str(exc)
        if directions_per_iteration is not None and num_directions is not None and directions_per_iteration > num_directions:
            return f"directions_per_iteration {directions_per_iteration} is more than num_directions {num_directions}."
        if t_min is not None and t_max is not None and t_min > t_max:
            return f"t_min {t_min} is above t_max {t_max}."
        return True

    @classmethod
    def fingerprint_inputs(cls, **_: Any) -> Any:
        # Always run: the images folder and the checkpoint on disk can change between queues; a finished
        # run with the same settings, model and images is recognised and returns at once.
        return float("nan")

    @classmethod
    def execute(cls, model: Any, clip: Any, vae: Any, image_folder: str, name: str, resolution: int,
                num_directions: int, directions_per_iteration: int, iterations: int, batch_size: int,
                learning_rate: float, temperature: float, t_min: int, t_max: int, seed: int, token_count: int,
                checkpoint_every: int, resume: bool, names: str, images: torch.Tensor | None = None) -> io.NodeOutput:
        require_numbers(cls, locals())  # the arguments by name: linked values were not there to check at queue time
        settings = TrainSettings(
            num_directions=num_directions, directions_per_iteration=directions_per_iteration, iterations=iterations,
            batch_size=batch_size, learning_rate=learning_rate, temperature=temperature, t_min=t_min, t_max=t_max,
            seed=seed, token_count=token_count, checkpoint_every=checkpoint_every)
        out = output_path(name)
        arrays, source = gather_images(image_folder, images, resolution)
        uid = cls.hidden.unique_id if cls.hidden else None
        dyn = cls.hidden.dynprompt if cls.hidden else None
        work = _host.NodeWork(uid, iterations)
        fname = out.relative_to(folder_paths.get_folder_paths(FOLDER)[0]).as_posix()
        d, report = run_training(model, clip, vae, arrays, source, settings, out, label=fname,
                                 model_name=_host.upstream_model_name(dyn, uid), names=names, resume=resume,
                                 progress=work.progress, check_cancel=work.check_cancel)
        return io.NodeOutput(fname, loss_plot(d.loss_history), report, ui={"text": [report]})


def _slot_inputs() -> list[Any]:
    out: list[Any] = []
    for n in range(1, SLOTS + 1):
        out += [
            io.Int.Input(f"index_{n}", default=n - 1 if n <= 2 else -1, min=-1, max=MAX_INDEX,
                         tooltip=f"Slot {n}: which direction (0..K-1, see the report for names); -1 = slot off."),
            io.Float.Input(f"scale_{n}", default=1.0, min=-10.0, max=10.0, step=0.05, round=0.01,
                           display_mode=io.NumberDisplay.slider,
                           tooltip=f"Slot {n}: strength; negative goes the opposite way, 0 = off (output unchanged)."),
            io.Float.Input(f"start_{n}", default=0.0, min=0.0, max=1.0, step=0.01, display_mode=io.NumberDisplay.slider,
                           tooltip=f"Slot {n}: where in sampling it starts acting (0 = first step). Early steps steer layout."),
            io.Float.Input(f"end_{n}", default=1.0, min=0.0, max=1.0, step=0.01, display_mode=io.NumberDisplay.slider,
                           tooltip=f"Slot {n}: where it stops (1 = last step). Late steps steer detail."),
        ]
    return out


class NoiseCLRApplyDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseCLRApplyDirections",
            display_name="NoiseCLR Apply Directions",
            category="NoiseQuery/noiseclr",
            description=(
                "Applies up to four NoiseCLR directions at once, each with a scale and a start..end range of the "
                "sampling steps: at each step it adds scale x (eps(x, direction) - eps(x, empty prompt)) to the noise "
                "prediction. All active directions run in one batched UNet call per step. Connect `model` to a "
                "KSampler, or `guider` to SamplerCustomAdvanced. Warns when the directions were trained on another model "
                "of the same family, and refuses directions of another family (e.g. SDXL directions on Flux)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (ideally the one the directions were trained on)."),
                io.Combo.Input("directions", options=directions_files(), tooltip="A directions file from models/noiseclr_directions."),
                *_slot_inputs(),
                io.Conditioning.Input("positive", optional=True, tooltip="For the guider output only: positive prompt (default: the empty prompt, as in NoiseCLR's edits)."),
                io.Conditioning.Input("negative", optional=True, tooltip="For the guider output only: negative prompt (default: the empty prompt)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="For the guider output only: classifier-free guidance scale."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the directions added inside CFG: for KSampler."),
                io.Guider.Output(display_name="guider", tooltip="A CFG guider with the directions, positive, negative and cfg: for SamplerCustomAdvanced."),
                io.String.Output(display_name="report", tooltip="The directions in use, with names, and any base-model warning."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, directions: str, **_: Any) -> Any:
        try:
            st = directions_path(directions).stat()
            return (directions, st.st_mtime_ns, st.st_size)
        except NoiseCLRError as exc:  # execute reports it; here only "changed"
            return ("missing", directions, str(exc))

    # Every FLOAT is named so that NaN/inf are refused at queue time (a NaN scale or start gives black images or an
    # IndexError inside the sampler); check_numbers re-applies the ranges ComfyUI then skips. Kept in step with
    # _slot_inputs (SLOTS = 4; tests/host/test_validation_server.py checks every FLOAT input is named).
    @classmethod
    def validate_inputs(cls, cfg: float | None = None,
                        scale_1: float | None = None, start_1: float | None = None, end_1: float | None = None,
                        scale_2: float | None = None, start_2: float | None = None, end_2: float | None = None,
                        scale_3: float | None = None, start_3: float | None = None, end_3: float | None = None,
                        scale_4: float | None = None, start_4: float | None = None, end_4: float | None = None
                        ) -> bool | str:
        return check_numbers(cls, locals())

    @classmethod
    def execute(cls, model: Any, directions: str, cfg: float, positive: Any = None, negative: Any = None,
                **slot_values: Any) -> io.NodeOutput:
        require_numbers(cls, {"cfg": cfg, **slot_values})  # linked values were not there to check at queue time
        d = load_directions(directions_path(directions))
        slots = [(int(slot_values[f"index_{n}"]), float(slot_values[f"scale_{n}"]), float(slot_values[f"start_{n}"]),
                  float(slot_values[f"end_{n}"])) for n in range(1, SLOTS + 1)]
        patched, guidance, lines = apply_directions(model, d, slots)
        empty_cond = empty_prompt_conditioning(d)
        guider = comfy.samplers.CFGGuider(patched)
        guider.set_conds(positive if positive is not None else empty_cond, negative if negative is not None else empty_cond)
        guider.set_cfg(cfg)
        pooled = f" + pooled {d.pooled_dim}" if d.pooled_dim else ""
        report = "\n".join([f"{directions}: {d.count} directions ({d.token_count} tokens each{pooled}, "
                            f"{family_label(d.family)}), trained "
                            f"{d.iterations_done} iterations on {d.data.get('images', '?')} images", *lines])
        return io.NodeOutput(patched, guider, report, ui={"text": [report]})


class NoiseCLRNameDirections(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NoiseCLRNameDirections",
            display_name="NoiseCLR Name Directions",
            category="NoiseQuery/noiseclr",
            description=("Attaches names to directions you have looked at ('0=smile, 3=older'); they are saved in the "
                         "directions file and shown by NoiseCLR Apply Directions."),
            inputs=[
                io.Combo.Input("directions", options=directions_files(), tooltip="A directions file from models/noiseclr_directions."),
                io.String.Input("names", default="", tooltip="'index=name' pairs separated by commas, e.g. '0=smile, 3=older'."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="Every direction with its name.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, names: str | None = None) -> bool | str:
        if names:
            try:
                parse_names(names)
            except NoiseCLRError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, directions: str, names: str) -> io.NodeOutput:
        path = directions_path(directions)
        d = rename_directions(path, parse_names(names)) if names.strip() else load_directions(path)
        report = "\n".join(f"#{i} {n}" for i, n in enumerate(d.names))
        return io.NodeOutput(report, ui={"text": [report]})


register_folder()
NOISECLR_NODES: list[type] = [NoiseCLRTrainDirections, NoiseCLRApplyDirections, NoiseCLRNameDirections]
