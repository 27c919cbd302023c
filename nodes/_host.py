"""Where the pack meets ComfyUI: folders, model identity, progress/interrupt, cached searchers."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..noisequery_core import ClipEmbedder, ClipSpec, Library, Searcher, load_clip
from ..noisequery_core.errors import ModelError, QueryError
from ..noisequery_core.exploration.rank import AestheticHead
from ..noisequery_core.library.paths import list_libraries, resolve_library
from ..noisequery_core.search.clip import spec_for_identity

log = logging.getLogger("noisequery")

LIBRARY_FOLDER = "noise_libraries"
CLIP_FOLDER = "noisequery_clip"
AESTHETIC_FOLDER = "noisequery_aesthetic"  # score heads on CLIP embeddings (nodes/exploration_rank_nodes.py)
EMBEDDING_FOLDER = "noisequery_embeddings"  # seed-invariant prompts (nodes/exploration_invariant_nodes.py)

CLIP_CHOICES = ["ViT-B-32:openai", "ViT-B-16:openai", "ViT-L-14:openai", "ViT-H-14:laion2b_s32b_b79k", "none"]


def register_folder(name: str) -> None:
    """Register models/<name> once; user paths from extra_model_paths.yaml stay first.

    The first registered folder is created when none of them exists yet (so a fresh install
    has e.g. a models/noise_libraries to build into, and a moved one is not shadowed).
    """
    default = os.path.join(folder_paths.models_dir, name)
    known = folder_paths.folder_names_and_paths.get(name, ([], set()))[0]
    if default not in known:
        folder_paths.add_model_folder_path(name, default, is_default=False)
    paths = folder_paths.get_folder_paths(name)
    if not any(os.path.isdir(p) for p in paths):
        try:
            os.makedirs(paths[0], exist_ok=True)
        except OSError as exc:
            log.warning("cannot create %s (%s); add a writable %s path in extra_model_paths.yaml", paths[0], exc, name)


def register_folders() -> None:
    """The pack's own model folders (NoiseCLR registers its folder in nodes/directions_runtime.py)."""
    for name in (LIBRARY_FOLDER, CLIP_FOLDER, AESTHETIC_FOLDER, EMBEDDING_FOLDER):
        register_folder(name)


def library_roots() -> list[str]:
    return folder_paths.get_folder_paths(LIBRARY_FOLDER)


def library_names() -> list[str]:
    return list_libraries(library_roots())


def open_library(name: str) -> Library:
    return Library.open(resolve_library(library_roots(), name, must_exist=True))


def clip_cache_dir() -> str:
    return folder_paths.get_folder_paths(CLIP_FOLDER)[0]


def torch_device() -> str:
    return str(comfy.model_management.get_torch_device())


_lock = threading.Lock()
_embedders: dict[tuple[str, str, str], ClipEmbedder] = {}
_searchers: dict[str, Searcher] = {}


def embedder_for(spec: ClipSpec) -> ClipEmbedder:
    """Load (once) a CLIP model, with its weights cached in models/noisequery_clip."""
    key = (spec.model, spec.pretrained, spec.config)
    with _lock:
        got = _embedders.get(key)
        if got is None:
            cache = clip_cache_dir()
            # HF_HUB_OFFLINE=1 (huggingface's own switch) skips the download attempts, which
            # otherwise retry for about a minute on an offline machine before failing.
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
            try:
                got = load_clip(spec, cache_dir=cache, device=torch_device(), allow_download=not offline)
            except ModelError as exc:
                raise ModelError(f"{exc} (ComfyUI looks for CLIP weights in {cache}: models/{CLIP_FOLDER}/<model>/<tag>.safetensors)") from exc
            _embedders[key] = got
        return got


def searcher_for(library: Library, need_text: bool) -> Searcher:
    """A cached Searcher per library folder (it follows appends by itself)."""
    key = str(library.path)
    with _lock:
        s = _searchers.get(key)
        if s is None or s.library.manifest.created != library.manifest.created:
            s = Searcher(library)
            _searchers[key] = s
    if need_text and s.embedder is None and library.features.clip is not None:
        s.embedder = embedder_for(spec_for_identity(library.features.clip))
    return s


def library_fingerprint(name: str) -> tuple[Any, ...]:
    """Changes whenever entries are committed to the library (for fingerprint_inputs)."""
    try:
        path = resolve_library(library_roots(), name, must_exist=True)
        st = (path / "manifest.json").stat()
        return (str(path), st.st_mtime_ns, st.st_size)
    except Exception as exc:  # validation reports the real error; here only "changed"
        log.debug("library_fingerprint: %s is unresolved (%s)", name, exc)
        return ("unresolved", name, str(exc))


# ------------------------------------------------------------------ model identity


