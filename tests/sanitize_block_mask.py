"""Runs the Hopper block-sparse forward and backward (head dims 64 and 128, causal or not) on odd lengths whose
last query and key tiles reach past the sequence, with full, partial and skipped 128-blocks and query rows that
see no key, for compute-sanitizer: `compute-sanitizer --tool memcheck|racecheck python
tests/sanitize_block_mask.py`. CuPy only; the partial blocks' masks are staged from the store (block_sparse.cuh)."""

import cupy as cp
import numpy as np

import cuflash

rng = np.random.default_rng(0)
sq, sk = 333, 517
dense = np.zeros((sq, sk), bool)
for i in range(0, sq, 128):
    for j in range(0, sk, 128):
        kind = rng.integers(3)  # skipped, full, partial
        if kind:
            dense[i:i + 128, j:j + 128] = True if kind == 1 else rng.random((min(128, sq - i), min(128, sk - j))) < 0.6
dense[40:50] = False  # rows that see no key
bm = cuflash.BlockMask.from_dense(dense)
for d in (64, 128):
    for causal in (False, True):
        q, k, v, dout = (cp.asarray(rng.standard_normal(shape).astype(np.float16))
                         for shape in ((1, sq, 4, d), (1, sk, 2, d), (1, sk, 2, d), (1, sq, 4, d)))
        out, lse = cuflash.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True)
        grads = cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal, block_mask=bm)
        assert bool(cp.isfinite(out).all()) and all(bool(cp.isfinite(g).all()) for g in grads), (d, causal)
cp.cuda.Device().synchronize()
print("sanitize run done")
