"""cuflash.jax (cuflash/jax.py) on CPU JAX: attention under jax.jit equals the float64 reference, its
gradients (jax.custom_vjp through cuflash's backward) equal the reference gradients, jax.vmap maps it, a
jitted training step of a small attention block with value_and_grad agrees with the same block on
jax.nn.dot_product_attention(implementation="xla"), bad arguments raise at trace time, errors inside the
custom call (_jax_callback.py) reach JAX as exceptions, eager calls compile once, and operands and options
are taken as JAX takes them; on a GPU backend (gpu-marked) the custom call launches the kernels on XLA's
stream and matches the eager GPU functions.
"""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="tests of the JAX adapter (cuflash.jax); need jax")
jnp = pytest.importorskip("jax.numpy")

import cuflash.jax as cfj  # noqa: E402
from cuflash import reference  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_jax_for_cpu_tests(request):
    """The tests without the gpu mark are CPU JAX's: cuflash.jax picks its path by JAX's default backend, so
    where that is a GPU (a CUDA jaxlib) they skip, and the gpu-marked ones test that path."""
    if request.node.get_closest_marker("gpu") is None and jax.default_backend() != "cpu":
        pytest.skip(f"a CPU JAX test; JAX's default backend here is {jax.default_backend()}")


def _inputs(dtype=np.float32, b=2, sq=17, sk=23, hq=4, hk=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in ((b, sq, hq, d), (b, sk, hk, d), (b, sk, hk, d),
                                                                 (b, sq, hq, d)))


OPTIONS = [dict(), dict(causal=True), dict(window_size=(5, 2), softcap=3.0, softmax_scale=0.2),
           dict(causal=True, alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4], np.float32))]


@pytest.mark.parametrize("opts", OPTIONS)
def test_jit_forward_and_grad_equal_reference(opts):
    q, k, v, do = _inputs()
    alibi = opts.get("alibi_slopes")
    static = {n: x for n, x in opts.items() if n != "alibi_slopes"}

    @jax.jit
    def fwd(q, k, v, alibi):
        return cfj.attention(q, k, v, alibi_slopes=alibi, return_lse=True, **static)

    out, lse = fwd(q, k, v, alibi)
    ref_out, ref_lse = reference.attention_reference(q, k, v, **opts)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-5, rtol=2e-5)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32

    loss = lambda q, k, v: (cfj.attention(q, k, v, alibi_slopes=alibi, **static) * do).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g, r in zip(grads, reference.attention_backward_reference(do, q, k, v, **opts)):
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-4, rtol=1e-4)


def test_vmap_maps_over_a_leading_axis():
    q, k, v, _ = _inputs()
    qs, ks, vs = (jnp.stack([x, 0.5 * x]) for x in (q, k, v))
    out = jax.jit(jax.vmap(lambda q, k, v: cfj.attention(q, k, v, causal=True)))(qs, ks, vs)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(out[i]),
                                      np.asarray(cfj.attention(qs[i], ks[i], vs[i], causal=True)))


def test_dropout_under_jit_equals_the_numpy_path():
    import cuflash
    q, k, v, _ = _inputs()
    got = jax.jit(lambda q, k, v: cfj.attention(q, k, v, dropout_p=0.2, dropout_seed=9))(q, k, v)
    np.testing.assert_array_equal(np.asarray(got), cuflash.attention(q, k, v, dropout_p=0.2, dropout_seed=9))


