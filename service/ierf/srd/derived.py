"""Tensors derived from parameters (folded batch-norm scales, scaled and re-laid-out kernels), kept between
calls: they depend on the model, not the image, and recomputing them costs a pass over every weight.

An entry is reused only while each source is the very same tensor object, at the same version (in-place
updates through the tensor, such as optimiser steps and ``load_state_dict``, bump it), over the same
memory with the same dtype, device and layout (``model.double()``, ``.to()`` and ``param.data = ...``
swap the memory of the same Parameter object). Fused optimiser steps bump no counter themselves; a hook
(``ierf._fused_steps``) does it for them. Writes through ``param.data`` bypass the version counter and
cannot be seen: call :func:`clear_derived_cache` after such an edit.

Sources are held by weak reference: a model that is deleted takes its entries with it.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ierf._fused_steps import watch_fused_optimizers

watch_fused_optimizers()  # fused optimiser steps bump no version counter on their own


def _fingerprint(source: torch.Tensor) -> tuple:
    return (source._version, source.data_ptr(), source.dtype, source.device, tuple(source.shape), source.stride())


class DerivedCache:
    """LRU, bounded by entry count and by bytes, so a model larger than the budget still works (it then
    recomputes) and models used one after another do not accumulate."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 1 << 30) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._bytes = 0
        # key -> (weak refs to the sources, their fingerprints, value, bytes)
        self._entries: OrderedDict[tuple, tuple[tuple[weakref.ref, ...], tuple, Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        # Keys whose source died and whose entry is still to drop (their callback found the lock taken).
        self._dead: collections.deque[tuple] = collections.deque()

    def get(self, tag: str, sources: tuple[torch.Tensor, ...], build: Callable[[], Any]) -> Any:
        if torch.is_grad_enabled() and any(s.requires_grad for s in sources):
            return build()  # would capture an autograd graph
        if any(s.is_inference() for s in sources):
            return build()  # no version counter to tell an update by
        key = (tag, *(id(s) for s in sources))
        prints = tuple(_fingerprint(s) for s in sources)
        with self._lock:
            self._purge_dead()
            hit = self._entries.get(key)
            if hit is not None and hit[1] == prints and all(ref() is s for ref, s in zip(hit[0], sources, strict=True)):
                self._entries.move_to_end(key)
                return hit[2]
        # Built as ordinary tensors even inside torch.inference_mode(): an inference tensor kept here would
        # have no version counter and could not enter autograd, so one call under inference mode would
        # break every later call outside it.
        with torch.inference_mode(False), torch.no_grad():
            value = _unpinned(build(), sources)
        size = _nbytes(value, sources)
        if size > self.max_bytes:
            return value
        refs = tuple(weakref.ref(s, lambda _, key=key: self._source_died(key)) for s in sources)
        with self._lock:
            self._pop(key)
            self._entries[key] = (refs, prints, value, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._pop(next(iter(self._entries)))
        return value

    def forget(self, sources: list[torch.Tensor]) -> None:
        """Drop every entry built from any of ``sources`` (changed in a way their version does not show)."""
        ids = {id(s) for s in sources}
        with self._lock:
            for key in [k for k in self._entries if not ids.isdisjoint(k[1:])]:
                self._pop(key)

    def _pop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[3]

    def _source_died(self, key: tuple) -> None:
        """Weak-reference callback: the entry is dropped now when the lock is free, so deleting a model frees
        its entries at once (not at the next call). It may run inside whatever allocation triggered the
        collection, with the lock held by this very thread: then the key only waits in the queue."""
        self._dead.append(key)
        # Values dropped by a purge may be sources of other entries: their callbacks, finding the lock
        # taken, queue their keys, and the loop takes them after the release.
        while self._dead and self._lock.acquire(blocking=False):
            try:
                self._purge_dead()
            finally:
                self._lock.release()

    def _purge_dead(self) -> None:
        """Drop entries whose source was freed: they can never match again and must not pin their values."""
        while self._dead:
            key = self._dead.popleft()
            entry = self._entries.get(key)
            if entry is not None and any(ref() is None for ref in entry[0]):
                self._pop(key)
            entry = None  # its value freed now, inside the loop: keys it was the source of are taken too

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            self._purge_dead()
            return len(self._entries)


def _unpinned(value: Any, sources: tuple[torch.Tensor, ...]) -> Any:
    """A view of a source keeps the source object alive through ``_base`` (and so the entry could never
    die with its model): re-express it over a detached alias of the same memory."""
    if isinstance(value, torch.Tensor):
        base = value._base
        if base is not None and any(base is s for s in sources):
            return base.detach().as_strided(value.shape, value.stride(), value.storage_offset())
        return value
    if isinstance(value, tuple):
        return tuple(_unpinned(v, sources) for v in value)
    if isinstance(value, list):
        return [_unpinned(v, sources) for v in value]
    return value


def _nbytes(value: Any, sources: tuple[torch.Tensor, ...]) -> int:
    """Bytes the entry keeps alive beyond its sources: views of a source (a reshaped weight) cost nothing."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if any(storage.data_ptr() == s.untyped_storage().data_ptr() for s in sources):
            return 0
        return storage.nbytes()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v, sources) for v in value)
    return 0


DERIVED = DerivedCache()

# model -> its batch norms' running statistics when last explained (see follow_running_statistics)
_STATISTICS_SEEN: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def follow_running_statistics(model: torch.nn.Module) -> None:
    """Batch norm's kernel updates ``running_mean``/``running_var`` in place without bumping their version
    counters (a train-mode forward: a frozen backbone left in train(), SWA's update_bn, recalibration), so
    folds keyed on versions would go stale, silently. Once per call: the buffers' values against those of
    the last call on this model (one concatenation and one comparison), and their entries dropped when they
    moved. Only batch norms' statistics: other buffers (anchor tables, embeddings) can be large, and nothing
    updates them behind their version counters."""
    buffers = [
        b
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase)
        for b in (m.running_mean, m.running_var)
        if b is not None and b.is_floating_point() and not b.is_inference()
    ]
    if not buffers:
        return
    with torch.no_grad():
        try:
            now = torch.cat(buffers)  # 1-d statistics: one op, not a view per buffer
        except RuntimeError:  # other shapes, or buffers on several devices
            now = torch.cat([b.reshape(-1).cpu() for b in buffers])
        seen = _STATISTICS_SEEN.get(model)
        if seen is not None and seen.shape == now.shape and seen.device == now.device and torch.equal(seen, now):
            return
    DERIVED.forget(buffers)  # also on a first call: another explainer of this model may have left folds
    _STATISTICS_SEEN[model] = now


def clear_derived_cache() -> None:
    """Forget every parameter-derived tensor (needed only after writing weights through ``param.data``)."""
    DERIVED.clear()
