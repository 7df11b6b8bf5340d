"""Outlier-channel split layers in the cache: the layer codec against SplitQuantizer and float64,
attention over split layers, storage bytes, and recipes with outliers applied end to end."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_models import tiny_model

import tqpatch
from tqpatch import Recipe, SplitQuantizer
from tqpatch.cache import TurboQuantCache
from tqpatch.split import HeadSplit

pytestmark = pytest.mark.usefixtures("one_thread")


def _channels(H: int, d: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d, generator=g)[:n] for _ in range(H)])


@pytest.mark.parametrize("d,n,out_bits,bits", [(64, 16, 4, 3), (128, 32, 3, 2), (128, 64, 4, 3), (256, 32, 8, 4)])
def test_head_split_matches_split_quantizer_and_float64(d, n, out_bits, bits):
    H = 3
    ch = _channels(H, d, n, seed=d + n)
    hs = HeadSplit(d, ch, out_bits, bits, seed=5)
    x = torch.randn(2, H, 9, d, generator=torch.Generator().manual_seed(1)) * 3
    codes, scales = hs.encode(x)
    assert codes.shape == (2, H, 9, hs.code_bytes) and scales.shape == (2, H, 9, 2)
    assert hs.code_bytes == (n * out_bits + (d - n) * bits) // 8
    for h in range(H):  # each head == a SplitQuantizer over that head's channels
        sq = SplitQuantizer(d, ch[h], out_bits, bits, seed=5, scale_dtype=torch.float16)
        qv = sq.quantize(x[:, h])
        assert torch.equal(codes[:, h], qv.codes)
        torch.testing.assert_close(scales[:, h].to(torch.float16), qv.scales, rtol=0, atol=0)
        ref = sq.dequantize(dataclasses.replace(qv, scales=scales[:, h].to(torch.float16)))
        got = hs.unrotate(hs.dequantize_rotated(codes, scales.to(torch.float16)))[:, h]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # rotated-domain inner products equal float64 products with the dequantized vectors
    q = torch.randn(2, 2 * H, 4, d, generator=torch.Generator().manual_seed(2))  # G = 2 query heads per KV head
    k_rot = hs.dequantize_rotated(codes, scales.to(torch.float16))
    k_hat = hs.unrotate(k_rot).double().repeat_interleave(2, dim=1)
    got = hs.rotate(q) @ k_rot.repeat_interleave(2, dim=1).transpose(-1, -2)
    ref = q.double() @ k_hat.transpose(-1, -2)
    assert ((got.double() - ref).norm() / ref.norm()).item() < 1e-5
    # rotate/unrotate are inverse orthogonal maps
    torch.testing.assert_close(hs.unrotate(hs.rotate(q)), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hs.rotate(q).norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_head_split_rejects_bad_channels():
    with pytest.raises(ValueError, match="distinct"):
        HeadSplit(64, torch.tensor([[1, 1, 2, 3]]), 4, 3)
    with pytest.raises(ValueError, match="lie in"):
        HeadSplit(64, torch.tensor([[1, 64]]), 4, 3)
    with pytest.raises(ValueError, match="Haar"):
        HeadSplit(64, _channels(1, 64, 16, 0), 4, 3, rotation="hadamard")
    with pytest.raises(ValueError):  # 12 channels at 3 bits do not fill whole bytes
        HeadSplit(64, _channels(1, 64, 12, 0), 3, 2)


def _split_recipe(model, kb: int, vb: int, k_out: int, v_out: int, n: int, window: int) -> Recipe:
    r = Recipe.uniform(model, kb, vb, window=window)
    L, H, d = r.num_hidden_layers, r.num_key_value_heads, r.head_dim
    kch = torch.stack([_channels(H, d, n, seed=10 + i) for i in range(L)]).to(torch.int16)
    vch = torch.stack([_channels(H, d, n, seed=20 + i) for i in range(L)]).to(torch.int16)
    return dataclasses.replace(r, key_outlier_channels=kch, key_outlier_bits=[k_out] * L,
                               value_outlier_channels=vch, value_outlier_bits=[v_out] * L)


def test_split_recipe_8bit_matches_unpatched_and_stores_exact_bytes():
    """8-bit outliers and 8-bit rest: decode through split layers follows the unpatched model;
    the cache holds exactly the split format's bytes."""
    model = tiny_model("llama", head_dim=64)
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    tqpatch.apply(model, recipe=_split_recipe(model, 8, 8, 8, 8, n=16, window=0), prefill_chunk=None)
    plan = TurboQuantCache(model).layers[0].plan
    assert plan.key_split is not None and plan.value_split is not None
    cache = TurboQuantCache(model, max_cache_len=48, batch_size=2)
    with torch.no_grad():
        out = [model(ids[:, :8], past_key_values=cache, use_cache=True).logits]
        for t in range(8, 40):
            out.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    got = torch.cat(out, 1)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"split 8/8-bit decode vs unpatched: relative error {rel:.3g}"
    per_vec = (16 * 8 + 48 * 8) // 8 + 2 * 2  # codes + two fp16 scales
    expected = sum(2 * layer.capacity * layer.plan.num_kv_heads * per_vec * 2 for layer in cache.layers)
    assert tqpatch.cache_nbytes(cache) == expected


