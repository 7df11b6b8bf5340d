"""The patcher on tiny random models of every supported architecture (CPU)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, tiny_model

import tqpatch
from tqpatch import packing
from tqpatch.cache import TurboQuantCache


def _decode_logits(model, ids, prompt_len, cache=None):
    with torch.no_grad():
        out = model(ids[:, :prompt_len], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = [out.logits[:, -1:]]
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_decode_matches_unpatched(arch):
    model = tiny_model(arch)
    ids = torch.randint(1, 256, (2, 8 + 32), generator=torch.Generator().manual_seed(3))
    ref, _ = _decode_logits(model, ids, 8)
    tqpatch.apply(model, key_bits=8, value_bits=8, window=0)
    got, cache = _decode_logits(model, ids, 8)
    assert isinstance(cache, TurboQuantCache)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"{arch}: relative error {rel:.3g} over 32 decode steps"
    tqpatch.unapply(model)
    again, _ = _decode_logits(model, ids, 8)
    assert torch.equal(again, ref), "unapply must restore the model bit for bit"


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_generate_and_exact_storage_bytes(arch):
    head_dim = 128
    model = tiny_model(arch, head_dim=head_dim)
    ids = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    tqpatch.apply(model, key_bits=4, value_bits=4, window=0)
    max_len = 64
    cache = TurboQuantCache(model, max_cache_len=max_len, batch_size=1)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert out.shape == (1, 22)
    # Exactly the format's bytes: codes (d*b/8) + one fp16 scale per vector, K and V, per slot.
    expected = 0
    for layer in cache.layers:
        slots = layer.capacity * layer.plan.num_kv_heads
        per_vec = packing.packed_size(head_dim, 4) + 2
        expected += 2 * slots * per_vec
    assert tqpatch.cache_nbytes(cache) == expected
    bf16 = sum(2 * layer.capacity * layer.plan.num_kv_heads * head_dim * 2 for layer in cache.layers)
    assert tqpatch.cache_nbytes(cache) <= 0.27 * bf16
    # no full-precision history anywhere: only codes, scales and bookkeeping
    for layer in cache.layers:
        assert layer.win_k.numel() == 0 and not hasattr(layer, "keys") or layer.keys is None


def test_rotated_domain_attention_matches_float64_dequantized():
    from tqpatch.kernels.reference import history_attention
    from tqpatch.quantizer import TurboQuantizer

    g = torch.Generator().manual_seed(5)
    for d in (64, 128, 256):
        for bits in (2, 3, 4):
            for group in (1, 4, 7):
                B, Hkv, T = 2, 2, 37
                kq = TurboQuantizer(d, bits, seed=d + bits, scale_dtype=torch.float16)
                vq = TurboQuantizer(d, bits, seed=d + bits, scale_dtype=torch.float16)
                k = torch.randn(B, Hkv, T, d, generator=g)
                v = torch.randn(B, Hkv, T, d, generator=g)
                q = torch.randn(B, Hkv * group, 1, d, generator=g)
                kqv, vqv = kq.quantize(k), vq.quantize(v)
                start = torch.tensor([0, 5])
                t = kq.tensors("cpu")
                out, lse = history_attention(
                    q @ t["matrix"].T, kqv.codes, kqv.scales, vqv.codes, vqv.scales, t["centroids"],
                    vq.tensors("cpu")["centroids"], torch.tensor(T), start, key_bits=bits, value_bits=bits,
                    scaling=d**-0.5,
                )
                out = out @ t["matrix"]
                # float64 reference over the dequantized K/V
                kd = kq.dequantize(kqv).double().repeat_interleave(group, 1)
                vd = vq.dequantize(vqv).double().repeat_interleave(group, 1)
                s = (q.double() @ kd.transpose(-1, -2)) * d**-0.5
                s[1, :, :, :5] = float("-inf")
                ref = torch.softmax(s, -1) @ vd
                rel = ((out.double() - ref).norm() / ref.norm()).item()
                assert rel < 1e-5, (d, bits, group, rel)
                assert torch.allclose(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


def test_left_padded_batch_equals_single_prompts():
    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=8)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (5, 11, 8)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        for i, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i, width:], alone[0, len(p) :]), f"row {i} differs"


def test_host_padding_flag_follows_the_masks():
    """Eager chunks read left padding from a host-side flag (no GPU wait per layer): set by a
    padded mask on an empty cache, left alone for a mask without padding, cleared by reset."""
    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=8)
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    full = torch.ones(2, 9, dtype=torch.long)
    padded = full.clone()
    padded[1, :3] = 0
    cache = TurboQuantCache(model, max_cache_len=64, batch_size=2)
    with torch.no_grad():
        model(ids, attention_mask=full, past_key_values=cache, use_cache=True)
        assert not any(layer.host_padded for layer in cache.layers)
        cache.reset()
        model(ids, attention_mask=padded, past_key_values=cache, use_cache=True)
        assert all(layer.host_padded for layer in cache.layers)
        assert all(int(layer.start[1]) == 3 for layer in cache.layers)
        cache.reset()
        assert not any(layer.host_padded for layer in cache.layers)
        lazy = TurboQuantCache(model)  # allocated at the first update: the flag travels with the start
        model(ids, attention_mask=padded, past_key_values=lazy, use_cache=True)
        assert all(layer.host_padded for layer in lazy.layers)


def test_generate_modes_and_growth():
    model = tiny_model("qwen2", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=3, window=4)
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert torch.equal(greedy, model.generate(ids, max_new_tokens=8, do_sample=False)), "repeated calls differ"
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20)
        assert sampled.shape == (2, 18)
        beams = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        assert beams.shape == (2, 16)
        # past the allocation: a cache sized for 12 positions grows when generation goes further
        cache = TurboQuantCache(model, max_cache_len=12)
        long = model.generate(ids, max_new_tokens=20, do_sample=False, past_key_values=cache)
        assert long.shape == (2, 30)
        assert torch.equal(long[:, :18], greedy), "growth changed the tokens"
    tqpatch.unapply(model)
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert plain.shape == (2, 18)


def test_window_ring_encodes_each_token_once():
    """Tokens leave the full-precision window in order and are encoded exactly once: the codes
    equal a direct encode of each position's K/V, whatever the chunking."""
    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=5)
    ids = torch.randint(1, 256, (1, 30), generator=torch.Generator().manual_seed(8))
    caches = []
    with torch.no_grad():
        for chunks in ([30], [7, 1, 1, 1, 3, 17], [1] * 30):
            cache = TurboQuantCache(model, max_cache_len=40, batch_size=1)
            pos = 0
            for c in chunks:
                model(ids[:, pos : pos + c], past_key_values=cache, use_cache=True)
                pos += c
            caches.append(cache)
    for layer_idx in range(3):
        ref = caches[0].layers[layer_idx]
        assert int(ref.n) == 30
        for other in caches[1:]:
            o = other.layers[layer_idx]
            # layer 0's K/V do not depend on the history: same tokens in the window, same codes
            # (up to float rounding of differently-shaped projections flipping a rare bucket)
            if layer_idx == 0:
                same = (o.k_codes[:, :, :25] == ref.k_codes[:, :, :25]).float().mean().item()
                assert same > 0.995, same
                assert torch.allclose(o.win_k, ref.win_k, atol=1e-5)
                assert int((o.k_scales[:, :, 25:] != 0).sum()) == 0, "slots past the history were written"


