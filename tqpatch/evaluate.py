"""Quality evaluation of K/V cache compression methods (``tqpatch eval``).

For one model and one text, every :class:`Method` (unquantized, tqpatch settings or recipes,
simulated quantizer variants, transformers' ``QuantizedCache``) is measured by:

* **decode mode** (the main metric): ``S`` segments of ``prompt_len + M + 1`` tokens, run as one
  batch. The prompt is prefilled exactly; then tokens are fed one per forward call through the
  method's cache (teacher forcing), so every scored token sees compressed history. Scored: the
  ``M`` next-token predictions of the fed tokens: perplexity, mean KL(unquantized || method) and
  top-1 agreement with the unquantized argmax.
* **chunk mode**: the same, but the tokens after the prompt are fed ``chunk`` at a time.
* **passkey**: a number hidden at several depths of a filler haystack at several lengths; greedy
  answer; correct when the number appears in it.
* **memory**: the cache's stored bytes after the longest passkey prompt (or a text prefix of
  ``memory_len`` tokens when passkey is off): bytes per token and bits per stored K/V value,
  counting every byte the cache holds (codes, scales, zero points, full-precision windows and
  residual buffers), next to the format's own bits per value.

How the unquantized reference is kept: the reference (the ``unquantized`` method) runs first, the
same way (decode or chunk), and stores only the final hidden state of every scored position
(``[S, M, hidden]`` float32: ~10 MB for 4,096 tokens), not its log-probabilities (``vocab`` times
larger: 4 GB for Gemma's 262K vocabulary). Each method's step then recomputes the reference
log-probs of that step's positions from those hidden states with the model's own output head
(:func:`logits_from_hidden`: ``lm_head`` plus any final soft cap) — the same matmul the reference
ran — and compares them streaming, in float64. Only per-position scalars are kept.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

__all__ = [
    "Method",
    "EvalConfig",
    "ModeMetrics",
    "MethodResult",
    "EvalResult",
    "default_methods",
    "full_methods",
    "parse_bits",
    "evaluate",
    "logits_from_hidden",
    "text_segments",
    "write_results",
]

logger = logging.getLogger(__name__)

KINDS = ("unquantized", "tqpatch", "simulated", "hf-quantized")


@dataclass(frozen=True)
class Method:
    """One K/V cache method to evaluate.

    Attributes:
        name: a label (unique within a run).
        kind: ``"unquantized"``; ``"tqpatch"`` (``settings``: keyword arguments of
            :func:`tqpatch.apply`: ``recipe``, ``key_bits``, ``value_bits``, ``window``,
            ``rotation``, ``skip_layers``, ...); ``"simulated"`` (quantize -> dequantize through
            :class:`tqpatch.evalcaches.WindowedDequantizedCache`; ``settings``: ``key_bits``,
            ``value_bits``, ``qjl``, ``rotation``, ``seed``, ``window``); ``"hf-quantized"``
            (transformers' ``QuantizedCache``; ``settings``: ``backend`` (``"quanto"`` or
            ``"hqq"``), ``nbits``, ``residual_length``, ``q_group_size``).
        family: the plot line it belongs to (default: derived from kind and settings).
    """

    name: str
    kind: str
    settings: dict = field(default_factory=dict)
    family: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Method {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.family:
            object.__setattr__(self, "family", _default_family(self))

    @property
    def simulated(self) -> bool:
        return self.kind == "simulated"


def _default_family(m: Method) -> str:
    s = m.settings
    if m.kind == "unquantized":
        return "unquantized"
    if m.kind == "hf-quantized":
        return f"HF QuantizedCache ({s.get('backend', 'quanto')})"
    if m.kind == "simulated":
        return "TurboQuant prod/QJL (simulated)" if s.get("qjl") else "TurboQuant (simulated)"
    if s.get("recipe") is not None:
        return "tqpatch recipe"
    if s.get("key_bits", 4) != s.get("value_bits", 4):
        return "tqpatch K/V asymmetric"
    if s.get("rotation") == "hadamard":
        return "tqpatch hadamard"
    if s.get("window") == 0:
        return "tqpatch window 0"
    return "tqpatch uniform"


@dataclass
class EvalConfig:
    """Settings of one evaluation.

    Attributes:
        prompt_len: exact prompt (prefill) tokens per segment.
        scored_tokens: next-token predictions scored per mode (at least; rounded up to
            ``segments`` times a whole number).
        segments: text segments, run as one batch.
        chunk: tokens per forward call in chunk mode (0: skip chunk mode).
        decode: run decode mode.
        passkey_lengths: passkey prompt lengths in tokens (empty: skip passkey).
        passkey_depths: needle depths (fractions of the haystack).
        passkey_new_tokens: greedy tokens generated for the answer.
        memory_len: tokens of the memory probe when passkey is off.
        text_offset: characters of the text skipped before the first segment.
        seed: seed of the passkey numbers.
    """

    prompt_len: int = 512
    scored_tokens: int = 4096
    segments: int = 8
    chunk: int = 64
    decode: bool = True
    passkey_lengths: tuple[int, ...] = (1024, 2048, 4096, 8000)
    passkey_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    passkey_new_tokens: int = 8
    memory_len: int = 4096
    text_offset: int = 0
    seed: int = 0

    @property
    def steps(self) -> int:
        """Scored tokens per segment (``M``)."""
        return max(1, math.ceil(self.scored_tokens / self.segments))

    def check(self) -> None:
        """Raise ``ValueError`` with a hint on a setting that cannot work."""
        if self.prompt_len < 1 or self.segments < 1 or self.scored_tokens < 1:
            raise ValueError("prompt_len, segments and scored_tokens must be positive")
        if self.chunk < 0:
            raise ValueError(f"chunk must be >= 0 (0 skips chunk mode), got {self.chunk}")
        for d in self.passkey_depths:
            if not 0 <= d <= 1:
                raise ValueError(f"passkey depths are fractions in [0, 1], got {d}")


@dataclass
class ModeMetrics:
    """Quality of one method in one mode (decode or chunk), over ``tokens`` scored positions."""

    tokens: int
    nll: float
    perplexity: float
    perplexity_change_pct: float
    kl: float
    top1_agreement: float
    kl_max: float
    seconds: float


@dataclass
class MethodResult:
    """Everything measured for one method."""

    method: dict
    decode: ModeMetrics | None = None
    chunk: ModeMetrics | None = None
    passkey: dict | None = None
    memory: dict | None = None
    seconds: float = 0.0
    error: str | None = None


@dataclass
class EvalResult:
    """The result of :func:`evaluate`; :func:`write_results` writes it."""

    model: str
    config: dict
    methods: list[MethodResult]
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "config": self.config, "info": self.info,
                "methods": [asdict(m) for m in self.methods]}


# -- method lists ---------------------------------------------------------------------------------

def parse_bits(text: str) -> tuple[int, int]:
    """``"4/2"`` -> ``(4, 2)``; ``"4"`` -> ``(4, 4)``."""
    try:
        parts = [int(p) for p in text.split("/")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(1 <= p <= 8 or p == 16 for p in parts):
        raise ValueError(f"bits must look like K/V with K, V in 1..8 or 16 (e.g. 4/4 or 4/2), got {text!r}")
    return parts[0], parts[1]


def tqpatch_bits_method(key_bits: int, value_bits: int, **settings: Any) -> Method:
    """A uniform tqpatch method ``K{key_bits}/V{value_bits}``."""
    name = f"tqpatch K{key_bits}/V{value_bits}"
    extra = [f"{k}={v}" for k, v in settings.items() if k not in ("window",) or v != 64]
    return Method(name + (f" ({', '.join(extra)})" if extra else ""), "tqpatch",
                  dict(key_bits=key_bits, value_bits=value_bits, **settings))


def recipe_method(recipe: str) -> Method:
    """A tqpatch method running recipe ``recipe`` (a bundled name, a path or a Hub reference)."""
    return Method(f"tqpatch recipe {recipe}", "tqpatch", dict(recipe=recipe))


def hf_method(backend: str, nbits: int) -> Method:
    """transformers' ``QuantizedCache`` with ``backend`` at ``nbits``."""
    return Method(f"HF {backend} int{nbits}", "hf-quantized", dict(backend=backend, nbits=nbits))