def model_fingerprint(model: Any) -> str:
    """A short hash of the diffusion model's weights (a few tensors), class and weight patches.

    ComfyUI keeps no checkpoint path or hash on a MODEL, so this is what identifies it;
    LoRAs and other weight patches change it, as they change every image.
    """
    h = hashlib.sha256()
    base = model.model
    h.update(type(base.model_config).__name__.encode())
    sd = base.diffusion_model.state_dict()
    keys = sorted(sd)
    # ComfyUI patches LoRAs into the weights in place and keeps the originals in `backup`
    # (shared by clones): hash the originals, and the patches separately below.
    backup = getattr(model, "backup", {}) or {}
    for k in keys[:2] + keys[len(keys) // 2 : len(keys) // 2 + 1] + keys[-2:]:
        saved = backup.get(f"diffusion_model.{k}")
        src = saved.weight if saved is not None else sd[k]
        t = src.detach().to("cpu", torch.float32).contiguous()
        h.update(k.encode())
        h.update(t.numpy().tobytes()[: 1 << 20])
    for k in sorted(getattr(model, "patches", {}) or {}):
        h.update(k.encode())
        for p in model.patches[k]:
            h.update(repr(p[0]).encode())  # strength
    return h.hexdigest()[:16]


def upstream_model_name(dynprompt: Any, unique_id: str | None, input_name: str = "model", depth: int = 12) -> str:
    """Follow a MODEL link upstream to the loader and return its file name ('' if not found)."""
    if dynprompt is None or unique_id is None:
        return ""
    names: list[str] = []
    node_id, inp = str(unique_id), input_name
    for _ in range(depth):
        try:
            node = dynprompt.get_node(node_id)
        except Exception as exc:  # a node id the prompt does not hold (e.g. an expanded group)
            log.debug("upstream_model_name: stopped at node %s (%s)", node_id, exc)
            break
        link = node.get("inputs", {}).get(inp)
        if not isinstance(link, list) or len(link) != 2:
            break
        up = dynprompt.get_node(str(link[0]))
        inputs = up.get("inputs", {})
        for key in ("ckpt_name", "unet_name", "model_name"):
            if isinstance(inputs.get(key), str):
                return "+".join([inputs[key], *reversed(names)])
        for key in ("lora_name",):
            if isinstance(inputs.get(key), str):
                names.append(Path(inputs[key]).stem)
        node_id, inp = str(link[0]), "model"
    return ""


def upstream_text(dynprompt: Any, unique_id: str | None, input_name: str) -> str:
    """The constant text of the CLIPTextEncode feeding ``input_name`` (best effort, '' if unknown)."""
    if dynprompt is None or unique_id is None:
        return ""
    try:
        link = dynprompt.get_node(str(unique_id)).get("inputs", {}).get(input_name)
        if isinstance(link, list):
            up = dynprompt.get_node(str(link[0]))
            text = up.get("inputs", {}).get("text")
            return text if isinstance(text, str) else ""
    except Exception as exc:  # best effort: the text only labels the library's generation key
        log.debug("upstream_text: no constant text for %s of node %s (%s)", input_name, unique_id, exc)
        return ""
    return ""


def conditioning_fingerprint(cond: Any) -> str:
    h = hashlib.sha256()
    for c in cond:
        t = c[0].detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    # pooled_output is left out on purpose: for SD1.x ComfyUI never loads text_projection, so
    # the pooled vector is uninitialised memory and would make the key non-deterministic.
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ progress / interrupt


class NodeWork:
    """ComfyUI's side of the core's long-work contract (noisequery_core.work), for one node run.

    ``progress`` drives the node's progress bar (with ``preview``, when set, as its image) and shows
    the core's message as the node's progress text; ``check_cancel`` raises ComfyUI's own interrupt,
    so a stopped run is reported as "interrupted" the usual way. Every node that does long work
    uses this one adapter: ``work = NodeWork(cls.hidden.unique_id, total)``.
    """

    def __init__(self, node_id: str | None, total: int, *, text_updates: int = 50):
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(max(int(total), 1), node_id=node_id)
        self.preview: Any = None  # e.g. ("JPEG", pil_image, max_size), sent with every update
        self._text_updates = max(1, text_updates)  # progress texts per run at most (each is a websocket message)
        self._text_step = -1

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.bar.update_absolute(done, max(total, 1), self.preview)
        if message and self.node_id is not None:
            step = done * self._text_updates // max(total, 1)
            if step != self._text_step or done >= total:
                self._text_step = step
                send_progress_text(message, self.node_id)

    def check_cancel(self) -> None:
        raise_if_interrupted()


def send_progress_text(text: str, node_id: str) -> None:
    """Show ``text`` under the node in the browser (ComfyUI's progress text); nothing without a server."""
    try:
        from server import PromptServer
    except ImportError as exc:  # ComfyUI embedded without its server module
        log.debug("no ComfyUI server to show progress text (%s)", exc)
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_progress_text(text, node_id)


def raise_if_interrupted() -> None:
    """Raise ComfyUI's interrupt (InterruptProcessingException) when the user pressed Cancel."""
    comfy.model_management.throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------ aesthetic score heads

AESTHETIC_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
_heads: dict[str, tuple[float, AestheticHead]] = {}
_heads_lock = threading.Lock()


def aesthetic_choices() -> list[str]:
    """'none' and the score heads in models/noisequery_aesthetic (NoiseQueryRank and NoiseQueryRefine offer them)."""
    try:
        names = folder_paths.get_filename_list(AESTHETIC_FOLDER)
    except Exception as exc:  # folder not registered (should not happen): offer none, say why in the log
        log.warning("cannot list %s: %s", AESTHETIC_FOLDER, exc)
        names = []
    return ["none", *[n for n in names if n.lower().endswith(AESTHETIC_SUFFIXES)]]


def aesthetic_head(name: str) -> AestheticHead:
    """The head ``name`` from models/noisequery_aesthetic, loaded once and reloaded when the file changes."""
    path = folder_paths.get_full_path(AESTHETIC_FOLDER, name)
    if path is None:
        raise QueryError(f"aesthetic model {name!r} is not in models/{AESTHETIC_FOLDER} "
                         f"({', '.join(folder_paths.get_folder_paths(AESTHETIC_FOLDER))}); put the file there "
                         "and refresh, or choose 'none' (or another metric).")
    mtime = os.path.getmtime(path)
    with _heads_lock:
        got = _heads.get(path)
        if got is None or got[0] != mtime:
            got = (mtime, AestheticHead.load(path))
            _heads[path] = got
    return got[1]
