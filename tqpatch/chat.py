"""``tqpatch chat``: an interactive terminal chat whose whole history lives in one compressed cache.

Each turn appends the user's message with the tokenizer's chat template and generates the answer
with ``model.generate(full_conversation_ids, past_key_values=cache)``: transformers feeds only the
tokens the cache does not hold yet, so a new turn is one chunk that attends to the compressed
history, never a re-prefill of the conversation.

The token ids of the conversation are kept exactly as the model saw and produced them; a new turn
only appends the template text that follows the history (the end of the assistant turn, the new
user turn, the generation prompt), tokenized on its own. Re-rendering and re-tokenizing the whole
conversation could tokenize the old answer differently from how it was generated, and the cache
would then hold tokens that no longer line up with the ids.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterable, TextIO

import torch
from transformers import TextStreamer

from .cache import TurboQuantCache, cache_nbytes

__all__ = ["TurnResult", "ChatSession", "run_chat", "load_chat_model", "parse_bits", "format_status", "BUNDLED_MODELS"]

logger = logging.getLogger(__name__)

BUNDLED_MODELS = ("smollm2-135m", "gemma3-270m")
QUIT_COMMANDS = ("/quit", "/exit")
_SENTINEL = "\x00tqpatch-answer\x00"


@dataclass
class TurnResult:
    """One exchange.

    Attributes:
        answer: the generated text (special tokens removed).
        cached_before: tokens the cache held when the turn started.
        fed_tokens: tokens the model was fed to start this turn (the uncached suffix).
        context_tokens: tokens of the conversation after the answer.
        kv_bytes: measured bytes of the cache's K/V storage (:func:`tqpatch.cache_nbytes`).
        kv_positions: positions the full-attention layers' storage has room for.
        bf16_bytes: what a bf16 cache would take for ``context_tokens`` tokens.
        bf16_room_bytes: what bf16 storage would take for the same allocated positions.
    """

    answer: str
    cached_before: int
    fed_tokens: int
    context_tokens: int
    kv_bytes: int
    kv_positions: int
    bf16_bytes: int
    bf16_room_bytes: int


class _StreamWriter(TextStreamer):
    """transformers' ``TextStreamer`` writing to a given text stream instead of stdout."""

    def __init__(self, tokenizer: Any, stream: TextIO) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text + ("\n" if stream_end else ""))
        self.stream.flush()


class ChatSession:
    """A multi-turn conversation with a model patched by :func:`tqpatch.apply`.

    Args:
        model: a patched causal LM.
        tokenizer: its tokenizer; must have a chat template.
        max_new_tokens: most tokens generated per answer.
        max_cache_len: positions to preallocate (``None``: allocate at the first turn with
            headroom, grow by doubling when full).
        generate_kwargs: extra ``generate`` arguments (default greedy decoding).

    Raises:
        ValueError: the model is not patched or the tokenizer has no chat template.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 256, max_cache_len: int | None = None,
                 generate_kwargs: dict | None = None) -> None:
        from .patch import is_patched

        if not is_patched(model):
            raise ValueError("ChatSession needs a model patched by tqpatch: call tqpatch.apply(model) first")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "this tokenizer has no chat template; use an instruction-tuned model (or set tokenizer.chat_template)"
            )
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_cache_len = max_cache_len
        self.generate_kwargs = {"do_sample": False} if generate_kwargs is None else dict(generate_kwargs)
        self.messages: list[dict[str, str]] = []
        self.ids: list[int] = []
        self.cache = TurboQuantCache(model, max_cache_len=max_cache_len)
        self._closing = self._assistant_closing()
        # transformers 5.24 names generate's cache argument `cache`; 5.17 `past_key_values`
        params = inspect.signature(model.prepare_inputs_for_generation).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        eos = model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self._eos.add(tokenizer.eos_token_id)

    # -- template bookkeeping ------------------------------------------------------------------
    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _assistant_closing(self) -> str:
        """The template text that follows an assistant message's content (e.g. ``<|im_end|>\\n``)."""
        text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}], False)
        at = text.rfind(_SENTINEL)
        return text[at + len(_SENTINEL):] if at >= 0 else ""

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _new_turn_ids(self, message: str) -> list[int]:
        messages = self.messages + [{"role": "user", "content": message}]
        text = self._render(messages, True)
        if not self.messages:
            return self._encode(text)
        previous = self._render(self.messages, False)
        if not text.startswith(previous):
            logger.warning("the chat template renders the history differently once a turn is added; "
                           "re-encoding the whole conversation into a fresh cache")
            self.ids, self.cache = [], TurboQuantCache(self.model, max_cache_len=self.max_cache_len)
            return self._encode(text)
        tail = self._closing
        if self.ids and self.ids[-1] in self._eos:
            eos_text = self.tokenizer.decode([self.ids[-1]])
            tail = tail[len(eos_text):] if tail.startswith(eos_text) else tail
        return self.ids + self._encode(tail + text[len(previous):])

    # -- one turn ------------------------------------------------------------------------------
    def send(self, message: str, stream: TextIO | None = None) -> TurnResult:
        """Add the user's ``message``, generate the answer (streamed to ``stream`` if given) and
        return what happened."""
        ids = self._new_turn_ids(message)
        cached = int(self.cache.get_seq_length())
        device = self.model.get_input_embeddings().weight.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        streamer = _StreamWriter(self.tokenizer, stream) if stream is not None else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else next(iter(self._eos), 0)
        with torch.no_grad():
            out = self.model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), **{self._cache_kwarg: self.cache},
                max_new_tokens=self.max_new_tokens, streamer=streamer, pad_token_id=pad, **self.generate_kwargs,
            )
        self.ids = out[0].tolist()
        answer = self.tokenizer.decode(self.ids[len(ids):], skip_special_tokens=True).strip()
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return TurnResult(answer=answer, cached_before=cached, fed_tokens=len(ids) - cached,
                          context_tokens=len(self.ids), **self.memory())

    def memory(self) -> dict[str, int]:
        """Measured K/V bytes and the bf16 equivalents (see :class:`TurnResult`)."""
        tokens = len(self.ids)
        bf16 = bf16_room = 0
        room = 0
        for layer in self.cache.layers:
            p = layer.plan
            per_token = 2 * p.num_kv_heads * p.head_dim * 2  # K and V, 2 bytes per bf16 element
            bf16 += per_token * (min(tokens, p.sliding_window) if p.sliding_window else tokens)
            if layer.is_initialized:
                slots = layer.capacity + p.window
                bf16_room += per_token * slots
                if not layer.ring:
                    room = max(room, slots)
        return {"kv_bytes": cache_nbytes(self.cache), "kv_positions": room or tokens, "bf16_bytes": bf16,
                "bf16_room_bytes": bf16_room}


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_status(turn: TurnResult, label: str = "tqpatch") -> str:
    """The status line printed after each answer."""
    return (f"[context {turn.context_tokens} tokens | K/V {_mib(turn.kv_bytes)} ({label}, measured; room for "
            f"{turn.kv_positions} tokens) | bf16 equivalent: {_mib(turn.bf16_bytes)} for {turn.context_tokens} "
            f"tokens, {_mib(turn.bf16_room_bytes)} for {turn.kv_positions}]")