def available_hf_backends() -> list[str]:
    """The ``QuantizedCache`` backends whose packages are installed."""
    import importlib.util

    found = []
    if importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None:
        found.append("quanto")
    if importlib.util.find_spec("hqq") is not None:
        found.append("hqq")
    return found


def default_methods() -> list[Method]:
    """The quick set: unquantized, tqpatch at 4/3/2 bits, ``QuantizedCache`` int4/int2 (quanto
    when installed)."""
    methods = [Method("unquantized", "unquantized")]
    methods += [tqpatch_bits_method(b, b) for b in (4, 3, 2)]
    backends = available_hf_backends()
    if backends:
        methods += [hf_method(backends[0], b) for b in (4, 2)]
    return methods


def full_methods(model_name: str | None = None) -> list[Method]:
    """The issue-5 comparison: unquantized; tqpatch K=V at 2, 3, 4 bits; the calibrated recipes
    ``<model>``, ``<model>-3.5bit``, ``<model>-3bit``, ``<model>-2.5bit`` that are bundled (missing ones are
    skipped with a logged note); K4/V2 and K8/V4; QJL (prod, simulated) at 3 and 4 bits; the
    MSE variant simulated the same way at 3 and 4 bits (its direct comparison); Hadamard at 4
    bits; window 0 at 4 bits; ``QuantizedCache`` int2/int4 for each installed backend."""
    from .recipe import list_recipes

    methods = [Method("unquantized", "unquantized")]
    methods += [tqpatch_bits_method(b, b) for b in (2, 3, 4)]
    if model_name:
        bundled = set(list_recipes())
        for r in (f"{model_name}-2.5bit", f"{model_name}-3bit", f"{model_name}-3.5bit", model_name):
            if r in bundled:
                methods.append(recipe_method(r))
            else:
                logger.info("no bundled recipe %r: skipped (calibrate one to include it)", r)
    methods += [tqpatch_bits_method(4, 2), tqpatch_bits_method(8, 4)]
    for b in (3, 4):
        methods.append(Method(f"QJL prod {b}-bit (simulated)", "simulated", dict(key_bits=b, value_bits=b, qjl=True)))
        methods.append(Method(f"MSE {b}-bit (simulated)", "simulated", dict(key_bits=b, value_bits=b, qjl=False)))
    methods.append(tqpatch_bits_method(4, 4, rotation="hadamard"))
    methods.append(tqpatch_bits_method(4, 4, window=0))
    backends = available_hf_backends()
    if not backends:
        logger.warning("neither optimum-quanto nor hqq is installed: no QuantizedCache baseline "
                       "(pip install 'tqpatch[eval]')")
    for be in backends:
        methods += [hf_method(be, 2), hf_method(be, 4)]
    return methods


