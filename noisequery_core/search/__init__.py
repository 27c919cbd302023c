"""Searching a library: per-image features (colour statistics, CLIP embeddings), the ANN index, queries.

Modules: ``color`` (statistics, histogram, layout, regions), ``clip`` (open_clip models and weights),
``features`` (image → row), ``index`` (faiss over the CLIP column), ``query`` (terms, scoring, hits).
Import from the modules.
"""