def test_training_step_matches_xla_attention():
    """value_and_grad of a small attention block (projections, GQA attention, output projection) inside a
    jitted SGD step: loss and parameter gradients agree with the same block on XLA's attention."""
    rng = np.random.default_rng(1)
    dm, hq, hk, d = 32, 4, 2, 8
    params = {n: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.2) for n, s in
              (("wq", (dm, hq * d)), ("wk", (dm, hk * d)), ("wv", (dm, hk * d)), ("wo", (hq * d, dm)))}
    x = jnp.asarray(rng.standard_normal((2, 24, dm)).astype(np.float32))

    def block(params, x, attend):
        b, s, _ = x.shape
        q = (x @ params["wq"]).reshape(b, s, hq, d)
        k = (x @ params["wk"]).reshape(b, s, hk, d)
        v = (x @ params["wv"]).reshape(b, s, hk, d)
        return ((attend(q, k, v).reshape(b, s, hq * d) @ params["wo"]) ** 2).mean()

    ours = lambda q, k, v: cfj.attention(q, k, v, causal=True)  # noqa: E731
    theirs = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")  # noqa: E731

    @jax.jit
    def step(params, x):
        loss, grads = jax.value_and_grad(block)(params, x, ours)
        return loss, grads, jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads)

    loss, grads, new = step(params, x)
    ref_loss, ref_grads = jax.value_and_grad(block)(params, x, theirs)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    for n in params:
        np.testing.assert_allclose(np.asarray(grads[n]), np.asarray(ref_grads[n]), atol=1e-5, rtol=1e-4)
    assert float(step(new, x)[0]) < float(loss)


def _packed(dtype=np.float32, lens=(5, 0, 17, 1, 9), hq=4, hk=2, d=16, seed=3, spare=2):
    rng = np.random.default_rng(seed)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    total = int(cu[-1]) + spare
    q, k, v, dout = (rng.standard_normal((total, h, d)).astype(dtype) for h in (hq, hk, hk, hq))
    return q, k, v, dout, cu


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(3, 1), softcap=2.0),
                                  dict(causal=True, alibi_slopes=np.array([0.1, 0.2, 0.3, 0.4], np.float32))])
def test_varlen_jit_forward_and_grad_equal_per_sequence_reference(opts):
    """attention_varlen under jit: each packed sequence (lengths 0, 1, 5, 9, 17, GQA) equals the float64
    reference of that sequence alone; rows past the last sequence are zero with LSE +inf; jax.grad gives the
    reference gradients (zero outside every sequence); cu_seqlens is traced (new lengths, no retrace)."""
    q, k, v, dout, cu = _packed()  # float32: JAX runs without x64 here
    traces = []

    def loss(q, k, v, cu):
        traces.append(1)
        out, lse = cfj.attention_varlen(q, k, v, cu, cu, 17, 17, return_lse=True, **opts)
        return (out * dout).sum(), (out, lse)
    (val, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v,
                                                                                              jnp.asarray(cu))
    out, lse = np.asarray(out), np.asarray(lse)
    for i in range(len(cu) - 1):
        rows = slice(cu[i], cu[i + 1])
        if cu[i + 1] == cu[i]:
            continue
        q64, k64, v64, do64 = (x[None, rows].astype(np.float64) for x in (q, k, v, dout))
        ref, ref_lse = reference.attention_reference(q64, k64, v64, **opts)
        np.testing.assert_allclose(out[rows], ref[0], atol=2e-5)
        np.testing.assert_allclose(lse[:, rows], ref_lse[0], atol=2e-5)
        refs = reference.attention_backward_reference(do64, q64, k64, v64, **opts)
        for g, r in zip(grads, refs):
            np.testing.assert_allclose(np.asarray(g)[rows], r[0], atol=1e-4)
    assert np.all(out[cu[-1]:] == 0) and np.all(np.isinf(lse[:, cu[-1]:]))
    assert all(np.all(np.asarray(g)[cu[-1]:] == 0) for g in grads)
    other = np.array([0, 17, 17, 20, 30, 31], np.int32)
    jax.jit(lambda q, k, v, cu: cfj.attention_varlen(q, k, v, cu, cu, 17, 17, **opts))(q, k, v, jnp.asarray(other))
    jitted = jax.jit(lambda q, k, v, cu: loss(q, k, v, cu)[0])
    jitted(q, k, v, jnp.asarray(cu))
    n = len(traces)
    jitted(q, k, v, jnp.asarray(other))
    assert len(traces) == n


