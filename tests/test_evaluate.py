"""``tqpatch.evaluate`` / ``tqpatch eval``: the metrics are right, the caches behave, bytes are measured."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers.cache_utils import DynamicCache

import tqpatch
from tqpatch import evalcaches
from tqpatch import evaluate as E
from tqpatch.passkey import passkey_ids

from tiny_models import tiny_model

TEXT_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def text() -> str:
    return TEXT_PATH.read_text()[:200_000]


def _direct_metrics(model, ids, prompt_len, method_logits):
    """Reference: one full forward of the unquantized model; KL/ppl/top-1 written out plainly."""
    with torch.no_grad():
        ref = model(ids).logits[:, prompt_len:-1].double()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(method_logits.double(), -1)
    targets = ids[:, prompt_len + 1:]
    kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).mean().item()
    nll = -logq.gather(-1, targets[..., None]).mean().item()
    top1 = (logp.argmax(-1) == logq.argmax(-1)).double().mean().item()
    return kl, math.exp(nll), top1


def test_decode_mode_matches_direct_computation(one_thread):
    model = tiny_model("llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 41))
    P = 24
    ref, hidden = E.run_teacher_forced(model, E.Method("u", "unquantized"), ids, P, 1, None, record=True, progress=False)
    assert hidden.shape == (2, 16, model.config.hidden_size)
    kl, ppl, top1 = _direct_metrics(model, ids, P, E.logits_from_hidden(model, hidden))
    assert kl < 1e-8 and top1 == 1.0  # decode-way reference == one full forward, up to float noise
    assert ref.kl == 0.0 and ref.top1_agreement == 1.0 and ref.tokens == 32
    assert ref.perplexity == pytest.approx(ppl, rel=1e-5)

    method = E.Method("t", "tqpatch", dict(key_bits=3, value_bits=3, window=0))
    got, _ = E.run_teacher_forced(model, method, ids, P, 1, hidden, progress=False)
    # the same method stepped by hand through the model's own forward
    tqpatch.apply(model, key_bits=3, value_bits=3, window=0)
    try:
        cache = tqpatch.TurboQuantCache(model, max_cache_len=41, batch_size=2)
        with torch.no_grad():
            model(ids[:, :P], past_key_values=cache, use_cache=True)
            steps = [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(P, 40)]
    finally:
        tqpatch.unapply(model)
    kl, ppl, top1 = _direct_metrics(model, ids, P, torch.cat(steps, 1))
    assert got.kl > 1e-6
    assert got.kl == pytest.approx(kl, rel=1e-3, abs=1e-9)
    assert got.perplexity == pytest.approx(ppl, rel=1e-5)
    assert got.top1_agreement == pytest.approx(top1)


def test_logits_from_hidden_applies_final_softcap():
    model = tiny_model("gemma2")  # final_logit_softcapping=30
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        assert torch.allclose(E.logits_from_hidden(model, h), model(ids).logits, atol=1e-5)


def test_windowed_simulation_with_exact_round_trips_is_the_dynamic_cache_on_sliding_layers(one_thread):
    model = tiny_model("gemma3_text")  # sliding window 24 on every other layer
    ids = torch.randint(0, 256, (2, 44))
    ident = [lambda x: x.clone()] * model.config.num_hidden_layers
    with torch.no_grad():
        for window in (0, 5):
            outs = []
            for cache in (DynamicCache(config=model.config),
                          evalcaches.WindowedDequantizedCache(model.config, ident, ident, window=window)):
                model(ids[:, :20], past_key_values=cache, use_cache=True)
                outs.append(torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                                       for t in range(20, 44)], 1))
            assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_hf_quantized_cache_on_sliding_layers_runs_and_is_accurate_at_8_bits(one_thread):
    pytest.importorskip("hqq")
    model = tiny_model("gemma3_text")
    ids = torch.randint(0, 256, (2, 50))
    with torch.no_grad():
        ref = model(ids).logits[:, 30:]
        cache = evalcaches.hf_quantized_cache(model, "hqq", nbits=8, residual_length=8)
        model(ids[:, :30], past_key_values=cache, use_cache=True)
        got = torch.cat([model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(30, 50)], 1)
    assert ((got - ref).norm() / ref.norm()).item() < 0.02
    sliding = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    assert sliding and all(layer._quantized_keys[1]["shape"][2] <= 23 for layer in sliding)  # window W - 1
    st = evalcaches.hf_cache_storage(cache)
    assert st["payload"] > 0 and st["metadata"] > 0 and st["quantized_values"] > 0


def test_quality_ordering_and_measured_bytes_on_smollm2(smollm2, text, one_thread):
    model, tok = smollm2
    methods = [E.Method("unquantized", "unquantized"),
               E.tqpatch_bits_method(8, 8, window=0), E.tqpatch_bits_method(4, 4, window=0),
               E.tqpatch_bits_method(2, 2, window=0)]
    cfg = E.EvalConfig(prompt_len=48, scored_tokens=16, segments=2, chunk=0, passkey_lengths=(), memory_len=64)
    res = E.evaluate(model, tok, text, methods, cfg, progress=False, continue_on_error=False)
    r = {m.method["name"]: m for m in res.methods}
    ref, k8, k4, k2 = (r[m.name] for m in methods)
    assert ref.decode.kl == 0.0 and ref.decode.top1_agreement == 1.0 and ref.decode.tokens == 16
    assert k8.decode.kl < 2e-3 and k8.decode.top1_agreement >= 0.95
    assert k2.decode.kl > k4.decode.kl > k8.decode.kl
    # format: b bits + one fp16 scale per 64-value vector
    assert k4.memory["format_bits"] == pytest.approx(4 + 16 / 64)
    assert k2.memory["format_bits"] == pytest.approx(2 + 16 / 64)
    assert ref.memory["bits_per_value_bf16"] == pytest.approx(16.0)


def test_bytes_per_token_is_cache_nbytes(smollm2, one_thread):
    model, _ = smollm2
    method = E.tqpatch_bits_method(4, 4)
    ids = torch.randint(0, 1000, (2, 150))
    with torch.no_grad(), E.prepared(model, method):
        _, cache = E._greedy(model, method, ids, 3)
        mem = E.measure_memory(model, method, cache, 152, 2)
        assert mem["bytes_per_token"] == tqpatch.cache_nbytes(cache) / (152 * 2)
    assert not tqpatch.is_patched(model)


def test_passkey_ids_exact_length_and_unquantized_smollm2_finds_the_key(smollm2, one_thread):
    model, tok = smollm2
    prompts = [passkey_ids(tok, 300, d, 40000 + i) for i, d in enumerate((0.1, 0.5, 0.9))]
    assert all(p.ids.numel() == 300 for p in prompts)
    assert prompts[0].needle_position < prompts[1].needle_position < prompts[2].needle_position
    assert "40001" in tok.decode(prompts[1].ids[prompts[1].needle_position:prompts[1].needle_position + 12])
    cfg = E.EvalConfig(passkey_lengths=(300,), passkey_depths=(0.1, 0.5, 0.9), passkey_new_tokens=8)
    pk, mem = E.run_passkey(model, tok, E.Method("unquantized", "unquantized"), cfg, progress=False)
    assert pk["accuracy"] == 1.0, pk
    assert mem["tokens"] == 307 and mem["bits_per_value_bf16"] == pytest.approx(16.0)
    with pytest.raises(ValueError, match="no room"):
        passkey_ids(tok, 30, 0.5, 12345)


def test_cli_end_to_end_writes_json_and_markdown(tmp_path, capsys, one_thread):
    from tqpatch.cli import main

    status = main(["eval", "smollm2-135m", "--text", str(TEXT_PATH), "--bits", "4/4", "--out", str(tmp_path),
                   "--prompt-len", "32", "--scored-tokens", "4", "--segments", "2", "--chunk", "2",
                   "--passkey-lengths", "120", "--passkey-depths", "0.5", "--no-plot", "--no-progress"])
    assert status == 0
    data = json.loads((tmp_path / "smollm2-135m.json").read_text())
    names = [m["method"]["name"] for m in data["methods"]]
    assert names == ["unquantized", "tqpatch K4/V4"]
    m = data["methods"][1]
    assert m["decode"]["tokens"] == 4 and m["chunk"]["tokens"] == 4 and m["decode"]["kl"] >= 0
    assert m["passkey"]["lengths"]["120"]["depths"]["0.5"]["key"] >= 10000
    assert data["info"]["command"].startswith("tqpatch eval smollm2-135m") and data["info"]["torch"]
    md = (tmp_path / "smollm2-135m.md").read_text()
    assert "| tqpatch K4/V4 |" in md and "Passkey" in md
    assert "tqpatch K4/V4" in capsys.readouterr().out


def test_parse_bits_and_bad_method():
    assert E.parse_bits("4/2") == (4, 2) and E.parse_bits("3") == (3, 3)
    with pytest.raises(ValueError, match="K/V"):
        E.parse_bits("4/9")
    with pytest.raises(ValueError, match="kind must be one of"):
        E.Method("x", "magic")
