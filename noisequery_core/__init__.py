"""NoiseQuery core: an on-disk library of seeds with image features, and queries over it.

Host-independent: never imports ComfyUI. The public API:

    Library.open / Library.create      the on-disk library (storage.py)
    import_folder                      seed-named images → library (ingest.py)
    Query, Searcher, search            text / colour / layout queries (query.py)
    verify, merge                      upkeep (maintenance.py)
    ClipSpec, load_clip                CLIP models through open_clip (clip.py)
"""

from __future__ import annotations

from .clip import ClipEmbedder, ClipSpec, load_clip
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
from .features import FeatureExtractor, feature_set
from .ingest import ImportReport, import_folder, parse_seed_name
from .maintenance import MergeReport, VerifyReport, merge, verify
from .manifest import NOISE_COMFYUI_CPU, NOISE_UNKNOWN, ClipIdentity, FeatureSet, GenerationKey
from .query import Hit, Query, RegionTarget, Searcher, StatTarget, search
from .storage import SEED_MAX, Library

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
