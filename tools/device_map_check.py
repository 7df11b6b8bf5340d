"""tqpatch on a model sharded over 2 GPUs with a device_map (accelerate).

    python tools/device_map_check.py --out results/device_map_h100x2            # ~1 min

A random-weight llama (8 layers, saved to a temporary directory) loaded with a device_map that
puts layers 0-3 on cuda:0 and 4-7 on cuda:1 (embeddings on 0, norm and head on 1). After
``tqpatch.apply`` with a recipe holding per-head data, every layer's cache storage, rotation,
codebook (centroids, thresholds) and key scale must be on that layer's device, both for a cache
preallocated by ``TurboQuantCache(model, max_cache_len, batch_size)`` and for the one generate
builds lazily; greedy tokens must equal the same model patched on cuda:0 alone. Writes
``device_map_check.json`` and ``device_map_check.md``. The Qwen2.5-32B-shaped throughput and
memory benchmark (device_map and tensor parallelism) is ``tools/bench_32b.py``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
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
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for device_map_check.json / .md")
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
    (out / "device_map_check.json").write_text(json.dumps(result, indent=2))
    (out / "device_map_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0 if result["check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