def test_varlen_vmap_runs_each_mapped_call():
    """jax.vmap over a leading axis of packed batches: each mapped call equals the unmapped one."""
    q, k, v, _, cu = _packed()
    f = lambda q, k, v: cfj.attention_varlen(q, k, v, jnp.asarray(cu), jnp.asarray(cu), 17, 17, causal=True)  # noqa: E731
    mapped = jax.jit(jax.vmap(f))(np.stack([q, 2 * q]), np.stack([k, k]), np.stack([v, v]))
    np.testing.assert_allclose(np.asarray(mapped[0]), np.asarray(f(q, k, v)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mapped[1]), np.asarray(f(2 * q, k, v)), atol=1e-6)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v, cu: cfj.attention_varlen(q, k, v, cu.astype(jnp.float32), cu, 17, 17), TypeError,
     "cu_seqlens_q"),
    (lambda q, k, v, cu: cfj.attention_varlen(q[None], k, v, cu, cu, 17, 17), ValueError, "3-D"),
    (lambda q, k, v, cu: cfj.attention_varlen(q, k, v, cu, cu[:-1], 17, 17), ValueError, "cu_seqlens_k"),
    (lambda q, k, v, cu: cfj.attention_varlen(q, k, v, cu, cu, 17.0, 17), TypeError, "max_seqlen_q"),
])
def test_varlen_bad_arguments_raise_at_trace_time(make, exc, match):
    q, k, v, _, cu = _packed()
    with pytest.raises(exc, match=match):
        jax.jit(make)(q, k, v, jnp.asarray(cu))


def test_argument_errors_name_the_argument():
    """Non-array operands and a non-bool return_lse raise TypeError naming the argument (not an
    AttributeError from inside the checks); the array functions called on traced values inside jax.jit point
    to cuflash.jax; cu_seqlens values the CPU path rejects reach JAX as an error naming them."""
    import cuflash
    q, k, v, _, cu = _packed()
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        cfj.attention_varlen(q, k, v, [0, 4], jnp.asarray(cu), 17, 17)
    with pytest.raises(TypeError, match="q must be a JAX array"):
        cfj.attention(q[None].tolist(), k[None], v[None])
    with pytest.raises(TypeError, match="return_lse"):
        cfj.attention(q[None], k[None], v[None], return_lse="no")
    with pytest.raises(TypeError, match="return_lse"):
        cfj.attention_varlen(q, k, v, jnp.asarray(cu), jnp.asarray(cu), 17, 17, return_lse="no")
    with pytest.raises(TypeError, match="cuflash.jax"):
        jax.jit(lambda q, k, v: cuflash.attention(q, k, v))(q[None], k[None], v[None])
    with pytest.raises(Exception, match="(?s)ValueError.*max_seqlen_q"):
        jax.jit(lambda q: cfj.attention_varlen(q, k, v, jnp.asarray(cu), jnp.asarray(cu), 2, 17))(q).block_until_ready()


def test_gpu_rules_at_trace_time(monkeypatch):
    """With a GPU backend the trace-time checks run on shape-only stand-ins of device arrays (no values, no
    len()): bf16 / fp16 pass, float32 is refused with the GPU rule's message, for the dense and the packed
    functions (checked here by pretending JAX's backend is a GPU; nothing runs)."""
    monkeypatch.setattr(cfj, "_on_gpu", lambda: True)
    q, k, v, _, cu = _packed()
    for dtype in (jnp.bfloat16, jnp.float16):
        qd, kd, vd = (jnp.asarray(x, dtype) for x in (q, k, v))
        assert cfj._check_varlen(qd, kd, vd, jnp.asarray(cu), jnp.asarray(cu), 17, 17, True, None, (-1, -1), 0.0,
                                 None)[4:] == (17, 17)
        cfj._check(qd[None], kd[None], vd[None], True, None, (-1, -1), 0.0, None, (0.0, None, 0))
    with pytest.raises(TypeError, match="float16"):
        cfj._check_varlen(q, k, v, jnp.asarray(cu), jnp.asarray(cu), 17, 17, True, None, (-1, -1), 0.0, None)
    with pytest.raises(TypeError, match="float16"):
        cfj._check(q[None], k[None], v[None], True, None, (-1, -1), 0.0, None, (0.0, None, 0))


