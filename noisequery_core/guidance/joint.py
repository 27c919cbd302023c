"""Joint attention (SD3's MMDiT, Flux): where the text and image tokens sit in one sequence, and the guide's bias on it.

A joint-attention transformer runs one self-attention over the text tokens and the image tokens concatenated:
Flux puts the text first, then the image (then any reference-image tokens, e.g. Kontext), in its double- and
single-stream blocks; SD3's MMDiT puts the text (after optional register tokens) first, then the image. A
highlight's phrase is a set of text *key* columns there, as in a UNet's cross-attention, but the phrase's text
tokens are also *queries* that read the image, and the blocks write what they read back into the phrase token,
which every image token then reads. So the bias has two parts:

* image side: image-query rows -> phrase-key columns, ``inside * m - outside * (1 - m)`` for the region m of
  each image token (the cross-attention bias, ``attention.attention_bias``), and
* text side: phrase-query rows -> image-key columns, the same values: the phrase token gathers its features from
  its region, so what it carries to later blocks (and to every image token reading it) describes its region
  instead of the whole image.

Everything else (image <-> image, text <-> text, other tokens) is left as the model computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import HighlightError
from .attention import BIAS_INSIDE, BIAS_OUTSIDE


@dataclass(frozen=True)
class JointLayout:
    """Where one joint-attention call's tokens are: text at [text_start, image_start), image after it."""

    n_tokens: int  # the whole sequence (queries = keys)
    text_start: int
    n_text: int  # the conditioning's tokens as the model got them (a multiple of the prompt's length when batched)
    grid: tuple[int, int]  # (h, w) image tokens, row-major

    @property
    def image_start(self) -> int:
        return self.text_start + self.n_text

    @property
    def n_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def image_slice(self) -> slice:
        return slice(self.image_start, self.image_start + self.n_image)


def patch_grid(latent_hw: tuple[int, int], patch: int) -> tuple[int, int]:
    """The image-token grid of a latent of (h, w) cells cut into patch x patch tokens.

    Flux and MMDiT pad the latent up to a multiple of the patch (ComfyUI's pad_to_patch_size), so a side of n cells
    gives ceil(n / patch) tokens.
    """
    if patch < 1:
        raise HighlightError(f"patch size {patch} is not a positive integer")
    h, w = latent_hw
    return -(-int(h) // patch), -(-int(w) // patch)


def joint_layout(n_tokens: int, n_text: int, grid: tuple[int, int], text_offset: int = 0) -> JointLayout | None:
    """The layout of a joint-attention call over ``n_tokens`` tokens, or None when the call is not one.

    Args:
        n_tokens: sequence length of the call (queries and keys).
        n_text: the conditioning tokens the model received (context length).
        grid: image-token grid (patch_grid of the latent).
        text_offset: tokens before the text (MMDiT register tokens; 0 for SD3 and Flux).
    Returns:
        The layout when text then image fit in the sequence; None otherwise (e.g. MMDiT's image-only
        self-attention of SD3.5 blocks, which has only the image tokens).
    """
    n_image = grid[0] * grid[1]
    if n_text <= 0 or n_image <= 0 or text_offset < 0 or text_offset + n_text + n_image > n_tokens:
        return None
    return JointLayout(int(n_tokens), int(text_offset), int(n_text), (int(grid[0]), int(grid[1])))


def phrase_key_positions(token_columns: Sequence[Sequence[int]], context_len: int, layout: JointLayout
                         ) -> list[list[int]]:
    """Each phrase's positions in the joint sequence.

    The prompt's ``context_len`` tokens are repeated up to ``layout.n_text`` when a batch mixes prompts of
    different lengths (ComfyUI's CONDCrossAttn.concat), so a phrase sits at the same place in every repetition.

    Raises:
        HighlightError: n_text is not a multiple of context_len (the conditioning reaching the model is not the
            guide's).
    """
    if context_len <= 0 or layout.n_text % context_len != 0:
        raise HighlightError(f"cannot find a {context_len}-token prompt in the {layout.n_text} text tokens of a joint "
                             "attention call (not a multiple): the conditioning reaching the model is not the guide's. "
                             "Connect the guide's conditioning output to the sampler's positive input")
    reps = layout.n_text // context_len
    out = []
    for cols in token_columns:
        idx = [c for c in cols if 0 <= c < context_len]
        out.append([layout.text_start + r * context_len + c for r in range(reps) for c in idx])
    return out


def joint_bias(regions: torch.Tensor, token_columns: Sequence[Sequence[int]], context_len: int, layout: JointLayout,
               weight: float, inside: float = BIAS_INSIDE, outside: float = BIAS_OUTSIDE,
               text_side: bool = True) -> torch.Tensor:
    """Additive bias for one joint-attention call: [n_tokens, n_tokens] float32 (rows = queries, cols = keys).

    Args:
        regions: [P, n_image] soft region per highlight (0..1) on ``layout.grid``.
        token_columns: per highlight, its positions in the prompt's tokens (0..context_len-1).
        context_len: the prompt's token count.
        layout: where text and image sit (joint_layout).
        weight: strength times schedule weight; 0 gives an all-zero bias.
        inside, outside: bias in logits at weight 1 inside / outside the region.
        text_side: also bias the phrase's query rows over the image keys (see the module docstring).
    Returns:
        Zero except image rows x phrase columns (and, with text_side, phrase rows x image columns), where it is
        ``weight * (inside * m - outside * (1 - m))`` of the image token.
    Raises:
        HighlightError: regions do not match the grid, or the text length does not fit the prompt.
    """
    if regions.ndim != 2 or regions.shape[1] != layout.n_image:
        raise HighlightError(f"regions of shape {tuple(regions.shape)} do not fit a {layout.grid[0]}x{layout.grid[1]} "
                             "image-token grid")
    n = layout.n_tokens
    bias = torch.zeros(n, n, dtype=torch.float32)
    if weight == 0:
        return bias
    img = layout.image_slice()
    for m, pos in zip(regions, phrase_key_positions(token_columns, context_len, layout)):
        if not pos:
            continue
        col = (weight * (inside * m - outside * (1.0 - m))).to(torch.float32)
        bias[img, pos] = col[:, None]
        if text_side:
            bias[pos, img] = col[None, :]
    return bias


def joint_phrase_probs(probs: Sequence[torch.Tensor], layout: JointLayout) -> list[torch.Tensor]:
    """Per-phrase attention of every image query ([B, n_tokens] from attention.phrase_attention) cut to the image
    rows: [B, n_image] each, the maps refocusing and the measurements use."""
    img = layout.image_slice()
    return [p[:, img] for p in probs]


@dataclass(frozen=True)
class JointModel:
    """What the guide needs to know of a joint-attention model: its patch size and the tokens before the text."""

    family: str  # "flux" or "sd3", for messages
    patch: int
    text_offset: int = 0
