import os, sys, torch, cuflash
from cuflash import dispatch
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
def bench(fn, n=15):
    for _ in range(3): fn()
    torch.cuda.synchronize(); ts=[]
    for _ in range(n):
        a=torch.cuda.Event(enable_timing=True); b=torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
configs = {64: ["128x128x4", "128x64x4", "64x64x4x3", "64x128x4x2", "128x128x8", "128x64x8x2"],
           128: ["128x64x4", "128x32x4", "64x64x4x2", "128x64x8", "128x128x8", "64x128x4x2"],
           256: ["128x64x8", "64x64x4", "128x32x8", "64x32x4x2"]}
dims = [int(x) for x in os.environ.get("DIMS","64,128,256").split(",")]
for d in dims:
    for s in [2048, 16384]:
      for causal in [False, True]:
        b = 16384 // s; h = 2048 // d
        q,k,v = [torch.randn(b,s,h,d,device='cuda',dtype=torch.bfloat16) for _ in range(3)]
        flops = 4*b*h*s*s*d/(2 if causal else 1)
        qt,kt,vt = [x.transpose(1,2) for x in (q,k,v)]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            tfa = bench(lambda: F.scaled_dot_product_attention(qt,kt,vt,is_causal=causal))
        line = f"d{d} s{s} c{int(causal)} FA2 {flops/tfa/1e9:5.0f} |"
        for cfg in configs[d]:
            os.environ["CUFLASH_FWD_TILES"] = f"{d}={cfg}"
            try:
                t = bench(lambda: cuflash.attention(q,k,v,causal=causal))
                line += f" {cfg} {flops/t/1e9:5.0f}"
            except Exception as e:
                line += f" {cfg} ERR({str(e)[:40]})"
        print(line, flush=True)
