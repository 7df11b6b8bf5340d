"""A Qwen2.5-32B-shaped model on 2 GPUs: tqpatch 4-bit vs bf16 K/V cache at long context, with
accelerate's device_map and with transformers' tensor parallelism.

    python tools/bench_32b.py --out results/h200x2_32b                      # both layouts, B 1 and 8
    python tools/bench_32b.py --out /tmp/b --layouts tp --batches 8 --compile       # compiled steps
    python tools/bench_32b.py --out /tmp/b --layers 4 --context 4096 --steps 4      # a quick look

The model: Qwen2.5-32B's shape (64 layers, 40 q / 8 kv heads, d 128, hidden 5120, intermediate 27648,
vocab 152064) with random bf16 weights: 61 GiB of weights, 256 KiB of bf16 K/V per token.

* ``device_map``: built on the meta device and materialised straight onto the GPUs (layers 0-31 on
  cuda:0, 32-63 on cuda:1), dispatched by accelerate: one GPU works at a time.
* ``tp``: a weightless checkpoint (the config and one tensor) loaded with ``tp_plan="auto"`` under
  ``torchrun --nproc-per-node 2``; transformers initialises the missing weights on each rank's GPU,
  each rank only its own shard (heads split over ranks), and tqpatch stores only that rank's KV heads.

For each layout, batch size (``--batches``) and cache (bf16 ``DynamicCache``, tqpatch K4/V4 with its
default 64-token full-precision window): prefill ``--context`` random tokens in model-level chunks of
4,096 (both caches), then ``--steps`` greedy decode steps, each timed: eager by default
(accelerate's hooks or the TP collectives in the loop), or with ``--compile`` one
``torch.compile(fullgraph=True, mode="reduce-overhead")`` step per cache, bf16 then with HF's
StaticCache (the first 3 steps, compile included, are left out). Reported: ms per step
(median after the warm-up steps), tokens/s (B x 1000 / ms), prefill seconds, the K/V bytes measured
(``tqpatch.cache_nbytes`` / the DynamicCache tensors, summed over GPUs) next to the format's own
size, and the peak allocated memory per GPU during prefill and during decode (weights included).
Writes ``bench_32b.json`` and ``bench_32b.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_map_check import _split_map  # noqa: E402
from tp_check import _free_port, _load_tp  # noqa: E402

CHUNK = 4096
CACHES = ("bf16 DynamicCache", "tqpatch K4/V4")


def qwen32b_config(layers: int = 64):
    import transformers as tf

    cfg = tf.Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=layers,
                         num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rope_theta=1_000_000.0, tie_word_embeddings=False, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def device_map_model(layers: int = 64):
    """The 32B shape with random weights, layers 0-31 on cuda:0 and 32-63 on cuda:1 (accelerate)."""
    import transformers as tf
    from accelerate import dispatch_model

    cfg = qwen32b_config(layers)
    with torch.device("meta"):
        model = tf.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    dm = _split_map(cfg.num_hidden_layers)
    modules = dict(model.named_modules())
    torch.manual_seed(0)
    for name, dev in dm.items():
        mod = modules[name]
        mod.to_empty(device=f"cuda:{dev}")
        with torch.no_grad():
            for pname, p in mod.named_parameters():
                if "norm" in pname:
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device="cuda:0")
    return dispatch_model(model, device_map=dm).eval()


def weightless_checkpoint(path: Path, layers: int = 64) -> None:
    """Config plus one tensor: ``from_pretrained`` initialises everything else (on the GPU, sharded)."""
    from safetensors.torch import save_file

    cfg = qwen32b_config(layers)
    cfg.save_pretrained(path)
    save_file({"model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)},
              str(path / "model.safetensors"), metadata={"format": "pt"})


def _devices() -> list[int]:
    if torch.distributed.is_initialized():
        return [torch.cuda.current_device()]
    return list(range(torch.cuda.device_count()))


def _sync() -> None:
    for d in _devices():
        torch.cuda.synchronize(d)


def _kv_bytes(cache, method: str) -> int:
    import tqpatch

    if method.startswith("tqpatch"):
        return tqpatch.cache_nbytes(cache)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed ``ids`` in model-level chunks of ``CHUNK`` tokens; returns the greedy next token."""
    with torch.no_grad():
        for lo in range(0, ids.shape[1], CHUNK):
            out = model(ids[:, lo:lo + CHUNK], past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1)


