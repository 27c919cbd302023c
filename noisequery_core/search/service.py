"""The library browser's service: HTTP-shaped requests (parsed JSON) → validated queries → pages of hits.

Host-independent (the aiohttp glue is nodes/server_routes.py): the service takes the registered
library roots and a loader for a library's CLIP text encoder as callables. Everything a client sends
is checked here first — types, ranges, NaN, colour syntax, page sizes, library names (through
``library/paths.resolve_library``, exactly as the nodes confine them) — and refused with a
``QueryError``/``LibraryError`` whose message names the field, so the glue can answer 400.
Thumbnails are found by library name + seed only; no client string ever becomes a path.

The text encoder is loaded once per CLIP identity and repeated texts are answered from a cache;
ranked hits of a query are cached so that scrolling (the next page) costs no new search.

"Like this image" for an uploaded picture: the image is posted once (``add_example``: raw PNG/JPEG/WebP bytes,
at most EXAMPLE_BYTES_MAX) and answered with an opaque handle, the hash of its bytes; a query names it as
``like_image: {"id": …, "weight": …}``. So typing and scrolling resend a few bytes, not the picture, and the
picture is decoded, checked and colour-analysed once, and embedded once per CLIP model.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LibraryError, NoiseQueryError, QueryError
from ..imaging import to_rgb8
from ..library.manifest import ClipIdentity
from ..library.paths import list_libraries, resolve_library
from ..library.storage import SEED_MAX, Library
from . import color, palette
from .clip import ShortTextEncoder
from .colorspace import parse_hex_color
from .query import Hit, Query, RegionTarget, Searcher, StatTarget, TextEncoder

PAGE_MAX = 96  # hits per page at most (the panel asks for 48)
RANK_MAX = 10_000  # = query._MAX_TOP_K: offset + limit may not pass it
WEIGHT_MAX = 10.0  # = the query nodes' weight inputs (nodes/search_nodes.py)
TEXT_MAX = 1000  # characters of a text or negative text
COLORS_MAX = 8
REGIONS_MAX = 4
EXCLUDE_MAX = 1000
BODY_MAX = 64 * 1024  # bytes of a query request; the glue refuses larger bodies unread
TEXT_CACHE = 256  # encoded texts kept per text encoder
RESULT_CACHE = 32  # ranked queries kept (for the next pages)
THUMB_MIME = {"webp": "image/webp", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
# Uploaded examples ("like this image"): only this route's body may be this large (the glue checks it unread).
EXAMPLE_BYTES_MAX = 8 * 1024 * 1024
EXAMPLE_PIXELS_MAX = 40_000_000  # width × height as the file declares it, checked before any pixel is decoded
EXAMPLE_SIDE_MAX = 16_384
EXAMPLE_KEEP_SIDE = 512  # the kept copy's short side: CLIP sees 224 px, the colour analysis 256 px
EXAMPLE_CACHE = 16  # uploaded examples kept (each ≤ ~1 MB); an older handle gets ExampleGoneError
EXAMPLE_ID_LEN = 32  # hex digits of the SHA-256 of the uploaded bytes: the example's handle
EXAMPLE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

_QUERY_KEYS = {"library", "text", "negative_text", "text_weight", "negative_weight", "colors", "stats", "regions",
               "like", "like_image", "exclude_seeds", "offset", "limit"}


# ---------------------------------------------------------------- field checks (every message names the field)


def _bad(field: str, problem: str, fix: str = "") -> QueryError:
    return QueryError(f"Request field '{field}' {problem}." + (f" {fix}" if fix else ""))


def _obj(value: Any, field: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(field, f"must be a JSON object, not {type(value).__name__}")
    unknown = sorted(set(value) - keys)
    if unknown:
        raise _bad(field, f"has unknown member(s) {', '.join(map(repr, unknown[:5]))}", f"Known: {', '.join(sorted(keys))}.")
    return value


def _str(value: Any, field: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise _bad(field, f"must be a string, not {type(value).__name__}")
    if len(value) > max_len:
        raise _bad(field, f"is {len(value)} characters long; at most {max_len} are allowed")
    if "\x00" in value:
        raise _bad(field, "contains a NUL character")
    return value


def _num(value: Any, field: str, lo: float, hi: float) -> float:
    # bool is an int in Python but never a number a user meant; NaN/inf pass every range test
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(field, f"must be a number, not {type(value).__name__} ({str(value)[:40]!r})")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise _bad(field, f"is {value}, not a finite number")
    if not lo <= v <= hi:
        raise _bad(field, f"is {v:g}, outside {lo:g}..{hi:g}")
    return v


def _int(value: Any, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _bad(field, f"must be a whole number, not {type(value).__name__} ({str(value)[:40]!r})")
    if not lo <= value <= hi:
        raise _bad(field, f"is {value}, outside {lo}..{hi}")
    return int(value)


def _color(value: Any, field: str) -> str:
    text = _str(value, field, 16).strip()
    try:
        parse_hex_color(text)
    except QueryError:
        raise _bad(field, f"is {text!r}, not a colour", "Write it as '#RRGGBB', e.g. '#FF8800'.") from None
    return text


def _list(value: Any, field: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise _bad(field, f"must be a JSON list, not {type(value).__name__}")
    if len(value) > max_len:
        raise _bad(field, f"has {len(value)} items; at most {max_len} are allowed")
    return value


def parse_seed(value: Any, field: str = "seed") -> int:
    """A seed from a JSON number or a query-string text: a whole number in 0..SEED_MAX, else QueryError."""
    if isinstance(value, str):
        s = value.strip()
        if not s.isdigit() or len(s) > 20:
            raise _bad(field, f"is {value[:40]!r}, not a seed number", f"Give a whole number 0..{SEED_MAX}.")
        value = int(s)
    return _int(value, field, 0, SEED_MAX)


# ---------------------------------------------------------------- the parsed request


@dataclass(frozen=True)
class Like:
    """"More like this": a library entry whose CLIP embedding (or colour layout, colour-only) is a target."""

    seed: int
    weight: float = 1.0


@dataclass(frozen=True)
class LikeImage:
    """"Like this image": an uploaded example (by the handle ``add_example`` returned) as a target."""

    id: str
    weight: float = 1.0


@dataclass(frozen=True)
class QueryRequest:
    """A validated query request: which library, what to look for, which page."""

    library: str
    query: Query
    like: Like | None
    like_image: LikeImage | None
    offset: int
    limit: int
    key: str  # canonical text of everything that decides the ranking (the result cache's key)


def parse_query_request(body: Any) -> QueryRequest:
    """Check a query request (parsed JSON) field by field. Raises QueryError naming the first bad field."""
    d = _obj(body, "request", _QUERY_KEYS)
    if "library" not in d:
        raise _bad("library", "is missing", "Name a library from GET /noisequery/libraries.")
    library = _str(d["library"], "library", 200)
    text = _str(d.get("text", ""), "text", TEXT_MAX)
    negative = _str(d.get("negative_text", ""), "negative_text", TEXT_MAX)
    text_w = _num(d.get("text_weight", 1.0), "text_weight", 0.0, WEIGHT_MAX)
    neg_w = _num(d.get("negative_weight", 0.5), "negative_weight", 0.0, WEIGHT_MAX)
    colors = []
    for i, c in enumerate(_list(d.get("colors", []), "colors", COLORS_MAX)):
        c = _obj(c, f"colors[{i}]", {"color", "weight"})
        if "color" not in c:
            raise _bad(f"colors[{i}].color", "is missing")
        colors.append((_color(c["color"], f"colors[{i}].color"), _num(c.get("weight", 1.0), f"colors[{i}].weight", 0.0, WEIGHT_MAX)))
    stats = []
    seen: set[str] = set()
    for i, s in enumerate(_list(d.get("stats", []), "stats", len(color.STATS))):
        s = _obj(s, f"stats[{i}]", {"name", "target", "lo", "hi", "weight"})
        name = _str(s.get("name", ""), f"stats[{i}].name", 32)
        spec = next((st for st in color.STATS if st.name == name), None)
        if spec is None:
            raise _bad(f"stats[{i}].name", f"is {name!r}, not a statistic", f"Use one of {', '.join(color.STAT_NAMES)}.")
        if name in seen:
            raise _bad(f"stats[{i}].name", f"repeats {name!r}")
        seen.add(name)
        vals = {k: None if s.get(k) is None else _num(s[k], f"stats[{i}].{k}", spec.lo, spec.hi) for k in ("target", "lo", "hi")}
        if vals["target"] is None and vals["lo"] is None and vals["hi"] is None:
            raise _bad(f"stats[{i}]", f"({name}) has neither a target nor a range", "Give 'target', or 'lo' and/or 'hi'.")
        if vals["target"] is not None and (vals["lo"] is not None or vals["hi"] is not None):
            raise _bad(f"stats[{i}]", f"({name}) has both a target and a range; give one of them")
        if vals["lo"] is not None and vals["hi"] is not None and vals["lo"] > vals["hi"]:
            raise _bad(f"stats[{i}]", f"({name}) has lo {vals['lo']:g} above hi {vals['hi']:g}")
        stats.append(StatTarget(name, target=vals["target"], lo=vals["lo"], hi=vals["hi"],
                                weight=_num(s.get("weight", 1.0), f"stats[{i}].weight", 0.0, WEIGHT_MAX)))
    regions = []
    for i, r in enumerate(_list(d.get("regions", []), "regions", REGIONS_MAX)):
        r = _obj(r, f"regions[{i}]", {"region", "color", "lightness", "weight"})
        name = _str(r.get("region", ""), f"regions[{i}].region", 32)
        if name not in color.REGION_NAMES:
            raise _bad(f"regions[{i}].region", f"is {name!r}, not a region", f"Use one of {', '.join(color.REGION_NAMES)}.")
        col = None if r.get("color") in (None, "") else _color(r["color"], f"regions[{i}].color")
        light = None if r.get("lightness") is None else _num(r["lightness"], f"regions[{i}].lightness", 0.0, 1.0)
        if col is None and light is None:
            raise _bad(f"regions[{i}]", f"({name}) has neither a colour nor a lightness")
        regions.append(RegionTarget(name, color=col, lightness=light,
                                    weight=_num(r.get("weight", 1.0), f"regions[{i}].weight", 0.0, WEIGHT_MAX)))
    like = None
    if d.get("like") is not None:
        lk = _obj(d["like"], "like", {"seed", "weight"})
        if "seed" not in lk:
            raise _bad("like.seed", "is missing", "Give the seed of a library entry.")
        like = Like(parse_seed(lk["seed"], "like.seed"), _num(lk.get("weight", 1.0), "like.weight", 0.0, WEIGHT_MAX))
    like_image = None
    if d.get("like_image") is not None:
        li = _obj(d["like_image"], "like_image", {"id", "weight"})
        ident = _str(li.get("id", ""), "like_image.id", 64)
        if len(ident) != EXAMPLE_ID_LEN or any(c not in "0123456789abcdef" for c in ident):
            raise _bad("like_image.id", f"is {ident[:40]!r}, not an example handle",
                       "Upload the image with POST /noisequery/example and use the 'id' it answers.")
        like_image = LikeImage(ident, _num(li.get("weight", 1.0), "like_image.weight", 0.0, WEIGHT_MAX))
        if like is not None:
            raise _bad("like_image", "comes with 'like'", "Give one example: a hit ('like') or an uploaded image.")
    exclude = tuple(parse_seed(v, f"exclude_seeds[{i}]") for i, v in enumerate(_list(d.get("exclude_seeds", []), "exclude_seeds", EXCLUDE_MAX)))
    limit = _int(d.get("limit", 48), "limit", 1, PAGE_MAX)
    offset = _int(d.get("offset", 0), "offset", 0, RANK_MAX - limit)
    query = Query(text=text, text_weight=text_w, negative_text=negative, negative_weight=neg_w, colors=tuple(colors),
                  stats=tuple(stats), regions=tuple(regions), exclude_seeds=exclude, top_k=offset + limit)
    if not (query.has_clip_terms or query.has_color_terms or like is not None or like_image is not None):
        raise QueryError("The query is empty: type a text, pick a colour, set a statistic or a region, choose "
                         "'more like this' on a hit, or upload an example image.")
    # an example's id is the hash of its bytes, so a cached ranking for it stays right
    key = json.dumps([library.strip(), text, negative, text_w, neg_w, colors, [vars(s) for s in stats],
                      [vars(r) for r in regions], None if like is None else vars(like),
                      None if like_image is None else vars(like_image), sorted(exclude)])
    return QueryRequest(library, query, like, like_image, offset, limit, key)


# ---------------------------------------------------------------- uploaded examples

class ExampleGoneError(QueryError):
    """A query names an uploaded example the server no longer keeps (evicted, or the server restarted)."""


@dataclass
class Example:
    """An uploaded example image, decoded and checked: a bounded RGB copy, its colour layout and palette, CLIP
    embeddings."""

    id: str
    image: Any  # PIL.Image.Image, 8-bit RGB, short side ≤ EXAMPLE_KEEP_SIDE
    width: int  # as uploaded (after the EXIF turn)
    height: int
    format: str
    layout: np.ndarray  # uint8 [GRID, GRID, 3]: the same colour analysis as every library entry
    embeddings: dict[ClipIdentity, np.ndarray]
    palette: tuple[tuple[str, float], ...] = ()  # ('#RRGGBB', share of the whole image), largest first


def decode_example(data: bytes) -> Example:
    """Decode an uploaded example (PNG, JPEG or WebP bytes) the way ``imaging.load_image`` decodes a file.

    Upright by EXIF, 16-bit and float by their real range (``imaging.to_rgb8``). Refused with a QueryError that
    says why: empty or oversize data, not one of the three formats, declared dimensions past EXAMPLE_SIDE_MAX
    or EXAMPLE_PIXELS_MAX (checked from the header, before any pixel is decoded: a decompression bomb
    never expands), a truncated or corrupt file, pixels with no picture.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise QueryError("The uploaded example is empty; send the bytes of a PNG, JPEG or WebP image.")
    if len(data) > EXAMPLE_BYTES_MAX:
        raise QueryError(f"The uploaded example is {len(data)} bytes; at most {EXAMPLE_BYTES_MAX} are accepted. "
                         "Send a smaller PNG, JPEG or WebP.")
    fix = "Send a PNG, JPEG or WebP image."
    try:
        with Image.open(io.BytesIO(data), formats=list(EXAMPLE_FORMATS)) as im:
            w, h = im.size
            if w < 1 or h < 1 or w > EXAMPLE_SIDE_MAX or h > EXAMPLE_SIDE_MAX or w * h > EXAMPLE_PIXELS_MAX:
                raise QueryError(f"The uploaded example declares {w}×{h} pixels; at most {EXAMPLE_SIDE_MAX} per side "
                                 f"and {EXAMPLE_PIXELS_MAX // 1_000_000} megapixels are accepted. Send a smaller image.")
            fmt = str(im.format)
            im.load()
            upright = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise QueryError(f"The uploaded example is not an image this server reads. {fix}") from None
    except Image.DecompressionBombError as exc:
        raise QueryError(f"The uploaded example is too large to decode ({exc}). Send a smaller image.") from None
    except (OSError, ValueError, SyntaxError) as exc:  # Pillow's truncated / corrupt file errors
        raise QueryError(f"The uploaded example cannot be decoded ({exc}); it may be truncated or damaged. {fix}") from None
    try:
        rgb = to_rgb8(upright, where="the uploaded example")
    except NoiseQueryError as exc:
        raise QueryError(str(exc)) from None
    width, height = rgb.size
    short = min(width, height)
    if short > EXAMPLE_KEEP_SIDE:  # keep a bounded copy: the encoders downscale further anyway
        scale = EXAMPLE_KEEP_SIDE / short
        rgb = rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
    layout, pal = color.example_targets(rgb)
    ident = hashlib.sha256(data).hexdigest()[:EXAMPLE_ID_LEN]
    return Example(ident, rgb, width, height, fmt, layout, {}, pal)


