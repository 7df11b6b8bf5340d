"""Tensor parallelism check: tqpatch on a model loaded with ``tp_plan="auto"`` under torchrun.

    python tools/tp_check.py --device cpu  --out results/tp_cpu      # gloo, 2 processes (CI)
    python tools/tp_check.py --device cuda --out results/tp_h100x2   # nccl, 2 GPUs

The parent process builds a small random-weight llama (saved to a temporary directory) and a
recipe with per-head data (``key_channel_scale`` ``[L, H, d]``, mixed bits, one layer kept in full
precision), runs single-process patched greedy generation as the reference, then launches
``torchrun --nproc-per-node N`` on this same file. Each rank loads the model tensor-parallel,
applies the recipe and checks that it holds only its own KV heads (plans, cache tensors) and the
recipe rows of exactly those heads, then generates greedily, and runs decode steps both eager and
compiled (``torch.compile(fullgraph=True)``, CUDA graphs on GPUs) over a preallocated cache. The
check passes when every rank's tokens equal the reference and its compiled steps give the tokens
of its eager ones. Writes ``tp_check.json`` and ``tp_check.md`` to ``--out``; exit
status 0 on success, 1 on a mismatch, 2 when something could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 8, 4, 64  # d 64: the GPU decode kernel takes 64/128/256
PROMPT_LEN, NEW_TOKENS, WINDOW = 24, 16, 4


def build_model_dir(path: Path, seed: int = 0) -> None:
    """A random-weight llama (4 layers, 8 q / 4 kv heads, d 64) saved to ``path`` in float32."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=512, hidden_size=NUM_HEADS * HEAD_DIM, intermediate_size=512,
                         num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
                         num_key_value_heads=NUM_KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=256,
                         initializer_range=0.2)  # wide enough weights that greedy tokens vary
    tf.LlamaForCausalLM(cfg).save_pretrained(path)


def build_recipe(path: Path, seed: int = 1) -> None:
    """Per-layer bits 4/3/16/4, window 4, and a random per-head key scale: a wrongly sharded row
    shows up in the per-rank check below."""
    from tqpatch import Recipe

    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, generator=g))
    Recipe(model_type="llama", num_hidden_layers=NUM_LAYERS, num_key_value_heads=NUM_KV_HEADS, head_dim=HEAD_DIM,
           key_bits=[4, 3, 16, 4], value_bits=[4, 3, 16, 3], window=WINDOW, key_channel_scale=scale).save(path)


def prompt_ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


def generate(model, ids: torch.Tensor, cache=None) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             past_key_values=cache, pad_token_id=0)
    return out[:, ids.shape[1]:].cpu()


def reference(model_dir: Path, recipe: Path, device: str, dtype: torch.dtype) -> dict:
    """Greedy tokens of the single-process model: unpatched, and patched with the recipe."""
    import transformers as tf

    import tqpatch

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = prompt_ids()
    plain = generate(model, ids)
    tqpatch.apply(model, recipe=str(recipe))
    patched = generate(model, ids)
    return {"unpatched": plain.tolist(), "patched": patched.tolist()}


