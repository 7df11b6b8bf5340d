"""Host cost per call of a compiled decode step, tqpatch vs transformers' StaticCache (CPU proxy).

A tiny random Llama (hidden 128, 4 query / 2 KV heads) with N layers, one compiled
(``fullgraph=True``) decode step per method, as ``tqpatch bench`` compiles it; measured per call:
the wall time (the tiny model's CPU compute included), the Dynamo guard evaluation ("TorchDynamo
Cache Lookup" in the profiler) and the number of guards by kind, with the default guard stance and
with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``. On a GPU machine the same guards
run before every CUDA-graph replay, so this is the part of a decode step's host time that grows
with the number of layers and tensors per layer.

    python tools/host_cost.py --out results/cpu --layers 2,8
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _guard_kinds(fn, args) -> dict[str, int]:
    """Guards of the compiled function by kind, read from Dynamo's guard log of a fresh compile."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    torch._logging.set_logs(guards=True)
    log = logging.getLogger("torch._dynamo.guards")
    log.addHandler(handler)
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            fn(*args)
    finally:
        log.removeHandler(handler)
        torch._logging.set_logs()
    kinds = Counter(re.findall(r"\b([A-Z_]+_MATCH|NO_TENSOR_ALIASING)\b", buf.getvalue()))
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def measure(layers: int, method: str, calls: int = 200) -> dict:
    import tqpatch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from tqpatch.cache import TurboQuantCache

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    if method == "tqpatch":
        tqpatch.apply(model, key_bits=4, value_bits=4)
        cache = TurboQuantCache(model, max_cache_len=2048, batch_size=1)
    else:
        cache = StaticCache(config=model.config, max_cache_len=2048)
    tok = torch.zeros(1, 1, dtype=torch.long)
    pos = torch.full((1, 1), 40, dtype=torch.long)
    with torch.no_grad():
        model(torch.zeros(1, 40, dtype=torch.long), past_key_values=cache, use_cache=True)

    def step(tok, pos):
        return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

    fn = torch.compile(step, fullgraph=True)
    row = dict(method=method, layers=layers, guards=_guard_kinds(fn, (tok, pos)))
    for stance in ("default", "skip_guard_eval_unsafe"):
        with torch.no_grad(), torch.compiler.set_stance("default", skip_guard_eval_unsafe=stance != "default"):
            for _ in range(3):
                fn(tok, pos)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(tok, pos)
            wall = (time.perf_counter() - t0) / calls * 1e6
            with torch.profiler.profile() as prof:
                for _ in range(50):
                    fn(tok, pos)
        lookup = [e.cpu_time_total / e.count for e in prof.key_averages() if "Cache Lookup" in e.key]
        row[stance] = dict(us_per_call=wall, guard_us_per_call=lookup[0] if lookup else None)
    if method == "tqpatch":
        tqpatch.unapply(model)
    torch._dynamo.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--commit", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    layer_counts = [int(x) for x in a.layers.split(",")]
    rows = [measure(n, m) for n in tqdm(layer_counts, desc="layers") for m in ("tqpatch", "static")]
    res = {"command": "python " + " ".join(sys.argv), "commit": a.commit, "torch": torch.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "threads": 1, "rows": rows}
    import transformers

    res["transformers"] = transformers.__version__
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_cost.json").write_text(json.dumps(res, indent=1))
    lines = ["# Host cost per call of a compiled decode step (CPU proxy)", "",
             f"Command: `{res['command']}`, commit {a.commit}, torch {res['torch']}, transformers "
             f"{res['transformers']}, 1 thread on this machine's CPU. Tiny random Llama (hidden 128, 4/2 heads), "
             "one compiled fullgraph step per method; µs per call (wall, the tiny model's compute included) and "
             "Dynamo guard evaluation per call (profiler), default stance and skip_guard_eval_unsafe.", "",
             "| method | layers | µs/call | guard µs/call | µs/call, skip guards | guard µs, skip | TENSOR_MATCH | "
             "all guards |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, s = r["default"], r["skip_guard_eval_unsafe"]
        lines.append(f"| {r['method']} | {r['layers']} | {d['us_per_call']:.0f} | {d['guard_us_per_call']:.0f} | "
                     f"{s['us_per_call']:.0f} | {s['guard_us_per_call']:.0f} | {r['guards'].get('TENSOR_MATCH', 0)} | "
                     f"{sum(r['guards'].values())} |")
    (out / "host_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
