"""The manager that keeps a capped set of adapters resident in a model, loading them lazily from an
:class:`~adapter_engine.store.AdapterStore`.

    store = AdapterStore("adapters/")                     # one sub-folder per adapter, PEFT or AdapterHub format
    memory = AdapterMemoryManager(model, store, max_active=16, max_bytes=64 << 20)
    with memory.use(["fr", "de"]):                        # loaded lazily on first use, pinned while the call runs
        with use_adapters(["fr", "de", "fr"]):
            model(**batch)
    memory.stats()                                        # hits, misses, evictions, loads, load time

The manager keeps at most ``max_active`` adapters and ``max_bytes`` bytes of adapter weights resident, evicting the
least recently used adapter that is neither pinned (``pin``: e.g. the active stack) nor in use by a running call
(reference counts from ``acquire`` / ``use``). An evicted adapter leaves the model; with ``offload="cpu"`` its weights
are kept in host memory (pinned when the model is on a GPU) and a reload is a host-to-device copy; with
``offload="drop"`` it is reloaded from the store, and so dropped only when its weights are the store's: it was loaded
from the store, or saved to it (``AdapterStore.save``), and no weight of it has changed in place since (their version
counters). Any other adapter (trained since it was loaded or saved, fresh, loaded from a folder, one the store does not
hold, or one with fp32 master weights, which the store loads rounded to the model's dtype) is kept on the host instead,
with a log line, so no trained adapter is lost. A reloaded adapter keeps each weight's ``requires_grad`` (a frozen one
stays frozen), and comes back in its layers' new dtype when the model was converted while it was offloaded. Every
method is thread-safe (one ``RLock``); forwards run outside it. The manager follows adapters deleted or merged away
(``merge_adapter``) and added behind its back through the model's own API. The fused bottleneck
op keeps one packed copy of each layer's resident adapters: device memory is about twice the counted bytes for
bottleneck adapters.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import api
from ._adapters import _state, unpatch_on_error
from .bottleneck import BottleneckStackLayer
from .changes import adapter_generation, tensor_version
from .kernels._backend import normal_tensors
from .lora import LoraLinear
from .merging import merged_adapters
from .patching import adapter_layer_dtype
from .residency import adapter_layers

if TYPE_CHECKING:
    from .store import AdapterStore

logger = logging.getLogger(__name__)

# every live manager: what a save of a model asks for the adapters its managers keep outside it (offloaded_adapters)
_MANAGERS: weakref.WeakSet[AdapterMemoryManager] = weakref.WeakSet()


@dataclass(frozen=True)
class MemoryStats:
    """Counters of an :class:`AdapterMemoryManager` (a consistent snapshot, taken under its lock)."""

    hits: int  # acquisitions of adapters that were resident
    misses: int  # acquisitions that needed a load
    evictions: int
    loads_from_cpu: int
    loads_from_disk: int
    load_time_s: float  # total wall time spent loading (host-to-device copies or disk reads)
    resident: int
    resident_bytes: int
    offloaded: int  # adapters kept in host memory

    @property
    def loads(self) -> int:
        return self.loads_from_cpu + self.loads_from_disk


@unpatch_on_error  # (a refused PeftModel is left unpatched: it stayed patched, its LoRA layers running fused)
def _patched_adapters(model: nn.Module) -> list[str]:
    """The adapters of ``model``, which is patched first when it is not: the manager tracks its adapter layers."""
    return list(_state(model).adapters)


class AdapterMemoryManager:
    """Keeps the adapters resident in ``model`` under ``max_active`` (count) and ``max_bytes`` (weight bytes).

    Args:
        model: a model patched by :func:`adapter_engine.patch` (adapters already in it are adopted).
        store: where missing adapters load from (lazily, on first :meth:`acquire`); may be None.
        max_active / max_bytes: the caps (None = unbounded).
        offload: ``"cpu"`` keeps evicted adapters in host memory; ``"drop"`` reloads them from the store (only those
            whose weights are unchanged since they were loaded from it; the rest are kept in host memory).
        wait_timeout: seconds an :meth:`acquire` waits for running calls to release adapters before it gives up
            (``RuntimeError``) when only in-use adapters could make room.
    """

    def __init__(
        self,
        model: nn.Module,
        store: AdapterStore | None = None,
        *,
        max_active: int | None = None,
        max_bytes: int | None = None,
        offload: str = "cpu",
        wait_timeout: float = 60.0,
    ) -> None:
        if offload not in ("cpu", "drop"):
            raise ValueError(f"offload must be 'cpu' or 'drop', got {offload!r}")
        for label, cap in (("max_active", max_active), ("max_bytes", max_bytes)):
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise ValueError(f"{label} must be a positive int or None, got {cap!r}")
        self.model, self.store = model, store
        self.max_active, self.max_bytes, self.offload = max_active, max_bytes, offload
        self.wait_timeout = float(wait_timeout)
        self._make_locks()
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self._refs: dict[str, int] = {}
        self._scoped: dict[int, dict[str, int]] = {}  # thread -> the references its open ``use`` blocks hold
        self._pinned: set[str] = set()
        self._offloaded: dict[str, api.AdapterSnapshot] = {}
        self._sizes: dict[str, int] = {}  # last known bytes of every adapter seen (for making room before a load)
        # adapters loaded from the store and unchanged since: their weights and those weights' versions at loading
        self._clean: dict[str, tuple[tuple, tuple, tuple]] = {}  # (+ their checksums, see _unchanged_since_load)
        self._requires_grad: dict[str, list[bool]] = {}  # evicted adapters: each weight's requires_grad, to restore
        # adapters merged into the base (merge_adapter) since the manager held them: not loaded again from the store
        self._merged: set[str] = set(merged_adapters(model))
        self._counts = {"hits": 0, "misses": 0, "evictions": 0, "cpu": 0, "disk": 0}
        self._load_time = 0.0
        # the model's dtype when the sizes were counted, and the adapter generation when it was last checked (_sync)
        self._dtype, self._generation = _model_dtype(model), adapter_generation()
        for name in _patched_adapters(model):
            self._resident[name] = self._sizes[name] = api.adapter_nbytes(model, name)
        if store is not None:
            store._managers.add(self)
        _MANAGERS.add(self)

    def _make_locks(self) -> None:
        self.lock = threading.RLock()
        self._released = threading.Condition(self.lock)

    def __getstate__(self) -> dict:  # deepcopy / pickle: a copy gets its own lock, and no call holds its adapters
        with self.lock:
            state = self.__dict__.copy()
        del state["lock"], state["_released"]
        state["_refs"], state["_scoped"] = {}, {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._make_locks()
        if self.store is not None:
            self.store._managers.add(self)
        _MANAGERS.add(self)

    # ------------------------------------------------------------------------------------------- queries
    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self.lock:
            self._sync()
            return list(self._resident)

    def is_resident(self, name: str) -> bool:
        with self.lock:
            self._sync()
            return name in self._resident

    def stats(self) -> MemoryStats:
        with self.lock:
            self._sync()
            c = self._counts
            return MemoryStats(
                c["hits"], c["misses"], c["evictions"], c["cpu"], c["disk"], self._load_time,
                len(self._resident), sum(self._resident.values()), len(self._offloaded),
            )  # fmt: skip

    def known(self, name: str) -> bool:
        """Resident, offloaded to the host, or in the store."""
        with self.lock:
            self._sync()
            return name in self._resident or name in self._offloaded or (self.store is not None and name in self.store)

    def holds(self, name: str) -> bool:
        """Resident or offloaded to the host: in the manager's keeping, not only in the store."""
        with self.lock:
            self._sync()
            return name in self._resident or name in self._offloaded

    # ------------------------------------------------------------------------------------------- pinning
    def pin(self, names: Iterable[str]) -> None:
        """Never evict these (e.g. the active stack) until :meth:`unpin`; they must be resident or loadable."""
        with self.lock:
            names = list(names)
            self.acquire(names)  # make them resident now (counts as use)
            self._pinned.update(names)
            self.release(names)

    def unpin(self, names: Iterable[str] | None = None) -> None:
        """Allow evicting ``names`` again (all pinned adapters when None)."""
        with self.lock:
            self._pinned.difference_update(self._pinned.copy() if names is None else set(names))
            self._make_room(0, 0, keep=set())

    def set_pinned(self, names: Iterable[str]) -> None:
        """Make exactly ``names`` pinned (loading them if needed)."""
        with self.lock:
            self._sync()
            names, previous = list(names), self._pinned
            self._pinned = set()
            try:
                self.pin(names)
            except BaseException:
                self._pinned = previous
                raise

    def make_room_for_one(self) -> None:
        """Evict (LRU) so that one more adapter fits under ``max_active`` (before adding one to the model)."""
        with self.lock:
            self._sync()
            self._make_room(0, 1, keep=set())

    @property
    def pinned(self) -> frozenset[str]:
        with self.lock:
            self._sync()  # (an adapter merged or deleted behind the manager's back is no longer pinned)
            return frozenset(self._pinned)

    # ------------------------------------------------------------------------------------------- use
    def acquire(self, names: Iterable[str]) -> list[str]:
        """Make ``names`` resident (loading lazily, evicting idle ones as the caps require) and hold a reference on
        each until :meth:`release`. All or nothing: while the caps leave no room because other calls hold their
        adapters, it waits holding nothing (no hold-and-wait, so no deadlock between calls), up to
        ``wait_timeout`` (then ``RuntimeError``). ``KeyError`` for names neither resident, offloaded nor in the
        store; ``ValueError`` when the call cannot fit even with every other call finished."""
        names = list(dict.fromkeys(names))
        deadline = time.monotonic() + self.wait_timeout
        with self.lock:
            self._sync()
            self._refuse_merged(names)
            unknown = [n for n in names if not self.known(n)]
            if unknown:
                raise KeyError(f"unknown adapters {unknown}: not resident, not offloaded and not in the store")
            if self.max_active is not None and len(set(names) | self._pinned) > self.max_active:
                raise ValueError(
                    f"a call needs {len(names)} adapters ({len(self._pinned)} pinned) but max_active is "
                    f"{self.max_active}"
                )
            while True:
                missing = [n for n in names if n not in self._resident]
                if self._fits(names, missing):
                    break
                busy = [n for n in self._resident if self._refs.get(n, 0) and n not in names]
                if not busy:
                    raise ValueError(self._cannot_fit(names, missing))
                scoped = self._scoped.get(threading.get_ident())
                if scoped and all(scoped.get(n, 0) >= self._refs[n] for n in busy):  # (it used to wait the timeout)
                    raise RuntimeError(
                        f"adapters {busy} are held by this thread's own open use() / route blocks (nested ones, or "
                        f"other asyncio tasks' on this thread), so {missing} cannot fit beside them under max_active="
                        f"{self.max_active}, max_bytes={self.max_bytes}: waiting here would block the only thread "
                        "that can release them. Nest fewer adapters, raise the caps, or leave the outer block first"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"timed out after {self.wait_timeout}s waiting for calls to release {busy}")
                self._released.wait(timeout=left)
            held: list[str] = []
            try:
                for n in names:  # hold what is resident first, so that loading the rest cannot evict it
                    if n in self._resident:
                        self._refs[n] = self._refs.get(n, 0) + 1
                        self._resident.move_to_end(n)
                        self._counts["hits"] += 1
                        held.append(n)
                for n in missing:
                    self._counts["misses"] += 1
                    self._make_room(self._size_of(n), 1, keep=set(names))
                    self._load(n)
                    self._refs[n] = self._refs.get(n, 0) + 1
                    held.append(n)
                self._make_room(0, 0, keep=set(names))
            except BaseException:
                self.release(held)
                raise
            if self._over_bytes_alone(names):
                self.release(held)
                for n in missing:  # undo this call's loads: nothing of it stays over the cap
                    if n in self._resident and n not in self._pinned and not self._refs.get(n, 0):
                        self._evict(n)
                raise ValueError(
                    f"adapters {names} ({sum(self._sizes[n] for n in names)} bytes) do not fit under max_bytes="
                    f"{self.max_bytes} beside the pinned {sorted(self._pinned)}"
                )
            return names

    def release(self, names: Iterable[str]) -> None:
        with self.lock:
            for n in names:
                left = self._refs.get(n, 0) - 1
                if left > 0:
                    self._refs[n] = left
                else:
                    self._refs.pop(n, None)
            self._released.notify_all()

    @contextlib.contextmanager
    def use(self, names: Iterable[str]) -> Iterator[list[str]]:
        """``acquire`` for the duration of the block (the adapters cannot be evicted while it runs). A block nested in
        another of the same thread that cannot fit beside the outer block's adapters raises at once: only that
        thread could release them."""
        held = self.acquire(names)
        ident = threading.get_ident()
        try:
            with self.lock:
                mine = self._scoped.setdefault(ident, {})
                for n in held:
                    mine[n] = mine.get(n, 0) + 1
            yield held
        finally:
            with self.lock:
                mine = self._scoped.get(ident, {})
                for n in held:
                    left = mine.get(n, 0) - 1
                    if left > 0:
                        mine[n] = left
                    else:
                        mine.pop(n, None)
                if not mine:
                    self._scoped.pop(ident, None)
            self.release(held)

    @contextlib.contextmanager
    def reading(self, name: str) -> Iterator[None]:
        """Adapter ``name`` in the model for the block, to be read (saved), and then where it was: a resident one stays
        resident; one offloaded to the host or only in the store is loaded for the block, past the caps and without
        evicting another adapter, then evicted again (to the host, or dropped as before). The block holds the
        manager's lock, so no other call loads or evicts meanwhile. ``use`` has to fit the adapter under the caps,
        which the pinned running stack may fill: saving a stack whose sibling had been evicted failed there."""
        with self.lock:
            self._sync()
            if name in self._resident:
                yield
                return
            self._refuse_merged([name])
            if not self.known(name):
                raise KeyError(f"unknown adapter {name!r}: not resident, not offloaded and not in the store")
            self._load(name)
            try:
                yield
            finally:
                if name in api._state(self.model).adapters:
                    self._evict(name)

    def evict(self, name: str) -> None:
        """Evict ``name`` now (``ValueError`` if it is pinned or in use)."""
        with self.lock:
            self._sync()
            if name not in self._resident:
                return
            if name in self._pinned or self._refs.get(name, 0):
                raise ValueError(f"adapter {name!r} is pinned or in use by a running call: cannot evict it")
            self._evict(name)

    def register(self, name: str, *, from_store: bool = False) -> None:
        """Count an adapter added to the model directly (e.g. a fresh one) as resident. ``from_store``: it was just
        loaded from this manager's store unchanged (``offload="drop"`` may then drop it while it stays unchanged). An
        adapter of that name kept in host memory is replaced by it, with a warning (its weights are dropped)."""
        with self.lock:
            self._resident[name] = self._sizes[name] = api.adapter_nbytes(self.model, name)
            self._resident.move_to_end(name)
            if self._offloaded.pop(name, None) is not None:
                logger.warning(
                    "adapter %r was added to the model under the name of an adapter the memory manager kept in host "
                    "memory: that copy is dropped (save it or reload it with memory.use before reusing its name)",
                    name,
                )
            self._requires_grad.pop(name, None)
            self._clean.pop(name, None)
            self._merged.discard(name)  # (a new adapter under a merged one's name)
            if from_store:
                self._mark_clean(name)

    def forget(self, name: str) -> None:
        """Stop tracking ``name`` (after it was deleted from the model directly)."""
        with self.lock:
            for table in (self._resident, self._offloaded, self._sizes, self._refs, self._clean, self._requires_grad,
                          *self._scoped.values()):  # fmt: skip
                table.pop(name, None)
            self._pinned.discard(name)

    # ------------------------------------------------------------------------------------------- internals
    def _sync(self) -> None:
        """Follow changes made to the model's adapters outside the manager: an adapter merged away
        (``merge_adapter``) or deleted is forgotten, one added through the model's API is adopted as resident; and
        a conversion of the model in place (``.half()``, ``.to(dtype)``): the resident adapters' bytes are counted
        again and the sizes of the others, which reload in the new dtype, are forgotten until they are loaded. The
        bytes counted before a conversion were kept: ``.float()`` of a 16-bit model went over ``max_bytes`` unseen."""
        present = api._state(self.model).adapters
        if len(present) != len(self._resident) or not all(n in present for n in self._resident):
            for name in [n for n in self._resident if n not in present]:
                logger.info("adapter %r left the model outside the memory manager (merged or deleted): forgotten", name)
                self.forget(name)
                if name in merged_adapters(self.model):
                    self._merged.add(name)
            for name in [n for n in present if n not in self._resident]:
                self.register(name)
        generation = adapter_generation()  # (bumped by conversions and adapter changes: the dtype is read only then)
        if generation != self._generation:
            self._generation, dtype = generation, _model_dtype(self.model)
            if dtype != self._dtype:
                self._dtype = dtype
                self._sizes = {n: api.adapter_nbytes(self.model, n) for n in self._resident}
                self._resident.update(self._sizes)

    def _refuse_merged(self, names: Iterable[str]) -> None:
        """``KeyError`` for adapters among ``names`` merged into the base (``merge_adapter``) since the manager held
        them, and not unmerged: the store's copy, loaded again, applied them twice (silently)."""
        merged = [n for n in names if n in self._merged and n not in self._offloaded and n not in self._resident]
        merged = [n for n in merged if n in merged_adapters(self.model)]
        if merged:
            raise KeyError(
                f"adapters {merged} are merged into the model's base weights (merge_adapter): loading them again "
                "would apply them twice; unmerge_adapter first, or route without them"
            )

    def _saved_to_store(self, model: nn.Module, name: str) -> None:
        """``self.store`` has just written adapter ``name`` of ``model``: when that is this manager's model, the
        adapter's weights are the store's copy from now until they change (their versions), as after a load from
        the store. A trained adapter used to stay "changed since its load" after a save, kept on the host forever."""
        if model is not self.model:
            return
        with self.lock:
            self._sync()
            if name in self._resident and self._reloads_as_is(name):
                self._mark_clean(name)

    def _reloads_as_is(self, name: str) -> bool:
        """Whether the store's load gives adapter ``name`` back in its weights' dtypes: it loads in the layers' dtype
        (``AdapterStore.load_into``), so fp32 master weights of a 16-bit model (``add_adapter`` / ``load_adapter``'s
        default) came back rounded to it after a drop, their training below 16-bit resolution lost. Such an adapter
        is kept in host memory instead."""
        for module, own in adapter_layers(self.model, name):
            if not isinstance(module, (BottleneckStackLayer, LoraLinear)):  # a trained module copy: in its dtypes
                continue
            layer = adapter_layer_dtype(module)
            if any(p.dtype != layer for p in own):
                logger.info("adapter %r has fp32 master weights: offload='drop' keeps it in host memory", name)
                return False
        return True

    def _mark_clean(self, name: str) -> None:
        weights = tuple(api.adapter_parameters(self.model, name))
        self._clean[name] = (weights, tuple(map(tensor_version, weights)), _checksums(weights))

    def _unchanged_since_load(self, name: str) -> bool:
        """Loaded from (or saved to) the store, and the same weight objects at the same in-place versions and the
        same bits since. The versions miss updates made through ``.data`` (``p.data.add_(...)``, a hand-written SGD
        step, bumps no version counter): without the checksums such a trained adapter was dropped, its training
        lost."""
        clean = self._clean.get(name)
        if clean is None:
            return False
        weights = tuple(api.adapter_parameters(self.model, name))
        same = len(weights) == len(clean[0]) and all(a is b for a, b in zip(weights, clean[0], strict=True))
        return same and tuple(map(tensor_version, weights)) == clean[1] and _checksums(weights) == clean[2]

    def _over(self, extra_bytes: int = 0, extra_count: int = 0) -> bool:
        count_over = self.max_active is not None and len(self._resident) + extra_count > self.max_active
        bytes_over = self.max_bytes is not None and sum(self._resident.values()) + extra_bytes > self.max_bytes
        return count_over or bytes_over

    def _idle(self, keep: Iterable[str]) -> list[str]:
        """Resident adapters that may be evicted now (LRU first): not pinned, not in use, not in ``keep``."""
        keep = set(keep)
        return [n for n in self._resident if n not in keep and n not in self._pinned and not self._refs.get(n, 0)]

    def _size_of(self, name: str) -> int:
        """Bytes of ``name`` once resident: as last seen resident, else its file's tensors in the model's dtype."""
        if name in self._sizes:
            return self._sizes[name]
        if self.store is None or name not in self.store:
            return 0
        return self.store.nbytes_on_disk(name, dtype=_model_dtype(self.model))

    def _fits(self, names: list[str], missing: list[str]) -> bool:
        idle = self._idle(names)
        if self.max_active is not None and len(self._resident) + len(missing) - len(idle) > self.max_active:
            return False
        if self.max_bytes is not None:  # sizes as last resident, else the store file's header (a pickle's, checked
            # after loading: it has none); a first load used to count 0 here, load over the cap, then be refused
            total = sum(self._resident.values()) + sum(self._size_of(n) for n in missing)
            if total - sum(self._resident[n] for n in idle) > self.max_bytes:
                return False
        return True

    def _cannot_fit(self, names: list[str], missing: list[str]) -> str:
        """Why a call's ``names`` cannot fit even with every other call finished: only they and the pinned adapters are
        left resident, and they exceed ``max_bytes`` (``acquire`` refuses ``max_active`` before). It used to read
        "cannot fit adapters [] beside [...]" when all of the call's adapters were resident (``missing`` empty)."""
        sizes = {n: self._resident[n] if n in self._resident else self._size_of(n) for n in names}
        pinned = {n: self._resident[n] for n in sorted(self._pinned) if n in self._resident and n not in sizes}
        to_load = f", {missing} to load" if missing else ""
        beside = f" beside the pinned {pinned} ({sum(pinned.values())} bytes)" if pinned else ""
        return (
            f"cannot fit this call's adapters {sizes} ({sum(sizes.values())} bytes{to_load}){beside} under "
            f"max_bytes={self.max_bytes} (max_active={self.max_active}): nothing else is resident to evict; raise "
            "max_bytes or run fewer adapters"
        )

    def _over_bytes_alone(self, names: list[str]) -> bool:
        """Whether ``names`` (resident now) and the pinned adapters alone exceed ``max_bytes``: the call cannot fit
        even with every other call finished. ``_fits`` checks that before loading for sizes known from an earlier
        residency; an adapter's first load reveals its size only now (a pickle's header has none). Such a call used
        to go over the cap with a log line on first use, and be refused on the next."""
        if self.max_bytes is None:
            return False
        need = set(names) | (self._pinned & self._resident.keys())
        return sum(self._resident[n] for n in need) > self.max_bytes

    def _make_room(self, extra_bytes: int, extra_count: int, keep: set[str]) -> None:
        """Evict idle adapters, least recently used first, until ``extra`` more fits (never waits)."""
        while self._over(extra_bytes, extra_count):
            idle = self._idle(keep)
            if not idle:
                logger.warning(
                    "adapter caps (max_active=%s, max_bytes=%s) exceeded: resident %s are pinned or in use",
                    self.max_active, self.max_bytes, list(self._resident),
                )  # fmt: skip
                return
            self._evict(idle[0])

    @normal_tensors()
    def _evict(self, name: str) -> None:
        weights = api.adapter_parameters(self.model, name)
        keep_on_host = self.offload == "cpu" or self.store is None or name not in self.store
        if not keep_on_host and not self._unchanged_since_load(name):
            keep_on_host = True  # its weights are not (or no longer) the store's copy: dropping it would lose them
            logger.info(
                "offload='drop': adapter %r changed since it was loaded from the store (or never came from it): "
                "kept in host memory instead; save it to the store to let it be dropped",
                name,
            )
        if keep_on_host:
            on_gpu = any(p.is_cuda for p in weights)
            self._offloaded[name] = api.snapshot_adapter(self.model, name, device="cpu", pin_memory=on_gpu)
        self._requires_grad[name] = [p.requires_grad for p in weights]
        api.delete_adapter(self.model, name)
        del self._resident[name]
        self._clean.pop(name, None)
        self._counts["evictions"] += 1
        logger.debug("evicted adapter %r (%s)", name, "to host memory" if keep_on_host else "dropped")

    @normal_tensors()  # a load inside a caller's inference_mode must still make normal tensors: an
    # inference tensor cannot train later, and has no version counter for the engine's caches of stacked factors
    def _load(self, name: str) -> None:
        start = time.perf_counter()
        snapshot = self._offloaded.pop(name, None)
        if snapshot is not None:
            try:
                api.restore_adapter(self.model, name, snapshot)
            except BaseException:
                self._offloaded[name] = snapshot  # still the only copy
                raise
            self._counts["cpu"] += 1
        else:
            if self.store is None:
                raise KeyError(f"adapter {name!r} is not resident and there is no store to load it from")
            self.store.load_into(self.model, name)
            self._counts["disk"] += 1
            self._mark_clean(name)
        weights = api.adapter_parameters(self.model, name)
        wanted = self._requires_grad.pop(name, None)
        if wanted is not None and len(wanted) == len(weights):  # as it was when evicted (e.g. frozen)
            for p, flag in zip(weights, wanted, strict=True):
                p.requires_grad_(flag)
        self._resident[name] = self._sizes[name] = api.adapter_nbytes(self.model, name)
        self._load_time += time.perf_counter() - start
        logger.debug("loaded adapter %r (%s)", name, "host" if snapshot is not None else "disk")


