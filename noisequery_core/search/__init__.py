"""Searching a library: per-image features (colour statistics, CLIP embeddings), the ANN index, queries.

Modules: ``color`` (statistics, layout, regions, colour versions), ``palette`` (per-image palettes and the
"how much of the image is this colour" score), ``colorspace`` (CIELAB, CIEDE2000), ``clip`` (open_clip models and weights),
``features`` (image → row), ``index`` (faiss over the CLIP column), ``terms`` (one small class per query term), ``query`` (the searcher that composes terms into hits).
Import from the modules.
"""