@pytest.mark.parametrize("kind", ["bool_2d", "additive_heads", "bool_causal"])
def test_attn_mask_under_jit_and_grad_equals_reference(kind):
    """attn_mask as a traced operand under jit: a boolean (seqlen_q, seqlen_k) mask, an additive float mask per
    (batch, head) (broadcast over rows: shape (batch, heads, 1, seqlen_k)), a boolean one with causal; out, LSE
    and the gradients equal the float64 reference with that mask; a float mask's gradient (a learned bias)
    equals jax.nn.dot_product_attention's gradient of its bias."""
    q, k, v, do = _inputs()
    rng = np.random.default_rng(5)
    if kind == "additive_heads":
        mask = np.where(rng.random((2, 4, 1, 23)) < 0.8, rng.standard_normal((2, 4, 1, 23)), -np.inf).astype(np.float32)
        opts = dict()
    else:
        mask = rng.random((17, 23)) < 0.7
        mask[3] = False  # a row that sees no key: zeros, LSE +inf
        opts = dict(causal=True) if kind == "bool_causal" else dict()
    out, lse = jax.jit(lambda q, k, v, m: cfj.attention(q, k, v, attn_mask=m, return_lse=True, **opts))(q, k, v, mask)
    ref, ref_lse = reference.attention_reference(q, k, v, attn_mask=mask, **opts)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, atol=2e-5, rtol=2e-5)
    argnums = (0, 1, 2, 3) if mask.dtype != bool else (0, 1, 2)
    loss = lambda q, k, v, m: (cfj.attention(q, k, v, attn_mask=m, **opts) * do).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=argnums))(q, k, v, mask)
    for g, r in zip(grads, reference.attention_backward_reference(do, q, k, v, attn_mask=mask, **opts)):
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-4, rtol=1e-4)
    if mask.dtype != bool:
        rep = lambda x: jnp.repeat(x, 2, axis=2)  # noqa: E731  (heads_k 2 -> heads_q 4)
        theirs = jax.grad(lambda m: (jax.nn.dot_product_attention(q, rep(k), rep(v), bias=m) * do).sum())(mask)
        assert grads[3].shape == mask.shape
        np.testing.assert_allclose(np.asarray(grads[3]), np.asarray(theirs), atol=1e-4, rtol=1e-4)


def test_attn_mask_vmap_and_block_mask():
    """vmap over per-example masks runs each mapped call with its own mask; a cuflash.BlockMask (static) gives
    what its dense mask gives as attn_mask."""
    from cuflash import BlockMask
    q, k, v, _ = _inputs()
    rng = np.random.default_rng(6)
    masks = rng.random((2, 17, 23)) < 0.6
    outs = jax.jit(jax.vmap(lambda q, k, v, m: cfj.attention(q, k, v, attn_mask=m)))(
        jnp.stack([q, 0.5 * q]), jnp.stack([k, k]), jnp.stack([v, v]), masks)
    for i, qi in enumerate((q, 0.5 * q)):
        np.testing.assert_allclose(np.asarray(outs[i]), reference.attention_reference(qi, k, v, attn_mask=masks[i])[0],
                                   atol=2e-5, rtol=2e-5)
    bm = BlockMask.from_dense(masks[0], block_size=8)
    out = jax.jit(lambda q, k, v: cfj.attention(q, k, v, block_mask=bm, causal=True))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), reference.attention_reference(q, k, v, attn_mask=masks[0],
                                                                              causal=True)[0], atol=2e-5, rtol=2e-5)


def test_attn_mask_errors_at_trace_time(monkeypatch):
    """A mask that does not broadcast raises ValueError naming attn_mask; bfloat16 masks are refused on CPU JAX
    (as by the NumPy path); a GPU backend refuses masks at trace time with NotImplementedError."""
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        jax.jit(lambda q, k, v: cfj.attention(q, k, v, attn_mask=jnp.ones((5, 23), bool)))(q, k, v)
    with pytest.raises(TypeError, match="bfloat16"):
        jax.jit(lambda q, k, v: cfj.attention(q, k, v, attn_mask=jnp.zeros((17, 23), jnp.bfloat16)))(q, k, v)
    monkeypatch.setattr(cfj, "_on_gpu", lambda: True)
    qd, kd, vd = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    with pytest.raises(NotImplementedError, match="attn_mask"):
        cfj._check(qd, kd, vd, False, None, (-1, -1), 0.0, None, (0.0, None, 0), jnp.ones((17, 23), bool))


