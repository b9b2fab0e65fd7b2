import sys; sys.path.insert(0, "tests")
import numpy as np
from smedjan import _C
import cuda_ref as ref
from test_cuda import op, rnd, poison
rng = np.random.default_rng(0)
for variant in (1, 0):
    _C.cuda_attention_variant(variant)
    for dtype in ("fp32", "bf16"):
        if dtype == "fp32" and variant == 0: continue
        for (B, T, H, KV, hd) in [(1,8,1,1,128),(1,8,1,1,96),(1,8,1,1,64),(1,64,4,1,128),(2,64,4,4,128),(1,64,2,2,128),(1,100,2,1,128),(2,64,4,1,64)]:
            W = (H + 2*KV)*hd
            qkv = rnd(rng, B, T, W, dtype=dtype)
            f = op("attention_forward", dtype, {"out": poison((B,T,H*hd)), "lse": poison((B,H,T)), "qkv": qkv}, (B,T,H,KV,hd))
            out, lse = ref.attention_fwd(qkv, B,T,H,KV,hd)
            e = ref.rel_err(f["out"], out); el = ref.rel_err(f["lse"], lse)
            got = np.asarray(f["out"]).reshape(B,T,H,hd); want = out.reshape(B,T,H,hd)
            bad = np.argwhere(np.abs(got-want) > 1e-2)
            print(f"var={variant} {dtype} B{B}T{T}H{H}KV{KV}hd{hd}: out {e:.2e} lse {el:.2e} bad dims {sorted(set(bad[:,3].tolist()))[:12]} bad t {sorted(set(bad[:,1].tolist()))[:6]}")