def encode_example_image(model: Any, image: Any) -> np.ndarray:
    """CLIP embedding [dim] of a PIL image with a ClipEmbedder-like model (``preprocess``, ``encode_images``)."""
    pixels = model.preprocess(image)
    return np.asarray(model.encode_images(pixels[None])[0], dtype=np.float32)


# ---------------------------------------------------------------- caches


class CachedTextEncoder:
    """A text encoder that remembers its last ``TEXT_CACHE`` texts (typing re-sends the same prefix texts)."""

    def __init__(self, inner: TextEncoder, size: int = TEXT_CACHE):
        self.inner = inner
        self.identity = inner.identity
        self._size = size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def encode_text(self, texts: list[str]) -> np.ndarray:
        out: list[np.ndarray | None] = []
        with self._lock:
            for t in texts:
                v = self._cache.get(t)
                if v is not None:
                    self._cache.move_to_end(t)
                    self.hits += 1
                out.append(v)
        todo = [t for t, v in zip(texts, out) if v is None]
        if todo:
            new = self.inner.encode_text(todo)
            self.misses += len(todo)
            with self._lock:
                for t, v in zip(todo, new):
                    self._cache[t] = np.asarray(v, dtype=np.float32)
                    while len(self._cache) > self._size:
                        self._cache.popitem(last=False)
            it = iter(new)
            out = [v if v is not None else next(it) for v in out]
        return np.stack([np.asarray(v, dtype=np.float32) for v in out])


