"""Where a compiled decode step's time goes, per layer: tqpatch 4-bit vs HF StaticCache bf16.

    python tools/profile_step.py --out DIR [--layers 4] [--batches 1,8] [--contexts 1024,32768]

Builds the Llama-3.1-8B shape with only ``--layers`` layers (the per-layer cost is the same and the
compile takes seconds instead of minutes), compiles one decode step per method
(``fullgraph=True, mode="reduce-overhead"``: CUDA graphs), times it, and profiles 5 steps at each
context. Writes ``profile_step.json`` and ``profile_step.md`` (ms per step, and the kernels of one
step with calls per layer and microseconds), and the Inductor output code of the tqpatch graph
(``tq_output_code.py``) for reading which ops fused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = 5


def _kernels(prof, layers: int, cuda: bool) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        us = (getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)) if cuda \
            else e.self_cpu_time_total
        if us <= 0 or e.key.startswith(("Torch-Compiled", "## Call", "CompiledFunction")):
            continue
        rows.append(dict(name=e.key[:110], calls_per_step=e.count / STEPS, calls_per_layer=e.count / STEPS / layers,
                         us_per_call=us / e.count, us_per_step=us / STEPS))
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows


def _profile(step, tok, pos, layers: int) -> tuple[float, float | None, list[dict]]:
    """ms per step and host ms per step (``tqpatch.bench.time_steps``: one sync per step; the host
    ms, None off CUDA, is the wall time until the call returns) and the kernel table."""
    from tqpatch.bench import _mark_step, time_steps

    def call():
        _mark_step()
        step(tok, pos)

    t = time_steps(call, tok.device, iters=30, warmup=3)
    ms, host = t["ms"], t.get("host_ms")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if tok.is_cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(STEPS):
            call()
        if tok.is_cuda:
            torch.cuda.synchronize()
    return ms, host, _kernels(prof, layers, tok.is_cuda)


def _output_code(dest: Path) -> str | None:
    """Copy the largest Inductor output module (the decode step's graph) to ``dest``."""
    try:
        from torch._inductor.codecache import PyCodeCache

        mods = PyCodeCache.modules if isinstance(PyCodeCache.modules, list) else list(PyCodeCache.modules.values())
        files = [Path(m.__file__) for m in mods if getattr(m, "__file__", None)]
        files = [f for f in files if f.exists() and "def call(" in f.read_text(errors="replace")]
        if not files:
            return None
        best = max(files, key=lambda f: f.stat().st_size)
        shutil.copy(best, dest)
        return str(best)
    except Exception as exc:  # noqa: BLE001 - best effort
        return f"not captured: {exc}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--contexts", default="1024,32768")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--commit", default="")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of this script")
    args = ap.parse_args()

    import tqpatch
    from transformers import StaticCache
    from tqpatch.bench import (MODEL_SHAPES, _cleanup, _fill_static, _first_calls, _step_fn, _step_inputs, build_model,
                               environment, fill_random, set_length, BenchConfig)
    from tqpatch.cache import TurboQuantCache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    shape = MODEL_SHAPES["llama-3.1-8b"]
    model = build_model("llama-3.1-8b", dev, torch.bfloat16, layers=args.layers)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    env = environment(BenchConfig(out=str(out), commit=args.commit, device=args.device, command="python " + " ".join(sys.argv)))
    result = dict(env=env, layers=args.layers, bits=args.bits, command=env["command"], points=[])
    code_saved = None
    for B in batches:
        tok, pos = _step_inputs(B, shape.vocab, dev)
        # tqpatch: one compiled step for every context (only the device-side length changes)
        tqpatch.apply(model, key_bits=args.bits, value_bits=args.bits)
        cache = TurboQuantCache(model, max_cache_len=max(contexts) + 256, batch_size=B)
        fill_random(cache, contexts[0])
        pos.fill_(contexts[0])
        _cleanup(dev, reset_dynamo=True)
        step = torch.compile(_step_fn(model, cache), fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            compile_s, _ = _first_calls(step, tok, pos, dev)
            if code_saved is None:
                code_saved = _output_code(out / "tq_output_code.py")
            for c in contexts:
                set_length(cache, c)
                pos.fill_(c)
                ms, host, kernels = _profile(step, tok, pos, args.layers)
                result["points"].append(dict(method=f"tq{args.bits}", batch=B, context=c, ms=ms, host_ms=host,
                                             compile_s=round(compile_s, 1), kernels=kernels))
                print(f"tq{args.bits} B={B} T={c}: {ms:.3f} ms/step (compile {compile_s:.0f} s)", flush=True)
        del cache, step
        tqpatch.unapply(model)
        _cleanup(dev, reset_dynamo=True)
        # HF static + compile: one compile per context
        for c in contexts:
            cache = StaticCache(config=model.config, max_cache_len=c + 256)
            with torch.no_grad():
                model(tok, position_ids=pos, past_key_values=cache, use_cache=True)
            _fill_static(cache, c)
            pos.fill_(c)
            _cleanup(dev, reset_dynamo=True)
            step = torch.compile(_step_fn(model, cache), fullgraph=True, mode="reduce-overhead")
            with torch.no_grad():
                compile_s, _ = _first_calls(step, tok, pos, dev)
                ms, host, kernels = _profile(step, tok, pos, args.layers)
            result["points"].append(dict(method="static", batch=B, context=c, ms=ms, host_ms=host,
                                         compile_s=round(compile_s, 1),
                                         kernels=kernels))
            print(f"static B={B} T={c}: {ms:.3f} ms/step", flush=True)
            del cache, step
            _cleanup(dev, reset_dynamo=True)
    result["output_code"] = code_saved
    (out / "profile_step.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    lines = [f"# Compiled decode step, Llama-3.1-8B shape with {args.layers} layers (random bf16 weights)", "",
             f"- card: {env.get('card')}; torch {env.get('torch')}, triton {env.get('triton')}, "
             f"transformers {env.get('transformers')}", f"- commit: {env.get('git_commit')}",
             f"- command: `{result['command']}`", "",
             "| method | B | context | ms/step | ms/step per layer | host ms/step | GPU kernel ms/step |",
             "|---|---|---|---|---|---|---|"]
    for p in result["points"]:
        host = "-" if p.get("host_ms") is None else f"{p['host_ms']:.3f}"
        gpu = sum(k["us_per_step"] for k in p["kernels"]) / 1e3
        lines.append(f"| {p['method']} | {p['batch']} | {p['context']} | {p['ms']:.3f} | {p['ms'] / args.layers:.3f} | "
                     f"{host} | {gpu:.3f} |")
    for p in result["points"]:
        lines += ["", f"## {p['method']} B={p['batch']} T={p['context']}: kernels of one step", "",
                  "| kernel | calls/layer | us/call | us/step |", "|---|---|---|---|"]
        lines += [f"| `{k['name']}` | {k['calls_per_layer']:.2f} | {k['us_per_call']:.1f} | {k['us_per_step']:.1f} |"
                  for k in p["kernels"][:40]]
        tot = sum(k["us_per_step"] for k in p["kernels"])
        n = sum(k["calls_per_step"] for k in p["kernels"])
        lines.append(f"| total | {n / args.layers:.1f} | | {tot:.1f} |")
    (out / "profile_step.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines[:20]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
