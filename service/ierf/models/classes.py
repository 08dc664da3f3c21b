"""ImageNet-1k class names (offline) and a forgiving class lookup for CLI and API targets."""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence


@functools.cache
def _imagenet_names() -> tuple[str, ...]:
    # torchvision ships the 1000 category names inside its weights metadata; reading them touches
    # no network (only .url would, and we never fetch it).
    from torchvision.models import ResNet50_Weights

    names = tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != 1000:
        raise RuntimeError(f"torchvision metadata holds {len(names)} ImageNet categories, expected 1000")
    return names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, index = class id (a fresh list; mutate freely)."""
    return list(_imagenet_names())


def class_index(name_or_id: int | str, class_names: Sequence[str] | None = None) -> int:
    """Resolve a class given as an id, a digit string or a name to its index.

    Names match case-insensitively: an exact match wins, else a unique substring
    (``"espresso"`` -> 967, ``"tiger cat"`` -> 282). Unknown or ambiguous names raise ValueError
    listing the candidates, so a user can refine the query. ``class_names`` defaults to ImageNet.
    """
    names = _imagenet_names() if class_names is None else tuple(class_names)
    if isinstance(name_or_id, bool):
        raise TypeError("class must be an int id or a name, not a bool")
    if isinstance(name_or_id, str):
        text = name_or_id.strip()
        digits = text.lstrip("+-")
        if digits.isascii() and digits.isdigit():  # "²" and other Unicode digits are not ids (int() refuses them)
            return _check_id(int(text), len(names))
        return _lookup_name(text, names)
    try:
        index = operator.index(name_or_id)
    except TypeError:
        raise TypeError(f"class must be an int id or a name, got {type(name_or_id).__name__}") from None
    return _check_id(index, len(names))


def _check_id(index: int, num_classes: int) -> int:
    if not 0 <= index < num_classes:
        raise ValueError(f"class id {index} is out of range: the model has classes 0..{num_classes - 1}")
    return index


def _lookup_name(text: str, names: Sequence[str]) -> int:
    if not text:
        raise ValueError("class name is empty")
    query = text.casefold()
    folded = [name.casefold() for name in names]
    exact = [i for i, name in enumerate(folded) if name == query]
    if len(exact) > 1:  # names that differ only in case (ImageNet's 264 'Cardigan' and 474 'cardigan')
        exact = [i for i in exact if names[i] == text] or exact
    if len(exact) == 1:
        return exact[0]
    matches = exact or [i for i, name in enumerate(folded) if query in name]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ValueError(f"no class name contains {text!r}; give a class id (0..{len(names) - 1}) or another name")
    shown = ", ".join(f"{i} {names[i]!r}" for i in matches[:12])
    more = f", … and {len(matches) - 12} more" if len(matches) > 12 else ""
    raise ValueError(f"class name {text!r} is ambiguous; candidates: {shown}{more}")