@dataclass
class _Entry:
    """One library folder as the service keeps it: its Searcher, guarded by a lock (a Searcher is not thread-safe)."""

    searcher: Searcher
    stamp: tuple[int, int]  # manifest.json (mtime_ns, size): a change reloads (rebuilt / upgraded library)
    lock: threading.Lock


class LibraryService:
    """Lists libraries, answers query requests page by page, serves thumbnails by library + seed.

    ``roots()`` gives the registered noise_libraries folders (read on every request, so a folder added
    in extra_model_paths.yaml and a library built meanwhile show up); ``load_encoder(identity)`` loads
    the CLIP text encoder for a library's CLIP identity (called once per identity) or raises.
    Thread-safe: the host calls it from worker threads, off its event loop.
    """

    def __init__(self, roots: Callable[[], Sequence[str | Path]],
                 load_encoder: Callable[[ClipIdentity], TextEncoder] | None = None):
        self._roots = roots
        self._load_encoder = load_encoder
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._models: dict[ClipIdentity, Any] = {}  # as loaded: the image path ("like this image") uses it
        self._encoders: dict[ClipIdentity, CachedTextEncoder] = {}
        self._encoder_lock = threading.Lock()
        self._examples: OrderedDict[str, Example] = OrderedDict()
        self._results: OrderedDict[str, tuple[tuple[Any, ...], list[Hit], bool]] = OrderedDict()

    # -- libraries
    def _path(self, name: str) -> Path:
        return resolve_library(list(self._roots()), name, must_exist=True)

    def _entry(self, name: str) -> _Entry:
        path = self._path(name)
        try:
            st = (path / "manifest.json").stat()
        except OSError as exc:
            raise LibraryError(f"Library {name!r}: its manifest cannot be read ({exc.strerror}).") from None
        stamp = (st.st_mtime_ns, st.st_size)
        key = str(path)
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.stamp != stamp:
                lib = Library.open(path)
                # same library grown: keep the Searcher (it follows appends); rebuilt under the name: a new one
                if e is None or lib.manifest.created != e.searcher.library.manifest.created:
                    e = _Entry(Searcher(lib), stamp, threading.Lock())
                    self._entries[key] = e
                e.stamp = stamp
            return e

    def libraries(self) -> dict[str, Any]:
        """Every library under the roots with what the panel shows; a library that cannot be opened says why."""
        out = []
        for name in list_libraries(list(self._roots())):
            item: dict[str, Any] = {"name": name}
            try:
                entry = self._entry(name)
                with entry.lock:  # refresh() swaps the manifest and caches a running search may be reading
                    lib = entry.searcher.library
                    lib.refresh()
                    out.append({**item, **describe(lib)})
            except NoiseQueryError as exc:
                out.append({**item, "status": "error", "message": str(exc)})
        return {"libraries": out, "page_max": PAGE_MAX, "rank_max": RANK_MAX, "weight_max": WEIGHT_MAX,
                "stats": [{"name": s.name, "lo": s.lo, "hi": s.hi, "doc": s.doc} for s in color.STATS],
                "regions": list(color.REGION_NAMES)}

    def _model(self, identity: ClipIdentity) -> Any:
        with self._encoder_lock:  # one load per identity, even when two first requests race
            model = self._models.get(identity)
            if model is None:
                if self._load_encoder is None:
                    raise QueryError(f"No CLIP encoder is available for {identity.describe()}.")
                model = self._models[identity] = self._load_encoder(identity)
            return model

    def _encoder(self, identity: ClipIdentity) -> CachedTextEncoder:
        inner = self._model(identity)
        with self._encoder_lock:
            enc = self._encoders.get(identity)
            if enc is None:
                enc = CachedTextEncoder(ShortTextEncoder(inner) if ShortTextEncoder.applies(inner) else inner)
                self._encoders[identity] = enc
            return enc

    # -- uploaded examples ("like this image")
    def add_example(self, data: bytes) -> dict[str, Any]:
        """Decode and keep an uploaded example image; answers its handle. Raises QueryError for a bad upload."""
        ident = hashlib.sha256(data).hexdigest()[:EXAMPLE_ID_LEN] if data else ""
        with self._lock:
            ex = self._examples.get(ident)
            if ex is not None:
                self._examples.move_to_end(ident)
        if ex is None:
            ex = decode_example(data)
            with self._lock:
                self._examples[ex.id] = ex
                while len(self._examples) > EXAMPLE_CACHE:
                    self._examples.popitem(last=False)
        return {"id": ex.id, "width": ex.width, "height": ex.height, "format": ex.format}

    def _example(self, ident: str) -> Example:
        with self._lock:
            ex = self._examples.get(ident)
            if ex is not None:
                self._examples.move_to_end(ident)
                return ex
        raise ExampleGoneError(f"Request field 'like_image.id' names example {ident!r}, which this server no longer "
                               "keeps (it keeps the last few uploads; a restart forgets them). Upload the image again.")

    def _example_embedding(self, ex: Example, identity: ClipIdentity) -> np.ndarray:
        emb = ex.embeddings.get(identity)
        if emb is None:
            model = self._model(identity)
            if not callable(getattr(model, "encode_images", None)) or getattr(model, "preprocess", None) is None:
                raise QueryError(f"The CLIP model {identity.describe()} has no image encoder here; "
                                 "'like this image' needs one.")
            emb = encode_example_image(model, ex.image)
            if emb.shape != (identity.dim,) or not np.isfinite(emb).all():
                raise QueryError(f"The CLIP image encoder gave an embedding of shape {emb.shape} for the example; "
                                 f"the library's CLIP {identity.describe()} has {identity.dim} dimensions.")
            ex.embeddings[identity] = emb  # one embedding per model and example; a race only repeats the work
        return emb

    def _with_like_image(self, lib: Library, query: Query, like: LikeImage) -> tuple[Query, list[str]]:
        """The example as a CLIP image target (library with CLIP) and, with current colour features, as a colour
        layout target (its colours where they are) and a palette target (its colours in its proportions, wherever
        they are: a photo with the same colours arranged differently still matches), each at half the example's
        weight so the colour side weighs as much as CLIP. Returns the query and what was used."""
        ex = self._example(like.id)
        used = []
        feats = lib.features
        if feats.clip is not None:
            query = replace(query, image_embedding=self._example_embedding(ex, feats.clip), image_weight=like.weight)
            used.append("clip")
        if feats.color_version == color.COLOR_VERSION:
            query = _with_colour_example(query, ex.layout, ex.palette, like.weight)
            used += ["colour", "palette"] if ex.palette else ["colour"]
        return query, used

    # -- queries
    def query(self, body: Any) -> dict[str, Any]:
        """Answer a query request (parsed JSON). Raises QueryError/LibraryError with a message for the user."""
        t0 = time.perf_counter()
        req = parse_query_request(body)
        entry = self._entry(req.library)
        with entry.lock:
            searcher = entry.searcher
            lib = searcher.library
            lib.refresh()
            if lib.count == 0:
                raise QueryError(f"Library {req.library!r} is empty: build it (BuildNoiseLibrary) or import images first.")
            query = req.query
            if req.like is not None:
                query = _with_like(lib, query, req.like, req.library)
            example_by: list[str] = []
            if req.like_image is not None:
                query, example_by = self._with_like_image(lib, query, req.like_image)
                if not example_by:
                    raise QueryError(f"Library {req.library!r} has neither CLIP features nor current colour features, "
                                     "so it cannot compare an example image. Upgrade it with `python -m "
                                     "noisequery_core upgrade --library <folder>`.")
            if query.has_clip_terms and lib.features.clip is None:
                raise QueryError(f"Library {req.library!r} is colour-only (built with CLIP model 'none'): it cannot answer "
                                 "text or 'like this' queries by CLIP. Use colours, statistics and regions.")
            if query.has_color_terms and lib.features.color_version != color.COLOR_VERSION:
                raise QueryError(f"Library {req.library!r} has colour features of version {lib.features.color_version}; "
                                 f"colour queries need version {color.COLOR_VERSION}. Upgrade it with `python -m "
                                 "noisequery_core upgrade --library <folder>` (text queries work meanwhile).")
            if (query.text.strip() or query.negative_text.strip()) and searcher.embedder is None:
                assert lib.features.clip is not None
                searcher.embedder = self._encoder(lib.features.clip)
            want = min(req.offset + req.limit, lib.count)
            stamp = (str(lib.path), lib.manifest.created, lib.count)
            hits, exhausted, cached = self._cached(req.key, stamp, want)
            if hits is None:
                # exactly as deep as asked: a text query costs about in proportion to its depth, and typing
                # (first pages) matters more than scrolling; a page asked again is served from the cache
                hits = searcher.search(replace(query, top_k=max(want, 1)))
                exhausted = len(hits) < want or want >= lib.count
                self._remember(req.key, stamp, hits, exhausted)
            page = hits[req.offset: req.offset + req.limit]
            return {
                "library": req.library,
                "count": lib.count,
                "offset": req.offset,
                "limit": req.limit,
                "hits": [_hit_json(h, req.offset + i) for i, h in enumerate(page)],
                "has_more": req.offset + req.limit < (len(hits) if exhausted else min(lib.count, RANK_MAX)),
                "cached": cached,
                # how an uploaded example was compared ("clip", "colour"): the panel says which was used
                "example_by": example_by,
                "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2),
            }

    def _cached(self, key: str, stamp: tuple[Any, ...], want: int) -> tuple[list[Hit] | None, bool, bool]:
        with self._lock:
            got = self._results.get(key)
            if got is not None and got[0] == stamp and (len(got[1]) >= want or got[2]):
                self._results.move_to_end(key)
                return got[1], got[2], True
        return None, False, False

    def _remember(self, key: str, stamp: tuple[Any, ...], hits: list[Hit], exhausted: bool) -> None:
        with self._lock:
            self._results[key] = (stamp, hits, exhausted)
            while len(self._results) > RESULT_CACHE:
                self._results.popitem(last=False)

    # -- thumbnails
    def thumbnail(self, library: Any, seed: Any) -> tuple[bytes, str]:
        """(encoded thumbnail, MIME type) of ``seed`` in ``library``: found by name and seed only, read without links."""
        name = _str(library, "library", 200)
        s = parse_seed(seed)
        entry = self._entry(name)
        lib = entry.searcher.library
        if not lib.features.thumbnail_size:
            raise LibraryError(f"Library {name!r} was built without thumbnails (thumbnail_size 0).")
        data = lib.read_thumbnail_bytes(s)
        if data is None:
            raise LookupError(f"Library {name!r} has no thumbnail for seed {s} (not one of its entries).")
        return data, THUMB_MIME.get(lib.features.thumbnail_format, "application/octet-stream")


