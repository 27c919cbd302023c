"""Ranking a batch of images by metrics: CLIP score against a prompt, and an optional aesthetic predictor.

Metrics are combined the way query terms are (noisequery_core.search.query): each is standardised over the batch
(z-score) and weighted, so weights are comparable whatever a metric's scale (cosines ~0.2-0.35, aesthetic
scores ~1-10). Raw values stay in the report.

The aesthetic hook is a head on L2-normalised CLIP image embeddings loaded from a weights file: a chain of
Linear layers applied in order, exactly the shape of the LAION "improved aesthetic predictor"
(``layers.0/2/4/6/7`` = 768->1024->128->64->16->1, dropouts in between and no activations; made for
ViT-L-14 embeddings) and of LAION's linear v1 predictor (one ``weight``/``bias``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelError, QueryError
from ..work import CheckCancel, Progress, never_cancel, no_progress

_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(weight|bias)$")


class AestheticHead:
    """Linear layers on CLIP image embeddings; ``__call__(embeddings [N, D]) -> scores [N]``."""

    def __init__(self, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]], name: str = ""):
        if not layers:
            raise ModelError(f"aesthetic model {name or '?'}: no Linear layers found.")
        for i, (w, b) in enumerate(layers):
            # A file from a stranger: only real, finite, well-shaped Linear weights become a score head.
            for what, t in (("weight", w), ("bias", b)):
                if t is None:
                    continue
                if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
                    raise ModelError(f"aesthetic model {name}: layer {i} {what} is not a non-empty float tensor; "
                                     "pick a LAION-style aesthetic head (.safetensors) in models/noisequery_aesthetic.")
                if not bool(torch.isfinite(t).all()):
                    raise ModelError(f"aesthetic model {name}: layer {i} {what} holds NaN or infinite values; "
                                     "the file is damaged: download it again.")
            if b is not None and tuple(b.shape) != (w.shape[0],):
                raise ModelError(f"aesthetic model {name}: layer {i} bias has shape {tuple(b.shape)} but its weight "
                                 f"gives {w.shape[0]} outputs.")
        for i in range(1, len(layers)):
            if layers[i][0].shape[1] != layers[i - 1][0].shape[0]:
                raise ModelError(f"aesthetic model {name}: layer {i} takes {layers[i][0].shape[1]} inputs but the "
                                 f"layer before gives {layers[i - 1][0].shape[0]}.")
        if layers[-1][0].shape[0] != 1:
            raise ModelError(f"aesthetic model {name}: the last layer gives {layers[-1][0].shape[0]} values; "
                             "a score head must end in one.")
        self.layers = [(w.float(), None if b is None else b.float()) for w, b in layers]
        self.name = name

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], name: str = "") -> AestheticHead:
        """``layers.<i>.weight/bias`` (any prefix, e.g. the LAION MLP) or a single ``weight``/``bias``."""
        found: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in sd.items():
            m = _LAYER_KEY.match(key)
            if m:
                found.setdefault(int(m.group(1)), {})[m.group(2)] = value
        if not found and "weight" in sd:
            found[0] = {k: sd[k] for k in ("weight", "bias") if k in sd}
        layers = []
        for i in sorted(found):
            part = found[i]
            if "weight" not in part or part["weight"].ndim != 2:
                continue  # not a Linear (LAION's dropouts have no weights)
            layers.append((part["weight"], part.get("bias")))
        if not layers:
            raise ModelError(f"aesthetic model {name}: expected Linear weights named 'layers.<i>.weight' (LAION "
                             f"improved aesthetic predictor) or 'weight'/'bias'; found {sorted(sd)[:6]}.")
        return cls(layers, name)

    @classmethod
    def load(cls, path: str | Path) -> AestheticHead:
        """From ``.safetensors`` (or ``.pth``/``.pt``/``.bin`` through torch.load(weights_only=True))."""
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"aesthetic model {p} does not exist.")
        try:
            if p.suffix == ".safetensors":
                from safetensors.torch import load_file

                sd = load_file(str(p))
            else:
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
                if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
                    sd = sd["state_dict"]
        except Exception as exc:  # corrupt file, pickled code, ...: say which file
            raise ModelError(f"cannot read aesthetic model {p}: {exc}") from exc
        if not isinstance(sd, dict):
            raise ModelError(f"aesthetic model {p} holds no state dict of tensors.")
        return cls.from_state_dict(sd, p.name)

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.asarray(embeddings, np.float32))
        if x.shape[-1] != self.in_dim:
            raise ModelError(f"aesthetic model {self.name} expects {self.in_dim}-wide CLIP embeddings but the CLIP "
                             f"model gives {x.shape[-1]} (the LAION predictors need ViT-L-14); pick the matching "
                             "clip_model.")
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        for w, b in self.layers:
            x = torch.nn.functional.linear(x, w, b)
        return x[:, 0].numpy().astype(np.float64)


def clip_scores(image_embeddings: np.ndarray, text_embedding: np.ndarray) -> np.ndarray:
    """Cosine similarity of each (L2-normalised) image embedding [N, D] to a text embedding [D] or [1, D]."""
    img = np.asarray(image_embeddings, np.float64)
    txt = np.asarray(text_embedding, np.float64).reshape(-1)
    if img.shape[-1] != txt.shape[0]:
        raise QueryError(f"image embeddings ({img.shape[-1]}) and text embedding ({txt.shape[0]}) differ in width.")
    img = img / np.maximum(np.linalg.norm(img, axis=-1, keepdims=True), 1e-12)
    txt = txt / max(float(np.linalg.norm(txt)), 1e-12)
    return img @ txt


@dataclass(frozen=True)
class Ranking:
    """``order``: batch indices best first; ``combined``: the weighted z-score sum per item (batch order)."""

    order: list[int]
    combined: np.ndarray
    metrics: dict[str, np.ndarray]
    weights: dict[str, float]

    @property
    def best(self) -> int:
        return self.order[0]

    def report(self, labels: Sequence[str] | None = None, top: int = 64) -> str:
        names = list(self.metrics)
        lines = ["rank by " + " + ".join(f"{self.weights[n]:g}*z({n})" for n in names)]
        for r, i in enumerate(self.order[:top]):
            label = labels[i] if labels else f"image {i}"
            terms = "  ".join(f"{n} {self.metrics[n][i]:.4f}" for n in names)
            lines.append(f"#{r} {label}  score {self.combined[i]:+.3f}  {terms}")
        return "\n".join(lines)


def _z(values: np.ndarray) -> np.ndarray:
    sd = float(values.std())
    return (values - values.mean()) / sd if sd > 1e-12 else np.zeros_like(values)


def rank(metrics: dict[str, np.ndarray], weights: dict[str, float]) -> Ranking:
    """Order a batch by sum(weight * zscore(metric)); ties keep batch order. Needs at least one metric."""
    if not metrics:
        raise QueryError("nothing to rank by: give a prompt (CLIP score) and/or an aesthetic model.")
    n = {len(v) for v in metrics.values()}
    if len(n) != 1:
        raise QueryError(f"metrics have different lengths {sorted(n)}.")
    total = np.zeros(n.pop())
    for name, values in metrics.items():
        total += float(weights.get(name, 1.0)) * _z(np.asarray(values, np.float64))
    order = sorted(range(len(total)), key=lambda i: (-total[i], i))
    return Ranking(order, total, {k: np.asarray(v, np.float64) for k, v in metrics.items()},
                   {k: float(weights.get(k, 1.0)) for k in metrics})


def embed_images(embedder: Any, images: Sequence[Any], batch: int = 16, *, progress: Progress = no_progress,
                 check_cancel: CheckCancel = never_cancel) -> np.ndarray:
    """CLIP image embeddings [N, D] of PIL images through an embedder with ``preprocess`` and ``encode_images``.

    ``progress`` counts images embedded; ``check_cancel`` is called before each batch (noisequery_core.work;
    nothing is stored, so a stop loses only this call's work).
    """
    out = []
    progress(0, len(images))
    for i in range(0, len(images), batch):
        check_cancel()
        pixels = torch.stack([embedder.preprocess(im.convert("RGB")) for im in images[i:i + batch]])
        out.append(embedder.encode_images(pixels))
        progress(min(i + batch, len(images)), len(images))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
