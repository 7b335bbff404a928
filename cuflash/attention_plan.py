"""``cuflash.plan``: an attention problem checked, dispatched and compiled once, then run as often as its
arrays come.

A training step or a decode loop calls attention on arrays of one shape again and again, and
:func:`cuflash.attention` checks every argument on every call. A plan does the checks and the kernel
compiles once; a run confirms that the arrays are of the planned kind (type, shape, dtype, device: a few
attribute reads) and launches. The launch plans under it (launch_plan.py: variant, grid, shared memory,
parameter block) are made here for the planned layouts, so the first run neither plans nor compiles.
"""

from __future__ import annotations

from . import api, arrays, executor


class AttentionPlan:
    """One attention problem, checked and planned by :func:`plan`; run it with :meth:`run` and
    :meth:`run_backward`.

    Attributes
    ----------
    shapes : tuple
        ``(q_shape, k_shape)``: (batch, seqlen_q, heads_q, head_dim) and (batch, seqlen_k, heads_k, head_dim).
    dtype : str
        ``"float16"``, ``"bfloat16"`` (GPU), or ``"float16"``/``"float32"``/``"float64"`` (CPU path).
    device : int or str
        The CUDA device ordinal, or ``"cpu"``.
    framework : str
        The array library of the planned arrays (``"torch"``, ``"cupy"``, ``"jax"``, ``"numpy"``, ``"dlpack"``).
    causal, softmax_scale, window_size, softcap, return_lse, deterministic
        The options, as checked (``softmax_scale`` resolved to its value).
    """

    __slots__ = ("_call", "_alibi", "causal", "softmax_scale", "window_size", "softcap", "return_lse",
                 "deterministic", "_checked")

    def __init__(self, call, alibi, causal, scale, window, softcap, return_lse, deterministic):
        self._call = call
        self._alibi = alibi
        self.causal, self.softmax_scale, self.window_size, self.softcap = causal, scale, window, softcap
        self.return_lse, self.deterministic = return_lse, deterministic
        self._checked = set()  # bound-call signatures (executor.py) whose arrays this plan has checked

    @property
    def shapes(self) -> tuple:
        c = self._call
        return (c.batch, c.seqlen_q, c.heads_q, c.head_dim), (c.batch, c.seqlen_k, c.heads_k, c.head_dim)

    @property
    def dtype(self) -> str:
        return self._call.dtype

    @property
    def device(self):
        return self._call.device

    @property
    def framework(self) -> str:
        return self._call.fw

    def __repr__(self) -> str:
        (qs, ks), c = self.shapes, self._call
        return (f"AttentionPlan(q={qs}, k={ks}, dtype={c.dtype}, device={c.device}, framework={c.fw}, "
                f"causal={self.causal}, softmax_scale={self.softmax_scale}, window_size={self.window_size}, "
                f"softcap={self.softcap}, alibi={self._alibi is not None})")

    def _check(self, names, xs, shapes):
        c = self._call
        for name, x, shape in zip(names, xs, shapes):
            fw = arrays.framework_of(x)
            if fw != c.fw:
                raise TypeError(f"{name} is a {fw} array; this plan was made for {c.fw} arrays")
            if tuple(x.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(x.shape)}; this plan was made for {shape}")
            dt = arrays.dtype_name(x, fw)
            if dt != c.dtype:
                raise TypeError(f"{name} has dtype {dt}; this plan was made for {c.dtype}")
            dev = arrays.device_of(x, fw)
            if dev != c.device:
                raise ValueError(f"{name} is on device {dev}; this plan was made for device {c.device}")

    def run(self, q, k, v):
        """The planned forward: :func:`cuflash.attention` with the plan's options.

        Parameters
        ----------
        q, k, v : arrays
            The planned array type, shapes, dtype and device; any strides (a layout other than the planned
            one is planned at its first run).

        Returns
        -------
        out, or (out, lse) when the plan was made with ``return_lse=True``: as :func:`cuflash.attention`.

        Raises
        ------
        TypeError, ValueError
            An array of another type, shape, dtype or device than planned (naming the argument).
        """
        key = self._key((q, k, v), self.return_lse)
        if key in self._checked:
            bound = executor.lookup_forward(key)
            res = bound.run(q, k, v) if bound is not None else None
            if res is not None:
                return res if self.return_lse else res[0]
        self._check(("q", "k", "v"), (q, k, v), self.shapes + self.shapes[1:])
        self._remember(key)
        c = self._call
        if c.fw == "torch" and api._needs_autograd(q, k, v):
            from . import torch as torch_adapter
            return torch_adapter.attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale,
                                           window_size=self.window_size, softcap=self.softcap,
                                           alibi_slopes=self._alibi, return_lse=self.return_lse)
        return api._forward(c, q, k, v, self._alibi, self.causal, self.softmax_scale, self.window_size, self.softcap,
                            self.return_lse, bind_key=key)

    def run_backward(self, dout, q, k, v, out, lse):
        """The planned backward: :func:`cuflash.attention_backward` with the plan's options (``deterministic``
        included).

        Parameters
        ----------
        dout : array, shape of q
            Gradient of the loss with respect to ``out``.
        q, k, v : arrays
            As for :meth:`run`.
        out, lse : arrays
            The forward's output and float32 (batch, heads_q, seqlen_q) natural-log LSE.

        Returns
        -------
        dq, dk, dv : as :func:`cuflash.attention_backward`.

        Raises
        ------
        TypeError, ValueError
            As :meth:`run`, and for ``dout``/``out``/``lse`` whose shape, dtype or device do not match.
        """
        key = self._key((dout, q, k, v, out, lse), self.deterministic)
        if key in self._checked:
            bound = executor.lookup_backward(key)
            res = bound.run(dout, q, k, v, out, lse) if bound is not None else None
            if res is not None:
                return res
        self._check(("q", "k", "v"), (q, k, v), self.shapes + self.shapes[1:])
        c = self._call
        api._check_backward_arrays(c, dout, out, lse)
        self._remember(key)
        return api._backward(c, dout, q, k, v, out, lse, self._alibi, self.causal, self.softmax_scale,
                             self.window_size, self.softcap, self.deterministic, bind_key=key)

    def _key(self, xs, flag):
        """The bound-call signature of these arrays under this plan's options (None: no fast path)."""
        if self._alibi is not None or not self._call.on_gpu:
            return None
        return api._bound_key(xs, self.causal, self.softmax_scale, self.window_size, self.softcap, flag, 0.0)

    def _remember(self, key):
        if key is not None:
            if len(self._checked) >= 64:
                self._checked.clear()
            self._checked.add(key)