@pytest.mark.parametrize("make,exc,match", [
    (lambda q, k, v: cfj.attention(q[:, :, :3], k, v), ValueError, "heads_q"),
    (lambda q, k, v: cfj.attention(q, k, v, window_size=(1,)), ValueError, "window_size"),
    (lambda q, k, v: cfj.attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)),
     TypeError, "dtype bfloat16"),
    (lambda q, k, v: cfj.attention(q, k, v, dropout_p=0.1), TypeError, "needs dropout_seed"),
])
def test_bad_arguments_raise_at_trace_time(make, exc, match):
    q, k, v, _ = _inputs()
    with pytest.raises(exc, match=match):
        jax.jit(make)(q, k, v)


def test_core_does_not_import_jax():
    import subprocess
    import sys
    code = "import sys, cuflash; assert 'jax' not in sys.modules, 'import cuflash imported jax'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_callback_errors_reach_jax_as_exceptions():
    """An error inside cuflash's custom call (_jax_callback.py) comes back to JAX as a raised error naming
    it, not a crash or a silently unwritten result."""
    from jax.experimental.buffer_callback import buffer_callback

    from cuflash import _jax_callback
    body = _jax_callback.callback("fwd", ("not", "the", "options", 0, 0, False, False), "cpu")
    q = jnp.ones((1, 4, 1, 8), jnp.float32)
    call = buffer_callback(body, (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((1, 1, 4), jnp.float32)))
    with pytest.raises(Exception, match="(?s)buffer callback.*(TypeError|AttributeError)"):
        jax.block_until_ready(call(q, q, q, jnp.zeros((0,), jnp.float32)))


@pytest.mark.gpu
def test_jit_grad_vmap_on_gpu():
    """On a GPU backend the same custom call launches the kernels on XLA's stream: the jitted forward equals
    cuflash.attention on the same device buffers bit for bit, the gradients equal attention_backward's up to
    the order of dQ's fp32 additions, and vmap folds the mapped axis into the batch (bf16, GQA, causal)."""
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    import cupy
    import cuflash
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(s).astype(np.float32) for s in ((2, 300, 4, 64), (2, 300, 2, 64), (2, 300, 2, 64),
                                                                  (2, 300, 4, 64))]
    q, k, v, dout = (jnp.asarray(x, jnp.bfloat16) for x in host)
    out = jax.jit(lambda q, k, v: cfj.attention(q, k, v, causal=True))(q, k, v)
    cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, dout))
    want, lse = cuflash.attention(cq, ck, cv, causal=True, return_lse=True)
    assert bool(cupy.array_equal(cupy.from_dlpack(out).view(cupy.uint16), want.view(cupy.uint16)))
    grads = jax.jit(jax.grad(lambda q, k, v: (cfj.attention(q, k, v, causal=True) * dout).astype(jnp.float32).sum(),
                             argnums=(0, 1, 2)))(q, k, v)
    want_grads = cuflash.attention_backward(cdo, cq, ck, cv, want, lse, causal=True)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), cupy.asnumpy(w.astype(cupy.float32)),
                                   atol=2e-2, rtol=2e-2)
    mapped = jax.jit(jax.vmap(lambda q, k, v: cfj.attention(q, k, v, causal=True)))(q[None].repeat(3, 0),
                                                                                     k[None].repeat(3, 0),
                                                                                     v[None].repeat(3, 0))
    assert mapped.shape == (3, *q.shape)
    assert bool(cupy.array_equal(cupy.from_dlpack(mapped[2]).view(cupy.uint16), want.view(cupy.uint16)))


def _gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")


