"""Highlight ("scribble") guidance: strokes → soft region maps → cross-attention bias and refocusing.

Modules: ``highlight`` (stroke JSON, region maps, phrase tokens, schedule, bias, refocus loss).
Pure tensor maths; the ComfyUI hooks that apply it live in ``nodes/guidance_runtime.py``.
"""
