"""Hard negative captions for contrastive training (NegCLIP, Yuksekgonul et al. 2023, "When and why
vision-language models behave like bags-of-words").

A CLIP trained on in-batch negatives alone can match "a red circle left of a blue square" to an image
of a blue circle beside a red square: nothing in the batch asks it to tell them apart, so its
embeddings keep the words and lose who has which attribute. unCLIP inherits that (the paper's
attribute-binding failures). Each caption here gets one negative made by swapping two words of one
word group between the objects (colours, or shapes, or all groups at once, which swaps the objects
and so the relation); a caption with nothing to swap gets one group word replaced by another.
NegCLIP swaps with a parser; word groups from the config keep it free of one, for any vocabulary.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

__all__ = ["hard_negative"]


def _positions(words: list[str], group: Sequence[str]) -> list[int]:
    vocabulary = set(group)
    return [i for i, word in enumerate(words) if word in vocabulary]


def _agree(words: list[str], changed: set[int]) -> str:
    """Re-choose "a" / "an" before each changed word, so grammar gives no negative away."""
    for i in changed:
        if i and words[i - 1].lower() in ("a", "an"):
            article = "an" if words[i][:1].lower() in "aeiou" else "a"
            words[i - 1] = article.capitalize() if words[i - 1][0].isupper() else article
    return " ".join(words)


def hard_negative(
    caption: str, groups: Mapping[str, Sequence[str]], rng: random.Random
) -> str | None:
    """A caption that differs from `caption` in what binds to what (or, failing that, in one
    attribute); None when no word of any group occurs in it."""
    words = caption.split(" ")
    swappable = []
    replaceable = []
    for group in groups.values():
        found = _positions(words, group)
        if len({words[i] for i in found}) >= 2:
            swappable.append(found)
        if found and len(group) >= 2:
            replaceable.append((found, group))
    if swappable:
        options = [[found] for found in swappable]
        if len(swappable) >= 2:
            options.append(swappable)  # every group at once: the objects trade places
        changed = set()
        for found in rng.choice(options):
            first = rng.choice(found)
            second = rng.choice([i for i in found if words[i] != words[first]])
            words[first], words[second] = words[second], words[first]
            changed |= {first, second}
        return _agree(words, changed)
    if replaceable:
        found, group = rng.choice(replaceable)
        at = rng.choice(found)
        words[at] = rng.choice([w for w in group if w != words[at]])
        return _agree(words, {at})
    return None
