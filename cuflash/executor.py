"""Bound calls: the per-call fast path of the dense GPU forward and backward (issue 14), and of
attention_with_kvcache (:class:`BoundSequence`, replaying a recording.py recording).

A call is identified by its signature: for each array its type, shape, strides, dtype, device and whether it
starts on a 16-byte boundary, plus the options (each with its type) and the environment variables that
steer dispatch. Everything :mod:`cuflash.api` validates and :mod:`cuflash.launch_plan` decides depends on
the signature alone, so the first call with a signature runs the general path and, when that call is a
plain one (every input read in place, head_dim a multiple of 8, something to compute, no ALiBi, dropout or
mask), leaves its launch plan bound here. A later call with the same signature then only allocates its
outputs and workspaces through the caller's framework, writes the pointers and tensor maps into
per-thread copies of the plan's parameter blocks, and launches: no validation, no planning, no
framework-neutral views.

A bound call launches only where it was bound: the CUDA context current on the calling thread must be the
one the general path ran in (the device's primary context). Otherwise (another device current, a thread
with no context yet) the call goes the general path, which makes the right device current.
"""

from __future__ import annotations

import ctypes
import struct
import threading

from . import launch_plan, params_layout, tma
from .arrays import DeviceArray

_CACHE_LIMIT = 256
_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")
_PTR_OFFSET = {name: params_layout.OFFSETS[name] for name, kind, _, _ in params_layout.FIELDS if kind == "ptr"}
# Tensor maps remembered per map slot, by address: a training step or a decode loop brings the same few
# addresses back (caching allocators), and encoding one costs more than the rest of the call.
_MAPS_PER_SLOT = 16

# Pointer tables of the two bound kinds, by position (ops.forward's and ops.backward's pointer names).
FORWARD_POINTERS = ("q", "k", "v", "o", "lse", "tile_counter")
BACKWARD_POINTERS = ("dout", "q", "k", "v", "o", "lse", "dq", "dk", "dv", "delta", "dq_accum", "dq_semaphore")

_forward: dict = {}
_backward: dict = {}


def _typed(*values) -> tuple:
    """Option values with their types: ``causal=1`` must not hit the entry that ``causal=True`` made (the
    general path rejects the first)."""
    return (*map(type, values), *values)


def torch_signature(xs) -> tuple:
    return tuple((x.__class__, x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15) for x in xs)


def cupy_signature(xs) -> tuple:
    return tuple((x.__class__, x.shape, x.strides, x.dtype, x.data.device_id, x.data.ptr & 15) for x in xs)


def key(fw: str, xs: tuple, causal, softmax_scale, window_size, softcap, flag):
    """The signature of a call on torch or CuPy arrays ``xs`` (q, k, v for the forward; dout, q, k, v, out,
    lse for the backward) with these options (``flag``: return_lse or deterministic), or None for a window
    that is not a tuple (the general path checks and normalizes it)."""
    if window_size.__class__ is not tuple:
        return None
    sig = torch_signature(xs) if fw == "torch" else cupy_signature(xs)
    return (fw, sig, _typed(causal, softmax_scale, softcap, flag, *window_size), launch_plan.env())


def lookup_forward(key):
    return _forward.get(key)


def lookup_backward(key):
    return _backward.get(key)


def bind_backward_of_forward(forward: BoundForward, deterministic: bool, backward_key) -> None:
    """Files the bound backward of ``backward_key`` (if the general path bound one) with the bound forward it
    differentiates (torch only), under ``deterministic``: q, k and v are that forward's, out and lse its
    outputs, so only dout, out and lse remain to be checked per call (:func:`run_backward_of_forward`); an
    autograd step then looks nothing up by signature in its backward."""
    bound = _backward.get(backward_key) if backward_key is not None else None
    if bound is not None:
        sigs = backward_key[1]  # (dout, q, k, v, out, lse)'s signatures
        if sigs[4][5] == sigs[5][5] == 0:  # (out and lse 16-byte aligned, as run_backward_of_forward checks)
            forward.backwards[deterministic] = (bound, sigs[0])