def _f32(x):
    return np.asarray(jnp.asarray(x).astype(jnp.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_jit_forward_and_grads_follow_flash_rule(dtype, causal):
    """Under jit on a GPU backend, the output and the vjp's gradients (odd lengths 257 / 300, GQA 4 / 2)
    against the float64 reference under FlashAttention's rule: 2x (output) and 3x (gradients) the error
    of the same math in the input dtype."""
    _gpu()
    from gpu_helpers import flash_rule, naive_backward_same_dtype, naive_same_dtype
    rng = np.random.default_rng(5)
    shapes = ((2, 257, 4, 64), (2, 300, 2, 64), (2, 300, 2, 64), (2, 257, 4, 64))
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s).astype(np.float32), dtype) for s in shapes)
    attend = lambda q, k, v: cfj.attention(q, k, v, causal=causal)  # noqa: E731
    out, grads = jax.jit(lambda q, k, v, do: (attend(q, k, v), jax.vjp(attend, q, k, v)[1](do)))(q, k, v, dout)
    hq, hk, hv, hdo = (_f32(x) for x in (q, k, v, dout))
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (hq, hk, hv, hdo))
    ref_out, _ = reference.attention_reference(q64, k64, v64, causal=causal)
    flash_rule(_f32(out).astype(np.float64), ref_out, naive_same_dtype(hq, hk, hv, dtype=dtype, causal=causal))
    refs = reference.attention_backward_reference(do64, q64, k64, v64, causal=causal)
    bases = naive_backward_same_dtype(hdo, hq, hk, hv, dtype=dtype, causal=causal)
    for ours, ref, base in zip(grads, refs, bases):
        flash_rule(_f32(ours).astype(np.float64), ref, base, factor=3.0, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.gpu
def test_gpu_training_step_with_donated_buffers():
    """A jitted bf16 training step of an attention block (projections, GQA causal attention, output
    projection) with its parameters donated: value_and_grad through cuflash's kernels tracks the same step
    on XLA's attention over 5 steps (loss within 2%), the donated buffers are consumed, and attention
    whose q, k, v are donated still reads them intact (XLA must not place the output over a live operand)."""
    _gpu()
    rng = np.random.default_rng(2)
    dm, hq, hk, d, b, s = 256, 4, 2, 64, 2, 200
    init = {n: rng.standard_normal(sh).astype(np.float32) * dm ** -0.5 for n, sh in
            (("wq", (dm, hq * d)), ("wk", (dm, hk * d)), ("wv", (dm, hk * d)), ("wo", (hq * d, dm)))}
    x = jnp.asarray(rng.standard_normal((b, s, dm)).astype(np.float32), jnp.bfloat16)

    def block(params, x, attend):
        q = (x @ params["wq"]).reshape(b, s, hq, d)
        k = (x @ params["wk"]).reshape(b, s, hk, d)
        v = (x @ params["wv"]).reshape(b, s, hk, d)
        y = attend(q, k, v).reshape(b, s, hq * d) @ params["wo"]
        return (y.astype(jnp.float32) ** 2).mean()

    def make_step(attend):
        def step(params, x):
            loss, grads = jax.value_and_grad(block)(params, x, attend)
            return loss, jax.tree_util.tree_map(lambda p, g: (p - 0.5 * g).astype(p.dtype), params, grads)
        return jax.jit(step, donate_argnums=0)

    ours = make_step(lambda q, k, v: cfj.attention(q, k, v, causal=True))
    xla = make_step(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
    p_ours = {n: jnp.asarray(w, jnp.bfloat16) for n, w in init.items()}
    p_xla = {n: jnp.asarray(w, jnp.bfloat16) for n, w in init.items()}
    losses = []
    for _ in range(5):
        old = p_ours["wq"]
        loss, p_ours = ours(p_ours, x)
        ref, p_xla = xla(p_xla, x)
        assert old.is_deleted()
        losses.append(float(loss))
        np.testing.assert_allclose(float(loss), float(ref), rtol=2e-2)
    assert losses[-1] < losses[0]

    q, k, v = (jnp.asarray(rng.standard_normal((2, 300, h, 64)).astype(np.float32), jnp.bfloat16)
               for h in (4, 2, 2))
    want = jax.jit(lambda q, k, v: cfj.attention(q, k, v, causal=True))(q, k, v)
    donated = jax.jit(lambda q, k, v: cfj.attention(q, k, v, causal=True), donate_argnums=(0, 1, 2))
    got = donated(*(jnp.array(x, copy=True) for x in (q, k, v)))
    assert bool(jnp.array_equal(got, want))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 72])
