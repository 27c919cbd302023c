"""The library manifest: schema version, generation key, feature set and committed row count."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import number_problem
from ..errors import LibraryError, SchemaVersionError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "noisequery-library"

# Noise-generator names recorded in GenerationKey.noise.
NOISE_COMFYUI_CPU = "comfyui-cpu-randn"  # torch.manual_seed(seed); torch.randn(latent, cpu) at batch 1
NOISE_UNKNOWN = "imported/unknown"


@dataclass(frozen=True)
class GenerationKey:
    """Everything that decides which image a seed produces.

    Two libraries can only be merged, and a seed only reproduces, when these match.
    """

    model: str = "unknown"
    model_hash: str = ""
    latent_shape: tuple[int, int, int] | None = None  # C, H, W of the latent
    noise: str = NOISE_UNKNOWN
    sampler: str = ""
    scheduler: str = ""
    steps: int = 0
    cfg: float = 0.0
    prompt: str = ""
    negative_prompt: str = ""
    denoise: float = 1.0
    extra: tuple[tuple[str, str], ...] = ()  # free-form (name, value) pairs, sorted

    def __post_init__(self) -> None:
        # A NaN cfg renders black images and would be written into the manifest as `NaN` (not even JSON).
        for name in ("cfg", "denoise"):
            problem = number_problem(getattr(self, name))
            if problem is not None:
                raise LibraryError(f"generation key: {name} {problem}; give the sampler a finite {name} (a library "
                                   f"whose manifest holds it was built with a broken setting: build it again).")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape) if self.latent_shape else None
        d["extra"] = {k: v for k, v in self.extra}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GenerationKey:
        d = dict(d)
        shape = d.get("latent_shape")
        d["latent_shape"] = tuple(int(x) for x in shape) if shape else None
        d["extra"] = tuple(sorted((str(k), str(v)) for k, v in (d.get("extra") or {}).items()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def describe(self) -> str:
        shape = "×".join(map(str, self.latent_shape)) if self.latent_shape else "?"
        return (
            f"model={self.model!r} hash={self.model_hash or '?'} latent={shape} noise={self.noise} "
            f"sampler={self.sampler or '?'}/{self.scheduler or '?'} steps={self.steps} cfg={self.cfg} "
            f"denoise={self.denoise} prompt={self.prompt!r} negative={self.negative_prompt!r}"
        )


@dataclass(frozen=True)
class ClipIdentity:
    """Names a CLIP image/text embedding space; text and image vectors must share one."""

    model: str
    pretrained: str
    dim: int

    def describe(self) -> str:
        return f"{self.model}/{self.pretrained or 'random'} (dim {self.dim})"


@dataclass(frozen=True)
class FeatureSet:
    """Which features every entry carries."""

    clip: ClipIdentity | None
    color_version: int
    thumbnail_size: int = 256  # longer side in pixels; 0 = no thumbnails
    thumbnail_format: str = "webp"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureSet:
        clip = d.get("clip")
        return cls(
            clip=ClipIdentity(**clip) if clip else None,
            color_version=int(d["color_version"]),
            thumbnail_size=int(d.get("thumbnail_size", 0)),
            thumbnail_format=str(d.get("thumbnail_format", "webp")),
        )

    def describe(self) -> str:
        clip = self.clip.describe() if self.clip else "none (colour-only)"
        thumbs = f"{self.thumbnail_size}px {self.thumbnail_format}" if self.thumbnail_size else "none"
        return f"clip={clip} color_features=v{self.color_version} thumbnails={thumbs}"


@dataclass(frozen=True)
class ColumnSpec:
    """One fixed-width column file: ``<name>.bin`` holds ``count`` rows of ``dtype`` × ``shape``."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        import numpy as np

        n = 1
        for s in self.shape:
            n *= s
        return n * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ColumnSpec:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(int(s) for s in d["shape"]))


@dataclass(frozen=True)
class Manifest:
    generation: GenerationKey
    features: FeatureSet
    columns: tuple[ColumnSpec, ...]
    count: int = 0
    created: str = ""
    updated: str = ""
    schema_version: int = SCHEMA_VERSION
    notes: dict[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> ColumnSpec | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "schema_version": self.schema_version,
            "count": self.count,
            "created": self.created,
            "updated": self.updated,
            "generation": self.generation.to_json(),
            "features": self.features.to_json(),
            "columns": [c.to_json() for c in self.columns],
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], where: Path) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise LibraryError(f"{where} is not a NoiseQuery library manifest (format={d.get('format')!r}).")
        version = d.get("schema_version")
        if not isinstance(version, int) or version < 1:
            raise LibraryError(f"{where}: schema_version {version!r} is not valid; the manifest is damaged.")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{where} was written by a newer NoiseQuery (library schema {version}); this version reads "
                f"schema {SCHEMA_VERSION} and older. Update the NoiseQuery pack to open this library."
            )
        try:
            return cls(
                generation=GenerationKey.from_json(d["generation"]),
                features=FeatureSet.from_json(d["features"]),
                columns=tuple(ColumnSpec.from_json(c) for c in d["columns"]),
                count=int(d["count"]),
                created=str(d.get("created", "")),
                updated=str(d.get("updated", "")),
                schema_version=version,
                notes=dict(d.get("notes") or {}),
            )
        except LibraryError as exc:  # a value the generation key refuses
            raise LibraryError(f"{where}: {exc}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise LibraryError(f"{where}: manifest field missing or malformed ({exc!r}); the manifest is damaged.") from exc


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix.

    Temp file in the same folder, fsync, ``os.replace``, then fsync the folder (POSIX).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    data = json.dumps(manifest.to_json(), indent=2, sort_keys=False).encode("utf-8")
    atomic_write_bytes(Path(folder) / MANIFEST_NAME, data)


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LibraryError(
            f"No NoiseQuery library at {folder}: {MANIFEST_NAME} is missing. "
            "Create one with `python -m noisequery_core import <images> --library <dir>` or the BuildNoiseLibrary node."
        ) from None
    except OSError as exc:
        raise LibraryError(f"Cannot read {path}: {exc}") from exc
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LibraryError(f"{path} is not valid JSON ({exc}); the manifest is damaged.") from exc
    if not isinstance(d, dict):
        raise LibraryError(f"{path} does not hold a JSON object; the manifest is damaged.")
    return Manifest.from_json(d, path)