def run_backward_of_forward(forward: BoundForward, deterministic: bool, dout, q, k, v, out, lse):
    """(dq, dk, dv) from the bound backward filed with ``forward``, or None (none filed, dout unlike the filed
    call's, out or lse off a 16-byte boundary, or another context current): the general path then runs.
    out and lse are ``forward``'s outputs, allocated alike every call but for their addresses; this runs on
    autograd's device thread, where each check costs several times what it does on the caller's."""
    hit = forward.backwards.get(deterministic)
    if (hit is None or (out.data_ptr() | lse.data_ptr()) & 15
            or (dout.__class__, dout.shape, dout.stride(), dout.dtype, dout.device, dout.data_ptr() & 15) != hit[1]):
        return None
    return hit[0].run(dout, q, k, v, out, lse)


def _remember(table: dict, key, bound) -> None:
    if len(table) >= _CACHE_LIMIT:
        table.clear()
    table[key] = bound


class _Launch:
    """Kernel launches from one parameter buffer whose bytes are relocated per call: pointer slots (byte
    offset, index, add) get ``values[index] + add``, tensor-map slots (byte offset, index, add, make, cache)
    the map ``make`` encodes for that address, remembered per address (a training step or a decode loop
    brings the same few back). ``values`` are a bound call's addresses: the pointer table of a plan's launch
    (:func:`_binding`) or the regions of a recorded call (:func:`_replay`). ``kernels`` are (function, grid,
    splits, threads, smem, argv_offsets), launched in order once the buffer is written: several when they
    take the same parameter bytes (the backward's preprocess, main kernel and postprocess share one block,
    which is then written once per call instead of three times). The function objects are kept: they keep
    their modules loaded while the launches may run."""

    __slots__ = ("functions", "kernels", "template", "ptr_slots", "map_slots", "scalar_slots", "_tls")

    def __init__(self, kernels, template: bytes, ptr_slots, map_slots, scalar_slots=()):
        self.functions = tuple(k[0] for k in kernels)
        self.kernels = tuple((k[0].ptr, *k[1:5], tuple(k[5])) for k in kernels)
        self.template = template
        self.ptr_slots = tuple(ptr_slots)
        self.map_slots = tuple((offset, index, add, make, {}) for offset, index, add, make in map_slots)
        self.scalar_slots = tuple(scalar_slots)  # int32 arguments given per call (recording.CallScalar)
        self._tls = threading.local()

    def __call__(self, values, stream: int, launch_kernel, scalar: int = 0) -> None:
        hit = getattr(self._tls, "buf", None)
        if hit is None:  # one parameter buffer per thread: the driver copies it during the launch call
            buf = ctypes.create_string_buffer(self.template, len(self.template))
            addr = ctypes.addressof(buf)
            launches = []
            for fn, grid, splits, threads, smem, offsets in self.kernels:
                argv = (ctypes.c_void_p * len(offsets))(*(addr + o for o in offsets))
                launches.append((fn, grid, splits, threads, smem, ctypes.addressof(argv), argv))
            hit = self._tls.buf = (buf, addr, tuple(launches))
        buf, addr, launches = hit
        for offset, index, add, make, cache in self.map_slots:
            p = values[index] + add
            m = cache.get(p)
            if m is None:
                if len(cache) >= _MAPS_PER_SLOT:
                    cache.clear()
                m = cache[p] = make(p)
            ctypes.memmove(addr + offset, m, tma.MAP_BYTES)
        pack = _U64.pack_into
        for offset, index, add in self.ptr_slots:
            pack(buf, offset, values[index] + add)
        for offset in self.scalar_slots:
            _I32.pack_into(buf, offset, scalar)
        for fn, grid, splits, threads, smem, argv, _ in launches:
            launch_kernel(fn, grid, splits, 1, threads, 1, 1, smem, stream, argv, 0)


def _accumulator_map_maker(shape, box):
    """Encodes the dq accumulator's map (``shape``) at a given address."""
    return lambda p: tma.accumulator_map(p, shape, *box)


def _tile_map_maker(view, box):
    """Encodes the tile map of ``view``'s geometry at a given address (the view's owner is not kept)."""
    shape, strides, dtype, device = view.shape, view.strides, view.dtype, view.device
    return lambda p: tma.tile_map(DeviceArray(p, shape, strides, dtype, device), box)


