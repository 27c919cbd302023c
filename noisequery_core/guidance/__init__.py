"""Highlight ("scribble") guidance: strokes → soft region maps → cross-attention bias and refocusing.

Modules, in the order the data flows: ``strokes`` (the widget's JSON and mask highlights → one
``Highlight`` per phrase), ``regions`` (soft maps at any grid, boxes, centroids), ``tokens`` (where each
phrase sits in the prompt's tokens), ``schedule`` (when guidance acts: ``GuideSettings``),
``attention`` (logit bias, batch rows and masks, attention with per-phrase maps), ``joint`` (the same on SD3 /
Flux joint attention: token layout and the two-sided bias), ``refocus``
(loss on those maps and the latent step), ``preview`` (the regions image and summary lines).
Pure tensor maths; the ComfyUI hooks that apply it live in ``nodes/guidance_runtime.py``.
"""
