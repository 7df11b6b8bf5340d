"""``tqpatch bench``: the pure parts on CPU (byte accounting, capacity arithmetic, the Markdown and
JSON writers, option parsing, merging), one tiny eager smoke run on CPU, and GPU runs (``-m gpu``)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from tqpatch import bench
from tqpatch.cli import build_parser


# -- byte accounting -------------------------------------------------------------------------------
def test_kernel_bytes_match_the_storage_format():
    # design.md: bytes per vector at d = 128: 4-bit 64 + 2 (fp16 scale) = 66; 3-bit 48 + 2; 2-bit 32 + 2
    for bits, per_vector in ((4, 66), (3, 50), (2, 34)):
        assert bench.kernel_bytes(1, 1, 1, 128, bits, bits) == 2 * per_vector  # K and V
    # results/h100/kernel_notes.md: B=8, T=32K, 4-bit, Hkv 8: 276.8 MB
    assert bench.kernel_bytes(8, 8, 32768, 128, 4, 4) == 8 * 8 * 32768 * 132
    assert bench.kernel_bytes(2, 3, 5, 64, 4, 2) == 2 * 3 * 5 * (32 + 16 + 4)


def test_bf16_kv_bytes():
    assert bench.bf16_kv_bytes(1, 1, 1, 128) == 512
    # results/h100/gpu_check.json: Llama-8B StaticCache at 32768 + 134 positions = 4,312,530,944 bytes
    assert bench.bf16_kv_bytes(1, 8, 32768 + 134, 128, layers=32) == 4_312_530_944


def test_rates():
    assert bench.gbps(3e9, 1e6) == pytest.approx(3.0)
    assert bench.tokens_per_s(8, 20.0) == pytest.approx(400.0)
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert bench.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == 9
    with pytest.raises(ValueError):
        bench.median([])


def test_model_shapes_and_weight_bytes():
    llama = bench.MODEL_SHAPES["llama-3.1-8b"]
    assert (llama.layers, llama.heads, llama.kv_heads, llama.head_dim) == (32, 32, 8, 128)
    assert 16.0e9 < llama.weight_bytes_bf16() < 16.1e9  # 8.03 B parameters
    qwen = bench.MODEL_SHAPES["qwen2.5-7b"]
    assert (qwen.layers, qwen.heads, qwen.kv_heads, qwen.hidden, qwen.intermediate, qwen.vocab) == (
        28, 28, 4, 3584, 18944, 152064)
    assert 15.2e9 < qwen.weight_bytes_bf16() < 15.3e9  # 7.62 B parameters
    cfg = qwen.config()
    assert cfg.model_type == "qwen2" and cfg.num_key_value_heads == 4 and not cfg.tie_word_embeddings


def test_weight_bytes_match_a_built_model():
    shape = bench.MODEL_SHAPES["tiny-qwen2"]
    model = bench.build_model("tiny-qwen2", torch.device("cpu"), dtype=torch.bfloat16)
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == shape.weight_bytes_bf16()
    assert model.model.layers[0].self_attn.k_proj.bias is not None


# -- capacity arithmetic ---------------------------------------------------------------------------
def test_fit_workspace_line():
    fixed, slope = bench.fit_workspace({1: 110, 8: 180})
    assert slope == pytest.approx(10.0) and fixed == pytest.approx(100.0)
    assert bench.fit_workspace({1: 50}) == (50.0, 0.0)
    fixed, slope = bench.fit_workspace({1: 200, 8: 100})  # shrinking: slope clamped at 0
    assert slope == 0.0 and fixed == pytest.approx(150.0)


def test_capacity_batch():
    gib = 1 << 30
    # 60 GiB free, 1.1 GiB K/V per row, 0.5 GiB fixed workspace, 10 MiB per row, 256 MiB headroom
    b = bench.capacity_batch(60 * gib, int(1.1 * gib), 0.5 * gib, 10 << 20, 256 << 20)
    assert b == int((60 * gib - 0.5 * gib - (256 << 20)) // (int(1.1 * gib) + (10 << 20)))
    assert b * (int(1.1 * gib) + (10 << 20)) + 0.5 * gib + (256 << 20) <= 60 * gib
    assert (b + 1) * (int(1.1 * gib) + (10 << 20)) + 0.5 * gib + (256 << 20) > 60 * gib
    assert bench.capacity_batch(100, 1000) == 0
    with pytest.raises(ValueError):
        bench.capacity_batch(100, 0)


def test_capacity_ratio_of_the_formats():
    # per-row K/V of Llama-8B at 32K (window 64 in bf16): 4-bit ~3.8x smaller than bf16
    ctx, L, H, d = 32768, 32, 8, 128
    bf16 = bench.bf16_kv_bytes(1, H, ctx, d, L)
    tq4 = L * (bench.kernel_bytes(1, H, ctx - 64, d, 4, 4) + 2 * 2 * H * 64 * d)
    free = 60 << 30
    ratio = bench.capacity_batch(free, tq4) / bench.capacity_batch(free, bf16)
    assert 3.6 < ratio < 4.0


# -- options ---------------------------------------------------------------------------------------
def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_parse_ints():
    assert bench.parse_ints("1,8, 32") == [1, 8, 32]
    assert bench.parse_ints("1k,32K,128k") == [1024, 32768, 131072]
    assert bench.parse_ints((1, 2)) == [1, 2]


def test_config_defaults_and_quick():
    cfg = bench.config_from_args(_args())
    assert cfg.suites == bench.SUITES and cfg.batches == (1, 8, 32) and cfg.contexts == (1024, 8192, 32768)
    assert cfg.methods == ("tq4", "tq3", "static", "dynamic") and cfg.kernel_bits == (4, 3, 2)
    assert cfg.kernel_lengths == (1024, 8192, 32768, 131072)
    q = bench.config_from_args(_args("--quick", "--batches", "1", "--suite", "e2e"))
    assert q.models == ("llama-3.1-8b",) and q.batches == (1,) and q.suites == ("e2e",) and not q.kernel_check
    cfg = bench.config_from_args(_args("--profile", "32768"))
    assert cfg.suites == () and cfg.profile == 32768 and cfg.output_stem() == "bench_profile_32768"
    assert bench.config_from_args(_args("--suite", "kernel,e2e")).output_stem() == "bench_kernel_e2e"
    assert bench.config_from_args(_args("--compile", "off")).compiled is False


@pytest.mark.parametrize("argv", [("--suite", "speed"), ("--models", "gpt2"), ("--methods", "tq5"),
                                  ("--kernel-bits", "5"), ("--steps", "1")])
def test_bad_options_are_rejected(argv):
    with pytest.raises(ValueError):
        bench.config_from_args(_args(*argv)).validate()


def test_cli_reports_bad_options(capsys):
    from tqpatch.cli import main

    assert main(["bench", "--suite", "speed"]) == 2
    assert "unknown suite" in capsys.readouterr().err


# -- writers ---------------------------------------------------------------------------------------
def _fake_result() -> dict:
    env = dict(command="tqpatch bench --quick", git_commit="abc123", git_dirty=False, date_utc="2026-01-01T00:00:00",
               device="cuda", card="NVIDIA H100 80GB HBM3", sm_count=132, torch="2.11", cuda="13.0", triton="3.6",
               transformers="5.17", python="3.11", tqpatch="0.1.0")
    e2e_rows = []
    for method, ms in (("tq4", 7.0), ("static", 9.8), ("dynamic", 24.1)):
        for ctx in (1024, 32768):
            e2e_rows.append(dict(model="llama-3.1-8b", method=method, batch=1, context=ctx, status="ok", ms=ms,
                                 ms_p10=ms, ms_p90=ms, tokens_per_s=1000 / ms, peak_memory_bytes=17e9,
                                 kv_bytes=ctx * 1e5, compile_s=100.0, compiled=method != "dynamic"))
    e2e_rows.append(dict(model="llama-3.1-8b", method="static", batch=8, context=32768, status="OOM"))
    return {
        "schema": bench.SCHEMA, "environment": env, "config": {}, "suites": ["kernel", "e2e", "capacity"],
        "skipped": [{"what": "prefill", "why": "budget"}], "errors": [], "seconds": 12.0,
        "kernel": {"shape": "Hq 32", "timer": "do_bench", "copy": {"GBps": 3000.0},
                   "rows": [dict(bits=4, B=8, T=32768, status="ok", kernel_us=223.4, kernel_eager_us=228.0,
                                 sdpa_bf16_us=364.6, bytes=276_824_064, sdpa_bytes=1_073_741_824, GBps=1239.0,
                                 pct_copy=41.3, sdpa_GBps=2945.0, ratio_vs_sdpa=0.613, config={}),
                            dict(bits=4, B=32, T=131072, status="OOM", error="x")],
                   "check": [dict(key_bits=4, value_bits=4, d=128, G=4, ring=False, softcap=0.0, lut="prmt",
                                  max_rel_err_out=3e-4, max_rel_err_lse=2e-4, ok=True, q_x8_rel_err_out=3e-4,
                                  q_x8_rel_err_lse=7e-4)],
                   "goals": {"ratio_B8_T32K_4bit_le_0.35": False}},
        "e2e": {"rows": e2e_rows, "compiles": [dict(model="llama-3.1-8b", method="tq4", batch=1, compile_s=100.0,
                                                    graphs=1, recompiles_over_contexts=0, contexts=[1024, 32768])]},
        "capacity": {"rows": [dict(model="llama-3.1-8b", method="tq4", context=32768, free_bytes=62e9,
                                   kv_bytes_per_row=1.1e9, workspace_fixed=2e8, workspace_per_row=1e7,
                                   computed_batch=54, verified_batch=54, ratio_vs_bf16_verified=3.9)]},
    }


def test_validate_result():
    r = _fake_result()
    assert bench.validate_result(r) == []
    r["e2e"]["rows"][0].pop("ms")
    r["kernel"]["rows"][0].pop("T")
    del r["environment"]["card"]
    problems = bench.validate_result(r)
    assert any("e2e.rows[0]" in p and "'ms'" in p for p in problems)
    assert any("kernel.rows[0] lacks 'T'" in p for p in problems)
    assert any("card" in p for p in problems)
    assert bench.validate_result({"schema": "x"})


def test_markdown_names_the_run_and_every_row():
    md = bench.format_markdown(_fake_result())
    for text in ("NVIDIA H100 80GB HBM3", "torch 2.11", "triton 3.6", "transformers 5.17", "abc123",
                 "`tqpatch bench --quick`", "## Decode attention kernel", "223.4", "0.613", "41%",
                 "## Decode step", "tqpatch 4-bit", "HF StaticCache bf16 + compile", "OOM", "## Capacity", "3.90",
                 "## Skipped", "prefill: budget", "1/1 variants"):
        assert text in md, text
    table = [line for line in md.splitlines() if line.startswith("| llama-3.1-8b")]
    assert len(table) == 7 + 1  # e2e rows + capacity row
    assert all(line.count("|") == table[0].count("|") for line in table[:7])


def test_write_outputs_json_markdown_plots(tmp_path):
    pytest.importorskip("matplotlib")
    paths = bench.write_outputs(_fake_result(), tmp_path, "b")
    names = sorted(p.name for p in paths)
    assert names == ["b.json", "b.md", "b_kernel_us_vs_length.png", "b_memory_vs_context_llama-3.1-8b.png",
                     "b_ms_vs_context_llama-3.1-8b.png"]
    back = json.loads((tmp_path / "b.json").read_text())
    assert bench.validate_result(back) == []
    assert all((tmp_path / n).stat().st_size > 1000 for n in names if n.endswith(".png"))


def test_non_finite_numbers_become_null(tmp_path):
    r = _fake_result()
    r["e2e"]["rows"][0]["ms_p90"] = float("nan")
    bench.write_outputs(r, tmp_path, "b", plots=False)
    assert json.loads((tmp_path / "b.json").read_text())["e2e"]["rows"][0]["ms_p90"] is None


def test_merge_results_concatenates_rows():
    a, b = _fake_result(), _fake_result()
    b["environment"]["command"] = "tqpatch bench --suite prefill"
    b["suites"] = ["prefill"]
    b["prefill"] = {"rows": [dict(model="llama-3.1-8b", method="tq4", prompt=8192, status="ok", seconds=1.0)]}
    m = bench.merge_results([a, b])
    assert len(m["e2e"]["rows"]) == 2 * len(a["e2e"]["rows"])
    assert len(m["prefill"]["rows"]) == 1 and m["suites"][-1] == "prefill"
    assert len(m["runs"]) == 2 and "--suite prefill" in m["environment"]["command"]
    assert m["seconds"] == 24.0 and bench.validate_result(m) == []
    b["environment"]["card"] = "NVIDIA H200"
    assert any(e["what"] == "merge" for e in bench.merge_results([a, b])["errors"])


def test_from_json_rerenders(tmp_path):
    from tqpatch.cli import main

    src = tmp_path / "a.json"
    src.write_text(json.dumps(_fake_result()))
    assert main(["bench", "--from-json", str(src), "--out", str(tmp_path / "o"), "--stem", "m"]) == 0
    assert (tmp_path / "o" / "m.md").read_text().startswith("# tqpatch bench")


def test_budget_skips_and_records(tmp_path):
    cfg = bench.BenchConfig(suites=(), device="cpu", out=str(tmp_path), budget_s=10.0, progress=False)
    run = bench._Run(cfg)
    assert run.allows("cheap", 1.0)
    assert not run.allows("expensive", 60.0)
    assert run.result["skipped"][0]["what"] == "expensive"
    run.note_compile("tq", 5.0)
    assert run.estimate("tq") == 1.0  # CPU: not compiled, nothing to estimate
    cfg.compile = True
    assert run.estimate("tq") == 5.0 and run.estimate("static") == bench._COMPILE_PRIOR_S["static"]


# -- CPU smoke run (eager, tiny model) -------------------------------------------------------------
def test_cpu_smoke_run(tmp_path, one_thread):
    cfg = bench.BenchConfig(suites=("e2e", "encode"), models=("tiny-llama",), batches=(1,), contexts=(32, 96),
                            methods=("tq4", "static", "dynamic"), steps=3, device="cpu", out=str(tmp_path),
                            progress=False, command="pytest")
    result = bench.run_bench(cfg)
    assert result["errors"] == [] and bench.validate_result(result) == []
    rows = result["e2e"]["rows"]
    assert {(r["method"], r["context"]) for r in rows} == {(m, c) for m in ("tq4", "static", "dynamic")
                                                            for c in (32, 96)}
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    tq = {r["context"]: r for r in rows if r["method"] == "tq4"}
    # one allocation for every context; K/V bytes measured per context
    assert tq[32]["kv_bytes_allocated"] == tq[96]["kv_bytes_allocated"] > tq[96]["kv_bytes"] > tq[32]["kv_bytes"]
    assert result["e2e"]["compiles"][0]["recompiles_over_contexts"] == 0
    dyn = {r["context"]: r for r in rows if r["method"] == "dynamic"}
    assert dyn[96]["kv_bytes"] == bench.bf16_kv_bytes(1, 2, 96, 128, 2) * 2  # float32 on CPU
    enc = result["encode"]["rows"][0]
    assert enc["store_ms"] > 0 and set(enc["share_of_step"]) == {"32", "96"}
    assert (tmp_path / "bench_e2e_encode.md").exists()


# -- GPU -------------------------------------------------------------------------------------------
gpu = pytest.mark.gpu


@gpu
def test_gpu_correctness_and_kernel_smoke(tmp_path):
    cfg = bench.BenchConfig(suites=("correctness", "kernel"), batches=(1,), kernel_bits=(4,), kernel_lengths=(4096,),
                            kernel_check=False, out=str(tmp_path), progress=False)
    result = bench.run_bench(cfg)
    assert result["errors"] == []
    assert result["correctness"]["e2e"]["compiled_vs_eager"] < 2e-2
    assert result["kernel"]["rows"][0]["status"] == "ok"


@gpu
def test_gpu_e2e_tiny_compiled_no_recompile(tmp_path):
    cfg = bench.BenchConfig(suites=("e2e", "encode", "capacity", "prefill"), models=("tiny-llama",), batches=(1, 2),
                            contexts=(256, 1024), prefill_lengths=(2048,), capacity_context=1024, steps=5,
                            out=str(tmp_path), progress=False)
    result = bench.run_bench(cfg)
    assert result["errors"] == [] and bench.validate_result(result) == []
    assert all(c["recompiles_over_contexts"] == 0 for c in result["e2e"]["compiles"])
    cap = {r["method"]: r for r in result["capacity"]["rows"]}
    assert cap["tq4"]["verified_batch"] and cap["static"]["verified_batch"]