def _bindings(launches, names: tuple, map_views: dict, accumulator) -> tuple:
    """A plan's launches (launch_plan.KernelLaunch, in order) as :class:`_Launch` objects with their pointer
    and tensor-map fields located in the parameter block by name (per call, the pointer table, addresses
    in ``names``' order, is written in); consecutive launches with the same block share one, each kernel
    reading it at its own start (after the tensor maps for the one that has them)."""
    from .ops import sm90_params_bytes
    groups = []
    for launch in launches:
        if groups and groups[-1][0].block == launch.block and not (launch.maps and any(g.maps for g in groups[-1])):
            groups[-1].append(launch)
        else:
            groups.append([launch])
    out = []
    for group in groups:
        with_maps = [launch for launch in group if launch.maps]
        maps = with_maps[0].maps if with_maps else ()
        maps_bytes = len(maps) * tma.MAP_BYTES
        size = sm90_params_bytes(len(maps)) if maps else len(group[0].block)
        template = bytes(maps_bytes) + group[0].block  # the block with its pointer fields zero
        template += bytes(size - len(template))
        ptr_slots = [(maps_bytes + _PTR_OFFSET[n], i, 0) for i, n in enumerate(names) if n in _PTR_OFFSET]
        map_slots = []
        for j, (name, box) in enumerate(maps):
            if name == "dq_accum":
                make = _accumulator_map_maker(accumulator, box)
            else:
                make = _tile_map_maker(map_views[name], box)
            map_slots.append((j * tma.MAP_BYTES, names.index(name), 0, make))
        kernels = [(launch.fn, launch.grid, launch.splits, launch.threads, launch.smem,
                    (0 if launch.maps else maps_bytes,)) for launch in group]
        out.append(_Launch(kernels, template, ptr_slots, map_slots))
    return tuple(out)