def decode_tokens(model, ids: torch.Tensor, steps: int, compiled: bool) -> torch.Tensor:
    """Greedy tokens of ``steps`` decode steps after an eager prefill, the step eager or compiled
    (``torch.compile(fullgraph=True)``; CUDA graphs on a GPU) over a preallocated cache."""
    import tqpatch

    B, T = ids.shape
    cache = tqpatch.TurboQuantCache(model, max_cache_len=T + steps + 8, batch_size=B)
    dev = model.get_input_embeddings().weight.device

    def step(tok, pos):
        return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

    if compiled:
        step = torch.compile(step, fullgraph=True, mode="reduce-overhead" if dev.type == "cuda" else None)
    out = []
    with torch.no_grad():
        tok = model(ids.to(dev), past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for i in range(steps):
            out.append(tok)
            tok = step(tok, torch.full((B, 1), T + i, device=dev)).argmax(-1).clone()
    return torch.cat(out, 1).cpu()


def _load_tp(model_dir: Path, dtype: torch.dtype):
    import inspect
    import warnings

    import transformers as tf

    dist_cfg = getattr(tf, "DistributedConfig", None)
    if dist_cfg is not None and "tp_plan" in inspect.signature(dist_cfg).parameters:
        return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                       distributed_config=dist_cfg(tp_plan="auto"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, tp_plan="auto")


def worker(args: argparse.Namespace) -> int:
    """One rank: load tensor-parallel, apply, check the local heads, generate, write rank<r>.json."""
    import torch.distributed as dist

    import tqpatch
    from tqpatch import Recipe
    from tqpatch.patch import attention_modules, layer_plans

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dtype = getattr(torch, args.dtype)
    model = _load_tp(Path(args.model_dir), dtype).eval()
    errors: list[str] = []
    k_proj = attention_modules(model)[0].k_proj
    if not hasattr(k_proj.weight, "placements"):
        errors.append(f"k_proj.weight is a {type(k_proj.weight).__name__}, not a DTensor: the model is not sharded")
    tqpatch.apply(model, recipe=args.recipe)
    recipe = Recipe.load(args.recipe)
    per = NUM_KV_HEADS // world
    mine = slice(rank * per, (rank + 1) * per)
    for p in layer_plans(model):
        if p.num_kv_heads != per or p.num_heads != NUM_HEADS // world:
            errors.append(f"layer {p.layer_idx}: plan has {p.num_heads} q / {p.num_kv_heads} kv heads, "
                          f"expected {NUM_HEADS // world} / {per}")
        if p.quantized and not torch.equal(p.key_scale, recipe.key_channel_scale[p.layer_idx, mine]):
            errors.append(f"layer {p.layer_idx}: key_scale is not the recipe's rows {mine.start}..{mine.stop - 1}")
    cache = tqpatch.TurboQuantCache(model)
    t0 = time.perf_counter()
    tokens = generate(model, prompt_ids(), cache)
    seconds = time.perf_counter() - t0
    eager_steps = decode_tokens(model, prompt_ids(), NEW_TOKENS, compiled=False)
    t0 = time.perf_counter()
    compiled_steps = decode_tokens(model, prompt_ids(), NEW_TOKENS, compiled=True)
    compile_s = time.perf_counter() - t0
    if not torch.equal(compiled_steps, eager_steps):
        errors.append("compiled decode steps give other greedy tokens than eager ones")
    heads = {}
    for layer in cache.layers:
        stored = [t for t in layer.tensors()[:-2] if t.ndim >= 3]
        heads[layer.plan.layer_idx] = sorted({int(t.shape[1]) for t in stored})
        if heads[layer.plan.layer_idx] != [per]:
            errors.append(f"layer {layer.plan.layer_idx}: cache tensors hold {heads[layer.plan.layer_idx]} heads")
    out = {"rank": rank, "world_size": world, "tokens": tokens.tolist(), "errors": errors,
           "cache_heads_per_layer": heads, "kv_bytes": tqpatch.cache_nbytes(cache), "generate_s": seconds,
           "compiled_equals_eager": torch.equal(compiled_steps, eager_steps), "compile_and_decode_s": compile_s,
           "device": str(k_proj.weight.device), "backend": dist.get_backend() if dist.is_initialized() else None}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parent(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        print(f"tp_check: needs {args.nproc} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, recipe = Path(tmp, "model"), Path(tmp, "recipe.safetensors")
        build_model_dir(model_dir)
        build_recipe(recipe)
        ref = reference(model_dir, recipe, "cuda:0" if args.device == "cuda" else "cpu", dtype)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU even where a GPU is present
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, "--worker",
               "--model-dir", str(model_dir), "--recipe", str(recipe), "--out", str(out), "--dtype", args.dtype]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-8000:], sep="\n", file=sys.stderr)
        print(f"tp_check: torchrun failed with exit status {proc.returncode}", file=sys.stderr)
        return 2
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(args.nproc)]
    mismatches = [r["rank"] for r in ranks if r["tokens"] != ref["patched"]]
    errors = [f"rank {r['rank']}: {e}" for r in ranks for e in r["errors"]]
    result = {
        "device": args.device, "nproc": args.nproc, "dtype": args.dtype,
        "backend": ranks[0]["backend"], "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "model": {"layers": NUM_LAYERS, "q_heads": NUM_HEADS, "kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM},
        "recipe": {"key_bits": [4, 3, 16, 4], "value_bits": [4, 3, 16, 3], "window": WINDOW,
                   "key_channel_scale": "random [L, H, d]"},
        "reference_unpatched": ref["unpatched"], "reference_patched": ref["patched"],
        "ranks": ranks, "token_mismatch_ranks": mismatches, "errors": errors,
        "distinct_tokens": len({t for row in ref["patched"] for t in row}),
        "passed": not mismatches and not errors, "wall_s": time.perf_counter() - t0,
    }
    Path(out, "tp_check.json").write_text(json.dumps(result, indent=2))
    lines = [f"# tqpatch under tensor parallelism ({args.nproc} x {result['gpu'] or 'CPU'}, {result['backend']})", "",
             f"torch {result['torch']}, transformers {result['transformers']}, {args.dtype}; random-weight llama "
             f"{NUM_LAYERS} layers, {NUM_HEADS} q / {NUM_KV_HEADS} kv heads, d {HEAD_DIM}; recipe K4/3/16/4 V4/3/16/3, "
             f"window {WINDOW}, per-head key scale.", "",
             "| rank | KV heads held per layer | K/V bytes | greedy tokens equal single-process patched | "
             "compiled decode step (fullgraph) equals eager |",
             "|---|---|---|---|---|"]
    for r in ranks:
        lines.append(f"| {r['rank']} | {sorted({h for v in r['cache_heads_per_layer'].values() for h in v})} | "
                     f"{r['kv_bytes']} | {r['tokens'] == ref['patched']} | {r['compiled_equals_eager']} |")
    lines += ["", f"Result: {'PASS' if result['passed'] else 'FAIL'}" + (f" ({'; '.join(errors)})" if errors else "")]
    Path(out, "tp_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if result["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nproc", type=int, default=2, help="tensor-parallel processes (default 2; must divide 4)")
    ap.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    ap.add_argument("--out", required=True, help="directory for tp_check.json / tp_check.md")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for torchrun (default 600)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return worker(args) if args.worker else parent(args)


if __name__ == "__main__":
    sys.exit(main())
