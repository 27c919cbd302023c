"""CLIP image/text embeddings through open_clip: naming a model, finding its weights offline, encoding.

A model is named by open_clip model name plus either a pretrained tag (``ViT-B-32`` +
``openai``), a local checkpoint file (safetensors preferred; ``.bin``/``.pt`` only through
``torch.load(weights_only=True)``), or — for architectures open_clip does not know — a
model-config JSON plus a checkpoint. Weights for a tag are looked up first as
``<cache_dir>/<model>/<tag>.safetensors`` (or ``.bin``/``.pt``), then in open_clip's own
cache under ``cache_dir``, and only then downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, ModelError
from ..library.manifest import ClipIdentity

log = logging.getLogger("noisequery")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
NONE_NAMES = ("", "none", "None")


@dataclass(frozen=True)
class ClipSpec:
    """How the user names a CLIP model.

    model: open_clip model name (``ViT-B-32``), or ``none`` for a colour-only library.
    pretrained: a pretrained tag (``openai``), a path to a weights file, or ``random``
        (random weights: tests and benchmarks only — never meaningful for search).
    config: optional path to an open_clip model-config JSON for a custom architecture;
        the model name then defaults to the file's stem.
    """

    model: str
    pretrained: str = ""
    config: str = ""

    @property
    def is_none(self) -> bool:
        return self.model in NONE_NAMES and not self.config

    @classmethod
    def parse(cls, text: str) -> ClipSpec:
        """``'ViT-B-32:openai'``, ``'ViT-B-32:/path/w.safetensors'``, ``'none'``."""
        text = (text or "").strip()
        if text in NONE_NAMES:
            return cls("none")
        model, _, pretrained = text.partition(":")
        return cls(model.strip(), pretrained.strip())


def _import_open_clip() -> Any:
    try:
        import open_clip
    except ImportError as exc:
        raise MissingDependencyError(
            "CLIP features need the package open_clip_torch: `pip install open_clip_torch` "
            "(or build a colour-only library with CLIP model 'none')."
        ) from exc
    return open_clip


def file_digest(path: Path, n: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def local_weight_candidates(cache_dir: Path | None, model: str, tag: str) -> list[Path]:
    """Where a user may drop the weights for (model, tag) to work offline."""
    if cache_dir is None or not tag:
        return []
    return [Path(cache_dir) / model / f"{tag}{suffix}" for suffix in WEIGHT_SUFFIXES]


class ClipEmbedder:
    """A loaded open_clip model with ``preprocess``, ``encode_images`` and ``encode_text``.

    Embeddings come back as float32, L2-normalised, shape [N, dim].
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, identity: ClipIdentity, device: str):
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.identity = identity
        self.device = device

    @property
    def dim(self) -> int:
        return self.identity.dim

    def encode_images(self, pixels: Any) -> np.ndarray:
        """Encode a preprocessed batch (torch tensor [N, 3, S, S])."""
        import torch

        with torch.inference_mode(), _autocast(self.device):
            feats = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalise(feats.float().cpu().numpy())

    def encode_text(self, texts: list[str]) -> np.ndarray:
        import torch

        tokens = self.tokenizer(list(texts)).to(self.device)
        with torch.inference_mode(), _autocast(self.device):
            feats = self.model.encode_text(tokens)
        return _normalise(feats.float().cpu().numpy())


