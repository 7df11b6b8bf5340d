"""Real trained models (PyPI GGUF test models) on real text: the fast path computes the algorithm.

For SmolLM2-135M and Gemma-3-270M, a 512-token prompt of tiny Shakespeare then 256 teacher-forced
decode steps. At every fourth step the patched model's logits must equal a plain reference to 1e-3: the
unpatched model with ordinary attention over the quantize -> dequantize'd K/V that the patched
cache holds at that step (plus the step's exact K/V), at 2, 3 and 4 bits. The reference is fed
the cache's own stored values each step: two independent runs would not agree to 1e-3, because a
1e-6 rounding difference moves a rare coordinate across a bucket boundary and the difference then
compounds over steps. Plain 4-bit TurboQuant must also stay within a sanity bound of the
unquantized model (closing that gap is the quality issue's job).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import tqpatch
from tqpatch.cache import TurboQuantCache
from tqpatch.patch import attention_modules
from tqpatch.simulate import as_dynamic_cache
from tqpatch.testmodels import load_test_model

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
CHECK_EVERY = 4  # reference steps (each costs a second forward); every decode step still runs
PROMPT, STEPS = int(__import__("os").environ.get("TQ_PROMPT", 512)), int(__import__("os").environ.get("TQ_STEPS", 256))


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def model_and_ids(request):
    model, tok = load_test_model(request.param)
    text = TEXT.read_text()[20000:60000]
    ids = tok(text, return_tensors="pt").input_ids[:, : PROMPT + STEPS]
    assert ids.shape[1] == PROMPT + STEPS
    return request.param, model, ids


def _teacher_forced(model, ids, cache, reference=None):
    """Logits of every decode step; with ``reference`` (the unpatched twin), also the reference's
    logits for each step, computed over the patched cache's stored K/V at that step."""
    refs = []
    with torch.no_grad():
        out = model(ids[:, :PROMPT], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = [out.logits[:, -1]]
        for t in range(PROMPT, PROMPT + STEPS - 1):
            if reference is not None and (t - PROMPT) % CHECK_EVERY == 0:
                history = as_dynamic_cache(cache, reference.config)
                refs.append(reference(ids[:, t : t + 1], past_key_values=history, use_cache=True).logits[:, -1])
            out = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    got = torch.stack(logits, 1).float()
    return (got, torch.stack(refs, 1).float()) if reference is not None else got


def test_fast_path_equals_dequantized_reference_and_sanity_bound(model_and_ids):
    name, model, ids = model_and_ids
    twin = copy.deepcopy(model)
    base = _teacher_forced(model, ids, None)
    for bits in (4, 3, 2):
        tqpatch.apply(model, key_bits=bits, value_bits=bits, window=0)
        try:
            got, ref = _teacher_forced(model, ids, TurboQuantCache(model, max_cache_len=PROMPT + STEPS), twin)
        finally:
            tqpatch.unapply(model)
        checked = got[:, 1::CHECK_EVERY]
        rel = ((checked - ref).norm() / ref.norm()).item()
        worst = ((checked - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
        assert rel < 1e-3 and worst < 1e-3, f"{name} {bits}-bit: fast path vs reference {rel:.2e} (worst step {worst:.2e})"
        if bits == 4:
            logp, logq = torch.log_softmax(base, -1), torch.log_softmax(got, -1)
            kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
            top1 = (base.argmax(-1) == got.argmax(-1)).float().mean().item()
            assert kl < 0.12, f"{name}: mean KL {kl:.4f} at uniform 4 bits"
            assert top1 >= 0.78, f"{name}: top-1 agreement {top1:.3f} at uniform 4 bits"
    again = _teacher_forced(model, ids, None)
    assert torch.equal(again, base), "unapply must restore the model"
