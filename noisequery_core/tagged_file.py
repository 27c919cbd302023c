"""Safetensors files with one JSON metadata entry (NoiseCLR directions, seed-invariant embeddings): write, read, check.

Such files come from strangers (shared in workflows and model folders), so a read checks everything before use:
the file opens as safetensors, carries this pack's metadata entry as valid JSON of the expected format and a
version this code reads, and every float tensor is finite, the text-encoding ones bounded like a text encoding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import NoiseQueryError
from .library.manifest import atomic_write_bytes

# Text encodings (and tokens trained from them by small Adam steps) hold values of a few tens; a file holding a
# value beyond this is damaged or not written by NoiseQuery, and would give black images.
MAX_ABS_VALUE = 1e4


@dataclass(frozen=True)
class TaggedFormat:
    """What a kind of tagged file is called and how it is recognised.

    meta_key / format / version: the metadata entry, its ``format`` value and the newest ``format_version`` read.
    what: the words for one file in messages ("NoiseCLR directions file"); meta_label: for its metadata ("NoiseCLR");
    missing: the sentence that follows
    "<path> does not exist." (how to get one); redo: what to do when the contents are damaged.
    error: the NoiseQueryError subclass raised. bounded: tensors holding text encodings.
    """

    meta_key: str
    format: str
    version: int
    what: str
    meta_label: str
    missing: str
    redo: str
    error: type[NoiseQueryError]
    bounded: tuple[str, ...]


def write_tagged(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], meta_key: str) -> Path:
    """Write ``tensors`` with ``meta`` under ``meta_key``, atomically (readers see the old file or the new one)."""
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # One metadata key only: safetensors writes a multi-key map in hash order, which would make the bytes of
    # identical files differ between processes.
    atomic_write_bytes(path, save(cpu, metadata={meta_key: json.dumps(meta, sort_keys=True)}))
    return path


def read_tagged(path: Path, fmt: TaggedFormat, required: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor],
                                                                                      dict[str, Any]]:
    """(tensors, metadata) of a tagged file, or ``fmt.error`` saying what is wrong with it and what to do."""
    from safetensors import safe_open

    err = fmt.error
    if not path.is_file():
        raise err(f"{fmt.what} {path} does not exist. {fmt.missing}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = (f.metadata() or {}).get(fmt.meta_key)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise err(f"{path} is not a readable safetensors file ({exc}); it is damaged or not a {fmt.what}.") from exc
    if raw is None:
        raise err(f"{path} is a safetensors file without {fmt.meta_label} metadata (no {fmt.meta_key!r} entry): not a "
                  f"{fmt.what} (a model in the wrong folder?).")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise err(f"{path}: the {fmt.meta_label} metadata is not valid JSON ({exc}); the file is damaged.") from exc
    if not isinstance(meta, dict) or meta.get("format") != fmt.format:
        raise err(f"{path}: metadata format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                  f"expected {fmt.format!r}.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > fmt.version:
        raise err(f"{path} was written by a newer NoiseQuery ({fmt.what} format {version}, this one reads "
                  f"<= {fmt.version}); update the NoiseQuery pack.")
    for name in required:
        if name not in tensors:
            raise err(f"{path}: tensor {name!r} is missing; the file is damaged.")
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            t32 = t.float()
            if not bool(torch.isfinite(t32).all()):
                raise err(f"{path}: tensor {name!r} holds NaN or infinite values; the file is damaged. {fmt.redo}")
            if name in fmt.bounded and float(t32.abs().max()) > MAX_ABS_VALUE:
                raise err(f"{path}: tensor {name!r} holds values up to {float(t32.abs().max()):.3g}, beyond any "
                          f"text encoding (|x| <= {MAX_ABS_VALUE:g}); the file is damaged or was not written by "
                          f"NoiseQuery. {fmt.redo}")
    return tensors, meta


def meta_width(meta: dict[str, Any], key: str, path: Path, fmt: TaggedFormat) -> int:
    """A width the metadata records (0 = none; e.g. the pooled part's), or ``fmt.error`` when it is not one."""
    width = meta.get(key, 0)
    if not isinstance(width, int) or isinstance(width, bool) or width < 0:
        raise fmt.error(f"{path}: {key} {width!r} is not a width; the file's metadata is damaged.")
    return width