class ShortTextEncoder:
    """open_clip's CLIP text tower run only over the tokens up to the longest text's end token.

    CLIP's text transformer is causal: position i attends to positions ≤ i only, and the embedding is read at the
    end-of-text token, so the padding after it (77 positions in all, a short query uses ~8) changes nothing but
    costs most of the time. The result equals ``encode_text`` (checked against it on first use; any other
    model, pooling or a mismatch falls back to the full encoder, logged).
    """

    def __init__(self, inner: Any):
        self.inner = inner
        self.identity = inner.identity
        self._checked = False
        self._ok = True

    @staticmethod
    def applies(enc: Any) -> bool:
        m = getattr(enc, "model", None)
        return (getattr(enc, "tokenizer", None) is not None and getattr(m, "attn_mask", None) is not None
                and getattr(m, "text_pool_type", None) == "argmax"
                and all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")))

    def _short(self, texts: list[str]) -> np.ndarray:
        import torch

        m, dev = self.inner.model, self.inner.device
        tokens = self.inner.tokenizer(list(texts)).to(dev)
        end = tokens.argmax(dim=-1)  # the end-of-text token has the largest id (what 'argmax' pooling reads)
        n = int(end.max()) + 1
        # the same precision and normalisation as ClipEmbedder.encode_text
        with torch.inference_mode(), _autocast(dev):
            cast = m.transformer.get_cast_dtype()
            x = m.token_embedding(tokens[:, :n]).to(cast) + m.positional_embedding[:n].to(cast)
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:n, :n]))
            x = x[torch.arange(x.shape[0], device=x.device), end]
            proj = m.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
        return _normalise(x.float().cpu().numpy())

    def encode_text(self, texts: list[str]) -> np.ndarray:
        if not self._ok:
            return self.inner.encode_text(texts)
        out = self._short(texts)
        if not self._checked:
            self._checked = True
            full = self.inner.encode_text(texts)
            if not np.allclose(out, full, atol=1e-3):
                log.warning("short text encoding differs from open_clip's (%.2g); using the full 77-token encoder",
                            float(np.abs(out - full).max()))
                self._ok = False
                return full
        return out


def _autocast(device: str) -> Any:
    import contextlib

    import torch

    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)


def load_clip(
    spec: ClipSpec,
    *,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
    allow_download: bool = True,
) -> ClipEmbedder:
    """Load a CLIP model named by ``spec``.

    Args:
        spec: the model name and weights (see ClipSpec).
        cache_dir: folder for weights: ``<cache_dir>/<model>/<tag>.safetensors`` is used as is,
            and open_clip's downloads are cached there.
        device: ``cpu`` or ``cuda[:n]``.
        allow_download: when False, never touch the network; missing weights fail at once.
    Returns:
        a ClipEmbedder. Raises ModelError naming the exact file to provide when weights are missing.
    """
    if spec.is_none:
        raise ModelError("CLIP model 'none' cannot embed anything; pick a CLIP model for text queries.")
    open_clip = _import_open_clip()
    cache = Path(cache_dir) if cache_dir else None
    model_name = spec.model
    if spec.config:
        cfg_path = Path(spec.config)
        if not cfg_path.is_file():
            raise ModelError(f"CLIP model config {cfg_path} does not exist; pass the path of an open_clip model JSON.")
        try:
            json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"CLIP model config {cfg_path} is not valid JSON: {exc}") from exc
        open_clip.add_model_config(cfg_path)
        model_name = spec.model if spec.model not in NONE_NAMES else cfg_path.stem
    if open_clip.get_model_config(model_name) is None:
        known = ", ".join(m for m in open_clip.list_models() if m.startswith(("ViT-B", "ViT-L")))[:300]
        raise ModelError(
            f"open_clip does not know the model {model_name!r}. Use one of open_clip.list_models() "
            f"(e.g. {known}) or pass a model-config JSON for a custom architecture."
        )

    pretrained = spec.pretrained
    if not pretrained:
        raise ModelError(
            f"CLIP {model_name}: name its weights — a pretrained tag (e.g. 'openai'), a weights file, or "
            "'random' (random weights, for tests only)."
        )
    weights: Path | None = None
    tag_for_cfg: str | None = None
    if pretrained != "random":
        as_path = Path(pretrained).expanduser()
        if as_path.suffix.lower() in WEIGHT_SUFFIXES or as_path.is_file():
            if not as_path.is_file():
                raise ModelError(f"CLIP weights file {as_path} does not exist.")
            weights = as_path
        else:
            tag_for_cfg = pretrained
            if not open_clip.get_pretrained_cfg(model_name, pretrained):
                tags = [t for m, t in open_clip.list_pretrained() if m == model_name]
                raise ModelError(
                    f"open_clip has no pretrained tag {pretrained!r} for {model_name}; known tags: {tags}."
                )
            for cand in local_weight_candidates(cache, model_name, pretrained):
                if cand.is_file():
                    weights = cand
                    break

    where = local_weight_candidates(cache, model_name, pretrained)
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if tag_for_cfg else {}
    source = cfg.get("hf_hub") or cfg.get("url") or "the model's release page"
    offline_hint = (
        f"To work offline, download the weights ({source}; on the hub the file is "
        f"open_clip_model.safetensors or open_clip_pytorch_model.bin) and save them as {where[0]}"
        + (f" (or {where[1].name})" if len(where) > 1 else "")
        + "."
        if where
        else ""
    )
    if tag_for_cfg and weights is None and not allow_download:
        raise ModelError(f"CLIP weights for {model_name}/{pretrained} are not on this machine. {offline_hint}")
    try:
        if pretrained == "random":
            # Random weights from a fixed seed, so the same architecture always gets the same
            # "random" embedding space (tests, benchmarks and the offline demo rely on this).
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        elif tag_for_cfg and weights is None:
            # Not dropped in by hand: let open_clip resolve its cache (and download when online).
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=tag_for_cfg, cache_dir=str(cache) if cache else None, weights_only=True
            )
        else:
            # Weights come from a file: apply the tag's own config (quick_gelu, mean/std) by hand,
            # because open_clip resolves (downloads) a tag even with load_weights=False.
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name,
                pretrained=None,
                force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                image_mean=cfg.get("mean"),
                image_std=cfg.get("std"),
                image_interpolation=cfg.get("interpolation"),
                image_resize_mode=cfg.get("resize_mode"),
                weights_only=True,
            )
            if weights is not None:
                _load_weights(open_clip, model, weights)
    except ModelError:
        raise
    except Exception as exc:  # open_clip/hub raise many types; all mean "could not get the weights"
        raise ModelError(f"Could not load CLIP {model_name}/{pretrained or 'random'}: {exc}. {offline_hint}") from exc

    model.eval().to(device)
    tokenizer = open_clip.get_tokenizer(model_name)
    dim = _probe_dim(model, preprocess)
    if weights is not None and tag_for_cfg is None:
        pretrained_id = f"file:{weights.name}#{file_digest(weights)}"
    elif tag_for_cfg:
        pretrained_id = tag_for_cfg
    else:
        pretrained_id = "random"
        log.warning("CLIP %s has RANDOM weights: text and image search results will be meaningless", model_name)
    identity = ClipIdentity(model=model_name, pretrained=pretrained_id, dim=dim)
    return ClipEmbedder(model, preprocess, tokenizer, identity, device)


