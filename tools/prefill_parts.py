"""Time the pieces of one fused prefill chunk (Llama-3.1-8B attention shape, one layer) on CUDA, and
check which causal alignment PyTorch's fused SDPA kernels use when Q < K.

    python tools/prefill_parts.py            # prints; with $OUT set also writes $OUT/prefill_parts.json

A 4096-token chunk after 4096 stored tokens (4-bit K/V): the whole fused chunk attention and its
parts (self part, query rotation, dequantizing the history, the stored part, merge, unrotation,
encoding the chunk), next to single cuDNN / flash calls and 131072 x 128 x 128 GEMMs in float32,
bf16 and tf32 (triton.testing.do_bench medians). DEV=cpu QN=512 smoke-runs the script on CPU.
"""
import sys, json, os
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton
import tqpatch
from tqpatch import attention as A
from tqpatch.cache import TurboQuantCache
from transformers import LlamaConfig, LlamaForCausalLM

dev = torch.device(os.environ.get("DEV", "cuda"))
def us(fn):
    if dev.type == "cpu":
        fn(); return 0.0
    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3

out = {}
# --- causal alignment of the fused kernels for Q < K
g = torch.Generator(device=dev).manual_seed(0)
Q, K, H, d = 256, 1024, 8, 128
q = torch.randn(1, H, Q, d, device=dev, dtype=torch.bfloat16, generator=g)
k = torch.randn(1, H, K, d, device=dev, dtype=torch.bfloat16, generator=g)
v = torch.randn(1, H, K, d, device=dev, dtype=torch.bfloat16, generator=g)
i = torch.arange(Q, device=dev).reshape(Q, 1); j = torch.arange(K, device=dev).reshape(1, K)
def ref(mask):
    s = (q.float() @ k.float().transpose(-1, -2)) * 0.088
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v.float()
br, tl = ref(j <= i + (K - Q)), ref(j <= i)
for name, f in (("flash", lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=0.088)[0]),
                ("cudnn", lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=0.088)[0]),
                ("efficient", lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, True, scale=0.088)[0])):
    try:
        o = f().float()
        out[f"align_{name}"] = dict(bottom_right=float((o - br).abs().max()), top_left=float((o - tl).abs().max()))
    except Exception as e:
        out[f"align_{name}"] = repr(e)[:200]
print(json.dumps(out, indent=1))

# --- pieces of one chunk: Q=4096 after 4096 stored tokens
cfg = LlamaConfig(vocab_size=1000, hidden_size=4096, intermediate_size=1024, num_hidden_layers=1,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=65536)
model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
tqpatch.apply(model, key_bits=4, value_bits=4)
cache = TurboQuantCache(model, max_cache_len=16384, batch_size=1)
with torch.no_grad():
    model(torch.randint(0, 1000, (1, 4096), device=dev), past_key_values=cache, use_cache=True, logits_to_keep=1)
layer = cache.layers[0]
Qn = int(os.environ.get("QN", 4096))
q = torch.randn(1, 32, Qn, 128, device=dev, dtype=torch.bfloat16)
k = torch.randn(1, 8, Qn, 128, device=dev, dtype=torch.bfloat16)
v = torch.randn(1, 8, Qn, 128, device=dev, dtype=torch.bfloat16)
q_pos = layer.n + torch.arange(Qn, device=dev)
p = layer.plan
t = {}
with torch.no_grad():
    t["whole fused chunk attention"] = us(lambda: A._fused_chunk_attention(layer, q, k, v))
    t["self part (cudnn causal 4096 + fp32)"] = us(lambda: A.fused_attention(q, k, v, scaling=p.scaling, causal=True))
    t["rotate queries (fp32)"] = us(lambda: A._rotate_queries(layer, q).to(torch.bfloat16))
    t["rotate queries (bf16)"] = us(lambda: A._rotate_queries(layer, q, torch.bfloat16))
    t["dequantize 4096 slots -> bf16"] = us(lambda: A._dequantize_slots(layer, 0, 4096 - p.window, torch.bfloat16))
    kt, vt = A._dequantize_slots(layer, 0, 4096, torch.bfloat16)
    qr = A._rotate_queries(layer, q).to(torch.bfloat16)
    t["stored part (cudnn 4096x4096 + fp32)"] = us(lambda: A.fused_attention(qr, kt, vt, scaling=p.scaling, causal=False))
    a = A.fused_attention(q, k, v, scaling=p.scaling, causal=True)
    b = A.fused_attention(qr, kt, vt, scaling=p.scaling, causal=False)
    t["merge two parts (fp32)"] = us(lambda: A.merge_attention([a, b]))
    t["unrotate values (fp32)"] = us(lambda: A._unrotate_values(layer, b[0]))
    pos = torch.arange(Qn, device=dev) + 100000
    t["encode 4096 tokens (k+v)"] = us(lambda: A._encode_into_history(layer, k, v, torch.remainder(pos, layer.capacity)))
    kk = torch.cat([kt, k], 2); vv = torch.cat([vt, v], 2)
    if dev.type == "cuda":  # the cuDNN / flash ops below exist on CUDA only
        t["one cudnn call over 8192 keys causal"] = us(lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, kk, vv, None, False, 0.0, True, False, scale=p.scaling))
        t["one flash call over 8192 keys causal"] = us(lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, kk.repeat_interleave(4, 1), vv.repeat_interleave(4, 1), 0.0, True, False, scale=p.scaling))
        x = torch.randn(131072, 128, device=dev); m = torch.randn(128, 128, device=dev)
        t["fp32 matmul 131072x128x128"] = us(lambda: x @ m)
        xb, mb = x.bfloat16(), m.bfloat16()
        t["bf16 matmul 131072x128x128"] = us(lambda: xb @ mb)
        torch.backends.cuda.matmul.allow_tf32 = True
        t["tf32 matmul 131072x128x128"] = us(lambda: x @ m)
        torch.backends.cuda.matmul.allow_tf32 = False
for kname, val in t.items():
    print(f"{kname:45s} {val:9.1f} us")
out["pieces_us"] = t
if os.environ.get("OUT"):
    import transformers
    out.update(card=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
               triton=triton.__version__, transformers=transformers.__version__, command="python tools/prefill_parts.py")
    Path(os.environ["OUT"], "prefill_parts.json").write_text(json.dumps(out, indent=1))
