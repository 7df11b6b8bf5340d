"""Profile a chunked tqpatch prefill against bf16 on CUDA: where the extra time goes.

    python tools/profile_prefill.py [--prompt 32768] [--out DIR]

Llama-3.1-8B shape (random bf16 weights), B=1. Runs the prompt once to warm up, then once under
torch.profiler for tqpatch 4-bit (model-level chunks of tqpatch's prefill chunk) and for bf16 in one
forward, and prints (and writes to ``DIR/profile_prefill_<prompt>.txt``) each run's wall time and its
CUDA kernel table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tqpatch  # noqa: E402
from tqpatch.bench import build_model  # noqa: E402
from tqpatch.cache import TurboQuantCache  # noqa: E402
from tqpatch.patch import DEFAULT_PREFILL_CHUNK  # noqa: E402


def run(model, ids, chunk, tq):
    from transformers import DynamicCache

    cache = TurboQuantCache(model, max_cache_len=ids.shape[1] + 64, batch_size=1) if tq else DynamicCache()
    with torch.no_grad():
        for lo in range(0, ids.shape[1], chunk):
            model(ids[:, lo:lo + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--out", default=".")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    model = build_model("llama-3.1-8b", torch.device("cuda"))
    ids = torch.randint(0, 1000, (1, args.prompt), device="cuda")
    report = [f"# prefill profile: Llama-3.1-8B shape, B=1, prompt {args.prompt}, {torch.cuda.get_device_name()}, "
              f"torch {torch.__version__}"]
    for label, tq, chunk in (("tqpatch 4-bit, chunks of %d" % DEFAULT_PREFILL_CHUNK, True, DEFAULT_PREFILL_CHUNK),
                             ("bf16 one forward", False, args.prompt)):
        if tq:
            tqpatch.apply(model, key_bits=4, value_bits=4)
        run(model, ids, chunk, tq)
        t0 = time.perf_counter()
        run(model, ids, chunk, tq)
        wall = time.perf_counter() - t0
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(model, ids, chunk, tq)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70)
        report += ["", f"## {label}: {wall:.3f} s wall (unprofiled)", "", table]
        if tq:
            tqpatch.unapply(model)
    text = "\n".join(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_prefill_{args.prompt}.txt").write_text(text)


if __name__ == "__main__":
    main()