# -- running a method -----------------------------------------------------------------------------

def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def logits_from_hidden(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final hidden states: the output head plus any final logit
    soft cap (Gemma 2/3), as the model's own forward computes them."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "model", None)
    if not isinstance(base, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no `.model` decoder; tqpatch eval needs a *ForCausalLM model")
    return base


@contextmanager
def prepared(model: torch.nn.Module, method: Method) -> Iterator[None]:
    """Patch the model for a tqpatch method (and unpatch afterwards); nothing for the others."""
    if method.kind != "tqpatch":
        yield
        return
    import tqpatch

    tqpatch.apply(model, **method.settings)
    try:
        yield
    finally:
        tqpatch.unapply(model)


def make_cache(model: torch.nn.Module, method: Method, batch_size: int, max_len: int):
    """A fresh cache of ``method`` for ``batch_size`` rows of up to ``max_len`` tokens (the model
    must already be prepared by :func:`prepared`)."""
    from transformers.cache_utils import DynamicCache

    from . import evalcaches

    s = dict(method.settings)
    if method.kind == "unquantized":
        return DynamicCache(config=model.config)
    if method.kind == "tqpatch":
        from .cache import TurboQuantCache

        return TurboQuantCache(model, max_cache_len=max_len, batch_size=batch_size)
    if method.kind == "simulated":
        return evalcaches.simulated_cache(model, **s)
    return evalcaches.hf_quantized_cache(model, **s)


def _forward_hidden(model, ids: torch.Tensor, cache) -> torch.Tensor:
    out = _decoder(model)(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.last_hidden_state


class _Scorer:
    """Streams per-position metrics of one method against the stored reference hidden states."""

    def __init__(self) -> None:
        self.nll: list[torch.Tensor] = []
        self.ref_nll: list[torch.Tensor] = []
        self.kl: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []

    def add(self, model, logits: torch.Tensor, ref_hidden: torch.Tensor | None, targets: torch.Tensor) -> None:
        logq = torch.log_softmax(logits.double(), dim=-1)
        self.nll.append(-logq.gather(-1, targets[..., None])[..., 0].float())
        if ref_hidden is None:  # this is the reference itself
            self.ref_nll.append(self.nll[-1])
            self.kl.append(torch.zeros_like(self.nll[-1]))
            self.agree.append(torch.ones_like(self.nll[-1]))
            return
        logp = torch.log_softmax(logits_from_hidden(model, ref_hidden).double(), dim=-1)
        self.ref_nll.append(-logp.gather(-1, targets[..., None])[..., 0].float())
        self.kl.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0).float())
        self.agree.append((logp.argmax(-1) == logq.argmax(-1)).float())

    def metrics(self, seconds: float) -> ModeMetrics:
        nll, ref = torch.cat([t.flatten() for t in self.nll]), torch.cat([t.flatten() for t in self.ref_nll])
        kl, agree = torch.cat([t.flatten() for t in self.kl]), torch.cat([t.flatten() for t in self.agree])
        mean_nll, ref_nll = nll.double().mean().item(), ref.double().mean().item()
        return ModeMetrics(
            tokens=int(nll.numel()), nll=mean_nll, perplexity=math.exp(mean_nll),
            perplexity_change_pct=100.0 * (math.exp(mean_nll - ref_nll) - 1.0),
            kl=kl.double().mean().item(), top1_agreement=agree.double().mean().item(),
            kl_max=kl.max().item(), seconds=seconds,
        )


def run_teacher_forced(model, method: Method, ids: torch.Tensor, prompt_len: int, chunk: int,
                       ref_hidden: torch.Tensor | None, record: bool = False, progress: bool = True,
                       desc: str = "") -> tuple[ModeMetrics, torch.Tensor | None]:
    """Prefill ``ids[:, :prompt_len]`` exactly, then feed the rest ``chunk`` tokens per forward
    through ``method``'s cache, scoring every fed token's next-token prediction.

    Args:
        ids: ``[S, prompt_len + M + 1]`` token ids (the last token is only a target).
        chunk: tokens per forward after the prompt (1: decode mode).
        ref_hidden: ``[S, M, hidden]`` reference final hidden states, or ``None`` when this run is
            the reference itself.
        record: return this run's ``[S, M, hidden]`` final hidden states (for a reference run).

    Returns:
        ``(metrics, hidden or None)``.
    """
    S, total = ids.shape
    M = total - prompt_len - 1
    scorer = _Scorer()
    kept = [] if record else None
    t0 = time.perf_counter()
    with torch.no_grad(), prepared(model, method):
        cache = make_cache(model, method, S, total)
        _forward_hidden(model, ids[:, :prompt_len], cache)
        bar = tqdm(range(0, M, chunk), desc=desc, leave=False, disable=not progress)
        for lo in bar:
            hi = min(lo + chunk, M)
            h = _forward_hidden(model, ids[:, prompt_len + lo: prompt_len + hi], cache)
            targets = ids[:, prompt_len + lo + 1: prompt_len + hi + 1]
            scorer.add(model, logits_from_hidden(model, h), None if ref_hidden is None else ref_hidden[:, lo:hi], targets)
            if kept is not None:
                kept.append(h.float())
        bar.close()
    seconds = time.perf_counter() - t0
    return scorer.metrics(seconds), (torch.cat(kept, 1) if kept is not None else None)


def text_segments(tokenizer, text: str, segments: int, length: int, offset: int = 0) -> torch.Tensor:
    """``[segments, length]`` token ids: consecutive non-overlapping pieces of ``text`` (from
    character ``offset``), each starting with the tokenizer's BOS when it adds one.

    Raises:
        ValueError: the text is too short; the message says how many tokens it has.
    """
    from .passkey import bos_ids

    bos = bos_ids(tokenizer)
    per = length - len(bos)
    need = segments * per
    body = text[offset:]
    n_chars = min(len(body), max(need * 8, 4096))
    while True:
        ids = tokenizer(body[:n_chars], add_special_tokens=False).input_ids
        if len(ids) > need or n_chars >= len(body):
            break
        n_chars = min(len(body), n_chars * 2)
    if len(ids) < need:
        raise ValueError(
            f"the text has {len(ids)} tokens after offset {offset}; {segments} segments of {length} tokens need {need}. "
            "Use a longer text or fewer --segments / --scored-tokens / a shorter --prompt-len"
        )
    rows = [bos + ids[i * per:(i + 1) * per] for i in range(segments)]
    return torch.tensor(rows, dtype=torch.int64)


def _greedy(model, method: Method, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, Any]:
    """Greedy continuation of ``ids [B, T]`` through ``method``'s cache; the cache is returned
    for measuring (the model must be prepared)."""
    B, T = ids.shape
    cache = make_cache(model, method, B, T + new_tokens)
    out = []
    h = _forward_hidden(model, ids, cache)
    for i in range(new_tokens):
        nxt = logits_from_hidden(model, h[:, -1:]).argmax(-1)
        out.append(nxt)
        if i + 1 < new_tokens:
            h = _forward_hidden(model, nxt, cache)
    return torch.cat(out, 1), cache


def measure_memory(model, method: Method, cache, tokens: int, batch: int) -> dict:
    """Stored bytes of ``cache`` after ``tokens`` tokens in each of ``batch`` rows: bytes per
    token (per row), bits per K/V value counting every stored byte, and the format's bits."""
    from . import evalcaches

    held = evalcaches.kv_values_held(model, tokens, batch)
    dtype = next(model.parameters()).dtype
    f16 = 2.0 / torch.empty((), dtype=dtype).element_size()  # full-precision parts as a bf16 model keeps them
    out: dict[str, Any] = {"tokens": tokens, "batch": batch, "model_dtype": str(dtype),
                           "bf16_bytes_per_token": 2 * held / (tokens * batch)}
    if method.kind == "unquantized":
        nbytes = evalcaches.dynamic_cache_nbytes(cache)
        out.update(bytes_per_token=nbytes / (tokens * batch), bits_per_value=8 * nbytes / held,
                   bits_per_value_bf16=8 * f16 * nbytes / held, format_bits=16.0)
    elif method.kind == "tqpatch":
        from .cache import cache_nbytes
        from .patch import layer_plans

        nbytes = cache_nbytes(cache)
        full = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.tensors()[:-2]
                   if t.dtype == dtype and t.dtype.is_floating_point)  # windows and full-precision layers
        out.update(bytes_per_token=nbytes / (tokens * batch), bits_per_value=8 * nbytes / held,
                   bits_per_value_bf16=8 * (nbytes - full + f16 * full) / held, full_precision_bytes=full,
                   format_bits=_tqpatch_format_bits(layer_plans(model)))
    elif method.kind == "simulated":
        s = method.settings
        fb = evalcaches.simulated_bits(model, s.get("key_bits", 4), s.get("value_bits", 4), s.get("qjl", False),
                                       s.get("skip_layers", ()))
        out.update(bytes_per_token=None, bits_per_value=fb, bits_per_value_bf16=fb, format_bits=fb,
                   note="simulated: bits are the format's (codes + fp16 scales, + the residual norm for QJL; "
                        "no window); the simulation itself stores dequantized K/V")
    else:
        st = evalcaches.hf_cache_storage(cache)
        total = st["payload"] + st["metadata"] + st["residual"]
        total16 = st["payload"] + f16 * (st["metadata"] + st["residual"])
        qv = max(st["quantized_values"], 1)
        out.update(storage=st, bytes_per_token=total / (tokens * batch), bits_per_value=8 * total / held,
                   bits_per_value_bf16=8 * total16 / held,
                   bits_per_value_excluding_residual=8 * (st["payload"] + st["metadata"]) / qv,
                   format_bits=8 * (st["payload"] + f16 * st["metadata"]) / qv)
    out["compression_vs_bf16"] = 16.0 / out["bits_per_value_bf16"]
    return out


