"""How many PyTorch ops one eager decode step launches, tqpatch vs bf16 ``DynamicCache``.

    python tools/eager_ops.py --out results/cpu        # writes eager_ops.json / eager_ops.md

An eager decode step of a small model is bound by launch overhead: its time follows the number of
ops launched, not the bytes they read. This counts, with torch.profiler on the CPU, the top-level
``aten::`` ops of one decode step (after a 300-token prompt) of a random-weight Qwen2-shaped model
(``--layers`` layers, 4 q / 2 kv heads, d 128) for the unpatched model with a ``DynamicCache`` and
for tqpatch K4/V4 (window 64), splits tqpatch's extra ops by the function that issued them, and
counts the scalar reads (``aten::item``) that would each wait for the GPU. On CUDA the history
part is one Triton launch instead of the CPU reference's few dozen ops.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import sys
import time
from pathlib import Path

import torch

PARTS = ("_chunk_part", "_history_part", "_store", "_encode_into_history", "merge_attention", "dense_attention",
         "_rotate_queries")


def _count(model, cache, ids) -> tuple[int, collections.Counter, int, float]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        model(nxt, past_key_values=cache, use_cache=True)
        t0 = time.perf_counter()
        for _ in range(5):
            model(nxt, past_key_values=cache, use_cache=True)
        ms = (time.perf_counter() - t0) / 5 * 1000
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(nxt, past_key_values=cache, use_cache=True)
    by_part: collections.Counter = collections.Counter()
    total = 0
    for e in prof.events():
        if not e.name.startswith("aten::") or (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")):
            continue
        total += 1
        parent, tag = e.cpu_parent, "model (projections, norms, MLP, RoPE)"
        while parent is not None:
            if parent.name.startswith("tqpatch::"):
                tag = parent.name.split("::", 1)[1]
                break
            parent = parent.cpu_parent
        by_part[tag] += 1
    reads = sum(1 for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense"))
    return total, by_part, reads, ms


def _label_parts() -> None:
    """Wrap tqpatch's attention helpers in profiler ranges (an op counts for the innermost range around it)."""
    from tqpatch import attention

    def wrap(name, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with torch.profiler.record_function("tqpatch::" + name):
                return fn(*args, **kwargs)
        return inner

    for name in PARTS:
        setattr(attention, name, wrap(name, getattr(attention, name)))


def time_cuda(layers: int, context: int, steps: int) -> list[dict]:
    """ms per eager decode step on CUDA (Llama-3.1-8B layer shape, ``layers`` layers, B=1): bf16
    DynamicCache, tqpatch K4/V4, and tqpatch with the per-layer counter reads of earlier versions
    put back (each layer reading ``n`` from the GPU, as before the host copy)."""
    import statistics

    import transformers as tf

    import tqpatch
    from tqpatch.cache import TurboQuantCache, TurboQuantLayer

    cfg = tf.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, context), device="cuda")
    rows = []
    for label in ("bf16 DynamicCache", "tqpatch K4/V4", "tqpatch K4/V4, a counter read per layer (before)"):
        patched = label.startswith("tqpatch")
        if patched and not tqpatch.is_patched(model):
            tqpatch.apply(model, key_bits=4, value_bits=4)
        saved = TurboQuantLayer.stored, TurboQuantCache.sync_lengths
        if "before" in label:
            TurboQuantLayer.stored = lambda self: int(self.n)
            TurboQuantCache.sync_lengths = lambda self: None
        try:
            cache = (TurboQuantCache(model, max_cache_len=context + steps + 8, batch_size=1) if patched
                     else tf.DynamicCache(config=cfg))
            with torch.no_grad():
                for lo in range(0, context, 4096):
                    out = model(ids[:, lo:lo + 4096], past_key_values=cache, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1:].argmax(-1)
                times = []
                for _ in range(steps):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    times.append(1000 * (time.perf_counter() - t0))
        finally:
            TurboQuantLayer.stored, TurboQuantCache.sync_lengths = saved
        rows.append({"cache": label, "ms_per_step": statistics.median(times[3:]), "ms_all": times})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "ms_all"}), flush=True)
        del cache
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for eager_ops.json / .md")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--cuda", action="store_true",
                    help="instead: time eager decode steps on CUDA (eager_decode_cuda.json / .md)")
    ap.add_argument("--context", type=int, default=8192, help="--cuda: prompt tokens (default 8192)")
    args = ap.parse_args(argv)
    import transformers as tf

    import tqpatch
    from tqpatch.evalcli import run_info

    info = run_info("python tools/eager_ops.py " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cuda:
        rows = time_cuda(args.layers, args.context, 20)
        info["device"] = torch.cuda.get_device_name(0)
        (out / "eager_decode_cuda.json").write_text(json.dumps({**info, "layers": args.layers,
                                                                "context": args.context, "rows": rows}, indent=2))
        lines = [f"# Eager decode step on {info['device']}", "",
                 f"Command: `{info['command']}`, commit {info['commit']}, torch {info['torch']}, "
                 f"transformers {info['transformers']}.", "",
                 f"Llama-3.1-8B layer shape, {args.layers} layers, random bf16 weights, B=1, {args.context}-token "
                 "prompt (chunks of 4,096), then 20 eager decode steps; median of the last 17.", "",
                 "| cache | ms per step |", "|---|---|"] + [f"| {r['cache']} | {r['ms_per_step']:.2f} |" for r in rows]
        (out / "eager_decode_cuda.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = tf.Qwen2Config(vocab_size=256, hidden_size=512, intermediate_size=512, num_hidden_layers=args.layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=128)
    model = tf.Qwen2ForCausalLM(cfg).eval()
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(1))
    bf16_total, _, bf16_reads, bf16_ms = _count(model, tf.DynamicCache(config=cfg), ids)
    _label_parts()
    tqpatch.apply(model, key_bits=4, value_bits=4)
    tq_total, parts, tq_reads, tq_ms = _count(model, tqpatch.TurboQuantCache(model, max_cache_len=400, batch_size=1),
                                              ids)
    result = {**info, "layers": args.layers,
              "unpatched": {"ops_per_step": bf16_total, "scalar_reads": bf16_reads, "cpu_ms_per_step": bf16_ms},
              "tqpatch": {"ops_per_step": tq_total, "scalar_reads": tq_reads, "cpu_ms_per_step": tq_ms,
                          "ops_by_part": dict(parts)}}
    (out / "eager_ops.json").write_text(json.dumps(result, indent=2))
    lines = ["# Ops launched by one eager decode step", "",
             f"Command: `{info['command']}`, commit {info['commit']}, torch {info['torch']}, "
             f"transformers {info['transformers']}, {info['device']}, 1 thread.", "",
             f"Random-weight Qwen2 shape, {args.layers} layers, 4 q / 2 kv heads, d 128, one token after a "
             "300-token prompt; top-level aten ops (torch.profiler, CPU).", "",
             "| cache | ops per step | ops per layer over unpatched | scalar reads (GPU waits) | CPU ms per step |",
             "|---|---|---|---|---|",
             f"| unpatched, DynamicCache | {bf16_total} | — | {bf16_reads} | {bf16_ms:.2f} |",
             f"| tqpatch K4/V4 | {tq_total} | {(tq_total - bf16_total) / args.layers:.0f} | {tq_reads} | "
             f"{tq_ms:.2f} |", "", "tqpatch's ops by the function that issued them (whole step):", "",
             "| part | ops |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in parts.most_common()]
    (out / "eager_ops.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
