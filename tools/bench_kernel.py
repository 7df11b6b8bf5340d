#!/usr/bin/env python
"""Check and time the Triton decode-attention kernel (tqpatch/kernels/triton_decode.py) on a GPU.

1. Correctness: ``decode_attention`` against ``history_attention`` (Q = 1) on fresh random codes,
   scales and queries, over bits 2/3/4, d 64/128/256, G 1/4/7/8, ring on/off, softcap, padding,
   n < C and empty rows; outputs poisoned with NaN first.
2. Timing (``triton.testing.do_bench``, median, L2 flushed between runs): the kernel (both stages,
   through the public wrapper) against ``scaled_dot_product_attention`` on bf16 K/V of the same
   shape (enable_gqa=True), for B in {1, 8, 32} x T in {1K, 8K, 32K, 128K}, Hq 32 / Hkv 8 / d 128,
   at 4 and 3 bits, plus a device-to-device copy for the bandwidth ceiling.
3. Optional launch-configuration sweep (``--sweep``) at a few shapes.

Writes ``kernel.json`` and ``kernel.md`` to ``--out`` and prints the table last.

    PYTHONUNBUFFERED=1 python tools/bench_kernel.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tqpatch.codebook import lloyd_max  # noqa: E402
from tqpatch.kernels import triton_decode as td  # noqa: E402
from tqpatch.kernels.reference import history_attention  # noqa: E402

HQ, HKV, D = 32, 8, 128


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# Correctness
# ------------------------------------------------------------------------------------------------

def rand_inputs(B, Hq, Hkv, C, d, kb, vb, n, starts, gen, q_scale=1.0, device="cuda"):
    q = torch.randn(B, Hq, d, generator=gen, device=device) * q_scale
    kc = torch.randint(0, 256, (B, Hkv, C, d * kb // 8), generator=gen, device=device, dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, Hkv, C, d * vb // 8), generator=gen, device=device, dtype=torch.uint8)
    ks = (torch.rand(B, Hkv, C, generator=gen, device=device) * 3 + 0.05).half()
    vs = (torch.rand(B, Hkv, C, generator=gen, device=device) * 3 + 0.05).half()
    kcent = torch.tensor(lloyd_max(d, kb), dtype=torch.float32, device=device)
    vcent = torch.tensor(lloyd_max(d, vb), dtype=torch.float32, device=device)
    nn = torch.tensor([n], dtype=torch.int32, device=device)
    st = torch.tensor(starts, dtype=torch.int32, device=device)
    return q, kc, ks, vc, vs, kcent, vcent, nn, st


CHECK_CASES = [  # key_bits, value_bits, d, G, ring, softcap, lut
    (2, 2, 64, 4, False, 0.0, "prmt"), (3, 3, 64, 4, False, 0.0, "prmt"), (4, 4, 64, 4, False, 0.0, "prmt"),
    (2, 2, 128, 4, False, 0.0, "prmt"), (3, 3, 128, 4, False, 0.0, "prmt"), (4, 4, 128, 4, False, 0.0, "prmt"),
    (2, 2, 256, 4, False, 0.0, "prmt"), (3, 3, 256, 4, False, 0.0, "prmt"), (4, 4, 256, 4, False, 0.0, "prmt"),
    (4, 2, 128, 7, True, 0.0, "prmt"), (2, 3, 128, 7, True, 0.0, "prmt"), (3, 4, 64, 7, True, 50.0, "prmt"),
    (4, 4, 64, 1, True, 30.0, "prmt"), (4, 3, 128, 8, False, 20.0, "prmt"),
    (4, 4, 128, 4, False, 0.0, "gather"), (3, 2, 64, 1, True, 0.0, "gather"),
]


def check(seed: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    Hkv, C = 2, 300
    for kb, vb, d, G, ring, softcap, lut in CHECK_CASES:
        scaling = d ** -0.5
        scen = [(3, 250, [0, 17, 249]), (2, 37, [0, 40]), (1, 0, [0])]
        scen += [(2, 777, [0, 600]), (2, C, [5, 0])] if ring else [(2, C, [0, 299])]
        worst_out = worst_lse = 0.0
        worst8 = [0.0, 0.0]  # at queries x8 (logits up to ~40): reported, not held to 1e-3
        ok = True
        for B, n, starts in scen:
            for q_scale in (1.0, 4.0, 8.0):
                args = rand_inputs(B, G * Hkv, Hkv, C, d, kb, vb, n, starts, gen, q_scale)
                q, kc, ks, vc, vs, kcent, vcent, nn, st = args
                ro, rl = history_attention(q.unsqueeze(2), kc, ks, vc, vs, kcent, vcent, nn, st, key_bits=kb,
                                           value_bits=vb, scaling=scaling, softcap=softcap or None, ring=ring)
                ro, rl = ro.squeeze(2), rl.squeeze(2)
                for splits in (1, 5):
                    cfg = td.default_config(B, Hkv, C, d, kb, vb)
                    cfg["splits"] = splits
                    out = torch.full((B, G * Hkv, d), float("nan"), device="cuda")
                    lse = torch.full((B, G * Hkv), float("nan"), device="cuda")
                    junk = torch.full((64 << 20,), float("nan"), device="cuda")
                    del junk
                    td._launch(q, kc, ks, vc, vs, kcent, vcent, nn, st, out, lse, kb, vb, scaling, softcap, ring,
                               cfg, lut)
                    torch.cuda.synchronize()
                    empty = ~torch.isfinite(rl)
                    if torch.isnan(out).any() or torch.isnan(lse).any():
                        ok = False
                    if not torch.equal(empty, ~torch.isfinite(lse)) or not bool((out[empty] == 0).all()):
                        ok = False
                    if (~empty).any():
                        e = ((out - ro).norm() / ro.norm()).item()
                        le = ((lse[~empty] - rl[~empty]).abs() / rl[~empty].abs().clamp_min(1)).max().item()
                        if q_scale > 4:
                            worst8 = [max(worst8[0], e), max(worst8[1], le)]
                        else:
                            worst_out, worst_lse = max(worst_out, e), max(worst_lse, le)
        ok = ok and worst_out < 1e-3 and worst_lse < 1e-3
        rows.append(dict(key_bits=kb, value_bits=vb, d=d, G=G, ring=ring, softcap=softcap, lut=lut,
                         max_rel_err_out=worst_out, max_rel_err_lse=worst_lse, ok=ok,
                         q_x8_rel_err_out=worst8[0], q_x8_rel_err_lse=worst8[1]))
        log(f"check kb={kb} vb={vb} d={d} G={G} ring={ring} softcap={softcap} lut={lut}: "
            f"out {worst_out:.2e} lse {worst_lse:.2e} {'OK' if ok else 'FAIL'} (q x8: {worst8[0]:.1e} {worst8[1]:.1e})")
    return rows


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

def bench(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def graph_bench(fn) -> float:
    """Median time of one replay of a CUDA graph holding one call of ``fn`` (no launch overhead:
    the decode step runs under CUDA graphs)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    us = bench(g.replay)
    del g
    return us