class _Bound:
    """What every bound call shares: the framework (torch, cupy, or jax: XLA's buffers given), device,
    context, and how it allocates."""

    def __init__(self, fw: str, device: int, dtype: str):
        from cupy.cuda import driver, runtime
        self.fw, self.device, self.ctx = fw, device, driver.ctxGetCurrent()
        self._memset = runtime.memsetAsync
        self._launch_kernel = driver.launchKernel
        self._ctx_get = driver.ctxGetCurrent
        if fw == "torch":
            import torch
            self._empty, self._empty_like = torch.empty, torch.empty_like
            self._tdevice = torch.device("cuda", device)
            names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                     "int32": torch.int32}
            self._dtype, self._f32, self._i32 = names[dtype], torch.float32, torch.int32
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            self._stream = (lambda: raw(device)) if raw else (lambda: torch.cuda.current_stream(device).cuda_stream)
        elif fw == "jax":
            # Outputs are XLA's buffers. Workspaces are this bound call's own, allocated at its first run from
            # CuPy's pool on XLA's stream and kept: XLA runs a computation's calls in order on that one stream
            # (which is part of the signature) and never captures this custom call into a CUDA graph, so each
            # run finds them free; dropped with the bound call, the pool hands them out again only on that
            # stream, in order. (A workspace per run from the pool, a device and a stream switch each, took
            # most of the 43 us a bound forward spent in the callback on the H200.)
            from . import arrays
            workspaces = {}

            def empty(shape, dtype, stream, name):
                hit = workspaces.get(name)
                if hit is None:
                    hit = workspaces[name] = arrays.empty("cupy", shape, dtype, device, stream)[1].owner
                return hit
            self._empty = empty
            self._f32, self._i32 = "float32", "int32"
        else:
            import cupy
            import numpy as np

            from .arrays import cupy_bfloat16
            self._empty = cupy.empty
            self._dtype = (cupy_bfloat16() or np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
            self._f32, self._i32 = np.float32, np.int32
            self._stream = lambda: cupy.cuda.get_current_stream().ptr

    def _alloc(self, shape, dtype, stream, name=""):
        """(array, address) of a new output or workspace; ``name`` tells a bound JAX call's workspaces apart."""
        if self.fw == "torch":
            t = self._empty(shape, dtype=dtype, device=self._tdevice)
            return t, t.data_ptr()
        a = self._empty(shape, dtype, stream, name) if self.fw == "jax" else self._empty(shape, dtype=dtype)
        return a, a.data.ptr

    def _ptr(self, x) -> int:
        return x.data_ptr() if self.fw == "torch" else x.data.ptr

    def _like(self, view) -> bool:
        """Whether an output of ``view``'s shape and dtype can be allocated as ``torch.empty_like`` of the
        array ``view`` was made from (a torch array with C-contiguous strides, which empty_like then keeps):
        0.9 against 1.9 us for torch.empty with its keyword arguments (this VM), per output."""
        return self.fw == "torch" and tuple(view.strides) == _contiguous_strides(view.shape)

    def ready(self) -> bool:
        """Whether this thread's current context is the one the call was bound in."""
        return self._ctx_get() == self.ctx


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class BoundForward(_Bound):
    """The dense forward of one signature (ops.forward's launch, bound)."""

    def __init__(self, fp, fw: str, views: dict, out_shape: tuple):
        q = views["q"]
        super().__init__(fw, q.device, q.dtype)
        self.out_shape = tuple(out_shape)
        self._out_like_q = self._like(q) and tuple(q.shape) == self.out_shape
        b, sq, hq = out_shape[:3]
        self.lse_shape = (b, hq, sq)
        self.counter = fp.tile_counter
        self.backwards = {}  # deterministic -> (BoundBackward, signatures of dout, out, lse): see bind_backward_of_forward
        from .ops import stream_tile_counter
        self._stream_counter = stream_tile_counter
        self.binding, = _bindings((fp.launch,), FORWARD_POINTERS, views, None)

    def run(self, q, k, v):
        """(out, lse) as the caller's arrays, or None when the thread's context is not the bound one."""
        if not self.ready():
            return None
        stream = self._stream()
        if self._out_like_q:
            out = self._empty_like(q)
            po = out.data_ptr()
        else:
            out, po = self._alloc(self.out_shape, self._dtype, stream)
        lse, pl = self._alloc(self.lse_shape, self._f32, stream)
        ptr = self._ptr
        self._launch([ptr(q), ptr(k), ptr(v), po, pl], stream)
        return out, lse

    def run_into(self, ptrs: list, stream: int) -> bool:
        """Launches into given outputs: ``ptrs`` the addresses of q, k, v, out, lse (XLA's buffers). False
        when the thread's context is not the bound one."""
        if not self.ready():
            return False
        self._launch(list(ptrs), stream)
        return True

    def _launch(self, ptrs: list, stream: int) -> None:
        counter = None
        ptrs.append(0)
        if self.counter:
            ptrs[5] = None if self.fw == "jax" else self._stream_counter(self.fw, self.device, stream)
            if ptrs[5] is None:  # (JAX: the bound call's own workspace, on XLA's one stream)
                counter, ptrs[5] = self._alloc((1,), self._i32, stream, "tile_counter")
                self._memset(ptrs[5], 0, 4, stream)
        self.binding(ptrs, stream, self._launch_kernel)
        del counter  # freed after enqueueing: stream-ordered allocators reuse it safely


class BoundBackward(_Bound):
    """The dense backward of one signature (ops.backward's launches, bound)."""

    def __init__(self, bp, fw: str, views: dict, grads: tuple):
        q = views["q"]
        super().__init__(fw, q.device, q.dtype)
        self.grad_shapes = tuple(tuple(g.shape) for g in grads)
        self._grads_like = all(self._like(views[n]) and tuple(views[n].shape) == shape
                               for n, shape in zip("qkv", self.grad_shapes))
        b, sq, hq = q.shape[:3]
        self.delta_shape = None if bp.delta_in_dq else (b, hq, sq)
        self.acc_shape, self.sem_shape = bp.dq_accum_shape, bp.dq_semaphore_shape
        map_views = {n: views[n] for n in ("q", "k", "v", "dout")}
        self.bindings = _bindings([launch for launch in bp.launches if launch.grid], BACKWARD_POINTERS, map_views,
                                  bp.dq_accum_shape)

    def run(self, dout, q, k, v, out, lse):
        """(dq, dk, dv) as the caller's arrays, or None when the thread's context is not the bound one."""
        if not self.ready():
            return None
        stream = self._stream()
        if self._grads_like:
            like = self._empty_like
            dq, dk, dv = like(q), like(k), like(v)
            pdq, pdk, pdv = dq.data_ptr(), dk.data_ptr(), dv.data_ptr()
        else:
            dq, pdq = self._alloc(self.grad_shapes[0], self._dtype, stream)
            dk, pdk = self._alloc(self.grad_shapes[1], self._dtype, stream)
            dv, pdv = self._alloc(self.grad_shapes[2], self._dtype, stream)
        ptr = self._ptr
        self._launch([ptr(dout), ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse), pdq, pdk, pdv], stream)
        return dq, dk, dv

    def run_into(self, ptrs: list, stream: int) -> bool:
        """Launches into given gradients: ``ptrs`` the addresses of dout, q, k, v, out, lse, dq, dk, dv (XLA's
        buffers). False when the thread's context is not the bound one."""
        if not self.ready():
            return False
        self._launch(list(ptrs), stream)
        return True

    def _launch(self, ptrs: list, stream: int) -> None:
        delta, pd = self._alloc(self.delta_shape, self._f32, stream, "delta") if self.delta_shape else (None, ptrs[6])
        acc, pa = self._alloc(self.acc_shape, self._f32, stream, "dq_accum") if self.acc_shape else (None, 0)
        sem, ps = self._alloc(self.sem_shape, self._i32, stream, "dq_semaphore") if self.sem_shape else (None, 0)
        ptrs += (pd, pa, ps)
        for binding in self.bindings:
            binding(ptrs, stream, self._launch_kernel)
        del delta, acc, sem  # freed after enqueueing: stream-ordered allocators reuse them safely


