import torch, cuflash, sys
d = int(sys.argv[1]); s = 16384 // 4; b = 16384 // s; h = 2048 // d
q,k,v = [torch.randn(b,s,h,d,device='cuda',dtype=torch.bfloat16) for _ in range(3)]
for _ in range(2): cuflash.attention(q,k,v)
torch.cuda.synchronize()