@pytest.mark.parametrize("window", [0, 6])
def test_split_layers_fused_prefill_and_decode_match_reference_paths(monkeypatch, window):
    """A fractional-bit split (16 channels at 4 bits, 48 at 3 = 3.25 bits): the fused chunk path
    equals the reference path, and generate runs through compressed split history."""
    from tqpatch import attention

    model = tiny_model("qwen2", head_dim=64)
    ids = torch.randint(1, 256, (2, 45), generator=torch.Generator().manual_seed(12))
    tqpatch.apply(model, recipe=_split_recipe(model, 3, 3, 4, 4, n=16, window=window), prefill_chunk=16)
    with torch.no_grad():
        fused = model(ids).logits
        monkeypatch.setattr(attention, "_fused_chunk_applies", lambda layer, Q: False)
        ref = model(ids).logits
        monkeypatch.undo()
        rel = ((fused - ref).norm() / ref.norm()).item()
        assert rel < 1e-4, f"fused vs reference over split layers: {rel:.3g}"
        out = model.generate(ids[:, :20], max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 26)


def test_split_beats_uniform_on_outlier_channel_keys():
    """Keys with a few large channels: the split's attention error is below uniform 3 bits at
    3.25 bits, and not far from uniform 4 bits (float64 reference)."""
    torch.manual_seed(0)
    d, H, T = 64, 2, 512
    k = torch.randn(1, H, T, d, dtype=torch.float64)
    big = torch.stack([torch.randperm(d)[:16] for _ in range(H)])
    for h in range(H):
        k[:, h, :, big[h]] *= 6.0
    q = torch.randn(1, H, 8, d, dtype=torch.float64)
    ref = torch.softmax((q @ k.transpose(-1, -2)) * d**-0.5, -1)

    def attn_err(k_hat):
        p = torch.softmax((q @ k_hat.double().transpose(-1, -2)) * d**-0.5, -1)
        return float((p - ref).abs().sum(-1).mean())

    hs = HeadSplit(d, big, 4, 3, seed=1)
    codes, scales = hs.encode(k.float())
    split_err = attn_err(hs.unrotate(hs.dequantize_rotated(codes, scales.to(torch.float16))))
    errs = {}
    for b in (3, 4):
        tq = tqpatch.TurboQuantizer(d, b, seed=1, scale_dtype=torch.float16)
        errs[b] = attn_err(tq.dequantize(tq.quantize(k.float())))
    assert split_err < 0.7 * errs[3] and split_err < 1.25 * errs[4], (split_err, errs)


def test_split_layer_compiled_decode_step_equals_eager():
    """A split recipe inside one torch.compile(fullgraph=True) decode step: no graph break, and
    the same logits as the eager step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, recipe=_split_recipe(model, 3, 2, 4, 4, n=16, window=4))
    ids = torch.randint(1, 256, (1, 14), generator=torch.Generator().manual_seed(9))

    def run(compiled: bool) -> torch.Tensor:
        cache = TurboQuantCache(model, max_cache_len=64, batch_size=1)
        with torch.no_grad():
            model(ids[:, :8], past_key_values=cache, use_cache=True)

            def step(tok, pos):
                return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

            fn = torch.compile(step, fullgraph=True, dynamic=False) if compiled else step
            return torch.cat([fn(ids[:, t:t + 1].clone(), torch.tensor([[t]])) for t in range(8, 14)], 1)

    eager = run(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel < 1e-4, rel
