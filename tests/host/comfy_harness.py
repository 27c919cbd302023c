"""Test harness that runs code against a real ComfyUI checkout, in-process or as a headless server."""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

SKIP_REASON = "ComfyUI not found: set COMFYUI_PATH or clone to ~/ComfyUI (see README)"
# The browser tests run once per frontend: "pinned" is the comfyui-frontend-package ComfyUI's requirements pin
# (installed in the venv, served by default); "newest" is the newest release on PyPI, which scripts/_host_setup.sh
# downloads and unzips, exporting its static folder (served with --front-end-root) in this variable.
FRONTENDS = ("pinned", "newest")
NEWEST_FRONTEND_ENV = "NOISEQUERY_NEWEST_FRONTEND"
NEWEST_FRONTEND_SKIP_REASON = (
    f"no newest comfyui-frontend-package downloaded: set {NEWEST_FRONTEND_ENV}=<unzipped wheel>/"
    "comfyui_frontend_package/static (scripts/test.sh does with CI=true or NOISEQUERY_HOST_SETUP=1)")
TINY_CKPT_NAME = "tiny_sd15.safetensors"
TINY_CKPT_SEED = 20240607

# Top-level module names that ComfyUI owns; a foreign module under one of these names breaks the boot.
_COMFY_TOP_LEVEL = ("comfy", "nodes", "utils", "folder_paths", "execution", "server", "latent_preview",
                    "comfy_extras", "comfy_api", "comfy_execution", "node_helpers", "app")

_STATE: dict[str, Any] = {"comfy_path": None, "booted": False, "packs": {}, "io_root": None}
_LOCK = threading.RLock()

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------------
# Locating and importing ComfyUI
# --------------------------------------------------------------------------------------------------

def find_comfyui() -> Path | None:
    """Return the ComfyUI checkout ($COMFYUI_PATH, else ~/ComfyUI) if it has main.py and comfy/, else None."""
    env = os.environ.get("COMFYUI_PATH", "").strip()
    candidate = Path(env).expanduser() if env else Path.home() / "ComfyUI"
    if (candidate / "main.py").is_file() and (candidate / "comfy").is_dir():
        return candidate.resolve()
    return None


@dataclass(frozen=True)
class Frontend:
    """A ComfyUI frontend the browser tests run against (FRONTENDS; the `frontend` fixture of tests/host/conftest.py)."""

    name: str  # "pinned" (the comfyui-frontend-package ComfyUI's requirements pin) or "newest" (newest on PyPI)
    root: Path | None  # served with --front-end-root; None: the installed (pinned) package, ComfyUI's default
    version: str


# The page's Run button: `button[aria-label=Run]` inside the queue-button group up to frontend 1.35.x, the
# queue-button itself (text "Run", no aria-label) in 1.58.x.
RUN_BUTTON = "[data-testid=queue-button] button[aria-label=Run], button[data-testid=queue-button]"

# What a frontend newer than the host (frontend 1.58.1 on ComfyUI 0.8.0) reports in every page, none of it the pack's:
# - its job list asks GET /api/jobs?status=...,cancelled, a status ComfyUI 0.8.0 does not know (it knows pending,
#   in_progress, completed, failed) and answers 400; the frontend then logs "[Jobs API] Error fetching jobs";
# - its missing-model check of its default workflow (z_image_turbo) fetches huggingface.co URLs, which the page's
#   Content Security Policy (connect-src 'self') blocks.
NEWER_FRONTEND_NOISE = (
    (re.compile(r"\b400\b.*/api/jobs\?status=\S*\bcancelled\b"), "/api/jobs status 'cancelled' unknown to this host"),
    (re.compile(r"^(console\.error: )?\[Jobs API\] Error fetching jobs: JobsApiError: Failed to fetch jobs: 400"),
     "/api/jobs status 'cancelled' unknown to this host"),
    (re.compile(r"(Connecting to '|Fetch API cannot load )https://huggingface\.co/\S+"
                r".*Content Security Policy", re.S), "the frontend's model check blocked by the page's CSP"),
    # console warnings the frontend itself logs while the page boots (stack traces: ComfyList, the core MaskEditor
    # extension, reka-ui's panel layout, litegraph's own ComfyNode.configure)
    (re.compile(r"console\.warning: \[ComfyUI\] The legacy queue/history menu is deprecated"),
     "the frontend's legacy-menu deprecation notice"),
    (re.compile(r"console\.warning: \[MaskEditor\] ComfyApp\.open_maskeditor is deprecated"),
     "the frontend's MaskEditor deprecation notice"),
    (re.compile(r"console\.warning: WARNING: Invalid layout total size: \d+%\. Layout normalization will be applied"),
     "the frontend's panel layout warning"),
    # litegraph warns once per page; its own node loading reads input.link first. (The pack's
    # web/js/highlight_scribble.js reads input.link too: a deprecation to address in the pack, not an error.)
    (re.compile(r"console\.warning: input\.link is deprecated\. Read connectivity via node\.isInputConnected"),
     "litegraph's input.link deprecation notice"),
)


