"""Per-call cost of the two ways JAX can call cuflash inside ``jax.jit`` (issue 19): an XLA FFI custom call
of a ctypes handler (what cuflash.jax uses, _jax_ffi.py) against ``jax.experimental.buffer_callback``.

    python bench/ab_jax_callback.py

Both run with an empty body, so only the mechanism is timed: the FFI handler parses its call frame (the
options' index, 3 arguments + ALiBi placeholder, 2 results) and reads XLA's stream on a GPU; the
buffer_callback body reads each buffer's address and shape through the array interface the backend gives
(``__cuda_array_interface__`` on a GPU, ``__array_interface__`` on the CPU) and the stream from its
context. 16 calls are chained in one jitted function; the time per call is the median of 7 batches of 50
jitted calls. Runs on JAX's default backend (CPU JAX or a GPU).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CHAIN = 16


def main() -> None:
    sys.path.insert(0, str(REPO))
    import jax
    import jax.numpy as jnp
    from jax.experimental.buffer_callback import buffer_callback

    import cuflash.jax as cfj
    from cuflash import _jax_ffi
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if gpu else jnp.float32
    shape = (1, 16, 2, 8)
    q, k, v = (jnp.asarray(np.random.default_rng(i).standard_normal(shape), dtype) for i in range(3))
    _jax_ffi._run_cpu = _jax_ffi._run_cuda = lambda *a: None  # the mechanism only

    def chain_ffi(q, k, v):
        for _ in range(CHAIN):
            q = cfj.attention(q, k, v, causal=True)
        return q

    def body(ctx, outs, q, k, v):
        if gpu:
            ctx.stream  # noqa: B018 - what a launch needs
        for b in (q, k, v, *outs):
            face = b.__cuda_array_interface__ if gpu else np.asarray(b).__array_interface__
            face["data"], face["shape"]  # noqa: B018

    call = buffer_callback(body, (jax.ShapeDtypeStruct(shape, dtype), jax.ShapeDtypeStruct((1, 2, 16), jnp.float32)))

    def chain_callback(q, k, v):
        for _ in range(CHAIN):
            q = call(q, k, v)[0]
        return q

    print(f"JAX {jax.__version__}, backend {jax.default_backend()}; us per call, {CHAIN} chained in one jit")
    for name, fn in (("XLA FFI, ctypes handler (cuflash.jax)", chain_ffi), ("buffer_callback", chain_callback)):
        f = jax.jit(fn)
        f(q, k, v).block_until_ready()
        samples = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(50):
                r = f(q, k, v)
            r.block_until_ready()
            samples.append((time.perf_counter() - t) / 50 / CHAIN * 1e6)
        print(f"  {name:<40} {statistics.median(samples):6.1f}")


if __name__ == "__main__":
    main()
