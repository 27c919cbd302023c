"""The library manifest: schema version, generation key, feature set and committed row count."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from ..errors import LibraryError, SchemaVersionError
from . import safefs

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
    # What the host detected the model as, e.g. "SDXL:eps", "Flux:flux" (nodes/sampling.py model_family); "" when
    # unknown (libraries built before it was recorded, imports). Informational, so not part of equality: the model
    # hash and latent shape already separate families, and an older library of the same model stays extendable.
    family: str = field(default="", compare=False)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["latent_shape"] = list(self.latent_shape) if self.latent_shape else None
        d["extra"] = {k: v for k, v in self.extra}
        return d

    def describe(self) -> str:
        shape = "×".join(map(str, self.latent_shape)) if self.latent_shape else "?"
        return (
            f"model={self.model!r} family={self.family or '?'} hash={self.model_hash or '?'} latent={shape} noise={self.noise} "
            f"sampler={self.sampler or '?'}/{self.scheduler or '?'} steps={self.steps} cfg={self.cfg} "
            f"denoise={self.denoise} prompt={self.prompt!r} negative={self.negative_prompt!r}"
        )


_DEFAULT_GEN = GenerationKey()
_MISSING = object()


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
        """Build a manifest from parsed JSON, refusing any field outside its domain (LibraryError naming it)."""
        return _Schema(where).manifest(d)


# ------------------------------------------------------------------ strict schema

MAX_MANIFEST_BYTES = 4 << 20  # real manifests are a few KB; notes hold one import report
MAX_JSON_DEPTH = 16
MAX_COUNT = 1 << 40  # rows; far beyond any real library, small enough that count × row size cannot overflow
MAX_DIM = 1 << 16
MAX_TEXT = 1 << 20
MAX_THUMBNAIL_SIZE = 4096  # also the pixel bound when a thumbnail is decoded (storage.decode_thumbnail)
THUMBNAIL_FORMATS = ("webp", "jpg")  # the formats encode_thumbnail writes (library/storage.py); kept in sync
COLUMN_DTYPES = ("<u8", "<f4", "<f2", "<u2", "|u1")  # "<u2": the colour palette (search/palette.py)
_COLUMN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class _Schema:
    """Checks one parsed manifest field by field; the first bad field raises a LibraryError naming it."""

    def __init__(self, where: Path, *, writing: bool = False):
        self.where = where
        self.writing = writing

    def fail(self, name: str, value: Any, want: str) -> NoReturn:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        if self.writing:
            raise LibraryError(f"Cannot record {self.where}: field {name!r} would be {shown}, but it must be {want}.")
        raise LibraryError(
            f"{self.where}: field {name!r} is {shown}, but it must be {want}. The manifest is damaged or was edited "
            "by hand; restore it from the library's source, or rebuild the library."
        )

    def obj(self, d: Any, name: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            self.fail(name, d, "a JSON object")
        return d

    def get(self, d: dict[str, Any], key: str, name: str, default: Any = _MISSING) -> Any:
        if key in d:
            return d[key]
        if default is _MISSING:
            raise LibraryError(
                f"{self.where}: field {name!r} is missing; the manifest is damaged. Restore it from the library's "
                "source, or rebuild the library."
            )
        return default

    def int_(self, value: Any, name: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.fail(name, value, f"a whole number from {lo} to {hi}")
        return value

    def float_(self, value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, value, "a finite number")
        return float(value)

    def str_(self, value: Any, name: str, max_len: int = MAX_TEXT) -> str:
        if not isinstance(value, str) or len(value) > max_len:
            self.fail(name, value, f"text of at most {max_len} characters")
        return value

    def generation(self, d: Any) -> GenerationKey:
        d = self.obj(d, "generation")
        g = "generation."
        shape = self.get(d, "latent_shape", g + "latent_shape", None)
        if shape is not None:
            if not isinstance(shape, list) or len(shape) != 3:
                self.fail(g + "latent_shape", shape, "null or a list of three positive whole numbers [C, H, W]")
            shape = tuple(self.int_(x, g + "latent_shape", 1, MAX_DIM) for x in shape)
        extra = self.obj(self.get(d, "extra", g + "extra", {}), g + "extra")
        pairs = tuple(sorted((self.str_(k, g + "extra", 1024), self.str_(v, f"{g}extra.{k}")) for k, v in extra.items()))
        text = {
            k: self.str_(self.get(d, k, g + k, getattr(_DEFAULT_GEN, k)), g + k)
            for k in ("model", "model_hash", "noise", "sampler", "scheduler", "prompt", "negative_prompt")
        }
        # Absent in manifests written before families were recorded: those read as unknown ("").
        text["family"] = self.str_(self.get(d, "family", g + "family", ""), g + "family", 256)
        return GenerationKey(
            **text,
            latent_shape=shape,
            steps=self.int_(self.get(d, "steps", g + "steps", 0), g + "steps", 0, 1_000_000),
            cfg=self.float_(self.get(d, "cfg", g + "cfg", 0.0), g + "cfg"),
            denoise=self.float_(self.get(d, "denoise", g + "denoise", 1.0), g + "denoise"),
            extra=pairs,
        )

    def features(self, d: Any) -> FeatureSet:
        d = self.obj(d, "features")
        clip_d = self.get(d, "clip", "features.clip", None)
        clip = None
        if clip_d is not None:
            clip_d = self.obj(clip_d, "features.clip")
            clip = ClipIdentity(
                model=self.str_(self.get(clip_d, "model", "features.clip.model"), "features.clip.model", 1024),
                pretrained=self.str_(self.get(clip_d, "pretrained", "features.clip.pretrained"), "features.clip.pretrained", 4096),
                dim=self.int_(self.get(clip_d, "dim", "features.clip.dim"), "features.clip.dim", 1, MAX_DIM),
            )
        fmt = self.get(d, "thumbnail_format", "features.thumbnail_format", "webp")
        # The format becomes part of every thumbnail's file name: only the fixed list may pass.
        if fmt not in THUMBNAIL_FORMATS:
            self.fail("features.thumbnail_format", fmt, f"one of {', '.join(THUMBNAIL_FORMATS)}")
        return FeatureSet(
            clip=clip,
            color_version=self.int_(self.get(d, "color_version", "features.color_version"), "features.color_version", 1, 1_000_000),
            thumbnail_size=self.int_(self.get(d, "thumbnail_size", "features.thumbnail_size", 0), "features.thumbnail_size", 0, MAX_THUMBNAIL_SIZE),
            thumbnail_format=fmt,
        )

    def column(self, d: Any, i: int) -> ColumnSpec:
        name = f"columns[{i}]"
        d = self.obj(d, name)
        cname = self.get(d, "name", name + ".name")
        if not isinstance(cname, str) or not _COLUMN_NAME.match(cname):
            self.fail(name + ".name", cname, "a lower-case column name such as 'seeds'")
        dtype = self.get(d, "dtype", name + ".dtype")
        if dtype not in COLUMN_DTYPES:
            self.fail(name + ".dtype", dtype, f"one of {', '.join(COLUMN_DTYPES)}")
        shape = self.get(d, "shape", name + ".shape")
        if not isinstance(shape, list) or len(shape) > 4:
            self.fail(name + ".shape", shape, "a list of at most four positive whole numbers")
        return ColumnSpec(cname, dtype, tuple(self.int_(x, name + ".shape", 1, MAX_DIM) for x in shape))

    def manifest(self, d: Any) -> Manifest:
        d = self.obj(d, "(top level)")
        if d.get("format") != FORMAT_NAME:
            raise LibraryError(
                f"{self.where} is not a NoiseQuery library manifest (format={str(d.get('format'))[:80]!r}). Point "
                "NoiseQuery at a folder built by it (it holds manifest.json, seeds.bin, ...)."
            )
        version = d.get("schema_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise LibraryError(f"{self.where}: schema_version {str(version)[:40]!r} is not valid; the manifest is damaged.")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"{self.where} was written by a newer NoiseQuery (library schema {version}); this version reads "
                f"schema {SCHEMA_VERSION} and older. Update the NoiseQuery pack to open this library."
            )
        columns = self.get(d, "columns", "columns")
        if not isinstance(columns, list) or len(columns) > 64:
            self.fail("columns", columns, "a list of column descriptions")
        notes = self.get(d, "notes", "notes", {})
        if notes is None:
            notes = {}
        return Manifest(
            generation=self.generation(self.get(d, "generation", "generation")),
            features=self.features(self.get(d, "features", "features")),
            columns=tuple(self.column(c, i) for i, c in enumerate(columns)),
            count=self.int_(self.get(d, "count", "count"), "count", 0, MAX_COUNT),
            created=self.str_(self.get(d, "created", "created", ""), "created", 64),
            updated=self.str_(self.get(d, "updated", "updated", ""), "updated", 64),
            schema_version=version,
            notes=dict(self.obj(notes, "notes")),
        )


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _json_depth(value: Any) -> int:
    """Deepest nesting of lists and objects in parsed JSON (iterative: the input is untrusted)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((x, depth) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(raw: bytes, where: Path | str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Strict JSON for files from a library: finite numbers only, bounded nesting; LibraryError otherwise."""
    try:
        # json's C scanner raises RecursionError (it does not crash) on absurd nesting.
        value = json.loads(raw, parse_float=_finite_float, parse_constant=_refuse_constant)
    except RecursionError:
        raise LibraryError(f"{where} nests deeper than Python can parse (at most {max_depth} levels allowed); "
                           "the file is damaged or not NoiseQuery's.") from None
    except ValueError as exc:
        raise LibraryError(f"{where} is not valid JSON ({str(exc)[:200]}); the file is damaged.") from None
    depth = _json_depth(value)
    if depth > max_depth:
        raise LibraryError(f"{where} nests {depth} levels deep (at most {max_depth} allowed); the file is damaged or not NoiseQuery's.")
    return value


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix.

    Temp file (exclusive, never through a link) in the same folder, fsync, ``os.replace``,
    then fsync the folder (POSIX). OS errors become a LibraryError naming the file and the fix.
    """
    path = Path(path)
    safefs.atomic_write(path.parent, path.name, data, durable=durable)


def fsync_dir(folder: Path) -> None:
    safefs.fsync_dir(folder)


def encode_manifest(manifest: Manifest, path: Path) -> bytes:
    """The manifest's file bytes; LibraryError (naming the field) for anything readers would refuse."""
    d = manifest.to_json()
    # The same schema as on reading: nothing this version writes can be refused by it (a NaN
    # cfg, a negative count) and the file never holds a non-finite number.
    _Schema(path, writing=True).manifest(d)
    try:
        data = json.dumps(d, indent=2, sort_keys=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise LibraryError(f"Cannot record {path}: {exc} (the notes must be plain JSON with finite numbers).") from None
    if _json_depth(d) > MAX_JSON_DEPTH or len(data) > MAX_MANIFEST_BYTES:
        raise LibraryError(
            f"Cannot record {path}: the notes nest deeper than {MAX_JSON_DEPTH} levels or the manifest would exceed "
            f"{MAX_MANIFEST_BYTES} bytes, which readers refuse. Keep notes small and flat."
        )
    return data


def write_manifest(folder: Path, manifest: Manifest, *, durable: bool = True) -> None:
    data = encode_manifest(manifest, Path(folder) / MANIFEST_NAME)
    safefs.atomic_write(Path(folder), MANIFEST_NAME, data, durable=durable)


def read_manifest(folder: Path) -> Manifest:
    path = Path(folder) / MANIFEST_NAME
    if safefs.lstat(Path(folder), MANIFEST_NAME) is None:
        raise LibraryError(
            f"No NoiseQuery library at {folder}: {MANIFEST_NAME} is missing. "
            "Create one with `python -m noisequery_core import <images> --library <dir>` or the BuildNoiseLibrary node."
        )
    raw = safefs.read_bytes(Path(folder), MANIFEST_NAME, limit=MAX_MANIFEST_BYTES)
    d = parse_json(raw, path)
    if not isinstance(d, dict):
        raise LibraryError(f"{path} does not hold a JSON object; the manifest is damaged.")
    return Manifest.from_json(d, path)
