"""GPU check of the patched decode path, plus a first end-to-end decode-step timing.

1. Correctness on CUDA (tiny random Llama, bf16): the compiled decode step
   (``torch.compile(fullgraph=True, mode="reduce-overhead")``: CUDA graphs, the Triton kernel
   inside) gives the same logits as the eager step, and the eager Triton path equals the
   plain-torch reference path.
2. Timing: a Llama-3.1-8B-shaped random-weight model, batch 1, decode step (ms) with tqpatch
   4-bit vs transformers' StaticCache, both compiled with CUDA graphs, measured in one run.
   Speed does not depend on weight or cache values, so caches are filled with random contents of
   the stated length instead of a real prefill.

    python tools/gpu_check.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

import tqpatch  # noqa: E402
from tqpatch.cache import TurboQuantCache  # noqa: E402
from tqpatch.kernels import triton_decode  # noqa: E402


def median_ms(fn, iters=30, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def fill_random(cache: TurboQuantCache, length: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    for layer in cache.layers:
        layer.k_codes.random_(0, 256, generator=g)
        layer.v_codes.random_(0, 256, generator=g)
        layer.k_scales.uniform_(0.5, 1.5, generator=g)
        layer.v_scales.uniform_(0.5, 1.5, generator=g)
        layer.win_k.normal_(generator=g)
        layer.win_v.normal_(generator=g)
        layer.n.fill_(length)


def correctness() -> dict:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    tqpatch.apply(model, key_bits=4, value_bits=4, window=16)
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    results = {}

    def run(compiled: bool, use_triton: bool):
        cache = TurboQuantCache(model, max_cache_len=400, batch_size=2)
        with torch.no_grad():
            model(ids[:, :256], past_key_values=cache, use_cache=True)
            step = lambda tok, pos: model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits  # noqa: E731
            if compiled:
                step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
            orig = triton_decode.available
            if not use_triton:
                triton_decode.available = lambda: False
            try:
                out = []
                for t in range(256, 300):
                    tok = ids[:, t : t + 1].clone()
                    pos = torch.full((2, 1), t, device="cuda")
                    out.append(step(tok, pos).clone())
            finally:
                triton_decode.available = orig
        return torch.cat(out, 1).float()

    eager_ref = run(False, False)
    eager_triton = run(False, True)
    compiled = run(True, True)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    results["eager_triton_vs_torch_reference"] = rel(eager_triton, eager_ref)
    results["compiled_cudagraphs_vs_eager"] = rel(compiled, eager_triton)
    return results


def timing(context: int, steps: int = 30) -> dict:
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                      rope_theta=500000.0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    tok = torch.randint(0, 128256, (1, 1), device="cuda")
    out = {"context": context, "batch": 1}
    max_len = context + 64 + steps + 40

    # HF bf16 StaticCache + compile
    static = StaticCache(config=cfg, max_cache_len=max_len)
    with torch.no_grad():
        model(tok, past_key_values=static, use_cache=True)
        for layer in static.layers:
            layer.keys.normal_()
            layer.values.normal_()
            layer.cumulative_length.fill_(context)
        f = torch.compile(lambda t, p: model(t, position_ids=p, past_key_values=static, use_cache=True).logits,
                          fullgraph=True, mode="reduce-overhead")
        pos = torch.full((1, 1), context, device="cuda")
        t0 = time.time()
        f(tok, pos)
        out["static_compile_s"] = time.time() - t0
        out["static_ms"] = median_ms(lambda: f(tok, pos), iters=steps)
        out["static_cache_bytes"] = sum(l.keys.numel() * 2 + l.values.numel() * 2 for l in static.layers)
    del static, f
    torch.cuda.empty_cache()

    tqpatch.apply(model, key_bits=4, value_bits=4)
    cache = TurboQuantCache(model, max_cache_len=max_len, batch_size=1)
    fill_random(cache, context)
    with torch.no_grad():
        g = torch.compile(lambda t, p: model(t, position_ids=p, past_key_values=cache, use_cache=True).logits,
                          fullgraph=True, mode="reduce-overhead")
        pos = torch.full((1, 1), context, device="cuda")
        t0 = time.time()
        g(tok, pos)
        out["tqpatch_compile_s"] = time.time() - t0
        out["tqpatch_ms"] = median_ms(lambda: g(tok, pos), iters=steps)
        out["tqpatch_cache_bytes"] = tqpatch.cache_nbytes(cache)
        out["tqpatch_length_after"] = int(cache.layers[0].n)
    tqpatch.unapply(model)
    del model, cache, g
    torch.cuda.empty_cache()
    return out


def profile(context: int, out_dir: str) -> None:
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    tqpatch.apply(model, key_bits=4, value_bits=4)
    cache = TurboQuantCache(model, max_cache_len=context + 200, batch_size=1)
    fill_random(cache, context)
    tok = torch.randint(0, 128256, (1, 1), device="cuda")
    pos = torch.full((1, 1), context, device="cuda")
    with torch.no_grad():
        g = torch.compile(lambda t, p: model(t, position_ids=p, past_key_values=cache, use_cache=True).logits,
                          fullgraph=True, mode="reduce-overhead")
        for _ in range(5):
            g(tok, pos)
        torch.cuda.synchronize()
        print("ms/step", median_ms(lambda: g(tok, pos), iters=20), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                g(tok, pos)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, "profile.txt").write_text(table)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--contexts", default="1024,32768")
    ap.add_argument("--profile", type=int, default=0, metavar="CONTEXT",
                    help="only profile the tqpatch compiled step at this context: top CUDA kernels")
    args = ap.parse_args()
    if args.profile:
        return profile(args.profile, args.out)
    info = {
        "command": "python tools/gpu_check.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": __import__("triton").__version__, "triton_kernel_available": triton_decode.available(),
    }
    print(json.dumps(info), flush=True)
    info["correctness"] = correctness()
    print("correctness", json.dumps(info["correctness"]), flush=True)
    info["timing"] = []
    write(info, args.out)
    for c in (int(x) for x in args.contexts.split(",")):
        try:
            r = timing(c)
        except Exception as exc:  # report, keep going
            r = {"context": c, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        info["timing"].append(r)
        print("timing", json.dumps(r), flush=True)
        write(info, args.out)


def write(info: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    Path(out, "gpu_check.json").write_text(json.dumps(info, indent=2))
    lines = ["| context | HF StaticCache+compile ms | tqpatch 4-bit compiled ms | static K/V bytes | tqpatch K/V bytes |",
             "|---|---|---|---|---|"]
    for r in info["timing"]:
        if "error" in r:
            lines.append(f"| {r['context']} | error: {r['error'][:80]} | | | |")
        else:
            lines.append(f"| {r['context']} | {r['static_ms']:.2f} | {r['tqpatch_ms']:.2f} | "
                         f"{r['static_cache_bytes']:,} | {r['tqpatch_cache_bytes']:,} |")
    md = (f"# GPU check ({info['device']}, torch {info['torch']}, transformers {info['transformers']}, "
          f"triton {info['triton']})\n\ncommand: `{info['command']}`, commit {info['commit']}\n\n"
          f"correctness (relative error of logits): {json.dumps(info['correctness'])}\n\n"
          "Llama-3.1-8B shape, random weights, batch 1, ms per compiled decode step (median, CUDA graphs):\n\n"
          + "\n".join(lines) + "\n")
    Path(out, "gpu_check.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