def describe(lib: Library) -> dict[str, Any]:
    """What the panel shows about a library and whether it can answer text / colour queries (and why not)."""
    gen, feats = lib.generation, lib.features
    shape = gen.latent_shape
    notes = []
    status = "ok"
    if lib.count == 0:
        status = "empty"
        notes.append("This library has no entries yet: build it with BuildNoiseLibrary or import images.")
    if feats.clip is None:
        notes.append("Colour-only library (no CLIP): search by colours, statistics and regions; text and "
                     "'like this' by CLIP are not available.")
    if feats.color_version != color.COLOR_VERSION:
        status = "needs_upgrade" if status == "ok" else status
        notes.append(f"Colour features are version {feats.color_version}; colour queries need version "
                     f"{color.COLOR_VERSION}: run `python -m noisequery_core upgrade --library {lib.path}`."
                     + (" Text queries work meanwhile." if feats.clip is not None else ""))
    return {
        "status": status,
        "count": lib.count,
        "model": gen.model,
        "width": shape[2] * 8 if shape else None,
        "height": shape[1] * 8 if shape else None,
        "clip": feats.clip.describe() if feats.clip else None,
        "text": feats.clip is not None,
        "color": feats.color_version == color.COLOR_VERSION,
        "thumbnails": bool(feats.thumbnail_size),
        "thumbnail_size": feats.thumbnail_size,
        "version": lib.manifest.created,  # changes when the library is rebuilt under the same name
        "notes": notes,
    }


