"""``tqpatch demo``: SmolLM2-135M from PyPI, generated unpatched and patched, side by side."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .passkey import passkey_prompt

__all__ = ["DemoRow", "run_demo", "format_table"]

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "What is the capital of France? Answer briefly.",
    "List three fruits.",
    passkey_prompt(),
)


@dataclass
class DemoRow:
    prompt: str
    setting: str
    text: str
    kv_bytes: int
    tokens: int


def _dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def run_demo(model_name: str = "smollm2-135m", prompts=DEFAULT_PROMPTS, max_new_tokens: int = 24,
             settings=((None, None), (4, 4), (3, 3)), progress: bool = True) -> list[DemoRow]:
    """Generate greedily from each prompt with the unquantized cache and with tqpatch at each
    ``(key_bits, value_bits)``; returns the outputs and the measured K/V bytes of each run."""
    import tqpatch
    from tqpatch.cache import TurboQuantCache
    from tqpatch.testmodels import load_test_model

    model, tok = load_test_model(model_name, torch.bfloat16)
    rows = []
    bar = tqdm(total=len(prompts) * len(settings), desc="demo", disable=not progress)
    for kb, vb in settings:
        if kb is not None:
            tqpatch.apply(model, key_bits=kb, value_bits=vb)
        try:
            for prompt in prompts:
                text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True) if tok.chat_template and len(prompt) < 500 else prompt
                ids = tok(text, return_tensors="pt").input_ids
                cache = TurboQuantCache(model, max_cache_len=ids.shape[1] + max_new_tokens) if kb else None
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                         return_dict_in_generate=True, past_key_values=cache,
                                         pad_token_id=tok.pad_token_id or tok.eos_token_id)
                nbytes = tqpatch.cache_nbytes(cache) if kb else _dynamic_cache_bytes(out.past_key_values)
                new = out.sequences[0, ids.shape[1]:]
                rows.append(DemoRow(prompt, "bf16" if kb is None else f"tqpatch K{kb}/V{vb}",
                                    tok.decode(new, skip_special_tokens=True).strip(), nbytes,
                                    int(out.sequences.shape[1])))
                bar.update()
        finally:
            if kb is not None:
                tqpatch.unapply(model)
    bar.close()
    return rows


def format_table(rows: list[DemoRow]) -> str:
    """A plain-text table: one block per prompt, one line per setting."""
    lines = []
    for prompt in dict.fromkeys(r.prompt for r in rows):
        shown = prompt if len(prompt) < 120 else prompt[:60] + " ... " + prompt[-50:]
        n_tok = next(r.tokens for r in rows if r.prompt == prompt)
        lines.append(f"\n>>> {shown}   ({n_tok} tokens)")
        base = next((r.kv_bytes for r in rows if r.prompt == prompt and r.setting == "bf16"), None)
        for r in (r for r in rows if r.prompt == prompt):
            ratio = f" (bf16 / this = {base / r.kv_bytes:.2f})" if base and r.setting != "bf16" else ""
            text = " ".join(r.text.split())
            lines.append(f"  [{r.setting:>14}] K/V {r.kv_bytes / 1024:8.1f} KiB{ratio}: {text[:160]}")
    lines.append(
        "\nK/V bytes are measured allocations: bf16 = transformers' DynamicCache; tqpatch = codes + fp16 scales "
        "+ the 64-token bf16 window, allocated for prompt + new tokens (short prompts live mostly in that window, "
        "so only long contexts show the compression)."
    )
    return "\n".join(lines) + "\n"
