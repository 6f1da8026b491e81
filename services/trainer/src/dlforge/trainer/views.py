"""Label-preserving views: the symmetries of the square (the dihedral group D4) applied to an image.

A view is applied to the decoded image before the frozen prefix, so the activation cache holds one
array per (boundary, view) and training samples one view per item per epoch: augmentation that
survives the cache. A view is only label-preserving for data that is symmetric under it (ELPV cells
are, under every element of D4; digits are not, under any but the identity), so a view set is a
declared option, never on by default for every data set; the trainer can also check a declared set
on the validation items people labeled (see :func:`dlforge.trainer.handlers.check_views`).

View sets are written as a name (``none``, ``flips``, ``dihedral``) or a comma list of views.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dlforge.common.errors import InvalidInput
from dlforge.vision.images import DIHEDRAL_VIEWS

IDENTITY = "identity"

# Each view maps a batch N x H x W (x C) to the same batch seen under one symmetry of the square: the
# vision core's table, whose names the feature store's keys carry (the labeler reads the same views).
_VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = DIHEDRAL_VIEWS
assert IDENTITY in _VIEWS
VIEW_NAMES: tuple[str, ...] = tuple(_VIEWS)

VIEW_SETS: dict[str, tuple[str, ...]] = {
    "none": (IDENTITY,),
    # the flips of the square: horizontal, vertical and both (a half turn); no quarter turns
    "flips": (IDENTITY, "hflip", "vflip", "rot180"),
    "dihedral": VIEW_NAMES,
}


def parse_views(spec: str) -> tuple[str, ...]:
    """The views of ``spec`` (a set name or a comma list), identity first, each once.

    Raises InvalidInput naming the unknown part.
    """
    text = spec.strip().lower()
    if text in VIEW_SETS:
        return VIEW_SETS[text]
    names = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [n for n in names if n not in _VIEWS]
    if not names or unknown:
        raise InvalidInput(f"view set {spec!r}: unknown {', '.join(map(repr, unknown)) or 'empty set'}; "
                           f"give one of {', '.join(VIEW_SETS)} or a comma list of {', '.join(VIEW_NAMES)}")
    out = [IDENTITY]
    out += [n for n in dict.fromkeys(names) if n != IDENTITY]
    return tuple(out)


def apply_view(view: str, images: np.ndarray) -> np.ndarray:
    """``images`` (N x H x W or N x H x W x C) under ``view``, as a contiguous array."""
    try:
        fn = _VIEWS[view]
    except KeyError as exc:
        raise InvalidInput(f"unknown view {view!r}; known: {', '.join(VIEW_NAMES)}") from exc
    if images.ndim < 3:
        raise InvalidInput(f"views apply to a batch of images (N x H x W [x C]), got shape {images.shape}")
    if view != IDENTITY and images.shape[1] != images.shape[2] and view not in ("hflip", "vflip", "rot180"):
        raise InvalidInput(f"view {view!r} needs square images, got {images.shape[1]}x{images.shape[2]}")
    return np.ascontiguousarray(fn(images))


def checked_views(spec: str) -> str:
    """``spec`` unchanged if :func:`parse_views` accepts it; a ValueError naming the bad part otherwise
    (for pydantic validators of settings and requests)."""
    try:
        parse_views(spec)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from exc
    return spec