def bits_label(model: Any) -> str:
    """``"K4/V4"`` for uniform settings, else ``"K3-4/V4, 2 layers bf16"``-style ranges."""
    from .cache import FULL_PRECISION
    from .patch import layer_plans

    plans = layer_plans(model)
    q = [p for p in plans if p.quantized]
    if not q:
        return "all layers full precision"
    kb, vb = sorted({p.key_bits for p in q}), sorted({p.value_bits for p in q})
    span = lambda b: str(b[0]) if len(b) == 1 else f"{b[0]}-{b[-1]}"  # noqa: E731
    skipped = sum(p.key_bits == FULL_PRECISION for p in plans)
    return f"K{span(kb)}/V{span(vb)}" + (f", {skipped} layers full precision" if skipped else "")


def run_chat(session: ChatSession, lines: Iterable[str], output: TextIO, *, prompt: str | None = None,
             label: str | None = None) -> list[TurnResult]:
    """Chat until ``/quit`` or the end of ``lines``: each non-empty line is one user turn; the
    streamed answer and a status line go to ``output``. Returns the turns."""
    label = label or bits_label(session.model)
    turns = []
    it = iter(lines)
    while True:
        if prompt:
            output.write(prompt)
            output.flush()
        line = next(it, None)
        if line is None:
            break
        message = line.strip()
        if message in QUIT_COMMANDS:
            break
        if not message:
            continue
        turn = session.send(message, stream=output)
        output.write(format_status(turn, f"tqpatch {label}") + "\n")
        output.flush()
        turns.append(turn)
    return turns


def parse_bits(text: str) -> tuple[int, int]:
    """``"4/3"`` -> (4, 3); ``"4"`` -> (4, 4)."""
    parts = text.split("/")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2):
        raise ValueError(f"--bits takes K/V bits like 4/4 or 4/3 (or one number for both), got {text!r}")
    return vals[0], vals[-1]


def load_chat_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str | None = None) -> tuple[Any, Any]:
    """Load ``name`` (a bundled test model, a local directory or a Hub id) as ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in BUNDLED_MODELS:
        from .testmodels import load_test_model

        model, tok = load_test_model(name, dtype)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tok = AutoTokenizer.from_pretrained(name)
        except OSError as exc:
            raise ValueError(
                f"could not load {name!r}: {exc}. Pass one of {', '.join(BUNDLED_MODELS)}, a local model directory "
                "or a Hub id that is reachable (or in the Hugging Face cache)"
            ) from exc
    if device:
        model = model.to(device)
    return model.eval(), tok