def newer_frontend_noise(problem: str) -> str | None:
    """Why `problem` (a failed request or console error of the page) is a known complaint of a frontend newer than
    the host (NEWER_FRONTEND_NOISE), or None when it is not one."""
    for pattern, why in NEWER_FRONTEND_NOISE:
        if pattern.search(problem):
            return why
    return None


def newest_frontend_root() -> Path | None:
    """The static folder of the newest frontend ($NOISEQUERY_NEWEST_FRONTEND) if it holds an index.html, else None."""
    env = os.environ.get(NEWEST_FRONTEND_ENV, "").strip()
    if env and (Path(env).expanduser() / "index.html").is_file():
        return Path(env).expanduser().resolve()
    return None


def frontend_version(front_end_root: PathLike | None = None) -> str:
    """Version of the frontend a server serves: the installed comfyui-frontend-package when front_end_root is None,
    else the one of the unzipped wheel whose <wheel>/comfyui_frontend_package/static folder front_end_root is."""
    from importlib.metadata import PackageNotFoundError, version

    if front_end_root is None:
        try:
            return version("comfyui-frontend-package")
        except PackageNotFoundError:
            return "?"
    for meta in sorted(Path(front_end_root).resolve().parents[1].glob("comfyui_frontend_package-*.dist-info/METADATA")):
        for line in meta.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "?"


def _require_comfy_path(comfy_path: PathLike | None) -> Path:
    path = Path(comfy_path).expanduser().resolve() if comfy_path is not None else find_comfyui()
    if path is None or not (path / "main.py").is_file():
        raise RuntimeError(SKIP_REASON)
    return path


def _module_is_inside(mod: ModuleType, root: Path) -> bool:
    files = [getattr(mod, "__file__", None), *list(getattr(mod, "__path__", []) or [])]
    for f in files:
        if f and Path(f).resolve().is_relative_to(root):
            return True
    return False


