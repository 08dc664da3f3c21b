"""Tensors derived from parameters (folded batch-norm scales, scaled and re-laid-out kernels), kept between
calls: they depend on the model, not the image, and recomputing them costs a pass over every weight.

An entry is reused only while each source is the very same tensor object at the same version (in-place
updates such as optimiser steps bump the version), so a changed model never sees stale values.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


class DerivedCache:
    """LRU, bounded by entry count and by bytes, so a model larger than the budget still works (it then
    recomputes) and models used one after another do not accumulate."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 1 << 30) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[tuple, tuple[tuple[torch.Tensor, ...], tuple[int, ...], Any]] = OrderedDict()

    def get(self, tag: str, sources: tuple[torch.Tensor, ...], build: Callable[[], Any]) -> Any:
        if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
            return build()  # would capture an autograd graph
        key = (tag, *(id(s) for s in sources))
        versions = tuple(s._version for s in sources)
        hit = self._entries.get(key)
        if hit is not None and hit[1] == versions and all(a is b for a, b in zip(hit[0], sources, strict=True)):
            self._entries.move_to_end(key)
            return hit[2]
        value = build()
        size = _nbytes(value, sources)
        if size > self.max_bytes:
            return value
        if hit is not None:
            old_sources, _, old_value = self._entries.pop(key)
            self._bytes -= _nbytes(old_value, old_sources)
        self._entries[key] = (sources, versions, value)
        self._bytes += size
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, (old_sources, _, old) = self._entries.popitem(last=False)
            self._bytes -= _nbytes(old, old_sources)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


def _nbytes(value: Any, sources: tuple[torch.Tensor, ...]) -> int:
    """Bytes the entry keeps alive: views of a source (a reshaped weight) cost nothing."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if any(storage.data_ptr() == s.untyped_storage().data_ptr() for s in sources):
            return 0
        return storage.nbytes()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v, sources) for v in value)
    return 0


DERIVED = DerivedCache()