def test_gpu_varlen_under_jit_equals_the_array_function(d):
    """On a GPU backend, attention_varlen under jit runs the variable-length kernels into XLA's buffers: the
    forward equals cuflash.attention_varlen on the same device buffers bit for bit (head dim 72: the
    zero-padded path), the gradients equal attention_varlen_backward's up to dQ's fp32 addition order."""
    _gpu()
    import cupy

    import cuflash
    q, k, v, dout, cu = _packed(lens=(300, 0, 1, 129, 700), d=d)
    q, k, v, dout = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, dout))
    jcu = jnp.asarray(cu)
    attend = lambda q, k, v: cfj.attention_varlen(q, k, v, jcu, jcu, 700, 700, causal=True)  # noqa: E731
    out, grads = jax.jit(lambda q, k, v, do: (attend(q, k, v), jax.vjp(attend, q, k, v)[1](do)))(q, k, v, dout)
    cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, dout))
    ccu = cupy.asarray(cu)
    want, lse = cuflash.attention_varlen(cq, ck, cv, ccu, ccu, 700, 700, causal=True, return_lse=True)
    assert bool(cupy.array_equal(cupy.from_dlpack(out).view(cupy.uint16), want.view(cupy.uint16)))
    want_grads = cuflash.attention_varlen_backward(cdo, cq, ck, cv, want, lse, ccu, ccu, 700, 700, causal=True)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(_f32(g), cupy.asnumpy(w.astype(cupy.float32)), atol=2e-2, rtol=2e-2)


def test_calls_outside_jit_compile_once(caplog):
    """Eager calls (outside jax.jit) of one shape and options reuse one compiled custom call: each call used to
    build a new callback, so JAX compiled and kept a new executable per call (memory grew ~1.5 MB a call)."""
    import logging
    q = jnp.ones((1, 16, 2, 16), jnp.float32)
    cfj.attention(q, q, q, causal=True).block_until_ready()
    jax.grad(lambda x: cfj.attention(x, q, q).sum())(q).block_until_ready()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for _ in range(5):
            cfj.attention(q, q, q, causal=True).block_until_ready()
            jax.grad(lambda x: cfj.attention(x, q, q).sum())(q).block_until_ready()
    compiles = [r for r in caplog.records if "ompil" in r.getMessage()]
    assert not compiles, [r.getMessage()[:200] for r in compiles]


def test_vmap_with_dropout_keeps_each_examples_mask():
    """Under vmap a call with dropout gives each example the mask it gets alone (the mask is keyed by the batch
    index: folding the mapped axis into the batch gave examples each other's masks), and ALiBi slopes of zero
    change nothing."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1, 4, 1, 8)), jnp.float32)
    f = lambda a: cfj.attention(a, a, a, dropout_p=0.5, dropout_seed=7)  # noqa: E731
    g = lambda a: cfj.attention(a, a, a, alibi_slopes=jnp.zeros(1, jnp.float32), dropout_p=0.5,  # noqa: E731
                                dropout_seed=7)
    want = np.stack([np.asarray(f(x[i])) for i in range(3)])
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), want)
    np.testing.assert_allclose(np.asarray(jax.vmap(g)(x)), want, atol=1e-6)


def test_operands_and_options_as_jax_takes_them():
    """float64 NumPy operands with 64-bit mode off compute in float32 (as JAX itself would take them), int64
    NumPy cu_seqlens as int32; a concrete 0-d JAX array is a fine static option; a traced option or an array
    window_size is a TypeError naming the option (not a tracer error from inside the checks)."""
    if jax.config.jax_enable_x64:
        pytest.skip("64-bit mode is on")
    q = np.random.default_rng(1).standard_normal((1, 4, 2, 8))
    out = jax.jit(lambda a: cfj.attention(a, q, q, softmax_scale=8.0 ** -0.5))(q.astype(np.float32))
    assert out.dtype == jnp.float32
    eager = cfj.attention(q, q, q, softmax_scale=1 / jnp.sqrt(8.0))
    np.testing.assert_allclose(np.asarray(out), np.asarray(eager), atol=1e-6)
    qp = q[0]
    cfj.attention_varlen(qp, qp, qp, np.array([0, 1, 4]), np.array([0, 1, 4]), 3, 3)
    with pytest.raises(TypeError, match="window_size.*static"):
        jax.jit(lambda a, w: cfj.attention(a, a, a, window_size=(w, 0)))(q, 2)
    with pytest.raises(TypeError, match="window_size"):
        cfj.attention(q, q, q, window_size=jnp.array([2, 0]))
    with pytest.raises(TypeError, match="causal.*static"):
        jax.jit(lambda a, c: cfj.attention(a, a, a, causal=c))(q, True)


def test_float_mask_gradient_with_dropout():
    """The gradient of a float attn_mask (a learned bias) with dropout equals JAX's own autodiff of the same
    math with cuflash's keep mask (cuflash.dropout_mask): dS = P (dP Z / (1 - p) - D)."""
    import cuflash
    rng = np.random.default_rng(8)
    q, k, v, do = (jnp.asarray(rng.standard_normal((1, 9, 2, 16)), jnp.float32) for _ in range(4))
    mask = jnp.asarray(rng.standard_normal((1, 2, 9, 9)), jnp.float32)
    p, seed = 0.25, 3
    keep = jnp.asarray(cuflash.dropout_mask(1, 2, 9, 9, dropout_p=p, dropout_seed=seed))

    def theirs(m):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0 + m
        probs = jax.nn.softmax(s, axis=-1) * keep / (1 - p)
        return (jnp.einsum("bhqk,bkhd->bqhd", probs, v) * do).sum()

    ours = jax.grad(lambda m: (cfj.attention(q, k, v, attn_mask=m, dropout_p=p, dropout_seed=seed) * do).sum())
    np.testing.assert_allclose(np.asarray(jax.jit(ours)(mask)), np.asarray(jax.grad(theirs)(mask)), atol=1e-5,
                               rtol=1e-4)