def plan(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
         return_lse=False, deterministic=False, dropout_p=0.0, backward=True) -> AttentionPlan:
    """Check and plan an attention problem once, for repeated calls on arrays of the same kind.

    Every argument is checked here exactly as :func:`cuflash.attention` checks it, and on a GPU the kernels
    the problem needs are compiled (or loaded from the disk cache) and their launches planned for the
    layouts of ``q``, ``k``, ``v`` (and contiguous ``out``/gradients). :meth:`AttentionPlan.run` then only
    confirms each array's type, shape, dtype and device before launching; its results equal
    :func:`cuflash.attention`'s bit for bit.

    Parameters
    ----------
    q, k, v : arrays
        Example arrays of the problem (shapes, dtype, device and array type as :func:`cuflash.attention`
        takes them); their values are not read.
    causal, softmax_scale, window_size, softcap, return_lse
        As :func:`cuflash.attention`; fixed for the plan.
    alibi_slopes : array or None
        As :func:`cuflash.attention`. The plan keeps this array and every run reads it, so in-place updates
        are seen.
    deterministic : bool
        As :func:`cuflash.attention_backward`, for :meth:`AttentionPlan.run_backward`.
    dropout_p : float
        Only 0.0 (a plan does not take dropout yet: NotImplementedError; :func:`cuflash.attention` does).
    backward : bool
        Also compile and plan the backward's kernels (default True).

    Returns
    -------
    AttentionPlan

    Raises
    ------
    TypeError, ValueError, NotImplementedError
        As :func:`cuflash.attention`, before anything is compiled or launched.

    Examples
    --------
    >>> p = cuflash.plan(q, k, v, causal=True, return_lse=True)
    >>> for step in range(n):
    ...     out, lse = p.run(q, k, v)
    ...     dq, dk, dv = p.run_backward(dout, q, k, v, out, lse)
    """
    call = api._Call(q, k, v)
    causal, scale, window, softcap, alibi = api._check_options(call, causal, softmax_scale, window_size, softcap,
                                                               alibi_slopes)
    return_lse = api._check_flag("return_lse", return_lse)
    deterministic = api._check_flag("deterministic", deterministic)
    backward = api._check_flag("backward", backward)
    api.check_dropout(dropout_p, "cuflash.plan")
    planned = AttentionPlan(call, alibi, causal, scale, window, softcap, return_lse, deterministic)
    if call.on_gpu and not call.empty:
        _prepare_launches(call, q, k, v, alibi, planned, backward)
    return planned


def _contiguous(shape, dtype, device) -> arrays.DeviceArray:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    # Address 0: aligned like every allocation, which is all a launch plan reads of an address.
    return arrays.DeviceArray(0, tuple(shape), tuple(reversed(strides)), dtype, device)


def _prepare_launches(call, q, k, v, alibi, planned, backward):
    """Compiles the kernels and makes the launch plans for the planned layouts (arrays the kernels read in
    place; others are copied per call and planned at their first run)."""
    from . import launch_plan, ops
    stream = arrays.current_stream(call.fw, call.device)
    views = [arrays.device_view(x, call.fw, stream) for x in (q, k, v)]
    if call.width != call.head_dim or not all(api._readable_in_place(x) for x in views):
        return
    cc = api._cc(call.device)
    alibi_view = None
    if alibi is not None:
        alibi_view = arrays.device_view(alibi, arrays.framework_of(alibi), stream)
        if alibi_view.strides[-1] != 1:
            alibi_view = _contiguous(alibi_view.shape, alibi_view.dtype, call.device)
    opts = dict(causal=planned.causal, window_size=planned.window_size, softmax_scale=planned.softmax_scale,
                softcap=planned.softcap, cc=cc)
    qshape = (call.batch, call.seqlen_q, call.heads_q, call.head_dim)
    out = _contiguous(qshape, call.dtype, call.device)
    with arrays.device_scope(call.fw, call.device):
        launch_plan.forward(*views, out, alibi_view, sm_count=ops._sm_count(call.device), **opts)
        if backward:
            grads = [_contiguous(x.shape, call.dtype, call.device) for x in views]
            launch_plan.backward(out, *views, out, alibi_view, *grads, deterministic=planned.deterministic, **opts)