def _replay(step) -> _Launch:
    """A recorded launch (recording.Recording's "launch" step) relocated to a bound call's regions."""
    _, function, grid, splits, threads, smem, template, argv_offsets, ptr_slots, maps, scalar_offsets = step
    map_slots = []
    for offset, view, box, region, add in maps:
        if view is None:  # the dq accumulator: box is (address, shape, box)
            make = _accumulator_map_maker(box[1], box[2])
        else:
            make = _tile_map_maker(view, box)
        map_slots.append((offset, region, add, make))
    return _Launch(((function, grid, splits, threads, smem, argv_offsets),), template, ptr_slots, map_slots,
                   scalar_offsets)


class BoundSequence(_Bound):
    """A recorded call (recording.Recording) replayed for new arrays of its signature: the outputs allocated
    by the caller's framework, every other allocation of the call carved from one workspace, then the
    recorded launches and memsets with their pointers moved to the new arrays. For calls that are a
    sequence of small kernels (attention_with_kvcache: append, forward, merge), where the general path's
    per-call Python is most of the time."""

    _ALIGN = 256  # each carved allocation starts where a framework allocation would (TMA needs 16 bytes)

    def __init__(self, rec, fw: str, device: int, dtype: str, outputs: tuple):
        """``outputs``: the recording's regions of the arrays the call returned, in return order."""
        super().__init__(fw, device, dtype)
        import numpy as np
        if fw == "torch":
            import torch
            natives = {dtype: self._dtype, "float32": self._f32, "int32": self._i32, "uint8": torch.uint8}
        else:
            natives = {dtype: self._dtype, "float32": self._f32, "int32": self._i32, "uint8": np.uint8}
        self._u8 = natives["uint8"]
        self.out_specs, self.temps, self.ws_bytes = [], [], 0
        for j, (shape, dt) in enumerate(rec.allocs):
            region = rec.inputs + j
            if region in outputs:
                self.temps.append((True, len(self.out_specs)))
                self.out_specs.append((shape, natives[dt]))
            else:
                self.temps.append((False, self.ws_bytes))
                nbytes = rec.regions[region][1]
                self.ws_bytes += -(-nbytes // self._ALIGN) * self._ALIGN
        order = [outputs.index(rec.inputs + j) for j in range(len(rec.allocs)) if rec.inputs + j in outputs]
        self.out_order = tuple(order.index(i) for i in range(len(outputs)))
        from cupy.cuda import runtime

        from . import ops
        steps = []
        for step in rec.steps:
            if step[0] == "launch":
                steps.append((0, _replay(step)))
            else:
                kind, region, add, value, count = step
                steps.append((1 if kind == "memset8" else 2, (region, add, value, count)))
        self.steps = tuple(steps)
        self.scalar_max = rec.scalar_max
        self._memset8 = runtime.memsetAsync
        self._memset32 = ops.memset_words

    def run(self, xs, scalar: int = 0):
        """The outputs (caller's arrays, in the recorded call's return order) for the caller's arrays ``xs``
        in the recording's role order (None where absent) and the call's CallScalar value ``scalar``, or
        None when the thread's context is not the bound one or ``scalar`` lies outside [0, scalar_max] (the
        general path, which raises there)."""
        if not self.ready() or (self.scalar_max is not None and not 0 <= scalar <= self.scalar_max):
            return None
        stream = self._stream()
        ptr = self._ptr
        bases = [0 if x is None else ptr(x) for x in xs]
        outs = [self._alloc(shape, dt, stream) for shape, dt in self.out_specs]
        ws, pw = self._alloc((self.ws_bytes,), self._u8, stream) if self.ws_bytes else (None, 0)
        for is_out, i in self.temps:
            bases.append(outs[i][1] if is_out else pw + i)
        launch_kernel = self._launch_kernel
        for kind, step in self.steps:
            if kind == 0:
                step(bases, stream, launch_kernel, scalar)
            elif kind == 1:
                region, add, value, count = step
                self._memset8(bases[region] + add, value, count, stream)
            else:
                region, add, value, count = step
                self._memset32(bases[region] + add, value, count, stream)
        del ws  # freed after enqueueing: stream-ordered allocators reuse it safely
        return [outs[i][0] for i in self.out_order]


_sequences: dict = {}


def clear() -> None:
    """Forgets every bound call (a test or benchmark that changes how the general path decides)."""
    _forward.clear()
    _backward.clear()
    _sequences.clear()


def view_identity(x, fw: str) -> tuple:
    """What makes two torch or CuPy arrays the same view: address, shape, strides and dtype (raises for other
    kinds of array)."""
    if fw == "torch":
        return (x.data_ptr(), x.shape, x.stride(), x.dtype)
    if fw == "cupy":
        return (x.data.ptr, x.shape, x.strides, x.dtype)
    raise TypeError(f"no view identity for {fw} arrays")


def sequence_key(kind: str, fw: str, xs, options: tuple):
    """The signature of a recorded call (:class:`BoundSequence`) of ``kind`` on the arrays ``xs`` (None where
    absent) with ``options``: :func:`key`'s rule (every array's type, shape, strides, dtype, device and
    16-byte alignment, the options with their types, the dispatch environment). None where a call is not
    bound: arrays other than torch's or CuPy's, or of both, and CuPy arrays with negative strides."""
    from .arrays import framework_of
    if fw not in ("torch", "cupy"):
        return None
    present = []
    for x in xs:
        if x is not None:
            if framework_of(x) != fw or (fw == "cupy" and any(st < 0 for st in x.strides)):
                return None
            present.append(x)
    table = torch_signature(present) if fw == "torch" else cupy_signature(present)
    return (kind, fw, tuple(x is None for x in xs), table, _typed(*options), launch_plan.env())


def lookup_sequence(key):
    return _sequences.get(key)


def bind_sequence(key, rec, fw: str, device: int, dtype: str, outputs: tuple) -> None:
    """Binds a finished recording under ``key`` (see :class:`BoundSequence`); a failed one is not bound."""
    if rec.failed is None:
        _remember(_sequences, key, BoundSequence(rec, fw, device, dtype, outputs))


def bind_forward(key, fp, fw, views: dict, out_shape: tuple) -> None:
    """Binds ``fp`` (ops.forward's plan) under ``key``: ``views`` the q, k, v and o views it was planned for
    (their geometry fixes the tensor maps), ``out_shape`` the output each run allocates."""
    _remember(_forward, key, BoundForward(fp, fw, views, out_shape))


def bind_backward(key, bp, fw, views, grads) -> None:
    _remember(_backward, key, BoundBackward(bp, fw, views, grads))
