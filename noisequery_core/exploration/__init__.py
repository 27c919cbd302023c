"""Moving through the "infinite index": seed and prompt interpolation, the variation explorer, ranking.

Modules: ``interp`` (slerp/lerp, seed strips and grids, conditioning blends), ``explore`` (variants, picks,
replayable history), ``rank`` (CLIP score, aesthetic heads, metric ranking).
"""
