"""Launch recording: what one call enqueues (kernel launches, memsets) and allocates, with every device
pointer it passed located in the call's arrays, so that :class:`cuflash.executor.BoundSequence` can replay
the call for new arrays of the same signature without re-deriving any of it.

ops.py and arrays.py report here while a :class:`Recording` is active on the thread; GPU work they cannot
describe (a copy made by the caller's framework) marks the recording unusable, and the call is then simply
not bound. Pointers are located by value: a pointer equal to exactly one array's base address belongs to
that array; otherwise it must lie inside exactly one array's extent (a view at an offset, such as one split's
partial state). Anything else (a pointer to memory the call did not name or allocate) makes the recording
unusable too: a replay must never reach memory of an earlier call.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading

_tls = threading.local()


def current():
    """The active recording of this thread, or None (the check every hook makes: one attribute read)."""
    return getattr(_tls, "rec", None)


class CallScalar(ctypes.c_int32):
    """An int32 kernel argument that a bound call takes anew each call (attention_with_kvcache's int
    cache_seqlens), recorded as a slot instead of a constant. ``scalar_max`` on the recording bounds the values
    the recorded general path would accept (it raises past them; the bound call then runs it)."""


class Unbindable(Exception):
    """The recorded call did something a replay could not repeat faithfully."""


class Recording:
    """Collects a call's steps. ``regions`` are (base, nbytes) of the caller's arrays in a fixed role order
    (None for an absent one); allocations made during the call are added after them, in order.

    Steps: ``("launch", fn, grid, splits, threads, smem, template, argv_offsets, ptr_slots, map_slots,
    scalar_offsets)`` with
    ``template`` the parameter bytes, ``argv_offsets`` where each kernel parameter starts in them,
    ``ptr_slots`` (byte offset, region, byte offset in the region) and ``map_slots`` (byte offset, view
    geometry, box, region, offset) for TMA descriptors; ``("memset8", region, offset, value, nbytes)`` and
    ``("memset32", region, offset, bits, count)``."""

    def __init__(self, regions):
        self.regions = [None if r is None else (int(r[0]), int(r[1])) for r in regions]
        self.inputs = len(self.regions)
        self.allocs = []  # (shape, dtype) of each allocation, region inputs + i
        self._keep = []  # the allocations themselves, alive until the recording ends (no address reuse)
        self.steps = []
        self.failed = None
        self.scalar_max = None  # set by the recorded call where it takes a CallScalar

    def __enter__(self):
        if current() is not None:
            raise RuntimeError("a recording is already active on this thread")
        _tls.rec = self
        return self

    def __exit__(self, *exc):
        _tls.rec = None
        self._keep.clear()
        return False

    def fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why

    # --- hooks -------------------------------------------------------------------------------------------

    def allocated(self, view, owner, nbytes: int) -> None:
        self.regions.append((view.ptr, nbytes))
        self.allocs.append((tuple(view.shape), view.dtype))
        self._keep.append(owner)

    def allocation_of(self, array):
        """The region of the allocation that is ``array`` (the framework array itself), or None."""
        for j, owner in enumerate(self._keep):
            if owner is array:
                return self.inputs + j
        return None

    def launch(self, fn, grid: int, splits: int, threads: int, smem: int, template: bytes, argv_offsets,
               pointer_offsets, maps=(), scalar_offsets=()) -> None:
        """A kernel launch: ``fn`` the loaded function (kept: it keeps its module loaded), ``pointer_offsets``
        the byte offsets of device pointers in ``template``; ``maps`` (byte offset, view, box) of tensor maps
        to re-encode (view None: an accumulator map given as (ptr, shape, box) in box); ``scalar_offsets``
        where the call's CallScalar goes. Views are kept as geometry only: a bound call must not keep the
        recorded call's arrays alive."""
        try:
            slots = []
            for off in pointer_offsets:
                p = int.from_bytes(template[off:off + 8], "little")
                if p:
                    slots.append((off, *self.locate(p)))
            map_slots = []
            for off, view, box in maps:
                ptr = view.ptr if view is not None else box[0]
                if view is not None:
                    view = dataclasses.replace(view, owner=None)
                map_slots.append((off, view, box, *self.locate(ptr)))
        except Unbindable as e:
            self.fail(str(e))
            return
        self.steps.append(("launch", fn, grid, splits, threads, smem, bytes(template), tuple(argv_offsets),
                           tuple(slots), tuple(map_slots), tuple(scalar_offsets)))

    def memset(self, kind: str, ptr: int, value: int, count: int) -> None:
        try:
            self.steps.append((kind, *self.locate(ptr), value, count))
        except Unbindable as e:
            self.fail(str(e))

    def locate(self, p: int):
        """(region, offset) of device address ``p`` (see the module's rule), or Unbindable."""
        exact = [i for i, r in enumerate(self.regions) if r is not None and r[0] == p]
        if len(exact) == 1:
            return exact[0], 0
        if exact:
            raise Unbindable(f"address {p:#x} starts {len(exact)} arrays")
        inside = [i for i, r in enumerate(self.regions) if r is not None and r[0] < p < r[0] + r[1]]
        if len(inside) != 1:
            raise Unbindable(f"address {p:#x} lies in {len(inside)} arrays")
        return inside[0], p - self.regions[inside[0]][0]


def array_region(x, fw: str) -> tuple:
    """(base address, bytes spanned) of a torch or CuPy array: its region in a :class:`Recording`."""
    if fw == "torch":
        shape, strides, item, ptr = x.shape, x.stride(), x.element_size(), x.data_ptr()
    else:
        shape, item, ptr = x.shape, x.dtype.itemsize, x.data.ptr
        strides = tuple(st // item for st in x.strides)
    return ptr, extent_bytes(shape, strides, item)


def extent_bytes(shape, strides, itemsize: int) -> int:
    """Bytes from an array's first element to one past its last (0 when empty; strides in elements, >= 0)."""
    if 0 in shape:
        return 0
    return (sum((n - 1) * s for n, s in zip(shape, strides)) + 1) * itemsize
