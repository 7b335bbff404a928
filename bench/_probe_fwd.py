import os, sys, time, json
import torch, cuflash
from torch.nn.attention import sdpa_kernel, SDPBackend
import torch.nn.functional as F
def bench(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts=[]
    for _ in range(n):
        a=torch.cuda.Event(enable_timing=True); b=torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
rows=[]
dims = [int(x) for x in os.environ.get("DIMS","64,128,256").split(",")]
for d in dims:
  for causal in [False, True]:
    for s in [1024, 4096, 16384]:
        b = 16384 // s; h = 2048 // d
        q,k,v = [torch.randn(b,s,h,d,device='cuda',dtype=torch.bfloat16) for _ in range(3)]
        flops = 4*b*h*s*s*d/(2 if causal else 1)
        t_cf = bench(lambda: cuflash.attention(q,k,v,causal=causal))
        qt,kt,vt = [x.transpose(1,2) for x in (q,k,v)]
        res = {}
        for name, be in [("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
            try:
                with sdpa_kernel(be):
                    res[name] = bench(lambda: F.scaled_dot_product_attention(qt,kt,vt,is_causal=causal))
            except Exception as e:
                res[name] = float('nan')
        tf = lambda t: flops/t/1e9
        line = f"d{d} causal={int(causal)} s{s}: cuflash {tf(t_cf):6.1f}  flash {tf(res['flash']):6.1f}  cudnn {tf(res['cudnn']):6.1f}  ratio/flash {res['flash']/t_cf:5.2f}"
        print(line, flush=True); rows.append(line)