def copy_bandwidth() -> dict:
    n = 1 << 30  # 1 GiB
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = bench(lambda: dst.copy_(src))
    del src, dst
    return {"bytes": n, "us": us, "GBps": 2 * n / us / 1e3}  # read + write


def kernel_inputs(B, T, bits, gen):
    kc = torch.randint(0, 256, (B, HKV, T, D * bits // 8), generator=gen, device="cuda", dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, HKV, T, D * bits // 8), generator=gen, device="cuda", dtype=torch.uint8)
    ks = (torch.rand(B, HKV, T, generator=gen, device="cuda") + 0.5).half()
    vs = (torch.rand(B, HKV, T, generator=gen, device="cuda") + 0.5).half()
    cent = torch.tensor(lloyd_max(D, bits), dtype=torch.float32, device="cuda")
    q = torch.randn(B, HQ, D, generator=gen, device="cuda")
    n = torch.tensor([T], dtype=torch.int32, device="cuda")
    st = torch.zeros(B, dtype=torch.int32, device="cuda")
    return q, kc, ks, vc, vs, cent, cent, n, st


def time_kernel(inputs, bits, config=None, lut=None, eager=False) -> float:
    q, kc, ks, vc, vs, kcent, vcent, n, st = inputs
    fn = lambda: td.decode_attention(q, kc, ks, vc, vs, kcent, vcent, n, st, key_bits=bits, value_bits=bits,  # noqa
                                     scaling=D ** -0.5, config=config, lut=lut)
    if eager:
        fn()
        torch.cuda.synchronize()
        return bench(fn)
    return graph_bench(fn)


def time_sdpa(B, T, gen) -> float | None:
    try:
        q = torch.randn(B, HQ, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HKV, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        return None
    fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    us = graph_bench(fn)
    del q, k, v
    torch.cuda.empty_cache()
    return us


def must_read(B, T, bits) -> int:
    return B * HKV * T * (2 * D * bits // 8 + 2 * 2)  # K and V codes + fp16 scales


def sweep(gen) -> list[dict]:
    rows = []
    shapes = [(8, 32768), (32, 32768), (1, 32768)]
    # (BLOCK_N, warps, stages, maxnreg, early_v, resident programs per SM assumed for the splits)
    configs = [(64, 4, 3, 0, False, 3), (64, 4, 3, 0, True, 3), (64, 4, 3, 128, False, 4), (64, 4, 2, 128, False, 4),
               (64, 4, 3, 128, True, 4), (32, 4, 3, 0, False, 4), (32, 4, 3, 0, False, 5), (128, 8, 3, 0, False, 2)]
    for B, T in shapes:
        inputs = kernel_inputs(B, T, 4, gen)
        for bn, nw, stg, mr, ev, per_sm in configs:
            splits_fit = td._fit_splits(B * HKV, -(-T // bn), per_sm * 132)
            for splits in sorted({splits_fit, min(-(-T // bn), 4 * splits_fit)}):
                cfg = {"BLOCK_N": bn, "num_warps": nw, "stages": stg, "maxnreg": mr, "early_v": ev, "splits": splits}
                try:
                    us = time_kernel(inputs, 4, cfg)
                except Exception as e:  # a config that does not compile or fit: record and go on
                    log(f"sweep B={B} T={T} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                gbps = must_read(B, T, 4) / us / 1e3
                rows.append(dict(B=B, T=T, **cfg, us=us, GBps=gbps))
                log(f"sweep B={B} T={T} {cfg}: {us:.1f} us {gbps:.0f} GB/s")
        us = time_kernel(inputs, 4, lut="gather")
        rows.append(dict(B=B, T=T, lut="gather", us=us, GBps=must_read(B, T, 4) / us / 1e3))
        log(f"sweep B={B} T={T} default config, lut=gather: {us:.1f} us")
        del inputs
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for kernel.json and kernel.md")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="1024,8192,32768,131072")
    ap.add_argument("--commit", default="", help="commit to record (default: git rev-parse HEAD)")
    ap.add_argument("--profile", action="store_true", help="only run the B=8 T=32K 4-bit call a few times (for ncu)")
    args = ap.parse_args()
    if args.profile:
        gen = torch.Generator(device="cuda").manual_seed(0)
        inputs = kernel_inputs(8, 32768, 4, gen)
        q, kc, ks, vc, vs, kcent, vcent, n, st = inputs
        for _ in range(3):
            td.decode_attention(q, kc, ks, vc, vs, kcent, vcent, n, st, key_bits=4, value_bits=4, scaling=D ** -0.5)
        torch.cuda.synchronize()
        return
    os.makedirs(args.out, exist_ok=True)
    assert td.available(), "needs CUDA and Triton"
    import triton

    t0 = time.time()
    dev = torch.cuda.get_device_properties(0)
    commit = args.commit
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
        except Exception:
            commit = "unknown"
    meta = dict(card=dev.name, sm_count=dev.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), commit=commit, command="PYTHONUNBUFFERED=1 python " + " ".join(sys.argv),
                shape=f"Hq {HQ} / Hkv {HKV} / d {D}",
                timer="triton.testing.do_bench median (L2 flushed) of one CUDA-graph replay holding the call; "
                      "'eager call' = do_bench of the Python call itself (includes launch overhead)")
    log(f"{meta}")
    result: dict = {"meta": meta}
    if not args.skip_check:
        result["check"] = check(seed=1234)
        log(f"check: {sum(r['ok'] for r in result['check'])}/{len(result['check'])} variants pass "
            f"({time.time() - t0:.0f} s)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    result["copy"] = copy_bandwidth()
    copy_gbps = result["copy"]["GBps"]
    log(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    if args.sweep:
        result["sweep"] = sweep(gen)
    rows = []
    sdpa_cache: dict = {}
    for bits in [int(b) for b in args.bits.split(",")]:
        for B in [int(b) for b in args.batches.split(",")]:
            for T in [int(t) for t in args.lengths.split(",")]:
                inputs = kernel_inputs(B, T, bits, gen)
                cfg = td.default_config(B, HKV, T, D, bits, bits)
                us = time_kernel(inputs, bits)
                us_eager = time_kernel(inputs, bits, eager=True)
                del inputs
                torch.cuda.empty_cache()
                if (B, T) not in sdpa_cache:
                    sdpa_cache[(B, T)] = time_sdpa(B, T, gen)
                sd = sdpa_cache[(B, T)]
                nbytes = must_read(B, T, bits)
                gbps = nbytes / us / 1e3
                row = dict(bits=bits, B=B, T=T, kernel_us=us, kernel_eager_us=us_eager, sdpa_bf16_us=sd, bytes=nbytes, GBps=gbps,
                           pct_copy=100 * gbps / copy_gbps, ratio_vs_sdpa=(us / sd) if sd else None, config=cfg)
                rows.append(row)
                log(f"bits={bits} B={B} T={T}: kernel {us:.1f} us, sdpa {sd if sd is None else round(sd, 1)} us, "
                    f"{gbps:.0f} GB/s = {row['pct_copy']:.0f}% of copy, ratio {row['ratio_vs_sdpa'] or float('nan'):.3f}")
    result["timing"] = rows
    goal = [r for r in rows if r["bits"] == 4 and r["B"] == 8 and r["T"] == 32768]
    result["goals"] = {
        "ratio_B8_T32K_4bit_le_0.35": bool(goal and goal[0]["ratio_vs_sdpa"] is not None and goal[0]["ratio_vs_sdpa"] <= 0.35),
        "pct_copy_ge_75_all_T_ge_8K_4bit": all(r["pct_copy"] >= 75 for r in rows if r["T"] >= 8192 and r["bits"] == 4),
        "pct_copy_ge_75_all_T_ge_8K_3bit": all(r["pct_copy"] >= 75 for r in rows if r["T"] >= 8192 and r["bits"] == 3),
    }
    with open(os.path.join(args.out, "kernel.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [
        "# Triton decode attention over TurboQuant codes: timings",
        "",
        f"Card: {meta['card']} ({meta['sm_count']} SMs); torch {meta['torch']}, triton {meta['triton']}; "
        f"commit {meta['commit']}.",
        f"Command: `{meta['command']}`.",
        f"Shape: {meta['shape']}; one query token per sequence; n = T = allocated slots. Timer: {meta['timer']}.",
        f"Device-to-device copy: {copy_gbps:.0f} GB/s (bytes read + written). 'bytes' = K and V codes plus "
        "their fp16 scales, what the kernel must read; GB/s = bytes / kernel time; SDPA = "
        "`scaled_dot_product_attention(enable_gqa=True)` on bf16 K/V of the same shape.",
        "",
        "| bits | B | T | kernel µs | SDPA bf16 µs | MB read | GB/s | % of copy | kernel / SDPA | kernel µs, eager call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sd = f"{r['sdpa_bf16_us']:.1f}" if r["sdpa_bf16_us"] else "OOM"
        ratio = f"{r['ratio_vs_sdpa']:.3f}" if r["ratio_vs_sdpa"] else "-"
        lines.append(f"| {r['bits']} | {r['B']} | {r['T']} | {r['kernel_us']:.1f} | {sd} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['GBps']:.0f} | {r['pct_copy']:.0f}% | {ratio} | {r['kernel_eager_us']:.1f} |")
    if "check" in result:
        lines += ["", "Correctness vs `history_attention` (float32), max over scenarios (padding, n < C, empty rows, "
                  "wrapped rings, 1 and 5 splits) and queries x1, x4; relative error of out (norm), of lse vs "
                  "max(1, |lse|); ok = both < 1e-3, no NaN, same empty rows. Last two columns: queries x8 "
                  "(logits up to ~40), reported only.", "",
                  "| K bits | V bits | d | G | ring | softcap | lut | out | lse | ok | out (q x8) | lse (q x8) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in result["check"]:
            lines.append(f"| {c['key_bits']} | {c['value_bits']} | {c['d']} | {c['G']} | {c['ring']} | {c['softcap']} | "
                         f"{c['lut']} | {c['max_rel_err_out']:.1e} | {c['max_rel_err_lse']:.1e} | {c['ok']} | "
                         f"{c['q_x8_rel_err_out']:.1e} | {c['q_x8_rel_err_lse']:.1e} |")
    lines += ["", f"Goals: {result['goals']}"]
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "kernel.md"), "w") as f:
        f.write(md)
    log(f"total {time.time() - t0:.0f} s")
    log(md)


if __name__ == "__main__":
    main()