def _run_coro(coro: Any) -> Any:
    """Run a coroutine to completion, also when called from inside a running event loop (pytest-asyncio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def runner() -> None:
        try:
            box["value"] = asyncio.run(coro)
        # re-raised in the caller's thread below
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=runner, name="comfy-harness-async")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def prepare_comfy_imports(comfy_path: PathLike | None = None) -> Path:
    """Make ComfyUI importable in this process, as main.py would (checkout first on sys.path, --cpu args).

    Idempotent. Must run before anything imports torch-dependent comfy modules. Works under pytest:
    sys.argv is swapped only while comfy.cli_args parses it.
    """
    with _LOCK:
        path = _require_comfy_path(comfy_path)
        if _STATE["comfy_path"] is not None:
            if _STATE["comfy_path"] != path:
                raise RuntimeError(f"ComfyUI already imported from {_STATE['comfy_path']}, not {path}")
            return path
        for name in _COMFY_TOP_LEVEL:
            mod = sys.modules.get(name)
            if mod is not None and not _module_is_inside(mod, path):
                raise RuntimeError(
                    f"module {name!r} is already imported from {getattr(mod, '__file__', mod)}; ComfyUI's own "
                    f"{name!r} must win. Do not import a project module of that name before booting ComfyUI.")
        while str(path) in sys.path:
            sys.path.remove(str(path))
        sys.path.insert(0, str(path))
        saved_argv = sys.argv
        sys.argv = [str(path / "main.py"), "--cpu", "--disable-all-custom-nodes", "--disable-api-nodes",
                    "--database-url", "sqlite:///:memory:"]
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.cli_args
            if not comfy.cli_args.args.cpu:  # cli_args was imported earlier without our argv
                if "comfy.model_management" in sys.modules:
                    log.warning("comfy.model_management imported before the harness; --cpu may not apply")
                comfy.cli_args.args.cpu = True
            # utils.extra_config must be imported before `nodes`, or `utils` resolves to comfy/utils.py
            import utils.extra_config  # noqa: F401
        finally:
            sys.argv = saved_argv
        if not _module_is_inside(sys.modules["utils"], path):
            raise RuntimeError(f"'utils' resolved to {sys.modules['utils']!r}, not ComfyUI's utils package")
        _STATE["comfy_path"] = path
        log.info("ComfyUI importable from %s", path)
        return path


def add_model_folder(folder_name: str, directory: PathLike, *, is_default: bool = True,
                     extensions: Iterable[str] | None = None) -> Path:
    """Point ComfyUI model folder `folder_name` (e.g. "checkpoints") at `directory` (created if missing).

    is_default puts it first in the search list. For a folder name ComfyUI does not know yet, `extensions`
    (e.g. folder_paths.supported_pt_extensions) restricts listing; by default such a folder lists every file.
    """
    import folder_paths

    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path(folder_name, str(d), is_default=is_default)
    if extensions is not None:
        key = folder_paths.map_legacy(folder_name)
        paths, _ = folder_paths.folder_names_and_paths[key]
        folder_paths.folder_names_and_paths[key] = (paths, set(extensions))
    folder_paths.filename_list_cache.pop(folder_paths.map_legacy(folder_name), None)
    return d


def _link_packs(packs: Mapping[str, PathLike] | Sequence[PathLike], link_root: Path) -> dict[str, Path]:
    """Map pack names to dirs; named packs get a symlink link_root/<name> so ComfyUI sees that name."""
    out: dict[str, Path] = {}
    if isinstance(packs, Mapping):
        link_root.mkdir(parents=True, exist_ok=True)
        for name, target in packs.items():
            target_path = Path(target).resolve()
            if not (target_path / "__init__.py").is_file() and not target_path.suffix == ".py":
                raise FileNotFoundError(f"custom node pack {target_path} has no __init__.py")
            link = link_root / name
            if link.is_symlink() or link.exists():
                if link.resolve() != target_path:
                    raise FileExistsError(f"{link} already exists and points elsewhere")
            else:
                link.symlink_to(target_path, target_is_directory=target_path.is_dir())
            out[name] = link
    else:
        for target in packs:
            p = Path(target).resolve()
            out[p.stem if p.is_file() else p.name] = p
    return out


def boot_inprocess(comfy_path: PathLike | None = None,
                   extra_model_dirs: Mapping[str, PathLike] | None = None,
                   custom_node_paths: Mapping[str, PathLike] | Sequence[PathLike] = (),
                   io_dir: PathLike | None = None, with_prompt_server: bool = True) -> ModuleType:
    """Import ComfyUI into this process, register its builtin nodes, load custom node packs; return `nodes`.

    - extra_model_dirs: {"checkpoints": dir, ...} added first in ComfyUI's search paths.
    - custom_node_paths: pack dirs loaded with nodes.load_custom_node; a mapping {name: dir} loads each
      through a symlink named `name` (the module/extension name ComfyUI then uses).
    - io_dir: where output/, temp/, input/, user/ go (default: a fresh temp dir, so the checkout stays clean).
    - with_prompt_server: construct (never start) a server.PromptServer first, as main.py does, so code using
      `PromptServer.instance` (route registration, send_sync) works in-process.
    Idempotent: later calls add model dirs / packs not seen before and return the same module.
    """
    with _LOCK:
        path = prepare_comfy_imports(comfy_path)
        import folder_paths

        if _STATE["io_root"] is None:
            if io_dir is not None:
                root = Path(io_dir).resolve()
            else:
                root = Path(tempfile.mkdtemp(prefix="comfy_inproc_"))
                atexit.register(shutil.rmtree, root, ignore_errors=True)
            for sub in ("output", "temp", "input", "user", "custom_nodes"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            folder_paths.set_output_directory(str(root / "output"))
            folder_paths.set_temp_directory(str(root / "temp"))
            folder_paths.set_input_directory(str(root / "input"))
            folder_paths.set_user_directory(str(root / "user"))
            _STATE["io_root"] = root

        import nodes
        if not _module_is_inside(nodes, path):
            raise RuntimeError(f"`import nodes` gave {nodes.__file__}, not ComfyUI's nodes.py")

        if not _STATE["booted"]:
            import hook_breaker_ac10a0

            t0 = time.perf_counter()
            if with_prompt_server:
                import server

                if getattr(server.PromptServer, "instance", None) is None:
                    server.PromptServer(asyncio.new_event_loop())  # sets PromptServer.instance; never started
            hook_breaker_ac10a0.save_functions()
            try:
                failed = _run_coro(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            finally:
                hook_breaker_ac10a0.restore_functions()
            if failed:
                log.warning("ComfyUI builtin extra nodes that failed to import: %s", failed)
            _STATE["builtin_names"] = set(nodes.NODE_CLASS_MAPPINGS)
            _STATE["booted"] = True
            log.info("ComfyUI in-process boot: %d node classes in %.1fs",
                     len(nodes.NODE_CLASS_MAPPINGS), time.perf_counter() - t0)

        for folder, directory in (extra_model_dirs or {}).items():
            add_model_folder(folder, directory)

        for name, pack_path in _link_packs(custom_node_paths, _STATE["io_root"] / "custom_nodes").items():
            key = str(pack_path)
            if key in _STATE["packs"]:
                continue
            ok = _run_coro(nodes.load_custom_node(key, ignore=_STATE["builtin_names"], module_parent="custom_nodes"))
            if not ok:
                raise RuntimeError(f"ComfyUI failed to load custom node pack {name!r} from {pack_path} "
                                   "(see the logged traceback)")
            _STATE["packs"][key] = name
            log.info("loaded custom node pack %s (%s)", name, pack_path)
        return nodes


class _StubServer:
    """Stand-in for server.PromptServer: records what the executor would send to clients."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict[str, Any] = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


