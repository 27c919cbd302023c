"""ComfyUI glue for NoiseQuery (V3 API): thin nodes over noisequery_core.

NODE_CLASSES lists every io.ComfyNode subclass the pack registers (read by the root
__init__.py's ComfyExtension). Node ids are permanent: saved workflows store them.
"""

from __future__ import annotations

from . import _host
from .directions_nodes import NOISECLR_NODES
from .exploration_invariant_nodes import INVARIANT_NODES
from .exploration_rank_nodes import NoiseQueryRank
from .exploration_refine_nodes import NoiseQueryRefine
from .exploration_variation_nodes import NoiseQueryVariantPicker, NoiseQueryVariations
from .exploration_walk_nodes import NoiseQueryConditioningInterpolate, NoiseQuerySeedGrid, NoiseQuerySeedSlerp
from .guidance_nodes import HighlightScribbleGuide, NoiseQueryHighlightMask
from .influence_nodes import NoiseQuerySeedInfluence
from .library_nodes import BuildNoiseLibrary, NoiseQueryLibraryInfo
from .search_nodes import NoiseQueryColor, NoiseQueryText

_host.register_folders()

NODE_CLASSES: list[type] = [
    BuildNoiseLibrary, NoiseQueryText, NoiseQueryColor, NoiseQueryLibraryInfo,  # library and queries
    NoiseQuerySeedInfluence,  # before a build: does the seed steer this model?
    HighlightScribbleGuide, NoiseQueryHighlightMask,  # guide
    NoiseQuerySeedSlerp, NoiseQuerySeedGrid, NoiseQueryConditioningInterpolate,  # infinite index
    NoiseQueryVariations, NoiseQueryVariantPicker, NoiseQueryRank, NoiseQueryRefine,
    *NOISECLR_NODES,  # NoiseCLR
    *INVARIANT_NODES,  # seed-invariant prompt
]