def _with_like(lib: Library, query: Query, like: Like, name: str) -> Query:
    """'More like this': the entry's CLIP embedding as an example image; in a colour-only library its colour layout
    and (current colour features) its palette, half the weight each, as an uploaded example is compared."""
    row = int(lib.rows_of([like.seed])[0])
    if row < 0:
        raise _bad("like.seed", f"is {like.seed}, which is not an entry of library {name!r}")
    if lib.features.clip is not None:
        emb = np.asarray(lib.column("clip")[row], dtype=np.float32)
        return replace(query, image_embedding=emb, image_weight=like.weight)
    layout = np.array(lib.column("layout")[row])
    pal: tuple[tuple[str, float], ...] = ()
    if lib.features.color_version == color.COLOR_VERSION:
        pal = tuple(palette.colours_of(lib.column("palette")[row], lib.column("palette_shares")[row][0],
                                       color.EXAMPLE_PALETTE_MIN_SHARE))
    return _with_colour_example(query, layout, pal, like.weight)


def _with_colour_example(query: Query, layout: np.ndarray, pal: tuple[tuple[str, float], ...], weight: float) -> Query:
    """An example's colour layout and palette as targets, half of ``weight`` each (all of it to the layout when
    there is no palette): the colour side of an example weighs as much as its CLIP side."""
    if not pal:
        return replace(query, layout=layout, layout_weight=weight)
    return replace(query, layout=layout, layout_weight=weight / 2, palette=pal, palette_weight=weight / 2)


def _hit_json(hit: Hit, rank: int) -> dict[str, Any]:
    # float() first: round() of a numpy scalar is ~30× slower than of a Python float (it showed in the profile)
    return {
        "rank": rank,
        "seed": str(hit.seed),  # as text: seeds pass 2^53, where JavaScript numbers lose digits
        "score": round(float(hit.score), 4),
        "terms": {k: {"raw": round(float(v.raw), 4), "z": round(float(v.z), 3), "weighted": round(float(v.weighted), 3)}
                  for k, v in hit.terms.items()},
    }
