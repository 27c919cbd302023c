#!/usr/bin/env python3
"""Train NoiseCLR directions from the command line, for long runs (same code as the NoiseCLRTrainDirections node).

    .venv/bin/python scripts/noiseclr_train.py --comfyui ~/ComfyUI --ckpt v1-5-pruned-emaonly.safetensors \\
        --images /data/faces --name faces_sd15 --iterations 2000 [--gpu] [--num-directions 8 ...]

ComfyUI loads the model, so ComfyUI is booted in this process (no server): its checkout goes first on sys.path
and this repository is loaded as a custom node pack, exactly as the server would. The directions file is written
to ComfyUI's models/noiseclr_directions (or --out DIR), with a checkpoint next to it every --checkpoint-every
iterations; Ctrl-C stops after the current iteration and writes a checkpoint, and running the same command again
resumes (bit-identical to a run that was never stopped). --ckpt is a name in ComfyUI's checkpoints folder or a path.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("noisequery")


def boot(comfy_path: str, *, cpu: bool, extra_model_paths: str | None = None) -> tuple[ModuleType, ModuleType]:
    """Import ComfyUI from ``comfy_path`` as main.py would and load this repo as a pack.

    Returns (ComfyUI's ``nodes`` module, the pack's ``nodes.directions_runtime`` module).
    """
    path = str(Path(comfy_path).expanduser().resolve())
    if not os.path.isfile(os.path.join(path, "main.py")):
        sys.exit(f"no ComfyUI checkout at {path} (pass --comfyui or set COMFYUI_PATH)")
    sys.path.insert(0, path)
    saved = sys.argv
    sys.argv = [os.path.join(path, "main.py"), "--disable-all-custom-nodes", "--disable-api-nodes",
                *(["--cpu"] if cpu else [])]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses the argv above)
        import utils.extra_config  # must come before `nodes` (see docs: utils vs comfy/utils.py)
    finally:
        sys.argv = saved
    default_yaml = os.path.join(path, "extra_model_paths.yaml")
    for yaml in [default_yaml] * os.path.isfile(default_yaml) + ([extra_model_paths] if extra_model_paths else []):
        utils.extra_config.load_extra_path_config(yaml)
    import server

    import nodes

    if getattr(server.PromptServer, "instance", None) is None:
        server.PromptServer(asyncio.new_event_loop())  # the pack registers routes on it; never started
    if not asyncio.run(nodes.load_custom_node(str(ROOT), module_parent="custom_nodes")):
        sys.exit(f"ComfyUI could not load the NoiseQuery pack from {ROOT} (see the log above)")
    cls = nodes.NODE_CLASS_MAPPINGS["NoiseCLRTrainDirections"]
    return nodes, sys.modules[cls.__module__.rsplit(".", 1)[0] + ".directions_runtime"]


def load_checkpoint(nodes: ModuleType, ckpt: str) -> tuple[Any, Any, Any, str]:
    import folder_paths

    name = ckpt
    if os.path.isfile(ckpt):
        folder_paths.add_model_folder_path("checkpoints", str(Path(ckpt).resolve().parent), is_default=True)
        name = Path(ckpt).name
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    return model, clip, vae, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", str(Path.home() / "ComfyUI")))
    p.add_argument("--extra-model-paths-config", default=None, help="an extra_model_paths.yaml, as for main.py")
    p.add_argument("--gpu", action="store_true", help="use ComfyUI's default device (without it: --cpu)")
    p.add_argument("--ckpt", required=True, help="checkpoint name in models/checkpoints, or a path")
    p.add_argument("--images", required=True, help="folder of training images (any folder; not recursive)")
    p.add_argument("--name", required=True, help="directions file name (without .safetensors)")
    p.add_argument("--out", default=None, help="folder for the file (default: models/noiseclr_directions)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--num-directions", type=int, default=8)
    p.add_argument("--directions-per-iteration", type=int, default=4)
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--t-min", type=int, default=100)
    p.add_argument("--t-max", type=int, default=900)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token-count", type=int, default=77)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--no-resume", action="store_true", help="start over even when a checkpoint exists")
    p.add_argument("--names", default="", help="'smile, age' or '0=smile, 3=age'")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    nodes, mod = boot(a.comfyui, cpu=not a.gpu, extra_model_paths=a.extra_model_paths_config)
    import torch

    core = sys.modules[mod.__name__.rsplit(".", 2)[0] + ".noisequery_core.directions.noiseclr"]
    settings = core.TrainSettings(
        num_directions=a.num_directions, directions_per_iteration=a.directions_per_iteration,
        iterations=a.iterations, batch_size=a.batch_size, learning_rate=a.learning_rate, temperature=a.temperature,
        t_min=a.t_min, t_max=a.t_max, seed=a.seed, token_count=a.token_count, checkpoint_every=a.checkpoint_every)
    files = sorted(f for f in Path(a.images).expanduser().iterdir() if f.suffix.lower() in mod.IMAGE_EXTS)
    if len(files) < 2:
        sys.exit(f"{a.images}: need at least 2 images ({', '.join(mod.IMAGE_EXTS)})")
    arrays = []
    imaging = sys.modules[mod.__name__.rsplit(".", 2)[0] + ".noisequery_core.imaging"]
    for f in files:
        arrays.append(mod._square(imaging.load_image(f), a.resolution))  # upright, 8-bit by the real range
    out = Path(a.out) / f"{a.name}.safetensors" if a.out else mod.output_path(a.name)

    stop = {"asked": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        log.info("stopping after this iteration (Ctrl-C again to abort without a checkpoint)")

    def check_cancel() -> None:
        if stop["asked"]:
            raise KeyboardInterrupt("stopped by Ctrl-C")

    t0 = time.perf_counter()
    every = max(1, a.iterations // 100)

    def progress(done: int, total: int, message: str = "") -> None:
        if done % every == 0 or done == total:
            rate = (time.perf_counter() - t0) / max(done, 1)
            log.info("iteration %d/%d  %s  (%.2f s/iteration so far)", done, total, message, rate)

    signal.signal(signal.SIGINT, on_sigint)
    with torch.inference_mode():  # as ComfyUI runs nodes; training switches it off where it needs autograd
        model, clip, vae, name = load_checkpoint(nodes, a.ckpt)
        try:
            _, report = mod.run_training(model, clip, vae, arrays, f"{len(arrays)} images from {a.images}", settings,
                                         out, model_name=name, names=a.names, resume=not a.no_resume,
                                         progress=progress, check_cancel=check_cancel)
        except KeyboardInterrupt:
            log.info("stopped; checkpoint %s. Run the same command again to resume.", core.checkpoint_path_for(out))
            return 130
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
