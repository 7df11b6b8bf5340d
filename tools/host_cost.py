"""Host cost per call of a compiled decode step, tqpatch vs transformers' StaticCache.

A tiny random Llama (hidden 128, 4 query / 2 KV heads) with N layers, one compiled
(``fullgraph=True``) decode step per method, as ``tqpatch bench`` compiles it; measured per call:
the time (the tiny model's compute is small, so this is mostly host work), the Dynamo guard
evaluation ("TorchDynamo Cache Lookup" in the profiler) and the number of guards by kind, with the
default guard stance and with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``.

On CPU (``--device cpu``, the default) the time is the wall time per call. On CUDA the step is
compiled with ``mode="reduce-overhead"`` (CUDA graphs, as the bench does) and timed like the bench
(``tqpatch.bench.time_steps``: CUDA events, one synchronisation per call, and the host time until
the call returns); a third variant compiles without CUDA graphs and captures the whole step in one
``torch.cuda.CUDAGraph`` that is replayed directly (no guards, no per-input checks): the floor of a
step's host cost.

    python tools/host_cost.py --out results/cpu --layers 2,8
    python tools/host_cost.py --out DIR --layers 8,32 --device cuda
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


def _cpu_timing(fn, tok, pos, calls: int) -> dict:
    for _ in range(3):
        fn(tok, pos)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(tok, pos)
    return dict(us_per_call=(time.perf_counter() - t0) / calls * 1e6)


def _cuda_timing(call, calls: int) -> dict:
    from tqpatch.bench import _mark_step, time_steps

    def one():
        _mark_step()
        call()

    t = time_steps(one, torch.device("cuda"), iters=calls, warmup=5)
    return dict(us_per_call=t["ms"] * 1e3, host_us_per_call=t["host_ms"] * 1e3, us_p10=t["ms_p10"] * 1e3,
                us_p90=t["ms_p90"] * 1e3)


def _guard_us(fn, tok, pos) -> float | None:
    with torch.profiler.profile() as prof:
        for _ in range(50):
            fn(tok, pos)
    lookup = [e.cpu_time_total / e.count for e in prof.key_averages() if "Cache Lookup" in e.key]
    return lookup[0] if lookup else None


def _whole_step_graph(fn, tok, pos) -> torch.cuda.CUDAGraph:
    """``fn(tok, pos)`` (compiled without CUDA graphs) captured once in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(tok, pos)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(tok, pos)
    return g


def measure(layers: int, method: str, device: torch.device, calls: int = 200) -> dict:
    import tqpatch
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    from tqpatch.cache import TurboQuantCache
    from tqpatch.step import step_function

    cuda = device.type == "cuda"
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16 if cuda else torch.float32).eval()
    if method == "tqpatch":
        tqpatch.apply(model, key_bits=4, value_bits=4)
        cache = TurboQuantCache(model, max_cache_len=4096, batch_size=1)
    else:
        cache = StaticCache(config=model.config, max_cache_len=4096)
    tok = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1, 1), 40, dtype=torch.long, device=device)
    with torch.no_grad():
        model(torch.zeros(1, 40, dtype=torch.long, device=device), past_key_values=cache, use_cache=True)

    step = step_function(model, cache)
    fn = torch.compile(step, fullgraph=True, mode="reduce-overhead" if cuda else None)
    row = dict(method=method, layers=layers, guards=_guard_kinds(fn, (tok, pos)))
    for stance in ("default", "skip_guard_eval_unsafe"):
        with torch.no_grad(), torch.compiler.set_stance("default", skip_guard_eval_unsafe=stance != "default"):
            row[stance] = _cuda_timing(lambda: fn(tok, pos), calls) if cuda else _cpu_timing(fn, tok, pos, calls)
            row[stance]["guard_us_per_call"] = _guard_us(fn, tok, pos)
    if cuda:  # the floor: the whole step in one directly replayed CUDA graph
        torch._dynamo.reset()
        plain = torch.compile(step, fullgraph=True)
        with torch.no_grad():
            g = _whole_step_graph(plain, tok, pos)
            row["whole_graph"] = _cuda_timing(g.replay, calls)
        del g
    if method == "tqpatch":
        tqpatch.unapply(model)
    torch._dynamo.reset()
    return row


def _cuda_table(res: dict, commit: str) -> list[str]:
    lines = ["# Host cost per call of a compiled decode step on CUDA", "",
             f"Command: `{res['command']}`, commit {commit}, {res['card']}, torch {res['torch']}, triton "
             f"{res['triton']}, transformers {res['transformers']}. Tiny random Llama (hidden 128, 4/2 heads, bf16), "
             "one fullgraph step per method. µs per call: CUDA events around the call with one synchronisation "
             "per call (as `tqpatch bench` times a step; the tiny model's GPU work is a few µs per layer), host µs: "
             "wall time until the call returns; guard µs: Dynamo's cache lookup (profiler). Variants: "
             "`reduce-overhead` (CUDA graph trees) with the default guard stance, with "
             "`skip_guard_eval_unsafe`, and the step compiled without CUDA graphs and captured whole in one "
             "`torch.cuda.CUDAGraph` replayed directly.", "",
             "| method | layers | µs/call | host µs | guard µs | skip guards: µs/call | host µs | guard µs | "
             "whole-step graph: µs/call | host µs | TENSOR_MATCH | all guards |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        d, s, g = r["default"], r["skip_guard_eval_unsafe"], r["whole_graph"]
        lines.append(f"| {r['method']} | {r['layers']} | {d['us_per_call']:.0f} | {d['host_us_per_call']:.0f} | "
                     f"{d['guard_us_per_call'] or 0:.0f} | {s['us_per_call']:.0f} | {s['host_us_per_call']:.0f} | "
                     f"{s['guard_us_per_call'] or 0:.0f} | {g['us_per_call']:.0f} | {g['host_us_per_call']:.0f} | "
                     f"{r['guards'].get('TENSOR_MATCH', 0)} | {sum(r['guards'].values())} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--commit", default="")
    ap.add_argument("--device", default="cpu", help="cpu (1 thread) or cuda (reduce-overhead, CUDA graphs)")
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    layer_counts = [int(x) for x in a.layers.split(",")]
    rows = [measure(n, m, device) for n in tqdm(layer_counts, desc="layers") for m in ("tqpatch", "static")]
    res = {"command": "python " + " ".join(sys.argv), "commit": a.commit, "torch": torch.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "threads": None if cuda else 1, "rows": rows}
    if cuda:
        res["card"] = torch.cuda.get_device_name()
        import triton

        res["triton"] = triton.__version__
    import transformers

    res["transformers"] = transformers.__version__
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "host_cost" if not cuda else "host_cost_cuda"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    if cuda:
        lines = _cuda_table(res, a.commit)
        (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
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