def test_bad_inputs_leave_model_unchanged():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="1..8 or 16"):
        tqpatch.apply(model, key_bits=9)
    with pytest.raises(ValueError, match="1..8 or 16"):
        tqpatch.apply(model, value_bits=0)
    with pytest.raises(ValueError, match="both K and V"):
        tqpatch.apply(model, key_bits=16, value_bits=4)
    with pytest.raises(ValueError, match="not patched"):
        tqpatch.unapply(model)
    with pytest.raises(ValueError, match="skip_layers"):
        tqpatch.apply(model, skip_layers=[7])
    assert not tqpatch.is_patched(model)
    assert "forward" not in model.model.layers[0].self_attn.__dict__
    tqpatch.apply(model)
    with pytest.raises(ValueError, match="already patched"):
        tqpatch.apply(model)
    tqpatch.unapply(model)

    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="no attention modules"):
        tqpatch.apply(NoAttention())

    gpt2 = __import__("transformers").GPT2LMHeadModel(
        __import__("transformers").GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    )
    with pytest.raises(ValueError, match="supported: llama"):
        tqpatch.apply(gpt2)


def test_compiled_decode_step_has_no_graph_break_or_recompile():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=4)
    cache = TurboQuantCache(model, max_cache_len=64, batch_size=1)
    ids = torch.randint(1, 256, (1, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model(ids[:, :8], past_key_values=cache, use_cache=True)

        def step(tok, pos):
            return model(tok, position_ids=pos, past_key_values=cache, use_cache=True).logits

        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        tok = torch.full((1, 1), int(ids[0, 8]))  # fresh strides, like the argmax outputs that follow
        eager_cache_len, fed = [], []
        for i in range(5):
            fed.append(tok)
            logits = compiled(tok, torch.tensor([[8 + i]]))
            tok = logits.argmax(-1)
            eager_cache_len.append(int(cache.layers[0].n))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert eager_cache_len == [9, 10, 11, 12, 13]

    # Compiled steps advance only the device-side counters; the next eager forward must pick them up
    # and give what an all-eager run of the same tokens gives.
    with torch.no_grad():
        after = model(tok, past_key_values=cache, use_cache=True).logits
        ref_cache = TurboQuantCache(model, max_cache_len=64, batch_size=1)
        model(ids[:, :8], past_key_values=ref_cache, use_cache=True)
        for t in fed:
            model(t, past_key_values=ref_cache, use_cache=True)
        ref = model(tok, past_key_values=ref_cache, use_cache=True).logits
    assert [layer.host_n for layer in cache.layers] == [14] * len(cache.layers)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-4)
    tqpatch.unapply(model)


def test_eager_decode_step_reads_no_counter_per_layer():
    """An eager decode step reads the device-side token counts once per forward (one transfer per
    device), never once per layer: on a GPU each such read waits for every queued kernel."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=4)
    ids = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        nxt = torch.tensor([[5]])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(nxt, past_key_values=cache, use_cache=True)
    reads = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
    assert reads == [], f"{len(reads)} scalar reads in one decode step of {len(cache.layers)} layers"
    assert [layer.host_n for layer in cache.layers] == [13] * len(cache.layers)
    tqpatch.unapply(model)


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_single_token_self_part_equals_dense_attention(softcap):
    from types import SimpleNamespace

    from tqpatch.attention import _self_part, dense_attention

    g = torch.Generator().manual_seed(int(softcap))
    B, Hq, Hkv, d = 3, 8, 2, 32
    q, k, v = (torch.randn(B, h, 1, d, generator=g, dtype=torch.float64).float() for h in (Hq, Hkv, Hkv))
    start = torch.tensor([0, 7, 9])  # row 2 is still padding at position 8
    layer = SimpleNamespace(plan=SimpleNamespace(scaling=d ** -0.5, softcap=softcap), start=start)
    q_pos = torch.tensor([8])
    out, lse = _self_part(layer, q, k, v, q_pos)
    ref_out, ref_lse = dense_attention(q, k, v, q_pos, torch.ones(1, dtype=torch.bool), q_pos, start,
                                       scaling=d ** -0.5, softcap=softcap, window=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    assert torch.isinf(lse[2]).all() and not out[2].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_matches_float64(dtype):
    from tqpatch.attention import fused_attention

    g = torch.Generator().manual_seed(11)
    for d, group, Q, T, causal in ((64, 1, 9, 9, True), (128, 4, 17, 40, False), (256, 7, 5, 5, True)):
        q = torch.randn(2, 2 * group, Q, d, generator=g)
        k = torch.randn(2, 2, T, d, generator=g)
        v = torch.randn(2, 2, T, d, generator=g)
        out, lse = fused_attention(q.to(dtype), k.to(dtype), v.to(dtype), scaling=d**-0.5, causal=causal)
        qd, kd, vd = (t.to(dtype).double() for t in (q, k, v))
        s = (qd @ kd.repeat_interleave(group, 1).transpose(-1, -2)) * d**-0.5
        if causal:
            s = s.masked_fill(torch.ones(Q, T, dtype=torch.bool).triu(1), float("-inf"))
        ref = torch.softmax(s, -1) @ vd.repeat_interleave(group, 1)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert ((out.double() - ref).norm() / ref.norm()).item() < tol, (d, group, dtype)
        assert torch.allclose(lse.double(), torch.logsumexp(s, -1), rtol=tol, atol=tol)


@pytest.mark.parametrize("bits,window,head_dim,smoothing", [(4, 0, 64, False), (3, 8, 128, True),
                                                             (2, 5, 64, False), (16, 4, 64, False)])
def test_fused_chunked_prefill_matches_reference_path(monkeypatch, bits, window, head_dim, smoothing):
    """Chunked prefill over compressed history: the fused SDPA path == the reference path."""
    import dataclasses

    from tqpatch import attention

    model = tiny_model("qwen2", head_dim=head_dim)
    ids = torch.randint(1, 256, (2, 45), generator=torch.Generator().manual_seed(12))
    recipe = tqpatch.Recipe.uniform(model, bits, bits, window=window)
    if smoothing:  # key smoothing: keys stored as k / D, queries times D
        L, H = recipe.num_hidden_layers, recipe.num_key_value_heads
        scale = torch.rand(L, H, head_dim, generator=torch.Generator().manual_seed(13)) + 0.5
        recipe = dataclasses.replace(recipe, key_channel_scale=scale)
    tqpatch.apply(model, recipe=recipe, prefill_chunk=16)
    if smoothing:
        assert tqpatch.cache.TurboQuantCache(model).layers[0].plan.key_scale is not None
    calls = []
    real = attention._fused_chunk_attention
    monkeypatch.setattr(attention, "_fused_chunk_attention", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = model(ids).logits
        assert calls, "the fused path did not run"
        monkeypatch.setattr(attention, "_fused_chunk_applies", lambda layer, Q: False)
        ref = model(ids).logits
    rel = ((fused - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"fused vs reference chunked prefill: relative difference {rel:.3g}"
