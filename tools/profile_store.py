"""Profile the per-token store (encode + write) of the compiled decode step on CUDA.

    python tools/profile_store.py [--context 32768]

Llama-3.1-8B attention shape (32 layers, 8 KV heads, d 128; small MLP/vocab: only the cache
matters), 4-bit, batch 1. Times three compiled graphs (CUDA graphs) - every layer's full store,
encode only, and the quantizer's encode_indices alone - and prints the CUDA kernel table of the
full store.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import tqpatch  # noqa: E402
from tqpatch import attention  # noqa: E402
from tqpatch.cache import TurboQuantCache  # noqa: E402


def bench(fn, iters=50):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    args = ap.parse_args()
    cfg = LlamaConfig(vocab_size=256, hidden_size=4096, intermediate_size=256, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    tqpatch.apply(model, key_bits=4, value_bits=4)
    cache = TurboQuantCache(model, max_cache_len=args.context + 200, batch_size=1)
    for layer in cache.layers:
        layer.n.fill_(args.context)
    kv = [(torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16),
           torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)) for _ in cache.layers]

    def store():
        for layer, (k, v) in zip(cache.layers, kv):
            attention._store(layer, k, v)

    def encode_only():
        out = []
        for layer, (k, v) in zip(cache.layers, kv):
            p = layer.plan
            out.append(p.key_quantizer.encode_indices(k)[1])
            out.append(p.value_quantizer.encode_indices(v)[1])
        return out

    x = torch.randn(8, 128, device="cuda")
    m = torch.randn(128, 128, device="cuda")

    def one_mm():
        return [x @ m.T for _ in range(64)]

    for name, fn in (("store (all layers)", store), ("encode_indices K+V (all layers)", encode_only),
                     ("64 x [8,128]@[128,128] fp32", one_mm)):
        c = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
        t0 = time.time()
        c()
        print(f"{name}: compile {time.time() - t0:.1f} s, {bench(c):.3f} ms per call", flush=True)
        if name.startswith("store"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    c()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=110), flush=True)


if __name__ == "__main__":
    main()