def _tqpatch_format_bits(plans) -> float:
    """Average bits per K/V value of the compressed format (codes + scales), weighted by each
    layer's K/V width; full-precision layers count 16."""
    num = den = 0.0
    for p in plans:
        w = p.num_kv_heads * p.head_dim
        for q, b in ((p.key_split or p.key_quantizer, p.key_bits), (p.value_split or p.value_quantizer, p.value_bits)):
            bpv = None if q is None else q.bytes_per_vector
            bits = 16.0 if q is None else 8.0 * (bpv() if callable(bpv) else bpv) / p.head_dim
            num += bits * w
            den += w
    return num / den


def run_passkey(model, tokenizer, method: Method, config: EvalConfig, progress: bool = True) -> tuple[dict, dict | None]:
    """Passkey accuracy of ``method`` at every (length, depth) of ``config``; also the memory
    measured after the longest prompt. Returns ``(passkey, memory)``."""
    from .passkey import passkey_ids

    rng = random.Random(config.seed)
    results: dict[str, dict[str, Any]] = {}
    memory = None
    t_all = time.perf_counter()
    with torch.no_grad(), prepared(model, method):
        for length in tqdm(sorted(config.passkey_lengths), desc="passkey", leave=False, disable=not progress):
            prompts = [passkey_ids(tokenizer, length, d, rng.randrange(10000, 99999)) for d in config.passkey_depths]
            t0 = time.perf_counter()
            batch = torch.stack([p.ids for p in prompts]).to(next(model.parameters()).device)
            new, cache = _greedy(model, method, batch, config.passkey_new_tokens)
            answers = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
            row = {f"{p.depth:g}": {"key": p.key, "answer": a.strip(), "correct": str(p.key) in a}
                   for p, a in zip(prompts, answers)}
            results[str(length)] = {"depths": row, "accuracy": sum(r["correct"] for r in row.values()) / len(row),
                                    "seconds": time.perf_counter() - t0}
            if length == max(config.passkey_lengths):
                memory = measure_memory(model, method, cache, length + config.passkey_new_tokens - 1, len(prompts))
            del cache
    n = sum(len(r["depths"]) for r in results.values())
    acc = sum(sum(d["correct"] for d in r["depths"].values()) for r in results.values()) / max(n, 1)
    return {"lengths": results, "accuracy": acc, "seconds": time.perf_counter() - t_all}, memory


