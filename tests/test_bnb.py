"""tqpatch on a model whose weights bitsandbytes quantized to 4 bits (NF4), on CPU.

bitsandbytes >= 0.48 ships a CPU backend; ``BitsAndBytesConfig(load_in_4bit=True)`` loads and runs
there (measured with bitsandbytes 0.50.2, torch 2.13 CPU). The same test runs on a GPU with
``TQPATCH_BNB_DEVICE=cuda``.
"""

from __future__ import annotations

import os

import bitsandbytes as bnb  # in the dev extra; a missing install fails here, it does not skip
import pytest
import torch
import transformers as tf
from tiny_models import COMMON

import tqpatch
from tqpatch.cache import TurboQuantCache

DEVICE = os.environ.get("TQPATCH_BNB_DEVICE", "cpu")


@pytest.fixture(scope="module")
def nf4_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**COMMON, head_dim=64, initializer_range=0.1)
    path = tmp_path_factory.mktemp("llama")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    qc = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(path, quantization_config=qc, device_map=DEVICE, dtype=torch.float32)
    return model.eval()


def _generate(model, ids, n=16):
    with torch.no_grad():
        return model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


def _teacher_forced_logits(model, ids, prompt_len):
    ids = ids.to(model.device)
    with torch.no_grad():
        out = model(ids[:, :prompt_len], use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1:]]
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1).float().cpu(), cache


def test_weights_are_4bit(nf4_llama):
    attn = nf4_llama.model.layers[0].self_attn
    assert isinstance(attn.k_proj, bnb.nn.Linear4bit) and attn.k_proj.weight.dtype == torch.uint8
    assert attn.k_proj.out_features == COMMON["num_key_value_heads"] * 64


def test_8bit_kv_keeps_tokens_and_4bit_kv_generates(nf4_llama, one_thread):
    model = nf4_llama
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    ref_tokens = _generate(model, ids)
    assert len(set(ref_tokens.flatten().tolist())) > 4, "degenerate reference output"
    ref_logits, _ = _teacher_forced_logits(model, torch.cat([ids, ref_tokens.cpu()], 1), 12)

    tqpatch.apply(model, key_bits=8, value_bits=8, window=0)
    try:
        assert torch.equal(_generate(model, ids), ref_tokens)
        got, cache = _teacher_forced_logits(model, torch.cat([ids, ref_tokens.cpu()], 1), 12)
        assert isinstance(cache, TurboQuantCache)
        rel = ((got - ref_logits).norm() / ref_logits.norm()).item()
        assert rel < 2e-2, f"8-bit K/V on NF4 weights: relative logit error {rel:.3g}"
    finally:
        tqpatch.unapply(model)

    tqpatch.apply(model, key_bits=4, value_bits=4, window=4)
    try:
        cache = TurboQuantCache(model)
        with torch.no_grad():
            out = model.generate(ids.to(model.device), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                 past_key_values=cache, pad_token_id=0)
        assert out.shape == (2, 28)
        assert int(cache.get_seq_length()) == 27
        layer = cache.layers[0]
        assert layer.k_codes.dtype == torch.uint8 and layer.k_codes.device.type == torch.device(DEVICE).type
        got4, _ = _teacher_forced_logits(model, torch.cat([ids, ref_tokens.cpu()], 1), 12)
        rel4 = ((got4 - ref_logits).norm() / ref_logits.norm()).item()
        assert rel4 < 0.25, f"4-bit K/V on NF4 weights: relative logit error {rel4:.3g}"
    finally:
        tqpatch.unapply(model)
