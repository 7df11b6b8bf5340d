"""Synthetic passkey (needle) prompts: a number hidden in a filler haystack, then the question.

:func:`passkey_prompt` gives the text form (the demo uses it); :func:`passkey_ids` builds token
ids of an exact length with the key at a given depth, from separately tokenized pieces, so that
prompts of one length but different depths have the same number of tokens and batch without
padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["FILLER", "INTRO", "QUESTION", "passkey_prompt", "PasskeyPrompt", "passkey_ids"]

INTRO = "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


def _needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def passkey_prompt(key: int = 68137, filler_repeats: int = 60) -> str:
    """A long synthetic document with one number hidden in the middle, then the question."""
    half = FILLER * (filler_repeats // 2)
    return f"{INTRO}{half}{_needle(key).rstrip()}\n{half}{QUESTION.lstrip()}"


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt as token ids.

    Attributes:
        ids: ``int64 [T]`` token ids (with the tokenizer's BOS when it adds one).
        key: the hidden number.
        depth: where the needle sits, as a fraction of the haystack (0..1).
        needle_position: index of the needle's first token in ``ids``.
    """

    ids: torch.Tensor
    key: int
    depth: float
    needle_position: int


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def bos_ids(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer adds a BOS token by default, else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a").input_ids
    return [bos] if ids and ids[0] == bos else []


def passkey_ids(tokenizer: Any, length: int, depth: float, key: int) -> PasskeyPrompt:
    """Token ids of a passkey prompt of exactly ``length`` tokens with the needle at ``depth``.

    The haystack is whole repeats of :data:`FILLER` (tokenized once), then cut to the exact
    length at a repeat boundary on the right; the needle goes between two repeats, so every
    depth of one length gives the same token count (the tokenizer sees no merged boundaries).

    Raises:
        ValueError: ``length`` too short for the intro, needle and question, or ``depth``
            outside [0, 1].
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction in [0, 1], got {depth}")
    head = bos_ids(tokenizer) + _encode(tokenizer, INTRO)
    needle = _encode(tokenizer, _needle(key))
    tail = _encode(tokenizer, QUESTION)
    unit = _encode(tokenizer, FILLER)
    room = length - len(head) - len(needle) - len(tail)
    if room < len(unit):
        raise ValueError(
            f"a passkey prompt of {length} tokens leaves no room for the haystack "
            f"(intro + needle + question take {length - room}); use a length of at least {length - room + len(unit)}"
        )
    n_units = room // len(unit)
    extra = room - n_units * len(unit)  # pad with a partial filler at the end to hit the length exactly
    before = int(round(depth * n_units))
    hay_before = unit * before
    hay_after = unit * (n_units - before) + unit[:extra]
    ids = head + hay_before + needle + hay_after + tail
    assert len(ids) == length, (len(ids), length)
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.int64), key, depth, len(head) + len(hay_before))