class InProcessRunner:
    """Validate and execute API-format graphs with ComfyUI's own PromptExecutor, without a server.

    Keeps the executor (and so its output cache) between runs, like the server's prompt worker.
    run() returns a dict shaped like a /history entry ({"status", "outputs", "meta"}) or, when
    validation fails, like the /prompt 400 body ({"error", "node_errors"}).
    """

    def __init__(self, nodes_module: ModuleType | None = None) -> None:
        if nodes_module is None:
            nodes_module = boot_inprocess()
        import execution

        self.server = _StubServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})

    def run(self, graph: Mapping[str, Any], extra_data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        import execution

        prompt = json.loads(json.dumps(graph))  # validation mutates inputs
        prompt_id = str(uuid.uuid4())
        valid = _run_coro(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            return {"error": valid[1], "node_errors": valid[3]}
        self.server.messages.clear()
        self.executor.execute(prompt, prompt_id, dict(extra_data or {}), valid[2])
        status = {"status_str": "success" if self.executor.success else "error",
                  "completed": self.executor.success, "messages": list(self.executor.status_messages)}
        return {"prompt_id": prompt_id, "status": status, **self.executor.history_result}

    def node_outputs(self, node_id: str) -> list[Any] | None:
        """The Python output values (one per output socket) node_id produced in the last run() (executed or
        served from cache), read from the executor's output cache; None when the node has no cached output.

        Example: ``image = runner.node_outputs("6")[0]`` after a graph whose node "6" is a VAEDecode.
        """
        entry = self.executor.caches.outputs.get(str(node_id))
        if entry is None:
            return None
        return [values[0] if isinstance(values, list) and len(values) == 1 else values
                for values in entry.outputs]


# --------------------------------------------------------------------------------------------------
# Tiny random-weight SD1.5 checkpoint
# --------------------------------------------------------------------------------------------------

def _tiny_unet_config() -> dict[str, Any]:
    # What comfy.model_detection.detect_unet_config reports for a 1-level UNet: the keys SD15 matches on
    # (model_channels 320, context_dim 768, no linear proj, no adm) plus a minimal depth.
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
        "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def tiny_sd15_shapes(comfy_path: PathLike | None = None) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Checkpoint key -> (shape, dtype) from ComfyUI's own SD15 UNet, CLIP-L and TAESD classes (built on meta)."""
    prepare_comfy_imports(comfy_path)
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    import torch
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    model_config = comfy.supported_models.SD15(_tiny_unet_config())
    meta = torch.device("meta")
    with meta:
        unet = UNetModel(**model_config.unet_config, device=meta, operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device=meta, dtype=torch.float32)
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    prefixes = (("model.diffusion_model.", unet), ("cond_stage_model.", clip), ("first_stage_model.", taesd))
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {}
    for prefix, module in prefixes:
        for k, v in module.state_dict().items():
            shapes[prefix + k] = (tuple(v.shape), v.dtype)
    # SD15.process_clip_state_dict renames every cond_stage_model.transformer.* key into .text_model.*, so
    # no SD1.5 checkpoint key can reach transformer.text_projection: ComfyUI leaves it uninitialised (it only
    # feeds pooled_output, which SD1.5 ignores). Writing it would only add an "unexpected" key.
    shapes.pop("cond_stage_model.transformer.text_projection.weight", None)
    return shapes


def _init_tensor(key: str, shape: tuple[int, ...], gen: Any) -> Any:
    import torch

    leaf = key.rsplit(".", 1)[-1]
    if key.endswith("vae_scale") or leaf == "logit_scale":
        return torch.full(shape, 1.0 if key.endswith("vae_scale") else 4.6052)
    if key.endswith("vae_shift"):
        return torch.zeros(shape)
    if leaf == "bias":
        return torch.randn(shape, generator=gen) * 0.02
    if len(shape) <= 1:  # norm scales
        return 1.0 + torch.randn(shape, generator=gen) * 0.02
    if "embedding" in key:
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=gen) * (1.0 / fan_in) ** 0.5


def tiny_sd15_state_dict(comfy_path: PathLike | None = None, seed: int = TINY_CKPT_SEED,
                         dtype: str = "float16") -> dict[str, Any]:
    """Deterministic random weights for every key of the tiny SD1.5 checkpoint (sorted-key order, one generator)."""
    import torch

    shapes = tiny_sd15_shapes(comfy_path)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out_dtype = getattr(torch, dtype)
    sd: dict[str, Any] = {}
    for key in sorted(shapes):
        shape, src_dtype = shapes[key]
        t = _init_tensor(key, shape, gen)
        sd[key] = t.to(out_dtype if src_dtype.is_floating_point else src_dtype).contiguous()
    return sd


def make_tiny_sd15_checkpoint(path: PathLike, comfy_path: PathLike | None = None,
                              seed: int = TINY_CKPT_SEED) -> Path:
    """Write a random-weight SD1.5-architecture checkpoint (tiny UNet, full CLIP-L, TAESD VAE) as fp16 safetensors.

    comfy.sd.load_checkpoint_guess_config detects it as SD15. Same seed -> byte-identical file.
    """
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sd = tiny_sd15_state_dict(comfy_path, seed=seed)
    tmp = out.with_name(out.name + ".part")
    # One metadata entry only: safetensors writes a multi-key metadata map in hash order (random per process).
    save_file(sd, str(tmp), metadata={"noisequery_tiny_sd15_seed": str(seed)})
    os.replace(tmp, out)
    log.info("wrote %s (%d tensors, %.0f MB) in %.1fs", out, len(sd), out.stat().st_size / 2**20,
             time.perf_counter() - t0)
    return out


def write_random_open_clip_weights(path: PathLike, model_name: str = "ViT-B-32", seed: int = 0) -> Path:
    """Write RANDOM weights of an open_clip architecture as an fp16 safetensors state dict.

    The model is built with torch.manual_seed(seed) inside a forked RNG, so the same (model_name, seed) gives
    the same file. Drop it at <noisequery_clip>/<model>/<tag>.safetensors and the pack loads it offline as
    that tag. Embeddings from it are meaningless: good for plumbing only.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(model_name, pretrained=None)
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    del model
    tmp = out.with_name(out.name + ".part")
    save_file(sd, str(tmp))
    os.replace(tmp, out)
    log.info("wrote random %s weights %s (%.0f MB) in %.1fs", model_name, out, out.stat().st_size / 2**20,
             time.perf_counter() - t0)
    return out


def file_sha256(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# A trivial V3 pack, to prove pack loading without the real one
# --------------------------------------------------------------------------------------------------

DUMMY_NODE_ID = "NQHarnessEcho"
DUMMY_PACK_NAME = "nq_harness_dummy"
_DUMMY_PACK_SOURCE = '''"""Harness dummy pack: one trivial V3 node."""
from __future__ import annotations

from aiohttp import web
from comfy_api.latest import ComfyExtension, io, ui
from server import PromptServer

WEB_DIRECTORY = "./web"


@PromptServer.instance.routes.get("/nq_harness/ping")
async def ping(request: web.Request) -> web.Response:
    return web.json_response({"pong": True})


class HarnessEcho(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NQHarnessEcho",
            display_name="NoiseQuery Harness Echo",
            category="testing/noisequery",
            inputs=[
                io.Int.Input("value", default=1, min=-1000, max=1000),
                io.Boolean.Input("fail", default=False),
            ],
            outputs=[io.Int.Output("doubled")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, value: int, fail: bool) -> io.NodeOutput:
        if fail:
            raise ValueError("harness echo asked to fail")
        return io.NodeOutput(value * 2, ui=ui.PreviewText(f"echo {value * 2}"))


class HarnessExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [HarnessEcho]


async def comfy_entrypoint() -> HarnessExtension:
    return HarnessExtension()
'''


def write_dummy_pack(directory: PathLike) -> Path:
    """Create a V3 pack: node NQHarnessEcho(value, fail) -> value*2 (+ PreviewText ui), route GET
    /nq_harness/ping, and WEB_DIRECTORY web/harness.js (served as /extensions/<pack name>/harness.js)."""
    d = Path(directory)
    (d / "web").mkdir(parents=True, exist_ok=True)
    (d / "__init__.py").write_text(_DUMMY_PACK_SOURCE, encoding="utf-8")
    (d / "web" / "harness.js").write_text("// NoiseQuery harness dummy extension\n", encoding="utf-8")
    return d


# --------------------------------------------------------------------------------------------------
# Headless server
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _supported_flags(comfy_path: Path) -> set[str]:
    text = (comfy_path / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return set(re.findall(r"add_argument\(\s*[\"'](--[a-z0-9-]+)", text))


def _filter_flags(cmd: list[str], supported: set[str]) -> list[str]:
    """Drop --flags (and their values) that this ComfyUI version does not define."""
    out: list[str] = []
    skipping = False
    for item in cmd:
        if item.startswith("--"):
            skipping = item not in supported
            if skipping:
                log.warning("ComfyUI at hand has no %s flag; dropped", item)
                continue
        elif skipping:
            continue
        out.append(item)
    return out


class ComfyServerError(RuntimeError):
    pass


class ComfyServer:
    """`python main.py` on a free port, with its own output/temp/input/user dirs and model/custom-node paths.

    Custom node packs are exposed through a temp `custom_nodes` folder listed in an
    --extra-model-paths-config YAML (ComfyUI supports a `custom_nodes:` entry there), each as a symlink
    named after the pack; only those names are whitelisted. The checkout is never modified.
    front_end_root serves another frontend (a static folder, `--front-end-root`) instead of the installed one.
    """

    def __init__(self, comfy_path: PathLike | None = None, *,
                 packs: Mapping[str, PathLike] | None = None,
                 model_dirs: Mapping[str, PathLike] | None = None,
                 port: int | None = None, python: str | None = None,
                 startup_timeout: float = 120.0, extra_args: Sequence[str] = (),
                 workdir: PathLike | None = None, env: Mapping[str, str] | None = None,
                 front_end_root: PathLike | None = None) -> None:
        self.comfy_path = _require_comfy_path(comfy_path)
        self.front_end_root = Path(front_end_root).resolve() if front_end_root is not None else None
        if self.front_end_root is not None and not (self.front_end_root / "index.html").is_file():
            raise FileNotFoundError(f"front_end_root {self.front_end_root} has no index.html")
        self.packs = dict(packs or {})
        self.model_dirs = {k: Path(v).resolve() for k, v in (model_dirs or {}).items()}
        self.port = port or free_port()
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self._workdir_arg = Path(workdir) if workdir is not None else None
        self.env = dict(env) if env is not None else None
        self.url = f"http://127.0.0.1:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.workdir: Path | None = None
        self._owns_workdir = False
        self.log_path: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log_file: Any = None
        self._session: Any = None

    # ---- lifecycle ----
    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        died = self.proc is not None and self.proc.poll() is not None
        if exc_type is not None or died:
            log.error("ComfyServer %s (exit %s); log tail:\n%s", "failed" if exc_type else "died",
                      self.proc.poll() if self.proc else None, self.log_tail())
            self.stop()
            if self.workdir is not None:
                log.error("ComfyServer files kept in %s", self.workdir)
            return
        self.stop()
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def start(self) -> None:
        import requests

        if self._workdir_arg is not None:
            self.workdir = self._workdir_arg.resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="comfy_server_"))
            self._owns_workdir = True
        wd = self.workdir
        for sub in ("output", "temp", "input", "user", "custom_nodes"):
            (wd / sub).mkdir(exist_ok=True)
        linked = _link_packs(self.packs, wd / "custom_nodes")

        section: dict[str, str] = {"custom_nodes": str(wd / "custom_nodes")}
        for folder, d in self.model_dirs.items():
            section[folder] = str(d)
        yaml_path = wd / "extra_model_paths.yaml"
        yaml_path.write_text(json.dumps({"comfy_harness": section}, indent=2), encoding="utf-8")  # JSON is YAML

        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--disable-all-custom-nodes", "--database-url", "sqlite:///:memory:",
               "--disable-api-nodes", "--output-directory", str(wd / "output"),
               "--temp-directory", str(wd / "temp"), "--input-directory", str(wd / "input"),
               "--user-directory", str(wd / "user"), "--extra-model-paths-config", str(yaml_path)]
        if linked:
            cmd += ["--whitelist-custom-nodes", *linked.keys()]
        if self.front_end_root is not None:
            cmd += ["--front-end-root", str(self.front_end_root)]
        cmd += self.extra_args
        cmd = [*cmd[:2], *_filter_flags(cmd[2:], _supported_flags(self.comfy_path))]
        if self.front_end_root is not None and "--front-end-root" not in cmd:
            raise ComfyServerError(f"the ComfyUI at {self.comfy_path} has no --front-end-root flag")

        self.log_path = wd / "server.log"
        # held open for the server's lifetime, closed in stop()
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        log.info("starting ComfyUI: %s", " ".join(cmd))
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._session = requests.Session()
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise ComfyServerError(f"ComfyUI exited with {self.proc.returncode} during startup:\n{tail}")
            try:
                r = self._session.get(self.url + "/object_info", timeout=5)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise ComfyServerError(f"ComfyUI did not answer /object_info within {self.startup_timeout}s:\n{tail}")
            time.sleep(0.25)
        self.startup_seconds = time.perf_counter() - t0
        log.info("ComfyUI up at %s after %.1fs", self.url, self.startup_seconds)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ---- HTTP API ----
    def _http(self) -> Any:
        if self._session is None:
            raise ComfyServerError("server not started")
        return self._session

    def get_json(self, path: str, **params: Any) -> Any:
        """GET <url><path> and decode the JSON answer (raises on HTTP errors)."""
        r = self._http().get(self.url + path, params=params or None, timeout=30)
        r.raise_for_status()
        return r.json()

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        suffix = f"/{node_class}" if node_class else ""
        r = self._http().get(f"{self.url}/object_info{suffix}", timeout=30)
        r.raise_for_status()
        return r.json()

    def post_prompt(self, api_graph: Mapping[str, Any], *, extra_data: Mapping[str, Any] | None = None,
                    prompt_id: str | None = None) -> str | dict[str, Any]:
        """Queue an API-format graph; return its prompt_id, or the JSON error body when ComfyUI answers 400."""
        body: dict[str, Any] = {"prompt": api_graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if prompt_id:
            body["prompt_id"] = prompt_id
        r = self._http().post(f"{self.url}/prompt", json=body, timeout=60)
        if r.status_code == 400:
            return r.json()
        r.raise_for_status()
        return str(r.json()["prompt_id"])

    def history(self, prompt_id: str | None = None) -> dict[str, Any]:
        suffix = f"/{prompt_id}" if prompt_id else ""
        r = self._http().get(f"{self.url}/history{suffix}", timeout=30)
        r.raise_for_status()
        return r.json()

    def wait(self, prompt_id: str, timeout: float = 60.0, poll: float = 0.1) -> dict[str, Any]:
        """Block until the prompt is in /history (finished, successfully or not); return its history entry."""
        if not isinstance(prompt_id, str):
            raise ComfyServerError(f"not a prompt id (validation failed?): {prompt_id!r}")
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id).get(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            if not self.alive:
                raise ComfyServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, api_graph: Mapping[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """post_prompt + wait; raises ComfyServerError with the error body if validation fails."""
        pid = self.post_prompt(api_graph)
        if not isinstance(pid, str):
            raise ComfyServerError(f"prompt rejected: {json.dumps(pid, indent=1)[:4000]}")
        return self.wait(pid, timeout)

    def get_image(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        r = self._http().get(f"{self.url}/view", params={"filename": filename, "subfolder": subfolder,
                                                        "type": type}, timeout=30)
        r.raise_for_status()
        return r.content

    def queue(self) -> dict[str, Any]:
        """GET /queue: {"queue_running": [...], "queue_pending": [...]}, items are [number, prompt_id, ...]."""
        r = self._http().get(f"{self.url}/queue", timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_running(self, prompt_id: str, timeout: float = 30.0) -> None:
        """Block until the prompt is the one executing (e.g. before interrupting it)."""
        deadline = time.monotonic() + timeout
        while not any(item[1] == prompt_id for item in self.queue()["queue_running"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not running after {timeout}s")
            time.sleep(0.05)

    def interrupt(self, prompt_id: str | None = None) -> None:
        """POST /interrupt: stops the running prompt (only if it is `prompt_id`, when given)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self._http().post(f"{self.url}/interrupt", json=body, timeout=30).raise_for_status()


# --------------------------------------------------------------------------------------------------
# History helpers
# --------------------------------------------------------------------------------------------------

def status_messages(entry: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(event, data), ...] from a history entry's status (execution_start, execution_cached, execution_error...)."""
    return [(m[0], m[1]) for m in ((entry.get("status") or {}).get("messages") or [])]


def execution_error(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The execution_error (or execution_interrupted) payload of a history entry, or None if it succeeded."""
    for event, data in status_messages(entry):
        if event in ("execution_error", "execution_interrupted"):
            return {"event": event, **data}
    return None


def output_images(entry: Mapping[str, Any], node_id: str | None = None) -> list[dict[str, str]]:
    """All {"filename", "subfolder", "type"} image records in a history entry (optionally one node's)."""
    outs = entry.get("outputs") or {}
    items = [outs[node_id]] if node_id is not None else list(outs.values())
    return [img for o in items for img in (o.get("images") or [])]


def txt2img_graph(ckpt_name: str, *, seed: int = 0, steps: int = 4, width: int = 64, height: int = 64,
                  sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.0,
                  positive: str = "a photo of a cat", negative: str = "blurry", batch_size: int = 1,
                  save: bool = True, prefix: str = "harness") -> dict[str, Any]:
    """API-format txt2img graph: 1 ckpt, 2/3 encode, 4 latent, 5 KSampler, 6 VAEDecode, 7 SaveImage/PreviewImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch_size}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": ({"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}} if save
              else {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}),
    }


# --------------------------------------------------------------------------------------------------
# Cross-attention probe (highlight guide tests and figures)
# --------------------------------------------------------------------------------------------------

class CrossAttentionProbe:
    """An `optimized_attention_override` that records softmax(QK^T/sqrt(d) + mask) of cross-attention calls.

    Put it on a model (``m.model_options["transformer_options"]["optimized_attention_override"] = probe``)
    BEFORE another pack's override: an override that chains (as HighlightScribbleGuide's does) passes its bias in
    `mask`, so the probe sees the attention the UNet really uses. `records` gets one
    ((latent h, latent w), cond_or_uncond, probs [batch, queries, keys] averaged over heads) per call.
    """

    def __init__(self) -> None:
        self.records: list[tuple[tuple[int, int], list[int], Any]] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> CrossAttentionProbe:
        return self  # ModelPatcher.clone() deep-copies model_options; keep one probe

    def __call__(self, func: Any, *args: Any, **kwargs: Any) -> Any:
        q, k, _v, heads = args[:4]
        if q.shape[1] != k.shape[1]:  # keys are text tokens, not pixels
            b, n, inner = q.shape
            dh = inner // heads
            qh = q.reshape(b, n, heads, dh).transpose(1, 2).float()
            kh = k.reshape(b, -1, heads, dh).transpose(1, 2).float()
            sim = qh @ kh.transpose(-1, -2) * dh ** -0.5
            mask = kwargs.get("mask")
            if mask is not None:
                sim = sim + (mask[:, None] if mask.ndim == 3 else mask).float()
            to = kwargs["transformer_options"]
            shape = to["original_shape"]
            self.records.append(((int(shape[2]), int(shape[3])), list(to["cond_or_uncond"]), sim.softmax(-1).mean(1)))
        return func(*args, **kwargs)