@pytest.mark.gpu
def test_gpu_dropout_under_jit_grad_and_vmap():
    """Dropout on a GPU backend: the jitted forward and its vjp equal cuflash.attention / attention_backward on
    the same device buffers with the same seed bit for bit (dK, dV; dQ up to its fp32 addition order), and
    under vmap each example keeps the mask it gets alone (the calls run one by one)."""
    _gpu()
    import cupy
    import cuflash
    rng = np.random.default_rng(6)
    shapes = ((2, 130, 4, 64), (2, 190, 2, 64), (2, 190, 2, 64), (2, 130, 4, 64))
    q, k, v, dout = (jnp.asarray(rng.standard_normal(s).astype(np.float32), jnp.bfloat16) for s in shapes)
    drop = dict(dropout_p=0.3, dropout_seed=(1 << 63) + 5, dropout_offset=7)
    attend = lambda q, k, v: cfj.attention(q, k, v, causal=True, **drop)  # noqa: E731
    out, grads = jax.jit(lambda q, k, v, do: (attend(q, k, v), jax.vjp(attend, q, k, v)[1](do)))(q, k, v, dout)
    cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, dout))
    want, lse = cuflash.attention(cq, ck, cv, causal=True, return_lse=True, **drop)
    np.testing.assert_array_equal(_f32(out), cupy.asnumpy(want.astype(cupy.float32)))
    wgrads = cuflash.attention_backward(cdo, cq, ck, cv, want, lse, causal=True, **drop)
    for i, (g, w) in enumerate(zip(grads, wgrads)):
        w = cupy.asnumpy(w.astype(cupy.float32))
        if i == 0:
            np.testing.assert_allclose(_f32(g), w, atol=2e-2, rtol=2e-2)
        else:
            np.testing.assert_array_equal(_f32(g), w)
    batched = jax.jit(jax.vmap(attend))(q[:, None], k[:, None], v[:, None])
    for i in range(2):
        alone = cuflash.attention(cq[i:i + 1], ck[i:i + 1], cv[i:i + 1], causal=True, **drop)
        np.testing.assert_array_equal(_f32(batched[i]), cupy.asnumpy(alone.astype(cupy.float32)))


def test_prng_key_as_dropout_seed_is_named():
    """A typed JAX PRNG key is not a seed: a TypeError naming dropout_seed (its .item() raised
    NotImplementedError from inside JAX)."""
    q, k, v, _ = _inputs()
    with pytest.raises(TypeError, match="dropout_seed"):
        cfj.attention(q, k, v, dropout_p=0.1, dropout_seed=jax.random.key(0))