def measure(model, method: str, batch: int, context: int, steps: int, compiled: bool = False) -> dict:
    """Prefill ``context`` tokens (chunks of 4,096) then time ``steps`` greedy decode steps (eager,
    or one ``torch.compile(fullgraph=True, mode="reduce-overhead")`` step: bf16 then uses HF's
    StaticCache; the first steps, compile included, are left out of the median)."""
    from transformers import DynamicCache, StaticCache

    import tqpatch

    vocab, dev0 = model.config.vocab_size, model.get_input_embeddings().weight.device
    ids = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(2)).to(dev0)
    if method.startswith("tqpatch"):
        cache = tqpatch.TurboQuantCache(model, max_cache_len=context + steps + 8, batch_size=batch)
    elif compiled:
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 8)
    else:
        cache = DynamicCache(config=model.config)

    def step(tok, pos, cache=cache):
        return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

    if compiled:
        step = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for d in _devices():
        torch.cuda.reset_peak_memory_stats(d)
    _sync()
    t0 = time.perf_counter()
    nxt = _prefill(model, ids, cache).to(dev0)
    _sync()
    prefill_s = time.perf_counter() - t0
    prefill_peak = {d: torch.cuda.max_memory_allocated(d) / 2**30 for d in _devices()}
    for d in _devices():
        torch.cuda.reset_peak_memory_stats(d)
    with torch.no_grad():
        times = []
        for i in range(steps):
            pos = torch.full((batch, 1), context + i, device=dev0)
            _sync()
            t = time.perf_counter()
            nxt = step(nxt, pos)[:, -1:].argmax(-1).to(dev0)
            _sync()
            times.append(1000 * (time.perf_counter() - t))
    decode_peak = {d: torch.cuda.max_memory_allocated(d) / 2**30 for d in _devices()}
    kv = _kv_bytes(cache, method)
    del cache, step
    gc.collect()
    torch.cuda.empty_cache()
    ms = statistics.median(times[3:] if compiled else times[2:])
    label = method + " + compile" if compiled and method.startswith("tqpatch") else (
        "bf16 StaticCache + compile" if compiled else method)
    return {"cache": label, "batch": batch, "context": context, "compiled": compiled, "first_step_s": times[0] / 1000,
            "ms_per_step": ms, "tokens_per_s": batch * 1000 / ms,
            "ms_all": times, "prefill_s": prefill_s, "kv_bytes": kv,
            "prefill_peak_gib": prefill_peak, "decode_peak_gib": decode_peak}


def run_layout(model, batches: list[int], context: int, steps: int, log, compiled: bool = False) -> list[dict]:
    import tqpatch

    rows = []
    for batch in batches:
        for method in CACHES:
            if method.startswith("tqpatch"):
                tqpatch.apply(model, key_bits=4, value_bits=4)
            try:
                rows.append(measure(model, method, batch, context, steps, compiled))
            except torch.OutOfMemoryError as e:
                rows.append({"cache": method, "batch": batch, "context": context, "error": f"OOM: {e}"[:300]})
                gc.collect()
                torch.cuda.empty_cache()
            finally:
                if compiled:
                    torch._dynamo.reset()
                if method.startswith("tqpatch"):
                    tqpatch.unapply(model)
            log(rows[-1])
    return rows


def profile_decode(model, batch: int, context: int, path: Path) -> None:
    """torch.profiler tables (by self CPU time, by GPU time) of 3 eager tqpatch K4/V4 decode steps."""
    import tqpatch
    from torch.profiler import ProfilerActivity, profile

    tqpatch.apply(model, key_bits=4, value_bits=4)
    try:
        dev0 = model.get_input_embeddings().weight.device
        ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(2))
        cache = tqpatch.TurboQuantCache(model, max_cache_len=context + 16, batch_size=batch)
        nxt = _prefill(model, ids.to(dev0), cache).to(dev0)
        with torch.no_grad():
            for _ in range(2):
                nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1).to(dev0)
            _sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1).to(dev0)
                _sync()
        ka = prof.key_averages()
        path.write_text(f"3 eager tqpatch K4/V4 decode steps, B={batch}, context {context}\n\n"
                        + ka.table(sort_by="self_cpu_time_total", row_limit=40) + "\n\n"
                        + ka.table(sort_by="self_device_time_total", row_limit=25) + "\n")
    finally:
        tqpatch.unapply(model)