def offloaded_adapters(model: nn.Module) -> list[str]:
    """The adapters of ``model`` that its memory managers keep in host memory: evicted, so not in the model (nor in
    what ``save_pretrained`` writes)."""
    names: set[str] = set()
    for manager in list(_MANAGERS):
        if manager.model is model:
            with manager.lock:
                names.update(manager._offloaded)
    return sorted(names)


def _model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating parameter: the store loads adapters in it; a conversion changes it."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksums(weights: Iterable[torch.Tensor]) -> tuple[int, ...]:
    """Per tensor, a 64-bit checksum of its bits: ``sum_i (b_i + 1) * (2 i + 1) * K`` over its elements' bit patterns
    ``b_i``, wrapping modulo 2**64, with K odd. Changing one element changes the sum by an odd multiple of the change,
    never 0 modulo 2**64; several changes cancel only by a chance of about 2**-64. On the device, one sync."""
    sums = []
    for t in weights:
        bits = t.detach().contiguous().view(_INT_OF_SIZE[t.element_size()]).reshape(-1).to(torch.int64)
        odd = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64).mul_(2).add_(1)
        sums.append(bits.add_(1).mul_(odd).mul_(0x9E3779B97F4A7C15 - (1 << 64)).sum())
    return tuple(torch.stack(sums).tolist()) if sums else ()


__all__ = ["AdapterMemoryManager", "MemoryStats", "offloaded_adapters"]
