"""``tqpatch.compile_step``: the compiled decode step (one captured CUDA graph on a GPU) gives the
eager step's logits, step after step, and advances the cache one token per call."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

import tqpatch
from tqpatch.cache import TurboQuantCache


def _run(model, make_cache, steps, device, compiled: bool):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 256, (2, 20), generator=g).to(device)
    toks = torch.randint(1, 256, (steps, 2, 1), generator=g).to(device)
    cache = make_cache()
    out = []
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        step = tqpatch.compile_step(model, cache) if compiled else (
            lambda t, p: model(t, position_ids=p, past_key_values=cache, use_cache=True).logits)
        for i in range(steps):
            pos = torch.full((2, 1), 20 + i, device=device)
            out.append(step(toks[i].clone(), pos).clone())  # the captured step reuses its output buffer
    return torch.cat(out, 1).float(), cache


def _check(model, make_cache, device, tol):
    torch._dynamo.reset()
    eager, eager_cache = _run(model, make_cache, 6, device, compiled=False)
    comp, comp_cache = _run(model, make_cache, 6, device, compiled=True)
    rel = ((comp - eager).norm() / eager.norm()).item()
    assert rel < tol, f"compiled step vs eager: {rel:.2e}"
    assert int(comp_cache.get_seq_length()) == int(eager_cache.get_seq_length()) == 26


def test_compile_step_matches_eager_on_cpu():
    model = tiny_model("llama", head_dim=64)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=8)
    _check(model, lambda: TurboQuantCache(model, max_cache_len=64, batch_size=2), torch.device("cpu"), 1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["tqpatch", "static"])
def test_captured_step_matches_eager_on_cuda(method):
    from transformers import StaticCache

    dev = torch.device("cuda")
    model = tiny_model("llama", head_dim=128, dtype=torch.bfloat16).to(dev)
    if method == "tqpatch":
        tqpatch.apply(model, key_bits=4, value_bits=4, window=8)
        make = lambda: TurboQuantCache(model, max_cache_len=64, batch_size=2)  # noqa: E731
    else:
        make = lambda: StaticCache(config=model.config, max_cache_len=64)  # noqa: E731
    _check(model, make, dev, 2e-2)
