"""One table per network pairs each unclip tensor with the diffusers tensor(s) it is made of, so that
import and export are the same table read in two directions.

Most links are renames; the rest concatenate several diffusers tensors along dim 0 (fused q/k/v),
permute rows (the decoder's extra context tokens) or fold two linear layers into one (the decoder's
conditioning vector). Shapes come from the networks themselves, so reshapes (a [1, 1, W] parameter
against a [W] one, Linear against 1x1 Conv1d) need no special cases.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class Link:
    """`ours` (an unclip key) is made of `theirs` (diffusers keys).

    kind "cat": concatenate `theirs` along dim 0 (one of them: a rename), then reshape.
    kind "tokens": one Linear whose output rows diffusers reads as [width, tokens] and unclip as
    [tokens, width]; `tokens` is the token count. kind "sum_bias": ours = the sum of theirs (the
    first gets all of it on export, the others zero). kind "cat_in": concatenate along dim 1
    (the input dimension of a Linear weight).
    """

    ours: str
    theirs: tuple[str, ...]
    kind: str = "cat"
    tokens: int = 0


def module_links(
    ours: str, theirs: str | Iterable[str], params: Iterable[str] = PARAMS
) -> list[Link]:
    """Links for the weight and bias of a module in unclip and the module(s) it is made of."""
    theirs = (theirs,) if isinstance(theirs, str) else tuple(theirs)
    return [Link(f"{ours}.{p}", tuple(f"{t}.{p}" for t in theirs)) for p in params]


def to_ours(links: list[Link], theirs: dict[str, torch.Tensor], ours_like: dict[str, torch.Tensor]):
    """unclip tensors from diffusers tensors, shaped like `ours_like`'s."""
    check_coverage(links, ours_like, theirs)
    out = {}
    for link in links:
        parts = [theirs[key] for key in link.theirs]
        target = ours_like[link.ours].shape
        if link.kind == "cat":
            # row-major flattening keeps dim-0 concatenation: q rows, then k rows, then v rows
            tensor = torch.cat([p.reshape(-1) for p in parts])
            if tensor.numel() != target.numel():
                raise ValueError(
                    f"{' + '.join(link.theirs)} has shapes {[tuple(p.shape) for p in parts]} but unclip's "
                    f"{link.ours} has shape {tuple(target)}"
                )
            tensor = tensor.reshape(target)
        elif link.kind == "tokens":
            (part,) = parts
            width = part.shape[0] // link.tokens
            tensor = part.reshape(width, link.tokens, *part.shape[1:]).transpose(0, 1)
            tensor = tensor.reshape(part.shape)
        elif link.kind == "cat_in":
            tensor = torch.cat(parts, dim=1)
        elif link.kind == "sum_bias":
            tensor = torch.stack(parts).sum(0)
        else:
            raise ValueError(f"unknown link kind {link.kind!r}")
        if tuple(tensor.shape) != tuple(target):
            raise ValueError(
                f"{' + '.join(link.theirs)} gives shape {tuple(tensor.shape)} but unclip's "
                f"{link.ours} has shape {tuple(target)}"
            )
        out[link.ours] = tensor.to(ours_like[link.ours].dtype).clone()
    return out


def to_theirs(
    links: list[Link], ours: dict[str, torch.Tensor], theirs_like: dict[str, torch.Tensor]
):
    """diffusers tensors from unclip tensors, shaped like `theirs_like`'s."""
    check_coverage(links, ours, theirs_like)
    out: dict[str, torch.Tensor] = {}
    for link in links:
        tensor = ours[link.ours]
        shapes = [theirs_like[key].shape for key in link.theirs]
        if link.kind == "cat":
            sizes = [s.numel() for s in shapes]
            if tensor.numel() != sum(sizes):
                raise ValueError(
                    f"unclip's {link.ours} has shape {tuple(tensor.shape)} but diffusers' "
                    f"{' + '.join(link.theirs)} have shapes {[tuple(s) for s in shapes]}"
                )
            pieces = tensor.reshape(-1).split(sizes)
            for key, piece, shape in zip(link.theirs, pieces, shapes, strict=True):
                out[key] = piece.reshape(shape)
        elif link.kind == "tokens":
            width = tensor.shape[0] // link.tokens
            piece = tensor.reshape(link.tokens, width, *tensor.shape[1:]).transpose(0, 1)
            out[link.theirs[0]] = piece.reshape(shapes[0])
        elif link.kind == "cat_in":
            for key, piece in zip(
                link.theirs, tensor.split([s[1] for s in shapes], dim=1), strict=True
            ):
                out[key] = piece
        elif link.kind == "sum_bias":
            out[link.theirs[0]] = tensor
            for key in link.theirs[1:]:
                out[key] = torch.zeros_like(tensor)
        else:
            raise ValueError(f"unknown link kind {link.kind!r}")
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(theirs_like[key].shape):
            raise ValueError(
                f"unclip gives {key} shape {tuple(tensor.shape)} but diffusers expects "
                f"{tuple(theirs_like[key].shape)}"
            )
        out[key] = tensor.to(theirs_like[key].dtype).contiguous().clone()
    return out


def check_coverage(links: list[Link], ours: dict, theirs: dict) -> None:
    """Every tensor on both sides is linked, and every link names existing tensors."""
    linked_ours = {link.ours for link in links}
    linked_theirs = {key for link in links for key in link.theirs}
    problems = []
    for name, keys, linked in (("unclip", ours, linked_ours), ("diffusers", theirs, linked_theirs)):
        missing = sorted(linked - set(keys))
        unlinked = sorted(set(keys) - linked)
        if missing:
            problems.append(f"{name} lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unlinked:
            problems.append(
                f"{name} has tensors no mapping covers: {unlinked[:4]}"
                f"{' ...' if len(unlinked) > 4 else ''}"
            )
    if problems:
        raise ValueError("the two networks do not have the same structure: " + "; ".join(problems))
