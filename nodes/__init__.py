"""ComfyUI glue for NoiseQuery (V3 API): thin nodes over noisequery_core.

NODE_CLASSES lists every io.ComfyNode subclass the pack registers. The nodes themselves
(BuildNoiseLibrary, NoiseQueryText, NoiseQueryColor, HighlightScribbleGuide, …) arrive
with their issues; until then the pack loads cleanly and registers none.
"""

from __future__ import annotations

NODE_CLASSES: list[type] = []