def _probe_dim(model: Any, preprocess: Any) -> int:
    import torch
    from PIL import Image

    with torch.inference_mode():
        x = preprocess(Image.new("RGB", (32, 32))).unsqueeze(0)
        return int(model.encode_image(x).shape[-1])


def _load_weights(open_clip: Any, model: Any, path: Path) -> None:
    """Load a local checkpoint: safetensors directly, torch files only with weights_only=True."""
    try:
        open_clip.load_checkpoint(model, str(path), weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"Could not load CLIP weights from {path}: {exc}. The file must be an open_clip state dict "
            "(safetensors preferred; pickled .bin/.pt files are read with weights_only=True only)."
        ) from exc


def spec_for_identity(identity: ClipIdentity, weights: str | Path | None = None, config: str | Path | None = None) -> ClipSpec:
    """The ClipSpec that reloads the model a library was embedded with.

    Libraries embedded from a local file record ``file:<name>#<sha>``; the caller must then
    pass that file again as ``weights``.
    """
    if identity.pretrained.startswith("file:"):
        if weights is None:
            raise ModelError(
                f"This library was embedded with CLIP {identity.model} from the local file "
                f"{identity.pretrained[5:].split('#')[0]}; pass that file again to query it."
            )
        return ClipSpec(identity.model, str(weights), str(config or ""))
    return ClipSpec(identity.model, identity.pretrained, str(config or ""))


def check_identity(embedder: ClipEmbedder, identity: ClipIdentity) -> None:
    got = embedder.identity
    if (got.model, got.pretrained, got.dim) != (identity.model, identity.pretrained, identity.dim):
        raise ModelError(f"Loaded CLIP {got.describe()} but the library needs {identity.describe()}.")