def memory_probe(model, tokenizer, text: str, method: Method, config: EvalConfig) -> dict:
    """Memory after a text prefix of ``config.memory_len`` tokens plus a few decode steps."""
    ids = text_segments(tokenizer, text, 1, config.memory_len, config.text_offset).to(next(model.parameters()).device)
    with torch.no_grad(), prepared(model, method):
        _, cache = _greedy(model, method, ids, config.passkey_new_tokens)
        return measure_memory(model, method, cache, config.memory_len + config.passkey_new_tokens - 1, 1)


# -- the whole evaluation ---------------------------------------------------------------------------

def evaluate(model, tokenizer, text: str, methods: Sequence[Method], config: EvalConfig | None = None,
             *, model_name: str = "", progress: bool = True, continue_on_error: bool = True) -> EvalResult:
    """Evaluate every method on ``model`` (see the module docs for what is measured).

    Args:
        model: a transformers causal LM (left unchanged: tqpatch methods patch and unpatch it).
        tokenizer: its tokenizer.
        text: the evaluation text (decode and chunk modes).
        methods: what to compare; an ``unquantized`` method is added first when missing (it is
            the reference).
        config: the settings (default :class:`EvalConfig`).
        model_name: a label for the results.
        continue_on_error: record a method that raises (e.g. a recipe for another model) as an
            error and go on; ``False`` re-raises.

    Returns:
        An :class:`EvalResult`.
    """
    config = config or EvalConfig()
    config.check()
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    methods = list(methods)
    if not any(m.kind == "unquantized" for m in methods):
        methods.insert(0, Method("unquantized", "unquantized"))
    ref_method = next(m for m in methods if m.kind == "unquantized")
    methods.remove(ref_method)
    methods.insert(0, ref_method)

    M = config.steps
    device = next(model.parameters()).device
    ids = text_segments(tokenizer, text, config.segments, config.prompt_len + M + 1, config.text_offset).to(device)
    refs: dict[str, torch.Tensor | None] = {}
    results = []
    t_start = time.perf_counter()
    for method in tqdm(methods, desc="methods", disable=not progress):
        logger.info("evaluating %s", method.name)
        res = MethodResult(method=asdict(method) | {"simulated": method.simulated})
        t0 = time.perf_counter()
        try:
            is_ref = method is ref_method
            modes = ([("decode", 1)] if config.decode else []) + ([("chunk", config.chunk)] if config.chunk else [])
            for mode, chunk in modes:
                metrics, hidden = run_teacher_forced(
                    model, method, ids, config.prompt_len, chunk, None if is_ref else refs[mode], record=is_ref,
                    progress=progress, desc=f"{method.name} {mode}")
                if is_ref:
                    refs[mode] = hidden
                setattr(res, mode, metrics)
            if config.passkey_lengths:
                res.passkey, res.memory = run_passkey(model, tokenizer, method, config, progress)
            else:
                res.memory = memory_probe(model, tokenizer, text, method, config)
        except Exception as exc:  # noqa: BLE001 - one broken method must not lose the others
            if not continue_on_error or method is ref_method:
                raise
            logger.error("%s failed: %s: %s", method.name, type(exc).__name__, exc)
            res.error = f"{type(exc).__name__}: {exc}"
        res.seconds = time.perf_counter() - t0
        logger.info("%s: %.1f s", method.name, res.seconds)
        results.append(res)
    info = {"wall_seconds": time.perf_counter() - t_start, "segments_shape": list(ids.shape),
            "torch_threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype)}
    return EvalResult(model=model_name or type(model).__name__, config=asdict(config), methods=results, info=info)


# -- writing ----------------------------------------------------------------------------------------

def _fmt(v: Any, spec: str = ".4f") -> str:
    return "—" if v is None else format(v, spec)


def format_markdown(result: EvalResult) -> str:
    """The results as a Markdown table (one row per method) plus the passkey grid."""
    cfg = result.config
    lines = [f"## {result.model}: K/V cache quality", ""]
    modes = []
    if cfg.get("decode", True):
        modes.append(f"Decode mode: {cfg['segments']} segments x ({cfg['prompt_len']}-token exact prompt + "
                     f"{math.ceil(cfg['scored_tokens'] / cfg['segments'])} teacher-forced tokens, one per step).")
    if cfg.get("chunk"):
        modes.append(f"Chunk mode: the same tokens fed {cfg['chunk']} per step.")
    if not modes:
        modes.append("Passkey only (decode and chunk modes not run in this file).")
    lines.append(
        " ".join(modes) + " KL = mean KL(unquantized || method) of the "
        "next-token distributions; top-1 = agreement with the unquantized argmax. Bits = average bits per "
        "stored K/V value counting every stored byte (codes, scales, zero points, full-precision windows and "
        "residual buffers), measured after the longest passkey prompt, with the full-precision parts (windows, residual "
        "buffers, scales and zero points that follow the model dtype) counted at 16 bits as a bf16 model keeps them; "
        "format = codes + scales (+ zero points) only, i.e. the cost per value of long compressed history.")
    lines.append("")
    head = ("| method | bits (measured) | bits (format) | decode ppl | Δppl | KL | top-1 | chunk Δppl | chunk KL | "
            "chunk top-1 | passkey | seconds |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result.methods:
        m = r.method
        name = m["name"] + (" *" if m.get("simulated") else "")
        if r.error:
            lines.append(f"| {name} | error: {r.error} |" + " |" * (head.count("|") - 3))
            continue
        mem = r.memory or {}
        d, c = r.decode, r.chunk
        pk = r.passkey["accuracy"] if r.passkey else None
        lines.append(
            f"| {name} | {_fmt(mem.get('bits_per_value_bf16'), '.2f')} | {_fmt(mem.get('format_bits'), '.2f')} | "
            f"{_fmt(d and d.perplexity, '.3f')} | {_fmt(d and d.perplexity_change_pct, '+.2f')}% | "
            f"{_fmt(d and d.kl, '.4f')} | {_fmt(d and d.top1_agreement, '.3f')} | "
            f"{_fmt(c and c.perplexity_change_pct, '+.2f')}% | {_fmt(c and c.kl, '.4f')} | "
            f"{_fmt(c and c.top1_agreement, '.3f')} | {_fmt(pk, '.2f')} | {r.seconds:.0f} |")
    if any(r.method.get("simulated") for r in result.methods):
        lines += ["", "\\* simulated: quantize -> dequantize of the stored K/V (a quality reference, not the "
                  "cache's own storage); its bits are the format's."]
    if any(r.method["kind"] == "hf-quantized" for r in result.methods):
        lines += ["", "HF QuantizedCache rows: bits (measured) include its full-precision residual buffer "
                  "(up to residual_length tokens); bits (format) = quantized payload + scales + zero points "
                  "(stored in the model dtype; counted at 16 bits)."]
    pk_rows = [r for r in result.methods if r.passkey]
    if pk_rows:
        lengths = list(pk_rows[0].passkey["lengths"])
        depths = list(pk_rows[0].passkey["lengths"][lengths[0]]["depths"]) if lengths else []
        lines += ["", "### Passkey (correct depths / total, per length)", "",
                  "| method | " + " | ".join(f"{L} tok" for L in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for r in pk_rows:
            cells = []
            for L in lengths:
                row = r.passkey["lengths"][L]["depths"]
                miss = [k for k, v in row.items() if not v["correct"]]
                cells.append(f"{len(row) - len(miss)}/{len(row)}" + (f" (missed {', '.join(miss)})" if miss else ""))
            lines.append(f"| {r.method['name']} | " + " | ".join(cells) + " |")
        lines += ["", f"Depths: {', '.join(depths)}."]
    info = result.info
    if info:
        lines += ["", "### Run", ""] + [f"- {k}: `{v}`" for k, v in info.items() if k != "method_seconds"]
    return "\n".join(lines) + "\n"


def plot_results(result: EvalResult, path) -> None:
    """Decode-mode KL, perplexity change and top-1 agreement against measured bits per value,
    one line per method family (needs matplotlib; the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, list[tuple[float, MethodResult]]] = {}
    for r in result.methods:
        if r.error or not r.decode or not r.memory or r.method["kind"] == "unquantized":
            continue
        fams.setdefault(r.method["family"], []).append((r.memory["bits_per_value_bf16"], r))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    panels = [("kl", "mean KL(unquantized || method)", True), ("perplexity_change_pct", "perplexity change (%)", False),
              ("top1_agreement", "top-1 agreement", False)]
    for ax, (key, label, log) in zip(axes, panels):
        for fam, pts in sorted(fams.items()):
            pts.sort(key=lambda p: p[0])
            xs = [p[0] for p in pts]
            ys = [max(getattr(p[1].decode, key), 1e-6) if log else getattr(p[1].decode, key) for p in pts]
            ax.plot(xs, ys, marker="o", linestyle="--" if "simulated" in fam else "-", label=fam)
        ax.set_xlabel("average bits per stored K/V value (measured, bf16 model)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result.model}: decode-mode quality vs K/V bits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: EvalResult, out_dir, stem: str, plot: bool = True) -> list:
    """Write ``out_dir/stem.json``, ``stem.md`` and (with matplotlib) ``stem.png``; returns the paths."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    paths[1].write_text(format_markdown(result))
    if plot:
        try:
            plot_results(result, out / f"{stem}.png")
            paths.append(out / f"{stem}.png")
        except ImportError:
            logger.warning("matplotlib is not installed: no plot (pip install 'tqpatch[plot]')")
    return paths
