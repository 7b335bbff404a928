"""Two-GPU scenarios of tests/test_api_gpu.py, one per fresh interpreter: ``python multi_gpu_checks.py NAME``.

Exit 0 and "ok" when the check holds, 77 (with the reason) when it cannot run here (a library missing), an
assertion traceback otherwise. With device 0 current, arrays on device 1 must give results on device 1,
bitwise equal to the same call on device 0, and leave device 0 current.
"""

import sys

import numpy as np

import cuflash
from gpu_helpers import host_randn, inputs, randn_like, same_bits


def _skip(reason):
    print(reason)
    sys.exit(77)


def cupy_arrays_on_second_gpu():
    """CuPy forward and backward on device 1."""
    import cupy
    q0, k0, v0 = inputs(2, 100, 130, 4, 2, 64, "float16", seed=3)
    do0 = randn_like(q0, 4)
    out0, lse0 = cuflash.attention(q0, k0, v0, causal=True, return_lse=True)
    grads0 = cuflash.attention_backward(do0, q0, k0, v0, out0, lse0, causal=True)
    with cupy.cuda.Device(1):
        q1, k1, v1, do1 = (cupy.asarray(x) for x in (q0, k0, v0, do0))
    assert cupy.cuda.runtime.getDevice() == 0
    out1, lse1 = cuflash.attention(q1, k1, v1, causal=True, return_lse=True)
    grads1 = cuflash.attention_backward(do1, q1, k1, v1, out1, lse1, causal=True)
    assert cupy.cuda.runtime.getDevice() == 0
    assert out1.device.id == 1 and all(g.device.id == 1 for g in grads1)
    for a, b in zip((out1, lse1, *grads1), (out0, lse0, *grads0)):
        same_bits(a, b)


def torch_autograd_on_second_gpu():
    """torch tensors on cuda:1 through flash_attn_func and autograd."""
    try:
        import torch
    except ImportError:
        _skip("needs torch")
    if not torch.cuda.is_available():
        _skip("needs torch with CUDA")
    from cuflash.torch import flash_attn_func
    torch.cuda.set_device(0)
    base = [torch.randn(2, 77, 4, 128, dtype=torch.float16) for _ in range(4)]
    results = []
    for dev in ("cuda:0", "cuda:1"):
        q, k, v = (x.to(dev).requires_grad_() for x in base[:3])
        out = flash_attn_func(q, k, v, causal=True)
        out.backward(base[3].to(dev))
        assert out.device == torch.device(dev) and torch.cuda.current_device() == 0
        results.append([t.detach().cpu() for t in (out, q.grad, k.grad, v.grad)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def jax_arrays_on_second_gpu():
    """JAX arrays placed on GPU 1."""
    try:
        import jax
    except ImportError:
        _skip("needs jax")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if len(gpus) < 2:
        _skip("JAX sees fewer than two GPUs")
    host = [host_randn((1, 50, 2, 64), "bfloat16", np.random.default_rng(s)) for s in range(3)]
    outs = []
    for dev in gpus[:2]:
        q, k, v = (jax.device_put(x, dev) for x in host)
        out = cuflash.attention(q, k, v)
        assert dev in out.devices()
        outs.append(np.asarray(out))
    assert np.array_equal(outs[0].view(np.uint16), outs[1].view(np.uint16))


if __name__ == "__main__":
    {"cupy_arrays_on_second_gpu": cupy_arrays_on_second_gpu,
     "torch_autograd_on_second_gpu": torch_autograd_on_second_gpu,
     "jax_arrays_on_second_gpu": jax_arrays_on_second_gpu}[sys.argv[1]]()
    print("ok")
