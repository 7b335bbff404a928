"""Runs attention_with_kvcache on the GPU over contiguous and paged caches (page sizes 1, 16, 256; shuffled
pages, a block-table entry past the caches), decoding with packed query heads and split-KV (1, 3 and our
choice), a 3-query causal chunk, rotary tables, cache_batch_idx, and lengths from 0 to nearly full, for
compute-sanitizer: `compute-sanitizer --tool memcheck|racecheck python
tests/sanitize_kvcache.py`. CuPy only."""

import cupy as cp
import numpy as np

import cuflash

rng = np.random.default_rng(0)
batch, cap, hq, hk = 3, 300, 8, 2
lens = np.array([0, 170, cap - 3], np.int32)
for d in (64, 128):
    for seqlen_q in (1, 3):
        q = cp.asarray(rng.standard_normal((batch, seqlen_q, hq, d)).astype(np.float16))
        new = [cp.asarray(rng.standard_normal((batch, seqlen_q, hk, d)).astype(np.float16)) for _ in range(2)]
        cos = cp.asarray(np.cos(np.arange(cap + 8)[:, None] * rng.random(d // 4)).astype(np.float16))
        sin = cp.asarray(np.sin(np.arange(cap + 8)[:, None] * rng.random(d // 4)).astype(np.float16))
        for layout in ("contiguous", "batch_idx", 1, 16, 256):
            if layout in ("contiguous", "batch_idx"):
                rows = batch + (2 if layout == "batch_idx" else 0)
                caches = [cp.asarray(rng.standard_normal((rows, cap, hk, d)).astype(np.float16)) for _ in range(2)]
                extra = dict(cache_batch_idx=cp.asarray(np.array([4, 0, 2], np.int32))) if rows > batch else {}
            else:
                max_pages = -(-cap // layout)
                num_pages = 2 * batch * max_pages
                caches = [cp.asarray(rng.standard_normal((num_pages, layout, hk, d)).astype(np.float16))
                          for _ in range(2)]
                table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages).astype(np.int32)
                table[2, -1] = 1 << 20  # past the caches: clamped
                extra = dict(block_table=cp.asarray(table))
            for splits in ((1, 3, 0) if seqlen_q == 1 else (0,)):
                out = cuflash.attention_with_kvcache(q, *caches, *new, cache_seqlens=cp.asarray(lens), causal=True,
                                                     num_splits=splits, rotary_cos=cos, rotary_sin=sin, **extra)
                assert out.shape == q.shape, (d, seqlen_q, layout, splits)
cp.cuda.Device().synchronize()
print("sanitize run done")
