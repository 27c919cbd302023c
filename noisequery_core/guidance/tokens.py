"""Phrase tokens: which conditioning positions (key columns of cross-attention) each highlighted phrase occupies."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import HighlightError
from .strokes import Highlight


def find_phrase_positions(rows: Sequence[Sequence[int]], phrase_ids: Sequence[int]) -> list[int]:
    """Flat token positions of every occurrence of a phrase in the prompt's tokenizer rows.

    Args:
        rows: the prompt's token id rows (one per 77-token chunk for CLIP), in the order the
            encoder concatenates them into the conditioning.
        phrase_ids: the phrase's token ids, without start/end/padding tokens.
    Returns:
        Positions as ``offset of the row + index in the row``, in order; [] when the phrase is
        empty or absent.
    """
    n = len(phrase_ids)
    if n == 0:
        return []
    want = list(phrase_ids)
    out: list[int] = []
    offset = 0
    for row in rows:
        ids = list(row)
        for i in range(len(ids) - n + 1):
            if ids[i : i + n] == want:
                out.extend(range(offset + i, offset + i + n))
        offset += len(ids)
    return out


def phrase_token_columns(highlights: Sequence[Highlight], rows: Sequence[Sequence[int]],
                         phrase_ids: Callable[[str], Sequence[int]], prompt: str = ""
                         ) -> tuple[list[list[int]], int]:
    """The conditioning positions of each highlight's phrase, and the prompt's token count.

    Args:
        highlights: the phrases to find.
        rows: the prompt's tokenizer rows (see find_phrase_positions).
        phrase_ids: the tokenizer, injected: phrase -> its token ids without start/end tokens.
        prompt: the prompt text, only for the error message.
    Returns:
        (columns, total): one list of positions per highlight, and the number of positions in ``rows``.
    Raises:
        HighlightError: a phrase does not occur in the prompt (the message names phrase and prompt).
    """
    total = sum(len(r) for r in rows)
    columns = []
    for hl in highlights:
        pos = find_phrase_positions(rows, phrase_ids(hl.phrase))
        if not pos:
            raise HighlightError(f"the phrase '{hl.phrase}' is not in the prompt '{prompt[:120]}'. A highlight's "
                                 "phrase must appear in the prompt word for word (case and spacing do not matter): "
                                 "edit the prompt, or choose the stroke's phrase again")
        columns.append(pos)
    return columns, total


def segment_token_columns(highlights: Sequence[Highlight],
                          segments: Sequence[tuple[Sequence[Sequence[int]], Callable[[str], Sequence[int]]]],
                          prompt: str = "") -> tuple[list[list[int]], int]:
    """phrase_token_columns over a conditioning made of several encoders' tokens laid one after another.

    SD3's conditioning is the CLIP-L/G tokens followed by the T5 tokens along the sequence; each part has its own
    tokenizer, so a phrase is looked up in each part with that part's tokenizer and found wherever it occurs.

    Args:
        highlights: the phrases to find.
        segments: (tokenizer rows, phrase -> ids without start/end tokens) per part, in conditioning order.
        prompt: the prompt text, only for the error message.
    Returns:
        (columns, total): per highlight its positions in the whole conditioning, and the conditioning's length.
    Raises:
        HighlightError: a phrase occurs in no part.
    """
    total = sum(len(r) for rows, _ in segments for r in rows)
    columns = []
    for hl in highlights:
        pos: list[int] = []
        offset = 0
        for rows, phrase_ids in segments:
            pos.extend(offset + p for p in find_phrase_positions(rows, phrase_ids(hl.phrase)))
            offset += sum(len(r) for r in rows)
        if not pos:
            raise HighlightError(f"the phrase '{hl.phrase}' is not in the prompt '{prompt[:120]}'. A highlight's "
                                 "phrase must appear in the prompt word for word (case and spacing do not matter): "
                                 "edit the prompt, or choose the stroke's phrase again")
        columns.append(pos)
    return columns, total
