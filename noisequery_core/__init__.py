"""NoiseQuery core: an on-disk library of seeds with image features, and queries over it.

Host-independent: never imports ComfyUI. The public API:

    Library.open / Library.create      the on-disk library (library/storage.py)
    import_folder                      seed-named images → library (library/ingest.py)
    Query, Searcher, search            text / colour / layout queries (search/query.py)
    verify, merge                      upkeep (library/maintenance.py)
    ClipSpec, load_clip                CLIP models through open_clip (search/clip.py)

Packages, one per system: ``library`` (the seed library on disk), ``search`` (features, index,
queries), ``guidance`` (highlight strokes → attention), ``directions`` (NoiseCLR), ``exploration``
(interpolation, variation explorer, ranking). Shared: ``errors``, ``noise`` (KSampler's initial
noise), ``work`` (the progress/cancel contract of long work).
"""

from __future__ import annotations

from .errors import (
    Cancelled,
    IncompatibleLibraryError,
    LibraryError,
    LibraryLockedError,
    MissingDependencyError,
    ModelError,
    NoiseQueryError,
    QueryError,
    SchemaVersionError,
)
from .library.ingest import ImportReport, import_folder, parse_seed_name
from .library.maintenance import MergeReport, VerifyReport, merge, verify
from .library.manifest import NOISE_COMFYUI_CPU, NOISE_UNKNOWN, ClipIdentity, FeatureSet, GenerationKey
from .library.storage import SEED_MAX, Library
from .search.clip import ClipEmbedder, ClipSpec, load_clip
from .search.features import FeatureExtractor, feature_set
from .search.query import Hit, Query, RegionTarget, Searcher, StatTarget, search

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "ClipEmbedder",
    "ClipIdentity",
    "ClipSpec",
    "FeatureExtractor",
    "FeatureSet",
    "GenerationKey",
    "Hit",
    "ImportReport",
    "IncompatibleLibraryError",
    "Library",
    "LibraryError",
    "LibraryLockedError",
    "MergeReport",
    "MissingDependencyError",
    "ModelError",
    "NOISE_COMFYUI_CPU",
    "NOISE_UNKNOWN",
    "NoiseQueryError",
    "Query",
    "QueryError",
    "RegionTarget",
    "SEED_MAX",
    "SchemaVersionError",
    "Searcher",
    "StatTarget",
    "VerifyReport",
    "feature_set",
    "import_folder",
    "load_clip",
    "merge",
    "parse_seed_name",
    "search",
    "verify",
]