def _weights_gib() -> dict:
    return {d: torch.cuda.memory_allocated(d) / 2**30 for d in _devices()}


def tp_worker(args: argparse.Namespace) -> int:
    """One tensor-parallel rank: load, measure, write rank<r>.json."""
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    t0 = time.perf_counter()
    model = _load_tp(Path(args.model_dir), torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    weights = _weights_gib()
    log = (lambda r: print(json.dumps({k: v for k, v in r.items() if k != "ms_all"}), flush=True)) if rank == 0 \
        else (lambda r: None)
    rows = run_layout(model, args.batch_list, args.context, args.steps, log, args.compile)
    Path(args.out, f"tp_rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "load_s": load_s, "weights_gib": weights, "rows": rows}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def tp_layout(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        weightless_checkpoint(Path(tmp), args.layers)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), __file__, "--tp-worker", "--model-dir", tmp, "--out", str(out),
               "--batches", args.batches, "--context", str(args.context), "--steps", str(args.steps)]
        cmd += ["--compile"] if args.compile else []
        proc = subprocess.run(cmd, text=True, capture_output=True, timeout=args.timeout)
    print(proc.stdout[-6000:], flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-8000:], file=sys.stderr)
        return {"error": f"torchrun exit status {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    ranks = [json.loads(Path(out, f"tp_rank{r}.json").read_text()) for r in range(2)]
    rows = []
    for i, row in enumerate(ranks[0]["rows"]):  # rank 0's times; memory and K/V bytes from both ranks
        merged = dict(row)
        if "error" not in row:
            merged["kv_bytes"] = sum(r["rows"][i]["kv_bytes"] for r in ranks)
            merged["kv_bytes_per_rank"] = [r["rows"][i]["kv_bytes"] for r in ranks]
            for key in ("prefill_peak_gib", "decode_peak_gib"):
                merged[key] = {f"cuda:{r['rank']}": next(iter(r["rows"][i][key].values())) for r in ranks}
        rows.append(merged)
    for r in range(2):
        Path(out, f"tp_rank{r}.json").unlink()
    return {"load_s": max(r["load_s"] for r in ranks),
            "weights_gib": {f"cuda:{r['rank']}": next(iter(r["weights_gib"].values())) for r in ranks}, "rows": rows}


def device_map_layout(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    model = device_map_model(args.layers)
    build_s = time.perf_counter() - t0
    weights = {f"cuda:{d}": v for d, v in _weights_gib().items()}
    if args.profile:
        profile_decode(model, 1, args.context, Path(args.out, "profile_device_map.txt"))
    rows = run_layout(model, args.batch_list, args.context, args.steps,
                      lambda r: print(json.dumps({k: v for k, v in r.items() if k != "ms_all"}), flush=True),
                      args.compile)
    for r in rows:
        for key in ("prefill_peak_gib", "decode_peak_gib"):
            if key in r:
                r[key] = {f"cuda:{d}": v for d, v in r[key].items()}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"load_s": build_s, "weights_gib": weights, "rows": rows}


def markdown(result: dict) -> str:
    shape = "Qwen2.5-32B shape" + (f" ({result['layers']} layers only)" if result["layers"] != 64 else "")
    lines = [f"# {shape} on {result['gpu']}: tqpatch K4/V4 vs bf16 K/V", "",
             f"Command: `{result['command']}`  ",
             f"commit {result['commit']}, torch {result['torch']}, transformers {result['transformers']}, "
             f"accelerate {result['accelerate']}.", "",
             f"Random bf16 weights; B x {result['context']} random prompt tokens prefilled in model-level chunks of "
             f"{CHUNK}; {result['steps']} greedy decode steps, " + ("one compiled step each (torch.compile fullgraph, "
             "reduce-overhead; bf16 with HF StaticCache); ms/step = median of the steps after the first 3 (compile and graph capture)."
             if result.get("compile") else "eager (no compile, no CUDA graphs); ms/step = median after 2 warm-up steps.")
             + "  K/V GiB = measured storage summed over both GPUs (tqpatch: codes, scales and "
             "its 64-token full-precision window); format ratio = 16 / (4 + 16/128) = 3.88x. Peaks = "
             "torch.cuda.max_memory_allocated per GPU, weights included.", ""]
    for layout, title in (("device_map", "accelerate device_map (layers 0-31 on GPU 0, 32-63 on GPU 1)"),
                          ("tp", "tensor parallelism (tp_plan=\"auto\", torchrun, 2 ranks: 20 q / 4 kv heads each)")):
        res = result.get(layout)
        if not res:
            continue
        lines += [f"## {title}", ""]
        if "error" in res:
            lines += [f"Did not run: {res['error']}", ""]
            continue
        w = res["weights_gib"]
        lines += ["Weights: " + ", ".join(f"{v:.1f} GiB on {k}" for k, v in w.items()) + ".", "",
                  "| B | K/V cache | ms / step | tokens/s | vs bf16 | prefill s | K/V GiB | K/V vs bf16 | "
                  "prefill peak GiB (per GPU) | decode peak GiB (per GPU) |", "|---|---|---|---|---|---|---|---|---|---|"]
        base = {r["batch"]: r for r in res["rows"] if r["cache"].startswith("bf16") and "error" not in r}
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['batch']} | {r['cache']} | {r['error'][:60]} | | | | | | | |")
                continue
            b = base.get(r["batch"])
            speed = f"{b['ms_per_step'] / r['ms_per_step']:.2f}x" if b else "—"
            ratio = f"{b['kv_bytes'] / r['kv_bytes']:.2f}x smaller" if b and r is not b else "1x"
            pp = " / ".join(f"{v:.1f}" for v in r["prefill_peak_gib"].values())
            dp = " / ".join(f"{v:.1f}" for v in r["decode_peak_gib"].values())
            lines.append(f"| {r['batch']} | {r['cache']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {speed} | "
                         f"{r['prefill_s']:.1f} | {r['kv_bytes'] / 2**30:.2f} | {ratio} | {pp} | {dp} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for bench_32b.json / .md")
    ap.add_argument("--layouts", default="tp,device_map", help="comma list of tp, device_map (default both)")
    ap.add_argument("--batches", default="1,8", help="comma list of batch sizes (default 1,8)")
    ap.add_argument("--context", type=int, default=32768, help="prompt tokens (default 32768)")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed (default 16)")
    ap.add_argument("--layers", type=int, default=64, help="decoder layers (default 64; fewer for a quick check)")
    ap.add_argument("--compile", action="store_true",
                    help="compiled decode steps (fullgraph, CUDA graphs; bf16 with HF StaticCache) instead of eager")
    ap.add_argument("--profile", action="store_true",
                    help="device_map layout: also write profile_device_map.txt (3 eager tqpatch steps, B=1)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for the torchrun part")
    ap.add_argument("--tp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.batch_list = [int(b) for b in args.batches.split(",") if b.strip()]
    if not set(args.layouts.split(",")) <= {"tp", "device_map"}:
        ap.error(f"--layouts takes tp and/or device_map, got {args.layouts!r}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.tp_worker:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return tp_worker(args)
    if torch.cuda.device_count() < 2:
        print(f"bench_32b: needs 2 GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    import accelerate
    import transformers

    from tqpatch.evalcli import run_info

    command = "python tools/bench_32b.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"gpu": f"2 x {torch.cuda.get_device_name(0)}", "torch": torch.__version__,
              "transformers": transformers.__version__, "accelerate": accelerate.__version__,
              "context": args.context, "steps": args.steps, "batches": args.batch_list, "layers": args.layers,
              "compile": args.compile,
              **run_info(command)}
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for layout in layouts:  # results written after each layout: a run cut short keeps what it measured
        result[layout] = device_map_layout(args) if layout == "device_map" else tp_layout(args)
        Path(args.out, "bench_32b.json").write_text(json.dumps(result, indent=2))
        text = markdown(result)
        Path(args.out, "bench_32b.md").write_text(text)
    print(text)
    return 0 if all("error" not in result.get(k, {}) for k in layouts) else 1


if __name__ == "__main__":
    sys.exit(main())
