"""tqpatch on a model sharded over 2 GPUs with a device_map (accelerate), and an optional benchmark.

    python tools/device_map_check.py --out results/device_map_h100x2            # check (~1 min)
    python tools/device_map_check.py --out results/device_map_h100x2 --bench    # + 32B-shaped bench

Check: a random-weight llama (8 layers, saved to a temporary directory) loaded with a device_map
that puts layers 0-3 on cuda:0 and 4-7 on cuda:1 (embeddings on 0, norm and head on 1). After
``tqpatch.apply`` with a recipe holding per-head data, every layer's cache storage, rotation,
codebook (centroids, thresholds) and key scale must be on that layer's device, both for a cache
preallocated by ``TurboQuantCache(model, max_cache_len, batch_size)`` and for the one generate
builds lazily; greedy tokens must equal the same model patched on cuda:0 alone.

Bench (``--bench``): a Qwen2.5-32B-shaped model with random bf16 weights (64 layers, 40 q / 8 kv
heads, d 128, hidden 5120, intermediate 27648, vocab 152064), built on the meta device and
materialised straight onto the two GPUs (layers 0-31 / 32-63), B=1, a ``--context`` token prompt
(default 32768): ms per decode step (median of ``--steps``) and peak memory per GPU, bf16
DynamicCache vs tqpatch K4/V4. Writes ``device_map_check.json`` and ``device_map_check.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CHECK_LAYERS, CHECK_HEADS, CHECK_KV, CHECK_D = 8, 8, 4, 64


def _split_map(num_layers: int, prefix: str = "model") -> dict[str, int]:
    half = num_layers // 2
    dm = {f"{prefix}.embed_tokens": 0, f"{prefix}.rotary_emb": 0, f"{prefix}.norm": 1, "lm_head": 1}
    dm.update({f"{prefix}.layers.{i}": 0 if i < half else 1 for i in range(num_layers)})
    return dm


def _greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].cpu()


def check(tmp: Path) -> dict:
    """The placement and greedy-equality check (see module docs)."""
    import transformers as tf

    import tqpatch
    from tqpatch import Recipe, TurboQuantCache
    from tqpatch.patch import attention_modules

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=1024, hidden_size=CHECK_HEADS * CHECK_D, intermediate_size=1024,
                         num_hidden_layers=CHECK_LAYERS, num_attention_heads=CHECK_HEADS,
                         num_key_value_heads=CHECK_KV, head_dim=CHECK_D, max_position_embeddings=1024,
                         initializer_range=0.1)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp / "model")
    g = torch.Generator().manual_seed(1)
    recipe = Recipe(model_type="llama", num_hidden_layers=CHECK_LAYERS, num_key_value_heads=CHECK_KV,
                    head_dim=CHECK_D, key_bits=4, value_bits=4, window=8,
                    key_channel_scale=torch.exp(0.3 * torch.randn(CHECK_LAYERS, CHECK_KV, CHECK_D, generator=g)))
    ids = torch.randint(3, 1024, (2, 40), generator=g)

    single = tf.AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32, device_map={"": 0}).eval()
    tqpatch.apply(single, recipe=recipe)
    ref = _greedy(single, ids.to("cuda:0"), 24)
    del single
    torch.cuda.empty_cache()

    model = tf.AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32,
                                                    device_map=_split_map(CHECK_LAYERS)).eval()
    tqpatch.apply(model, recipe=recipe)
    errors, placement = [], {}
    want = {m.layer_idx: next(m.parameters()).device for m in attention_modules(model)}
    if sorted({str(d) for d in want.values()}) != ["cuda:0", "cuda:1"]:
        errors.append(f"the device_map did not split the layers over two GPUs: {want}")

    def inspect(cache, what):
        for layer in cache.layers:
            i = layer.plan.layer_idx
            names = ["k_codes", "k_scales", "v_codes", "v_scales", "win_k", "win_v", "n", "start", "rotation_k",
                     "rotation_v", "k_centroids", "v_centroids", "k_thresholds", "v_thresholds", "key_scale"]
            found = {k: getattr(layer, k) for k in names if isinstance(getattr(layer, k, None), torch.Tensor)}
            missing = [k for k in ("k_codes", "rotation_k", "k_centroids", "key_scale") if k not in found]
            if missing:
                errors.append(f"{what} layer {i}: no {missing}")
            wrong = {k: str(t.device) for k, t in found.items() if t.device != want[i]}
            if wrong:
                errors.append(f"{what} layer {i} (on {want[i]}): {wrong}")
            placement.setdefault(what, {})[i] = sorted({str(t.device) for t in found.values()})

    pre = TurboQuantCache(model, max_cache_len=64, batch_size=2)
    inspect(pre, "preallocated")
    with torch.no_grad():
        out = model.generate(ids.to("cuda:0"), attention_mask=torch.ones_like(ids).to("cuda:0"), max_new_tokens=24,
                             min_new_tokens=24, do_sample=False, pad_token_id=0, past_key_values=pre)
    got_pre = out[:, ids.shape[1]:].cpu()
    lazy = TurboQuantCache(model)
    with torch.no_grad():
        out = model.generate(ids.to("cuda:0"), attention_mask=torch.ones_like(ids).to("cuda:0"), max_new_tokens=24,
                             min_new_tokens=24, do_sample=False, pad_token_id=0, past_key_values=lazy)
    inspect(lazy, "lazy")
    got_lazy = out[:, ids.shape[1]:].cpu()
    for name, got in (("preallocated", got_pre), ("lazy", got_lazy)):
        if not torch.equal(got, ref):
            errors.append(f"{name} cache: greedy tokens differ from the single-GPU patched model")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"errors": errors, "placement": placement, "reference": ref.tolist(), "split": got_lazy.tolist(),
            "distinct_tokens": len(set(ref.flatten().tolist())), "passed": not errors}


def _qwen32b_on_two_gpus():
    import transformers as tf
    from accelerate import dispatch_model

    cfg = tf.Qwen2Config(vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                         num_attention_heads=40, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                         rope_theta=1_000_000.0, tie_word_embeddings=False, use_sliding_window=False)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = tf.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    dm = _split_map(64)
    modules = dict(model.named_modules())
    torch.manual_seed(0)
    for name, dev in dm.items():
        mod = modules[name]
        mod.to_empty(device=f"cuda:{dev}")
        for pname, p in mod.named_parameters():
            with torch.no_grad():
                if "norm" in pname:
                    p.fill_(1.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.normal_(0.0, 0.02)
    rot = type(model.model.rotary_emb)(config=cfg, device="cuda:0")
    model.model.rotary_emb = rot
    model = dispatch_model(model, device_map=dm)
    return model.eval()


def _step_times(model, cache, context: int, steps: int, vocab: int) -> tuple[list[float], float, dict]:
    ids = torch.randint(0, vocab, (1, context), generator=torch.Generator().manual_seed(2)).to("cuda:0")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1).to("cuda:0")
        prefill_peak = {d: torch.cuda.max_memory_allocated(d) for d in (0, 1)}
        for d in (0, 1):
            torch.cuda.reset_peak_memory_stats(d)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1).to("cuda:0")
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - t))
    return times, prefill, prefill_peak


def bench(context: int, steps: int) -> dict:
    """bf16 DynamicCache vs tqpatch K4/V4 on the 32B-shaped model over two GPUs (see module docs)."""
    from transformers import DynamicCache

    import tqpatch

    t0 = time.perf_counter()
    model = _qwen32b_on_two_gpus()
    build_s = time.perf_counter() - t0
    weights = {d: torch.cuda.memory_allocated(d) for d in (0, 1)}
    rows = []
    for setting in ("bf16 DynamicCache", "tqpatch K4/V4"):
        if setting.startswith("tqpatch"):
            tqpatch.apply(model, key_bits=4, value_bits=4)
            cache = tqpatch.TurboQuantCache(model, max_cache_len=context + steps + 8, batch_size=1)
        else:
            cache = DynamicCache(config=model.config)
        for d in (0, 1):
            torch.cuda.reset_peak_memory_stats(d)
        times, prefill, prefill_peak = _step_times(model, cache, context, steps, model.config.vocab_size)
        peak = {d: torch.cuda.max_memory_allocated(d) for d in (0, 1)}
        kv = (tqpatch.cache_nbytes(cache) if setting.startswith("tqpatch") else
              sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)))
        rows.append({"setting": setting, "ms_per_step_median": statistics.median(times[2:]),
                     "ms_per_step_all": times, "prefill_s": prefill, "kv_bytes": kv,
                     "decode_peak_gib": {f"cuda:{d}": peak[d] / 2**30 for d in (0, 1)},
                     "prefill_peak_gib": {f"cuda:{d}": prefill_peak[d] / 2**30 for d in (0, 1)}})
        del cache
        gc.collect()
        torch.cuda.empty_cache()
    tqpatch.unapply(model)
    return {"context": context, "batch": 1, "steps": steps, "build_s": build_s,
            "weights_gib": {f"cuda:{d}": w / 2**30 for d, w in weights.items()}, "rows": rows}


def markdown(result: dict) -> str:
    c = result["check"]
    lines = [f"# tqpatch with a device_map over 2 GPUs ({result['gpu']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}, accelerate {result['accelerate']}.", "",
             f"## Check: random-weight llama, {CHECK_LAYERS} layers split 4/4 over cuda:0/cuda:1, recipe K4/V4 "
             "window 8 + per-head key scale", "",
             f"- every layer's storage, rotation, codebook and key scale on its own device: "
             f"{'yes' if not any('layer' in e for e in c['errors']) else 'NO'}",
             f"- greedy tokens (2 x 24, {c['distinct_tokens']} distinct) equal single-GPU patched: "
             f"{'yes' if not any('greedy' in e for e in c['errors']) else 'NO'}",
             f"- result: {'PASS' if c['passed'] else 'FAIL: ' + '; '.join(c['errors'])}"]
    b = result.get("bench")
    if b:
        lines += ["", f"## Qwen2.5-32B shape, random bf16 weights, layers 0-31 on cuda:0 and 32-63 on cuda:1, "
                  f"B=1, {b['context']} context, {b['steps']} decode steps", "",
                  f"Weights: {b['weights_gib']['cuda:0']:.1f} GiB on cuda:0, {b['weights_gib']['cuda:1']:.1f} GiB "
                  "on cuda:1.", "",
                  "| K/V cache | ms / decode step (median) | prefill s | K/V GiB (measured) | decode peak GiB "
                  "cuda:0 / cuda:1 | prefill peak GiB cuda:0 / cuda:1 |", "|---|---|---|---|---|---|"]
        for r in b["rows"]:
            dp, pp = r["decode_peak_gib"], r["prefill_peak_gib"]
            lines.append(f"| {r['setting']} | {r['ms_per_step_median']:.1f} | {r['prefill_s']:.1f} | "
                         f"{r['kv_bytes'] / 2**30:.2f} | {dp['cuda:0']:.1f} / {dp['cuda:1']:.1f} | "
                         f"{pp['cuda:0']:.1f} / {pp['cuda:1']:.1f} |")
        lines += ["", "Peaks = torch.cuda.max_memory_allocated per device (weights included), reset after the prefill; "
                  "eager decode (no compile, no CUDA graphs), accelerate's device_map hooks in the loop."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for device_map_check.json / .md")
    ap.add_argument("--bench", action="store_true", help="also run the Qwen2.5-32B-shaped benchmark")
    ap.add_argument("--context", type=int, default=32768, help="benchmark prompt tokens (default 32768)")
    ap.add_argument("--steps", type=int, default=32, help="benchmark decode steps (default 32)")
    args = ap.parse_args(argv)
    if torch.cuda.device_count() < 2:
        print(f"device_map_check: needs 2 GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    import accelerate
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": f"2 x {torch.cuda.get_device_name(0)}", "torch": torch.__version__,
              "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        result["check"] = check(Path(tmp))
    print(json.dumps({k: result["check"][k] for k in ("errors", "passed", "distinct_tokens")}), flush=True)
    if args.bench:
        result["bench"] = bench(args.context, args.steps)
    (out / "device_map_check.json").write_text(json.dumps(result, indent=2))
    (out / "device_map_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
