"""``tqpatch bench``: speed and memory of tqpatch against transformers' bf16 caches, on one GPU.

One process, one device, one model at a time. Suites (``--suite``, any subset, in this order):

* ``correctness``: the compiled decode step (``torch.compile(fullgraph=True,
  mode="reduce-overhead")``, CUDA graphs, the Triton kernel inside) gives the eager step's logits,
  and the eager Triton path gives the plain-torch reference path's (a 2-layer random Llama).
* ``kernel`` (was ``tools/bench_kernel.py``): first the Triton decode kernel against
  :func:`~tqpatch.kernels.reference.history_attention` over bits 2/3/4, d 64/128/256, GQA groups,
  rings, softcap, padding and empty rows (``--no-kernel-check`` skips it); then its time against
  ``scaled_dot_product_attention`` on bf16 K/V of the same shape (Hq 32 / Hkv 8 / d 128): median
  µs of one CUDA-graph replay (``triton.testing.do_bench``, L2 flushed), the bytes each must read,
  GB/s and the share of a device-to-device copy's bandwidth measured in the same run.
* ``e2e``: randomly initialised Llama-3.1-8B / Qwen2.5-7B-shaped models in bf16, ms per compiled
  decode step, tokens/s, peak memory and measured K/V bytes for tqpatch 4/3-bit, HF ``StaticCache``
  + compile and HF ``DynamicCache`` eager. tqpatch's step follows the device-side length ``n``, not
  the allocation, so one compiled step per (model, bits, batch) serves every context (checked: no
  recompile). The static cache's cost follows its allocation: one compile per (batch, context).
* ``capacity``: the largest batch at 32K context that fits the card's free memory (tqpatch 4/3-bit,
  bf16 static), computed from measured per-sequence K/V bytes and measured step workspace, then
  verified by allocating that batch and running one decode step.
* ``prefill``: eager chunked prefill time and peak memory (tqpatch 4-bit vs bf16 ``DynamicCache``).
* ``encode``: what storing the new token costs per decode step (encode + pack + write, all
  layers), as a compiled graph of its own next to the step it belongs to.

Speed does not depend on weight or cache values, so models are randomly initialised and caches are
filled with random contents of the stated length instead of a real prefill.

Results go to ``--out``: ``<stem>.json`` (schema :data:`SCHEMA`), ``<stem>.md`` and PNG plots. Every
finished measurement is written at once, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from .step import capture_graph, step_function

__all__ = [
    "SCHEMA", "SUITES", "METHODS", "MODEL_SHAPES", "ModelShape", "BenchConfig", "run_bench", "write_outputs",
    "format_markdown", "validate_result", "merge_results", "kernel_bytes", "bf16_kv_bytes", "capacity_batch",
    "fit_workspace", "add_arguments", "run_from_args",
]

logger = logging.getLogger(__name__)

SCHEMA = "tqpatch-bench/1"
SUITES = ("correctness", "kernel", "e2e", "capacity", "prefill", "encode")
METHODS = ("tq4", "tq3", "static", "dynamic")
TQ_BITS = {"tq4": 4, "tq3": 3, "tq2": 2}

# Kernel-suite shape (Llama-3.1-8B's attention).
HQ, HKV, D = 32, 8, 128

# Steps past the stated context that one measurement writes (compile + warm-up + timed steps).
_MARGIN = 128
# Prior guesses of compile seconds on an H100 (results/h100/gpu_check.json: 282 s tqpatch, 55 s
# static, both the 8B shape), replaced by the largest value measured in the run; used only to skip
# work that would overrun --budget-s.
_COMPILE_PRIOR_S = {"tq": 300.0, "static": 60.0, "small": 60.0}


# ------------------------------------------------------------------------------------------------
# Model shapes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer shape (weights are random: speed does not depend on them)."""

    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    rope_theta: float
    qkv_bias: bool = False

    def config(self, max_position_embeddings: int = 131072):
        """The transformers config of this shape (llama or qwen2)."""
        common = dict(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
                      num_hidden_layers=self.layers, num_attention_heads=self.heads,
                      num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                      max_position_embeddings=max_position_embeddings, rope_theta=self.rope_theta,
                      tie_word_embeddings=False)
        if self.model_type == "llama":
            from transformers import LlamaConfig

            return LlamaConfig(**common)
        if self.model_type == "qwen2":
            from transformers import Qwen2Config

            return Qwen2Config(use_sliding_window=False, **common)  # q/k/v biases are built in
        raise ValueError(f"no config builder for model_type {self.model_type!r}")

    def weight_bytes_bf16(self) -> int:
        """Parameter bytes in bf16 (embeddings, attention, MLP, norms, LM head)."""
        h, d = self.hidden, self.head_dim
        attn = h * self.heads * d * 2 + h * self.kv_heads * d * 2
        if self.qkv_bias:
            attn += (self.heads + 2 * self.kv_heads) * d
        mlp = 3 * h * self.intermediate
        per_layer = attn + mlp + 2 * h
        return 2 * (self.layers * per_layer + 2 * self.vocab * h + h)


MODEL_SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape("llama", 32, 32, 8, 128, 4096, 14336, 128256, 500000.0),
    "qwen2.5-7b": ModelShape("qwen2", 28, 28, 4, 128, 3584, 18944, 152064, 1000000.0, qkv_bias=True),
    # for CPU smoke runs and tests (--device cpu)
    "tiny-llama": ModelShape("llama", 2, 8, 2, 128, 512, 1024, 512, 10000.0),
    "tiny-qwen2": ModelShape("qwen2", 2, 4, 2, 128, 512, 1024, 512, 10000.0, qkv_bias=True),
}


# ------------------------------------------------------------------------------------------------
# Pure arithmetic (CPU-testable)
# ------------------------------------------------------------------------------------------------
def kernel_bytes(batch: int, kv_heads: int, length: int, head_dim: int, key_bits: int, value_bits: int,
                 scale_bytes: int = 2) -> int:
    """Bytes the decode kernel must read: K and V codes plus one fp16 scale per vector each."""
    per_slot = head_dim * key_bits // 8 + head_dim * value_bits // 8 + 2 * scale_bytes
    return batch * kv_heads * length * per_slot


def bf16_kv_bytes(batch: int, kv_heads: int, length: int, head_dim: int, layers: int = 1) -> int:
    """Bytes of bf16 K and V (what SDPA reads per layer; ``layers`` for a whole cache)."""
    return 2 * 2 * batch * kv_heads * length * head_dim * layers


def gbps(nbytes: float, us: float) -> float:
    """GB/s from bytes and microseconds."""
    return nbytes / us / 1e3


def tokens_per_s(batch: int, ms: float) -> float:
    """Tokens per second of a decode step producing one token per row in ``ms``."""
    return batch * 1000.0 / ms


def median(values: Sequence[float]) -> float:
    """The median (the mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of nothing")
    s = sorted(values)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def fit_workspace(points: dict[int, int]) -> tuple[float, float]:
    """A line ``fixed + per_row * B`` through measured workspace bytes ``{batch: bytes}`` (least
    squares; two points give the line through them). The slope is clamped at 0."""
    if not points:
        raise ValueError("no workspace measurements")
    if len(points) == 1:
        (b, w), = points.items()
        return float(w), 0.0
    xs, ys = list(points), [float(points[b]) for b in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    slope = max(slope, 0.0)
    return my - slope * mx, slope


def capacity_batch(free_bytes: int, per_row_kv: int, fixed_ws: float = 0.0, per_row_ws: float = 0.0,
                   headroom: int = 0) -> int:
    """Largest batch with ``batch * (per_row_kv + per_row_ws) + fixed_ws + headroom <= free_bytes``."""
    per_row = per_row_kv + per_row_ws
    if per_row <= 0:
        raise ValueError("per-row bytes must be positive")
    avail = free_bytes - fixed_ws - headroom
    return max(0, int(avail // per_row))


def parse_ints(text: str | Iterable[int]) -> list[int]:
    """``"1,8,32"`` (also ``1k``, ``32K``, ``128k``) -> ``[1, 8, 32]``."""
    if not isinstance(text, str):
        return [int(v) for v in text]
    out = []
    for v in text.split(","):
        v = v.strip().lower()
        if not v:
            continue
        out.append(int(float(v[:-1]) * 1024) if v.endswith("k") else int(v))
    return out


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What ``tqpatch bench`` runs. ``quick()`` gives the reduced defaults of ``--quick``."""

    suites: tuple[str, ...] = SUITES
    models: tuple[str, ...] = ("llama-3.1-8b", "qwen2.5-7b")
    batches: tuple[int, ...] = (1, 8, 32)
    contexts: tuple[int, ...] = (1024, 8192, 32768)
    methods: tuple[str, ...] = METHODS
    static_batches: tuple[int, ...] = (1,)
    kernel_bits: tuple[int, ...] = (4, 3, 2)
    kernel_lengths: tuple[int, ...] = (1024, 8192, 32768, 131072)
    kernel_check: bool = True
    kernel_sweep: bool = False
    capacity_context: int = 32768
    capacity_headroom: int = 256 << 20
    prefill_lengths: tuple[int, ...] = (8192, 32768)
    encode_ablation: bool = False
    generate: bool = False
    generate_prompts: tuple[int, ...] = (1024, 8192)
    generate_new_tokens: int = 64
    steps: int = 30
    profile: int = 0
    budget_s: float = 0.0
    device: str = "cuda"
    compile: bool | None = None  # None: on CUDA only
    step_graph: bool = False  # decode steps as one captured CUDA graph (both methods) instead of reduce-overhead
    out: str = "bench-out"
    stem: str = ""
    commit: str = ""
    command: str = ""
    progress: bool = True

    @staticmethod
    def quick(**overrides: Any) -> "BenchConfig":
        """Reduced grid: Llama only, batches 1 and 8, contexts 1K and 32K, tqpatch 4-bit and the
        bf16 baselines, 4-bit kernel at 8K/32K without the correctness sweep, one prefill length."""
        base = dict(models=("llama-3.1-8b",), batches=(1, 8), contexts=(1024, 32768),
                    methods=("tq4", "static", "dynamic"), static_batches=(1,), kernel_bits=(4,),
                    kernel_lengths=(8192, 32768), kernel_check=False, prefill_lengths=(32768,), steps=20)
        base.update(overrides)
        return BenchConfig(**base)

    def validate(self) -> None:
        bad = [s for s in self.suites if s not in SUITES]
        if bad:
            raise ValueError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
        bad = [m for m in self.models if m not in MODEL_SHAPES]
        if bad:
            raise ValueError(f"unknown model(s) {bad}; choose from {', '.join(MODEL_SHAPES)}")
        bad = [m for m in self.methods if m not in METHODS and m not in TQ_BITS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)} (and tq2)")
        for name in ("batches", "contexts", "kernel_lengths", "prefill_lengths"):
            if any(v < 1 for v in getattr(self, name)):
                raise ValueError(f"{name} must be positive")
        if any(b not in (2, 3, 4) for b in self.kernel_bits):
            raise ValueError("kernel bits must be 2, 3 or 4")
        if self.steps < 3:
            raise ValueError("steps must be >= 3")

    @property
    def compiled(self) -> bool:
        return torch.device(self.device).type == "cuda" if self.compile is None else bool(self.compile)

    def output_stem(self) -> str:
        if self.stem:
            return self.stem
        if self.profile and not self.suites:
            return f"bench_profile_{self.profile}"
        return "bench_" + "_".join(self.suites) if self.suites else "bench"


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(cfg: BenchConfig) -> dict[str, Any]:
    """Card, versions, commit and command line of this run."""
    import transformers

    from . import __version__

    dev = torch.device(cfg.device)
    env: dict[str, Any] = {
        "command": cfg.command or "tqpatch bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "git_commit": cfg.commit or os.environ.get("TQPATCH_COMMIT") or _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "device": str(dev),
        "card": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "tqpatch": __version__,
        "hostname_cpus": os.cpu_count(),
    }
    status = _git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        env["git_dirty"] = bool(status)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # CPU-only installs
        pass
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(card=p.name, sm_count=p.multi_processor_count, card_memory_bytes=p.total_memory)
        from .kernels import triton_decode

        env["triton_kernel_available"] = triton_decode.available()
    else:
        env["card"] = platform.processor() or platform.machine()
    return env


# ------------------------------------------------------------------------------------------------
# Timing and memory helpers (device code)
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], Any], device: torch.device, iters: int = 30, warmup: int = 3) -> dict[str, float]:
    """Median / p10 / p90 milliseconds of ``fn`` (CUDA events on CUDA, wall clock elsewhere), one
    synchronisation per call. On CUDA also ``host_ms``: the median wall time until ``fn`` returns
    (its host work: guards, launches or graph replay), which the event time includes because the
    GPU is idle until that work has launched something."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times, host = [], []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": median(times), "ms_p10": percentile(times, 10), "ms_p90": percentile(times, 90), "iters": iters}
    if host:
        out["host_ms"] = median(host)
    return out


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    _sync(device)
    return torch.cuda.max_memory_allocated(device)


def _free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(device)[0]


def _cleanup(device: torch.device, reset_dynamo: bool = False) -> None:
    if reset_dynamo:
        torch._dynamo.reset()
        with contextlib.suppress(Exception):
            from torch._inductor import cudagraph_trees

            cudagraph_trees.reset_cudagraph_trees()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1500]


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _mark_step() -> None:
    with contextlib.suppress(Exception):
        torch.compiler.cudagraph_mark_step_begin()


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_model(name: str, device: torch.device, dtype: torch.dtype | None = None,
                layers: int | None = None) -> torch.nn.Module:
    """A randomly initialised model of shape ``MODEL_SHAPES[name]`` (with only ``layers`` decoder
    layers when given), built on ``device`` directly."""
    from transformers import AutoModelForCausalLM

    shape = MODEL_SHAPES[name] if layers is None else dataclasses.replace(MODEL_SHAPES[name], layers=layers)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = shape.config()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if next(model.parameters()).dtype != dtype:  # older transformers: no dtype argument honoured
        model = model.to(dtype)
    return model.eval()


def fill_random(cache, length: int, seed: int = 0) -> None:
    """Fill a :class:`~tqpatch.TurboQuantCache` with random codes, scales and window of ``length``
    tokens (speed does not depend on the values)."""
    dev = cache.layers[0].n.device
    g = torch.Generator(device=dev).manual_seed(seed)
    for layer in cache.layers:
        if layer.plan.quantized:
            layer.k_codes.random_(0, 256, generator=g)
            layer.v_codes.random_(0, 256, generator=g)
            layer.k_scales.uniform_(0.5, 1.5, generator=g)
            layer.v_scales.uniform_(0.5, 1.5, generator=g)
        else:
            layer.keys.normal_(generator=g)
            layer.values.normal_(generator=g)
        layer.win_k.normal_(generator=g)
        layer.win_v.normal_(generator=g)
        layer.n.fill_(length)


def set_length(cache, length: int) -> None:
    """Set every layer's device-side length (what tqpatch's decode cost follows)."""
    for layer in cache.layers:
        layer.n.fill_(length)


def _fill_static(cache, length: int) -> None:
    for layer in cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)
        if hasattr(layer, "cumulative_length_int"):
            layer.cumulative_length_int = length


def _fill_dynamic(cache, batch: int, kv_heads: int, head_dim: int, length: int, dtype, device) -> None:
    for layer in cache.layers:
        layer.keys = torch.randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
        layer.values = torch.randn(batch, kv_heads, length, head_dim, dtype=dtype, device=device)
        if isinstance(getattr(layer, "cumulative_length", None), int):
            layer.cumulative_length = length


def _margin(cfg: "BenchConfig") -> int:
    """Positions past the context that one measurement writes: 3 first calls, warm-up, timed steps
    (a static cache indexes past its allocation otherwise)."""
    return _MARGIN + max(cfg.steps, 20)


_step_fn = step_function  # the uncompiled step every timed method compiles (tools import this name)


def _compile(fn, enabled: bool, graph: bool = False):
    """``fn`` compiled with ``fullgraph=True``: with CUDA graph trees (``mode="reduce-overhead"``, as
    transformers users compile a step), or, with ``graph``, captured whole in one CUDA graph and
    replayed without guards (:func:`tqpatch.step.capture_graph`)."""
    if not enabled:
        return fn
    if graph:
        return capture_graph(torch.compile(fn, fullgraph=True))
    return torch.compile(fn, fullgraph=True, mode="reduce-overhead")


# ------------------------------------------------------------------------------------------------
# The run: results, budget, incremental writes
# ------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, cfg: BenchConfig) -> None:
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.t0 = time.time()
        self.compile_s: dict[str, float] = {}
        self.result: dict[str, Any] = {
            "schema": SCHEMA,
            "environment": environment(cfg),
            "config": _jsonable(dataclasses.asdict(cfg)),
            "suites": list(cfg.suites),
            "skipped": [],
            "errors": [],
            "seconds": 0.0,
        }

    # -- budget --------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.time() - self.t0

    def estimate(self, kind: str) -> float:
        return self.compile_s.get(kind, _COMPILE_PRIOR_S[kind]) if self.cfg.compiled else 1.0

    def note_compile(self, kind: str, seconds: float) -> None:
        self.compile_s[kind] = max(self.compile_s.get(kind, 0.0), seconds)

    def allows(self, what: str, cost_s: float) -> bool:
        """Whether ``what`` (estimated ``cost_s``) fits the remaining --budget-s; records a skip if not."""
        b = self.cfg.budget_s
        if not b or self.elapsed() + cost_s <= b:
            return True
        self.skip(what, f"budget: {self.elapsed():.0f} s used + ~{cost_s:.0f} s estimated > {b:.0f} s")
        return False

    def skip(self, what: str, why: str) -> None:
        logger.warning("skipped %s (%s)", what, why)
        self.result["skipped"].append({"what": what, "why": why})

    def error(self, what: str, exc: BaseException) -> None:
        logger.error("%s failed: %s", what, _error_text(exc))
        self.result["errors"].append({"what": what, "error": _error_text(exc)})

    # -- output --------------------------------------------------------------------------------
    def add(self, section: str, row: dict[str, Any], key: str = "rows") -> None:
        """Record one measurement under ``result[section][key]`` and write the outputs at once."""
        self.result.setdefault(section, {}).setdefault(key, []).append(row)
        logger.info("%s: %s", section, json.dumps(_jsonable(row))[:400])
        self.save(plots=False)

    def save(self, plots: bool) -> list[Path]:
        self.result["seconds"] = round(self.elapsed(), 1)
        return write_outputs(self.result, self.cfg.out, self.cfg.output_stem(), plots=plots)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------------------------
# Suite: correctness
# ------------------------------------------------------------------------------------------------
def e2e_correctness(device: torch.device, compiled: bool = True, graph: bool = False) -> dict[str, Any]:
    """Logits of a 2-layer random Llama over 44 decode steps after a 256-token prefill: eager Triton
    path vs eager plain-torch reference, and the compiled step (CUDA graphs: graph trees, or with
    ``graph`` one captured graph) vs the eager step. Relative error ``|a - b| / |b|`` of the
    stacked logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tqpatch
    from tqpatch.cache import TurboQuantCache
    from tqpatch.kernels import triton_decode

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=128, max_position_embeddings=4096)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = LlamaForCausalLM(cfg).to(device, dtype).eval()
    tqpatch.apply(model, key_bits=4, value_bits=4, window=16)
    ids = torch.randint(0, 512, (2, 300), device=device)

    def run(compile_step: bool, use_triton: bool) -> torch.Tensor:
        cache = TurboQuantCache(model, max_cache_len=400, batch_size=2)
        with torch.no_grad():
            model(ids[:, :256], past_key_values=cache, use_cache=True)
            step = _compile(_step_fn(model, cache), compile_step, graph)
            orig = triton_decode.available
            if not use_triton:
                triton_decode.available = lambda: False
            try:
                out = []
                for t in range(256, 300):
                    _mark_step()
                    tok = ids[:, t : t + 1].clone()
                    pos = torch.full((2, 1), t, device=device)
                    out.append(step(tok, pos).clone())
            finally:
                triton_decode.available = orig
        return torch.cat(out, 1).float()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    res: dict[str, Any] = {"model": "2-layer random Llama (8 q / 2 kv heads, d 128), 4-bit, window 16",
                           "dtype": str(dtype).replace("torch.", "")}
    t0 = time.time()
    eager_ref = run(False, False)
    if triton_decode.available():
        eager_triton = run(False, True)
        res["eager_triton_vs_torch_reference"] = rel(eager_triton, eager_ref)
    else:
        eager_triton = eager_ref
        res["eager_triton_vs_torch_reference"] = None
        res["note"] = "no Triton kernel on this device: only the reference path ran"
    if compiled:
        res["compiled_vs_eager"] = rel(run(True, True), eager_triton)
    else:
        res["compiled_vs_eager"] = None
    # Chunked prefill (chunks of 64 over 300 tokens): the fused SDPA path vs the reference path.
    from tqpatch import attention

    def prefill(fused: bool) -> torch.Tensor:
        orig = attention._fused_chunk_applies
        if not fused:
            attention._fused_chunk_applies = lambda layer, Q: False
        try:
            with torch.no_grad():
                return model(ids, past_key_values=TurboQuantCache(model, max_cache_len=400, batch_size=2),
                             use_cache=True).logits.float()
        finally:
            attention._fused_chunk_applies = orig

    tqpatch.unapply(model)
    tqpatch.apply(model, key_bits=4, value_bits=4, window=16, prefill_chunk=64)
    res["fused_prefill_vs_reference"] = rel(prefill(True), prefill(False))
    res["fused_attention_backend"] = (f"cuDNN ({attention._CUDNN['mode']} K/V heads)" if attention._CUDNN["mode"]
                                      else "flash") if device.type == "cuda" else "flash (CPU)"
    res["seconds"] = round(time.time() - t0, 1)
    tqpatch.unapply(model)
    return res


KERNEL_CHECK_CASES = [  # key_bits, value_bits, d, G, ring, softcap, lut
    (2, 2, 64, 4, False, 0.0, "prmt"), (3, 3, 64, 4, False, 0.0, "prmt"), (4, 4, 64, 4, False, 0.0, "prmt"),
    (2, 2, 128, 4, False, 0.0, "prmt"), (3, 3, 128, 4, False, 0.0, "prmt"), (4, 4, 128, 4, False, 0.0, "prmt"),
    (2, 2, 256, 4, False, 0.0, "prmt"), (3, 3, 256, 4, False, 0.0, "prmt"), (4, 4, 256, 4, False, 0.0, "prmt"),
    (4, 2, 128, 7, True, 0.0, "prmt"), (2, 3, 128, 7, True, 0.0, "prmt"), (3, 4, 64, 7, True, 50.0, "prmt"),
    (4, 4, 64, 1, True, 30.0, "prmt"), (4, 3, 128, 8, False, 20.0, "prmt"),
    (4, 4, 128, 4, False, 0.0, "gather"), (3, 2, 64, 1, True, 0.0, "gather"),
]


def _rand_kernel_inputs(B, Hq, Hkv, C, d, kb, vb, n, starts, gen, q_scale=1.0, device="cuda"):
    from .codebook import lloyd_max

    q = torch.randn(B, Hq, d, generator=gen, device=device) * q_scale
    kc = torch.randint(0, 256, (B, Hkv, C, d * kb // 8), generator=gen, device=device, dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, Hkv, C, d * vb // 8), generator=gen, device=device, dtype=torch.uint8)
    ks = (torch.rand(B, Hkv, C, generator=gen, device=device) * 3 + 0.05).half()
    vs = (torch.rand(B, Hkv, C, generator=gen, device=device) * 3 + 0.05).half()
    kcent = torch.tensor(lloyd_max(d, kb), dtype=torch.float32, device=device)
    vcent = torch.tensor(lloyd_max(d, vb), dtype=torch.float32, device=device)
    nn = torch.tensor([n], dtype=torch.int32, device=device)
    st = torch.tensor(starts, dtype=torch.int32, device=device)
    return q, kc, ks, vc, vs, kcent, vcent, nn, st


def kernel_check(seed: int = 1234, cases: Sequence[tuple] = tuple(KERNEL_CHECK_CASES), progress=None) -> list[dict]:
    """The Triton decode kernel against ``history_attention`` (float32) on fresh random inputs:
    padding, n < C, empty rows, wrapped rings, 1 and 5 splits, queries x1/x4 (held to 1e-3) and x8
    (reported). Outputs are poisoned with NaN first."""
    from .kernels import triton_decode as td
    from .kernels.reference import history_attention

    gen = torch.Generator(device="cuda").manual_seed(seed)
    rows = []
    Hkv, C = 2, 300
    for kb, vb, d, G, ring, softcap, lut in cases:
        scaling = d ** -0.5
        scen = [(3, 250, [0, 17, 249]), (2, 37, [0, 40]), (1, 0, [0])]
        scen += [(2, 777, [0, 600]), (2, C, [5, 0])] if ring else [(2, C, [0, 299])]
        worst_out = worst_lse = 0.0
        worst8 = [0.0, 0.0]
        ok = True
        for B, n, starts in scen:
            for q_scale in (1.0, 4.0, 8.0):
                args = _rand_kernel_inputs(B, G * Hkv, Hkv, C, d, kb, vb, n, starts, gen, q_scale)
                q, kc, ks, vc, vs, kcent, vcent, nn, st = args
                ro, rl = history_attention(q.unsqueeze(2), kc, ks, vc, vs, kcent, vcent, nn, st, key_bits=kb,
                                           value_bits=vb, scaling=scaling, softcap=softcap or None, ring=ring)
                ro, rl = ro.squeeze(2), rl.squeeze(2)
                for splits in (1, 5):
                    cfg = td.default_config(B, Hkv, C, d, kb, vb)
                    cfg["splits"] = splits
                    out = torch.full((B, G * Hkv, d), float("nan"), device="cuda")
                    lse = torch.full((B, G * Hkv), float("nan"), device="cuda")
                    junk = torch.full((64 << 20,), float("nan"), device="cuda")
                    del junk
                    td._launch(q, kc, ks, vc, vs, kcent, vcent, nn, st, out, lse, kb, vb, scaling, softcap, ring,
                               cfg, lut)
                    torch.cuda.synchronize()
                    empty = ~torch.isfinite(rl)
                    if torch.isnan(out).any() or torch.isnan(lse).any():
                        ok = False
                    if not torch.equal(empty, ~torch.isfinite(lse)) or not bool((out[empty] == 0).all()):
                        ok = False
                    if (~empty).any():
                        e = ((out - ro).norm() / ro.norm()).item()
                        le = ((lse[~empty] - rl[~empty]).abs() / rl[~empty].abs().clamp_min(1)).max().item()
                        if q_scale > 4:
                            worst8 = [max(worst8[0], e), max(worst8[1], le)]
                        else:
                            worst_out, worst_lse = max(worst_out, e), max(worst_lse, le)
        ok = ok and worst_out < 1e-3 and worst_lse < 1e-3
        rows.append(dict(key_bits=kb, value_bits=vb, d=d, G=G, ring=ring, softcap=softcap, lut=lut,
                         max_rel_err_out=worst_out, max_rel_err_lse=worst_lse, ok=ok,
                         q_x8_rel_err_out=worst8[0], q_x8_rel_err_lse=worst8[1]))
        logger.info("kernel check kb=%d vb=%d d=%d G=%d ring=%s softcap=%s lut=%s: out %.2e lse %.2e %s",
                    kb, vb, d, G, ring, softcap, lut, worst_out, worst_lse, "OK" if ok else "FAIL")
        if progress is not None:
            progress.update(1)
    return rows


def _suite_correctness(run: _Run) -> None:
    sec = run.result.setdefault("correctness", {})
    try:
        sec["e2e"] = e2e_correctness(run.device, compiled=run.cfg.compiled, graph=run.cfg.step_graph)
        logger.info("correctness: %s", json.dumps(sec["e2e"]))
        run.save(plots=False)
    except Exception as exc:
        run.error("correctness e2e", exc)


# ------------------------------------------------------------------------------------------------
# Suite: kernel (was tools/bench_kernel.py)
# ------------------------------------------------------------------------------------------------
def do_bench_us(fn) -> float:
    """``triton.testing.do_bench`` median in µs (L2 flushed between runs)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_bench_us(fn) -> float:
    """Median µs of one replay of a CUDA graph holding one call of ``fn`` (the decode step runs
    under CUDA graphs, so launch overhead is not part of its cost)."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    us = do_bench_us(g.replay)
    del g
    return us


def copy_bandwidth(nbytes: int = 1 << 30) -> dict[str, float]:
    """Device-to-device copy of a large buffer: (bytes read + written) / time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = do_bench_us(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": nbytes, "us": us, "GBps": 2 * nbytes / us / 1e3}


def kernel_inputs(B: int, T: int, bits: int, gen: torch.Generator):
    """Random codes/scales/queries for the kernel suite's shape (``n = T`` = allocated slots)."""
    from .codebook import lloyd_max

    kc = torch.randint(0, 256, (B, HKV, T, D * bits // 8), generator=gen, device="cuda", dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, HKV, T, D * bits // 8), generator=gen, device="cuda", dtype=torch.uint8)
    ks = (torch.rand(B, HKV, T, generator=gen, device="cuda") + 0.5).half()
    vs = (torch.rand(B, HKV, T, generator=gen, device="cuda") + 0.5).half()
    cent = torch.tensor(lloyd_max(D, bits), dtype=torch.float32, device="cuda")
    q = torch.randn(B, HQ, D, generator=gen, device="cuda")
    n = torch.tensor([T], dtype=torch.int32, device="cuda")
    st = torch.zeros(B, dtype=torch.int32, device="cuda")
    return q, kc, ks, vc, vs, cent, cent, n, st


def time_kernel(inputs, bits: int, config: dict | None = None, lut: str | None = None, eager: bool = False) -> float:
    """µs of one ``decode_attention`` call: a CUDA-graph replay, or the eager Python call."""
    from .kernels import triton_decode as td

    q, kc, ks, vc, vs, kcent, vcent, n, st = inputs

    def fn():
        return td.decode_attention(q, kc, ks, vc, vs, kcent, vcent, n, st, key_bits=bits, value_bits=bits,
                                   scaling=D ** -0.5, config=config, lut=lut)

    if eager:
        fn()
        torch.cuda.synchronize()
        return do_bench_us(fn)
    return graph_bench_us(fn)


def time_sdpa(B: int, T: int, gen: torch.Generator) -> float | None:
    """µs of ``scaled_dot_product_attention(enable_gqa=True)`` over bf16 K/V (None: out of memory)."""
    import torch.nn.functional as F

    try:
        q = torch.randn(B, HQ, 1, D, generator=gen, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, HKV, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, HKV, T, D, generator=gen, device="cuda", dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        return None
    us = graph_bench_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    del q, k, v
    torch.cuda.empty_cache()
    return us


def kernel_sweep(gen: torch.Generator) -> list[dict]:
    """Launch configurations at a few shapes (4-bit)."""
    from .kernels import triton_decode as td

    rows = []
    shapes = [(8, 32768), (32, 32768), (1, 32768)]
    # (BLOCK_N, warps, stages, maxnreg, early_v, resident programs per SM assumed for the splits)
    configs = [(64, 4, 3, 0, False, 3), (64, 4, 3, 0, True, 3), (64, 4, 3, 128, False, 4), (64, 4, 2, 128, False, 4),
               (64, 4, 3, 128, True, 4), (32, 4, 3, 0, False, 4), (32, 4, 3, 0, False, 5), (128, 8, 3, 0, False, 2)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for B, T in shapes:
        inputs = kernel_inputs(B, T, 4, gen)
        for bn, nw, stg, mr, ev, per_sm in configs:
            splits_fit = td._fit_splits(B * HKV, -(-T // bn), per_sm * sms)
            for splits in sorted({splits_fit, min(-(-T // bn), 4 * splits_fit)}):
                cfg = {"BLOCK_N": bn, "num_warps": nw, "stages": stg, "maxnreg": mr, "early_v": ev, "splits": splits}
                try:
                    us = time_kernel(inputs, 4, cfg)
                except Exception as e:  # a config that does not compile or fit: record and go on
                    logger.warning("sweep B=%d T=%d %s: %s", B, T, cfg, _error_text(e)[:200])
                    continue
                rows.append(dict(B=B, T=T, **cfg, us=us, GBps=gbps(kernel_bytes(B, HKV, T, D, 4, 4), us)))
        us = time_kernel(inputs, 4, lut="gather")
        rows.append(dict(B=B, T=T, lut="gather", us=us, GBps=gbps(kernel_bytes(B, HKV, T, D, 4, 4), us)))
        del inputs
        torch.cuda.empty_cache()
    return rows


def kernel_ncu_target(B: int = 8, T: int = 32768, bits: int = 4) -> None:
    """A few calls of the kernel at one shape and nothing else (to run under ``ncu``)."""
    from .kernels import triton_decode as td

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, kc, ks, vc, vs, kcent, vcent, n, st = kernel_inputs(B, T, bits, gen)
    for _ in range(3):
        td.decode_attention(q, kc, ks, vc, vs, kcent, vcent, n, st, key_bits=bits, value_bits=bits, scaling=D ** -0.5)
    torch.cuda.synchronize()


def _suite_kernel(run: _Run) -> None:
    from .kernels import triton_decode as td

    if not td.available():
        run.skip("kernel", "needs CUDA and Triton")
        return
    cfg = run.cfg
    sec = run.result.setdefault("kernel", {})
    sec["shape"] = f"Hq {HQ} / Hkv {HKV} / d {D}; one query token per sequence; n = T = allocated slots"
    sec["timer"] = ("triton.testing.do_bench median (L2 flushed) of one CUDA-graph replay holding the call; "
                    "'eager' = do_bench of the Python call itself (includes launch overhead)")
    if cfg.kernel_check:
        try:
            sec["check"] = kernel_check()
            logger.info("kernel check: %d/%d variants pass", sum(r["ok"] for r in sec["check"]), len(sec["check"]))
            run.save(plots=False)
        except Exception as exc:
            run.error("kernel check", exc)
    else:
        run.skip("kernel check", "--quick / --no-kernel-check")
    gen = torch.Generator(device="cuda").manual_seed(0)
    sec["copy"] = copy_bandwidth()
    copy_gbps = sec["copy"]["GBps"]
    logger.info("device-to-device copy: %.0f GB/s (read + write)", copy_gbps)
    if cfg.kernel_sweep:
        sec["sweep"] = kernel_sweep(gen)
    sdpa: dict[tuple[int, int], float | None] = {}
    for bits in cfg.kernel_bits:
        for B in cfg.batches:
            for T in cfg.kernel_lengths:
                try:
                    inputs = kernel_inputs(B, T, bits, gen)
                    launch = td.default_config(B, HKV, T, D, bits, bits)
                    us = time_kernel(inputs, bits)
                    us_eager = time_kernel(inputs, bits, eager=True)
                    del inputs
                    torch.cuda.empty_cache()
                except Exception as exc:
                    _cleanup(run.device)
                    status = "OOM" if _is_oom(exc) else "error"
                    run.add("kernel", dict(bits=bits, B=B, T=T, status=status, error=_error_text(exc)))
                    continue
                if (B, T) not in sdpa:
                    sdpa[(B, T)] = time_sdpa(B, T, gen)
                sd = sdpa[(B, T)]
                nbytes = kernel_bytes(B, HKV, T, D, bits, bits)
                rate = gbps(nbytes, us)
                run.add("kernel", dict(
                    bits=bits, B=B, T=T, status="ok", kernel_us=us, kernel_eager_us=us_eager, sdpa_bf16_us=sd,
                    bytes=nbytes, sdpa_bytes=bf16_kv_bytes(B, HKV, T, D), GBps=rate, pct_copy=100 * rate / copy_gbps,
                    sdpa_GBps=gbps(bf16_kv_bytes(B, HKV, T, D), sd) if sd else None,
                    ratio_vs_sdpa=us / sd if sd else None, config=launch))
    rows = [r for r in sec.get("rows", []) if r.get("status") == "ok"]
    goal = [r for r in rows if r["bits"] == 4 and r["B"] == 8 and r["T"] == 32768]
    sec["goals"] = {
        "ratio_B8_T32K_4bit_le_0.35": (goal[0]["ratio_vs_sdpa"] is not None and goal[0]["ratio_vs_sdpa"] <= 0.35)
        if goal else None,
        "pct_copy_ge_75_all_T_ge_8K_4bit": all(r["pct_copy"] >= 75 for r in rows if r["T"] >= 8192 and r["bits"] == 4),
        "pct_copy_ge_75_all_T_ge_8K_3bit": all(r["pct_copy"] >= 75 for r in rows if r["T"] >= 8192 and r["bits"] == 3),
    }
    run.save(plots=False)


# ------------------------------------------------------------------------------------------------
# Suites: e2e (+ encode)
# ------------------------------------------------------------------------------------------------
def _step_inputs(B: int, vocab: int, device: torch.device):
    g = torch.Generator(device=device).manual_seed(1)
    tok = torch.randint(0, vocab, (B, 1), device=device, generator=g)
    pos = torch.zeros((B, 1), dtype=torch.long, device=device)
    return tok, pos


def _tq_kv_bytes(model, B: int, length: int) -> int:
    """Measured bytes of a TurboQuantCache allocated for ``B`` rows of ``length`` positions."""
    from .cache import TurboQuantCache, cache_nbytes

    c = TurboQuantCache(model, max_cache_len=length, batch_size=B)
    n = cache_nbytes(c)
    del c
    return n


def _first_calls(step, tok, pos, device) -> tuple[float, float]:
    """Seconds of the first call (trace + compile) and of the next two (CUDA-graph warm-up, record)."""
    _mark_step()
    t0 = time.time()
    step(tok, pos)
    _sync(device)
    t1 = time.time()
    for _ in range(2):
        _mark_step()
        step(tok, pos)
    _sync(device)
    return t1 - t0, time.time() - t1


def _timed(step, tok, pos, device, steps: int) -> dict[str, float]:
    def call():
        _mark_step()
        step(tok, pos)

    return time_steps(call, device, iters=steps, warmup=3)


def _tq_points(run: _Run, model, name: str, B: int, method: str, contexts: Sequence[int], *, section: str,
               with_encode: bool) -> dict[int, float]:
    """tqpatch at ``B`` rows: one allocation (max context + margin), one compiled step, every context
    by refilling ``n``. Returns ``{context: ms}``."""
    import tqpatch
    from .cache import TurboQuantCache, cache_nbytes

    cfg, dev = run.cfg, run.device
    bits = TQ_BITS[method]
    shape = MODEL_SHAPES[name]
    max_len = max(contexts) + _margin(cfg)
    base = dict(model=name, method=method, batch=B)
    out: dict[int, float] = {}
    tqpatch.apply(model, key_bits=bits, value_bits=bits)
    cache = step = None
    try:
        kv_at = {}
        for c in contexts:
            try:
                kv_at[c] = _tq_kv_bytes(model, B, c)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                kv_at[c] = None
            _cleanup(dev)
        try:
            cache = TurboQuantCache(model, max_cache_len=max_len, batch_size=B)
        except Exception as exc:
            if not _is_oom(exc):
                raise
            for c in contexts:
                run.add(section, dict(base, context=c, status="OOM", kv_bytes=kv_at.get(c),
                                      note=f"allocating {max_len} positions"))
            return out
        alloc = cache_nbytes(cache)
        fill_random(cache, contexts[0])
        tok, pos = _step_inputs(B, shape.vocab, dev)
        pos.fill_(contexts[0])
        _cleanup(dev, reset_dynamo=True)
        step = _compile(_step_fn(model, cache), cfg.compiled, cfg.step_graph)
        graphs0 = _unique_graphs()
        with torch.no_grad():
            compile_s, warm_s = _first_calls(step, tok, pos, dev)
            if cfg.compiled:
                run.note_compile("tq", compile_s)
            graphs1 = _unique_graphs()
            for c in contexts:
                set_length(cache, c)
                pos.fill_(c)
                _reset_peak(dev)
                t = _timed(step, tok, pos, dev, cfg.steps)
                peak = _peak(dev)
                out[c] = t["ms"]
                run.add(section, dict(
                    base, context=c, status="ok", **t, tokens_per_s=tokens_per_s(B, t["ms"]), peak_memory_bytes=peak,
                    peak_memory_bytes_at_context_est=(peak - alloc + kv_at[c]) if peak and kv_at.get(c) else None,
                    kv_bytes=kv_at.get(c), kv_bytes_allocated=alloc, allocated_positions=max_len,
                    compile_s=round(compile_s, 2), warmup_s=round(warm_s, 2),
                    length_after=int(cache.layers[0].n), compiled=cfg.compiled))
            recompiles = _unique_graphs() - graphs1
            run.result.setdefault(section, {}).setdefault("compiles", []).append(dict(
                base, compile_s=round(compile_s, 2), graphs=graphs1 - graphs0, recompiles_over_contexts=recompiles,
                contexts=list(contexts)))
            if recompiles:
                run.error(f"{section} {name} {method} B={B}",
                          RuntimeError(f"{recompiles} recompile(s) while only n changed"))
            if with_encode and "encode" in cfg.suites and run.allows(f"encode {name} B={B}", run.estimate("small")):
                _encode_point(run, model, cache, name, B, method, out)
    except Exception as exc:
        if _is_oom(exc):
            run.add(section, dict(base, context=None, status="OOM", error=_error_text(exc)))
        else:
            run.error(f"{section} {name} {method} B={B}", exc)
    finally:
        del cache, step
        tqpatch.unapply(model)
        _cleanup(dev, reset_dynamo=True)
    return out


def _encode_point(run: _Run, model, cache, name: str, B: int, method: str, step_ms: dict[int, float]) -> None:
    """The store of one decode token for every layer (window ring write, encode of the token that
    leaves the window: rotation, normalisation, bucketize, pack, index_copy into codes and scales,
    n += 1), compiled as a graph of its own with CUDA graphs, timed like the step."""
    from . import attention

    cfg, dev = run.cfg, run.device
    shape = MODEL_SHAPES[name]
    g = torch.Generator(device=dev).manual_seed(2)
    dtype = next(model.parameters()).dtype
    kv = [(torch.randn(B, shape.kv_heads, 1, shape.head_dim, generator=g, device=dev, dtype=dtype),
           torch.randn(B, shape.kv_heads, 1, shape.head_dim, generator=g, device=dev, dtype=dtype))
          for _ in cache.layers]

    def store():
        for layer, (k, v) in zip(cache.layers, kv):
            attention._store(layer, k, v)

    fn = _compile(store, cfg.compiled)
    t0 = time.time()
    _mark_step()
    fn()
    _sync(dev)
    compile_s = time.time() - t0

    def call():
        _mark_step()
        fn()

    t = time_steps(call, dev, iters=cfg.steps, warmup=3)
    share = {str(c): t["ms"] / ms for c, ms in step_ms.items()}
    row = dict(model=name, method=method, batch=B, store_ms=t["ms"], store_ms_p10=t["ms_p10"],
               store_ms_p90=t["ms_p90"], step_ms=step_ms, share_of_step=share, compile_s=round(compile_s, 2),
               how="all layers' _store(layer, k, v) for one new token, compiled (fullgraph, CUDA graphs) on "
                   "its own; share = store_ms / step_ms at each context")
    if cfg.encode_ablation:
        row.update(_store_ablation(run, model, cache, name, B, step_ms))
    run.add("encode", row)


def _store_ablation(run: _Run, model, cache, name: str, B: int, step_ms: dict[int, float]) -> dict[str, Any]:
    """The step compiled again with the store replaced by ``n += Q`` only: the in-graph cost."""
    from . import attention

    cfg, dev = run.cfg, run.device
    if not run.allows(f"encode ablation {name} B={B}", run.estimate("tq")):
        return {"ablation": "skipped (budget)"}
    orig = attention._store

    def length_only(layer, k, v):
        layer.n.add_(k.shape[2])

    attention._store = length_only
    try:
        _cleanup(dev, reset_dynamo=True)
        step = _compile(_step_fn(model, cache), cfg.compiled, cfg.step_graph)
        tok, pos = _step_inputs(B, MODEL_SHAPES[name].vocab, dev)
        res = {}
        with torch.no_grad():
            _first_calls(step, tok, pos, dev)
            for c in step_ms:
                set_length(cache, c)
                pos.fill_(c)
                res[str(c)] = _timed(step, tok, pos, dev, cfg.steps)["ms"]
        return {"step_ms_without_store": res,
                "store_ms_in_step": {c: step_ms[int(c)] - ms for c, ms in res.items()}}
    finally:
        attention._store = orig
        _cleanup(dev, reset_dynamo=True)


def _static_point(run: _Run, model, name: str, B: int, context: int) -> None:
    from transformers import StaticCache

    cfg, dev = run.cfg, run.device
    shape = MODEL_SHAPES[name]
    base = dict(model=name, method="static", batch=B, context=context)
    max_len = context + _margin(cfg)
    need = bf16_kv_bytes(B, shape.kv_heads, max_len, shape.head_dim, shape.layers)
    free = _free_bytes(dev)
    if free is not None and need > free:
        run.add("e2e", dict(base, status="OOM", kv_bytes=need, note=f"predicted: needs {need:,} B, {free:,} free"))
        return
    cache = step = None
    try:
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        tok, pos = _step_inputs(B, shape.vocab, dev)
        with torch.no_grad():
            model(tok, position_ids=pos, past_key_values=cache, use_cache=True)  # allocates the layers
        _fill_static(cache, context)
        kv = _tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
        pos.fill_(context)
        _cleanup(dev, reset_dynamo=True)
        step = _compile(_step_fn(model, cache), cfg.compiled, cfg.step_graph)
        with torch.no_grad():
            compile_s, warm_s = _first_calls(step, tok, pos, dev)
            if cfg.compiled:
                run.note_compile("static", compile_s)
            _reset_peak(dev)
            t = _timed(step, tok, pos, dev, cfg.steps)
            peak = _peak(dev)
        run.add("e2e", dict(base, status="ok", **t, tokens_per_s=tokens_per_s(B, t["ms"]), peak_memory_bytes=peak,
                            kv_bytes=kv, kv_bytes_allocated=kv, allocated_positions=max_len,
                            compile_s=round(compile_s, 2), warmup_s=round(warm_s, 2), compiled=cfg.compiled))
    except Exception as exc:
        if _is_oom(exc):
            run.add("e2e", dict(base, status="OOM", kv_bytes=need, error=_error_text(exc)))
        else:
            run.error(f"e2e {name} static B={B} T={context}", exc)
    finally:
        del cache, step
        _cleanup(dev, reset_dynamo=True)


def _dynamic_point(run: _Run, model, name: str, B: int, context: int) -> None:
    from transformers import DynamicCache

    cfg, dev = run.cfg, run.device
    shape = MODEL_SHAPES[name]
    base = dict(model=name, method="dynamic", batch=B, context=context)
    need = bf16_kv_bytes(B, shape.kv_heads, context + cfg.steps + 8, shape.head_dim, shape.layers)
    free = _free_bytes(dev)
    per_layer = need // shape.layers
    if free is not None and need + 2 * per_layer > free:  # + torch.cat's copy of one layer
        run.add("e2e", dict(base, status="OOM", kv_bytes=need, note=f"predicted: needs {need:,} B, {free:,} free"))
        return
    cache = None
    try:
        cache = DynamicCache()
        tok, pos = _step_inputs(B, shape.vocab, dev)
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            model(tok, position_ids=pos, past_key_values=cache, use_cache=True)  # creates the layers
            _fill_dynamic(cache, B, shape.kv_heads, shape.head_dim, context, dtype, dev)
            kv = _tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
            pos.fill_(context)
            _reset_peak(dev)
            t = time_steps(lambda: model(tok, position_ids=pos, past_key_values=cache, use_cache=True), dev,
                           iters=cfg.steps, warmup=3)
            peak = _peak(dev)
        run.add("e2e", dict(base, status="ok", **t, tokens_per_s=tokens_per_s(B, t["ms"]), peak_memory_bytes=peak,
                            kv_bytes=kv, compiled=False, note="eager; the cache grows by torch.cat every step"))
    except Exception as exc:
        if _is_oom(exc):
            run.add("e2e", dict(base, status="OOM", kv_bytes=need, error=_error_text(exc)))
        else:
            run.error(f"e2e {name} dynamic B={B} T={context}", exc)
    finally:
        del cache
        _cleanup(dev)


def _generate_points(run: _Run, model, name: str) -> None:
    """``model.generate`` throughput at B=1: decode tokens/s = (new - 1) / (t(new) - t(1))."""
    import tqpatch
    from .cache import TurboQuantCache

    cfg, dev = run.cfg, run.device
    shape = MODEL_SHAPES[name]
    new = cfg.generate_new_tokens
    for method in [m for m in cfg.methods if m in ("tq4", "tq3", "static")]:
        for L in cfg.generate_prompts:
            what = f"generate {name} {method} prompt {L}"
            if method == "static" and not run.allows(what, 2 * run.estimate("static")):
                continue
            ids = torch.randint(0, shape.vocab, (1, L), device=dev)
            try:
                if method in TQ_BITS:
                    tqpatch.apply(model, key_bits=TQ_BITS[method], value_bits=TQ_BITS[method])

                def gen(n: int) -> float:
                    kw: dict[str, Any] = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False)
                    if method == "static":
                        kw["cache_implementation"] = "static"
                    else:
                        kw["past_key_values"] = TurboQuantCache(model, max_cache_len=L + n + 8, batch_size=1)
                    _sync(dev)
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        model.generate(ids, **kw)
                    _sync(dev)
                    return time.perf_counter() - t0

                t_first = time.time()
                gen(new)  # warm-up (and compile, for static)
                warm = time.time() - t_first
                t1 = gen(1)
                tn = gen(new)
                run.add("e2e", dict(model=name, method=method, batch=1, prompt=L, new_tokens=new, status="ok",
                                    seconds_total=tn, seconds_prefill_plus_1=t1,
                                    decode_tokens_per_s=(new - 1) / (tn - t1) if tn > t1 else None,
                                    first_call_s=round(warm, 2),
                                    note="tqpatch generate() decodes eagerly (TurboQuantCache.is_compileable "
                                         "is False); static: generate's own compile"
                                    ), key="generate")
            except Exception as exc:
                if _is_oom(exc):
                    run.add("e2e", dict(model=name, method=method, batch=1, prompt=L, status="OOM"), key="generate")
                else:
                    run.error(what, exc)
            finally:
                if tqpatch.is_patched(model):
                    tqpatch.unapply(model)
                _cleanup(dev, reset_dynamo=True)


def _suite_e2e(run: _Run, model, name: str) -> None:
    cfg = run.cfg
    contexts = sorted(cfg.contexts)
    want_e2e = "e2e" in cfg.suites
    tq_methods = [m for m in cfg.methods if m in TQ_BITS]
    if not want_e2e:  # encode alone: the 4-bit step it is a share of
        tq_methods = ["tq4"]
    for B in cfg.batches:
        for method in tq_methods:
            what = f"{name} {method} B={B}"
            if not run.allows(f"e2e {what}", run.estimate("tq") + 10):
                continue
            _tq_points(run, model, name, B, method, contexts, section="e2e" if want_e2e else "encode_steps",
                       with_encode=(method == "tq4"))
        if not want_e2e:
            continue
        if "dynamic" in cfg.methods:
            for c in contexts:
                if run.allows(f"e2e {name} dynamic B={B} T={c}", 15):
                    _dynamic_point(run, model, name, B, c)
        if "static" in cfg.methods and B in cfg.static_batches:
            for c in contexts:
                if run.allows(f"e2e {name} static B={B} T={c}", run.estimate("static") + 10):
                    _static_point(run, model, name, B, c)
    if want_e2e and cfg.generate:
        _generate_points(run, model, name)


# ------------------------------------------------------------------------------------------------
# Suite: capacity
# ------------------------------------------------------------------------------------------------
def _capacity_method(run: _Run, model, name: str, method: str, context: int, free: int) -> dict[str, Any]:
    import tqpatch
    from transformers import StaticCache

    from .cache import TurboQuantCache, cache_nbytes

    dev = run.device
    shape = MODEL_SHAPES[name]
    max_len = context + 16
    tq = method in TQ_BITS
    if tq:
        tqpatch.apply(model, key_bits=TQ_BITS[method], value_bits=TQ_BITS[method])

    def make(B: int):
        """Allocate a cache of B rows at ``context`` and return (cache, kv bytes, step)."""
        tok, pos = _step_inputs(B, shape.vocab, dev)
        if tq:
            cache = TurboQuantCache(model, max_cache_len=max_len, batch_size=B)
            set_length(cache, context)
            nbytes = cache_nbytes(cache)
        else:
            cache = StaticCache(config=model.config, max_cache_len=max_len)
            with torch.no_grad():
                model(tok, position_ids=pos, past_key_values=cache, use_cache=True)  # allocates
            _fill_static(cache, context)
            nbytes = _tensor_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
        pos.fill_(context)

        def step():
            with torch.no_grad():
                model(tok, position_ids=pos, past_key_values=cache, use_cache=True)

        return cache, nbytes, step

    def workspace(B: int) -> tuple[int, int]:
        cache, nbytes, step = make(B)
        step()  # first call: kernels compiled, lazy buffers made
        base = _reset_peak(dev)
        step()
        ws = _peak(dev) - base
        del cache, step
        _cleanup(dev)
        return nbytes, ws

    try:
        kv1, ws1 = workspace(1)
        kv8, ws8 = workspace(8)
        fixed, slope = fit_workspace({1: ws1, 8: ws8})
        per_row_kv = kv8 / 8  # measured; kv1 is the same per row up to rounding
        computed = capacity_batch(free, int(per_row_kv), fixed, slope, run.cfg.capacity_headroom)
        res = dict(model=name, method=method, context=context, free_bytes=free, kv_bytes_b1=kv1, kv_bytes_b8=kv8,
                   kv_bytes_per_row=per_row_kv, workspace_b1=ws1, workspace_b8=ws8, workspace_fixed=fixed,
                   workspace_per_row=slope, headroom=run.cfg.capacity_headroom, computed_batch=computed)
        tried = []
        verified = None
        B = computed
        for _ in range(6):
            if B < 1:
                break
            try:
                cache, _, step = make(B)
                step()
                _sync(dev)
                tried.append({"batch": B, "ok": True})
                verified = B
                del cache, step
                _cleanup(dev)
                break
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                tried.append({"batch": B, "ok": False})
                _cleanup(dev)
                B = int(B * 0.97)
        res.update(verified_batch=verified, verify_tries=tried, computed_held=bool(tried and tried[0]["ok"]),
                   verify_how="allocate the cache at the batch, one eager decode step at n = context")
        return res
    finally:
        if tq:
            tqpatch.unapply(model)
        _cleanup(dev)


def _suite_capacity(run: _Run, model, name: str) -> None:
    dev = run.device
    if dev.type != "cuda":
        run.skip(f"capacity {name}", "needs CUDA (free device memory)")
        return
    context = run.cfg.capacity_context
    free = _free_bytes(dev)
    rows = {}
    for method in ("tq4", "tq3", "static"):
        try:
            rows[method] = _capacity_method(run, model, name, method, context, free)
            run.add("capacity", rows[method])
        except Exception as exc:
            run.error(f"capacity {name} {method}", exc)
    base = rows.get("static", {}).get("verified_batch")
    for method in ("tq4", "tq3"):
        r = rows.get(method)
        if r and base:
            r["ratio_vs_bf16_verified"] = (r["verified_batch"] or 0) / base
            r["ratio_vs_bf16_computed"] = r["computed_batch"] / max(1, rows["static"]["computed_batch"])
            r["goal_ratio_ge_3.5"] = r["ratio_vs_bf16_verified"] >= 3.5
    run.save(plots=False)


# ------------------------------------------------------------------------------------------------
# Suite: prefill
# ------------------------------------------------------------------------------------------------
def _suite_prefill(run: _Run, model, name: str) -> None:
    """Prefill B=1 prompts: bf16 in one forward (what HF does by default), bf16 fed in model-level
    chunks (HF's ``prefill_chunk_size``), and tqpatch 4-bit fed in the same chunks (each chunk
    attends to the compressed history; activations and attention transients are per chunk)."""
    import tqpatch
    from transformers import DynamicCache

    from .cache import TurboQuantCache, cache_nbytes
    from .patch import DEFAULT_PREFILL_CHUNK

    dev = run.device
    shape = MODEL_SHAPES[name]
    weights = _tensor_bytes(model.parameters())
    chunk = DEFAULT_PREFILL_CHUNK
    for method in ("tq4", "bf16", "bf16-chunked"):
        if method == "tq4":
            tqpatch.apply(model, key_bits=4, value_bits=4)
        try:
            def forward(ids):
                cache = (TurboQuantCache(model, max_cache_len=ids.shape[1] + 64, batch_size=1) if method == "tq4"
                         else DynamicCache())
                step = ids.shape[1] if method == "bf16" else chunk
                base = _reset_peak(dev)
                _sync(dev)
                t0 = time.perf_counter()
                with torch.no_grad():
                    for lo in range(0, ids.shape[1], step):
                        model(ids[:, lo:lo + step], past_key_values=cache, use_cache=True, logits_to_keep=1)
                _sync(dev)
                sec = time.perf_counter() - t0
                peak = _peak(dev)
                kv = cache_nbytes(cache) if method == "tq4" else _tensor_bytes(
                    [t for layer in cache.layers for t in (layer.keys, layer.values)])
                return sec, peak, base, kv

            warm = min(1024, *run.cfg.prefill_lengths)
            forward(torch.randint(0, shape.vocab, (1, warm), device=dev))  # warm-up: kernels, cuBLAS
            _cleanup(dev)
            for L in run.cfg.prefill_lengths:
                ids = torch.randint(0, shape.vocab, (1, L), device=dev)
                try:
                    runs = [forward(ids) for _ in range(2)]  # the first pays one-off costs (allocator, kernels)
                    sec, peak, base, kv = min(runs, key=lambda r: r[0])
                    run.add("prefill", dict(model=name, method=method, prompt=L, batch=1, status="ok", seconds=sec,
                                            seconds_runs=[r[0] for r in runs],
                                            tokens_per_s=L / sec, peak_memory_bytes=peak, weights_bytes=weights,
                                            peak_above_weights=(peak - weights) if peak else None, kv_bytes=kv,
                                            prefill_chunk=None if method == "bf16" else chunk))
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    run.add("prefill", dict(model=name, method=method, prompt=L, batch=1, status="OOM"))
                finally:
                    del ids
                    _cleanup(dev)
        except Exception as exc:
            run.error(f"prefill {name} {method}", exc)
        finally:
            if tqpatch.is_patched(model):
                tqpatch.unapply(model)
            _cleanup(dev)
    for L in run.cfg.prefill_lengths:  # the goal: tqpatch <= 10% slower than bf16 in one forward
        rows = {r["method"]: r for r in run.result.get("prefill", {}).get("rows", [])
                if r["model"] == name and r["prompt"] == L and r.get("status") == "ok"}
        if "tq4" in rows and "bf16" in rows:
            rows["tq4"]["slowdown_vs_bf16"] = rows["tq4"]["seconds"] / rows["bf16"]["seconds"] - 1
            rows["tq4"]["goal_slowdown_le_10pct"] = rows["tq4"]["slowdown_vs_bf16"] <= 0.10
    run.save(plots=False)


# ------------------------------------------------------------------------------------------------
# --profile
# ------------------------------------------------------------------------------------------------
def run_profile(run: _Run, context: int) -> None:
    """torch.profiler over 5 compiled tqpatch 4-bit steps of the first model: the kernel table."""
    import tqpatch
    from .cache import TurboQuantCache

    cfg, dev = run.cfg, run.device
    name = cfg.models[0]
    shape = MODEL_SHAPES[name]
    B = cfg.batches[0]
    model = build_model(name, dev)
    tqpatch.apply(model, key_bits=4, value_bits=4)
    # the e2e allocation, so a warm machine's compile caches serve both
    cache = TurboQuantCache(model, max_cache_len=max(max(cfg.contexts), context) + _margin(cfg), batch_size=B)
    fill_random(cache, context)
    tok, pos = _step_inputs(B, shape.vocab, dev)
    pos.fill_(context)
    step = _compile(_step_fn(model, cache), cfg.compiled, cfg.step_graph)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.no_grad():
        compile_s, _ = _first_calls(step, tok, pos, dev)
        set_length(cache, context)
        t = _timed(step, tok, pos, dev, 20)
        set_length(cache, context)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(5):
                _mark_step()
                step(tok, pos)
            _sync(dev)
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=90)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile_{name}_b{B}_{context}.txt"
    path.write_text(f"# {name}, tqpatch 4-bit, batch {B}, context {context}, 5 compiled steps\n"
                    f"# ms/step {t['ms']:.3f} (median of 20), compile {compile_s:.1f} s\n\n{table}\n",
                    encoding="utf-8")
    run.result["profile"] = dict(model=name, batch=B, context=context, ms=t["ms"], compile_s=round(compile_s, 2),
                                 table_file=path.name)
    logger.info("profile: %s ms/step, table in %s", f"{t['ms']:.3f}", path)
    del model, cache, step
    _cleanup(dev, reset_dynamo=True)


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the selected suites (see the module docs) and write the outputs; returns the result."""
    from tqdm.auto import tqdm

    cfg.validate()
    run = _Run(cfg)
    dev = run.device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available: run on a GPU machine or pass --device cpu (smoke runs)")
    logger.info("tqpatch bench: %s", json.dumps(run.result["environment"]))
    suites = cfg.suites
    model_suites = [s for s in ("e2e", "encode", "capacity", "prefill") if s in suites]
    total = int("correctness" in suites) + int("kernel" in suites) + len(model_suites) * len(cfg.models) \
        + int(bool(cfg.profile))
    with tqdm(total=total, desc="bench", unit="part", disable=not cfg.progress) as bar:
        if "correctness" in suites:
            bar.set_postfix_str("correctness")
            if run.allows("correctness", run.estimate("small")):
                _suite_correctness(run)
            bar.update(1)
        if "kernel" in suites:
            bar.set_postfix_str("kernel")
            try:
                _suite_kernel(run)
            except Exception as exc:
                run.error("kernel", exc)
            bar.update(1)
        for name in cfg.models if model_suites else ():
            model = None
            try:
                bar.set_postfix_str(f"{name}: building")
                model = build_model(name, dev)
                run.result.setdefault("models", {})[name] = dict(
                    dataclasses.asdict(MODEL_SHAPES[name]), weights_bytes=_tensor_bytes(model.parameters()))
                if "capacity" in suites:
                    bar.set_postfix_str(f"{name}: capacity")
                    if run.allows(f"capacity {name}", 60):
                        _suite_capacity(run, model, name)
                    bar.update(1)
                if "prefill" in suites:
                    bar.set_postfix_str(f"{name}: prefill")
                    if run.allows(f"prefill {name}", 60):
                        _suite_prefill(run, model, name)
                    bar.update(1)
                if "e2e" in suites or "encode" in suites:
                    bar.set_postfix_str(f"{name}: e2e")
                    _suite_e2e(run, model, name)
                    bar.update(int("e2e" in suites) + int("encode" in suites))
            except Exception as exc:
                run.error(f"model {name}", exc)
            finally:
                del model
                _cleanup(dev, reset_dynamo=True)
        if cfg.profile:
            bar.set_postfix_str("profile")
            try:
                run_profile(run, cfg.profile)
            except Exception as exc:
                run.error("profile", exc)
            bar.update(1)
    paths = run.save(plots=True)
    logger.info("wrote %s", ", ".join(map(str, paths)))
    return run.result


# ------------------------------------------------------------------------------------------------
# Output: JSON, Markdown, plots
# ------------------------------------------------------------------------------------------------
_REQUIRED = {
    "e2e": ("model", "method", "batch", "context", "status"),
    "kernel": ("bits", "B", "T", "status"),
    "prefill": ("model", "method", "prompt", "status"),
}


def validate_result(result: dict[str, Any]) -> list[str]:
    """Problems with a result dict's shape (empty when it follows :data:`SCHEMA`)."""
    problems = []
    if result.get("schema") != SCHEMA:
        problems.append(f"schema is {result.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("environment", "config", "suites", "skipped", "errors"):
        if key not in result:
            problems.append(f"missing {key!r}")
    env = result.get("environment", {})
    for key in ("command", "git_commit", "torch", "transformers", "card", "device"):
        if key not in env:
            problems.append(f"environment lacks {key!r}")
    for sec, keys in _REQUIRED.items():
        for i, row in enumerate(result.get(sec, {}).get("rows", [])):
            for k in keys:
                if k not in row:
                    problems.append(f"{sec}.rows[{i}] lacks {k!r}")
            if row.get("status") == "ok":
                need = {"e2e": "ms", "kernel": "kernel_us", "prefill": "seconds"}[sec]
                if not isinstance(row.get(need), (int, float)):
                    problems.append(f"{sec}.rows[{i}] is ok but {need!r} is not a number")
    for i, row in enumerate(result.get("capacity", {}).get("rows", [])):
        for k in ("model", "method", "context", "computed_batch", "verified_batch"):
            if k not in row:
                problems.append(f"capacity.rows[{i}] lacks {k!r}")
    try:
        json.dumps(result)
    except (TypeError, ValueError) as exc:
        problems.append(f"not JSON-serialisable: {exc}")
    return problems


_RUN_KEYS = ("schema", "environment", "config", "suites", "skipped", "errors", "seconds", "runs")


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from several runs (e.g. one per device call): rows are concatenated, the
    environment of each run is kept in ``runs``."""
    if not results:
        raise ValueError("nothing to merge")
    merged: dict[str, Any] = {"schema": SCHEMA, "environment": dict(results[0]["environment"]),
                              "config": results[0].get("config", {}), "suites": [], "skipped": [], "errors": [],
                              "seconds": 0.0, "runs": []}
    merged["environment"]["command"] = " ; ".join(r["environment"].get("command") or "" for r in results)
    for r in results:
        merged["runs"].append(dict(environment=r["environment"], suites=r.get("suites"), seconds=r.get("seconds")))
        merged["suites"] += [s for s in r.get("suites", []) if s not in merged["suites"]]
        merged["skipped"] += r.get("skipped", [])
        merged["errors"] += r.get("errors", [])
        merged["seconds"] += r.get("seconds") or 0.0
        for key, val in r.items():
            if key in _RUN_KEYS:
                continue
            if key == "models":
                merged.setdefault("models", {}).update(val)
            elif isinstance(val, dict):
                dst = merged.setdefault(key, {})
                for k, v in val.items():
                    if isinstance(v, list):
                        dst.setdefault(k, []).extend(v)
                    else:
                        dst.setdefault(k, v)
            else:
                merged.setdefault(key, val)
    cards = {r["environment"].get("card") for r in results}
    if len(cards) > 1:
        merged["environment"]["card"] = " / ".join(sorted(str(c) for c in cards))
        merged["errors"].append({"what": "merge", "error": f"runs on different cards: {sorted(map(str, cards))}"})
    return merged


def _f(v: Any, spec: str = ".2f", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def _gb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e9:.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _method_label(m: str) -> str:
    return {"tq4": "tqpatch 4-bit", "tq3": "tqpatch 3-bit", "tq2": "tqpatch 2-bit",
            "static": "HF StaticCache bf16 + compile", "dynamic": "HF DynamicCache bf16 eager",
            "bf16": "bf16 DynamicCache (sdpa), one forward",
            "bf16-chunked": "bf16 DynamicCache (sdpa), chunked"}.get(m, m)


def format_markdown(result: dict[str, Any]) -> str:
    """The Markdown report of a result."""
    e = result["environment"]
    commit = (e.get("git_commit") or "unknown") + (" (with uncommitted changes)" if e.get("git_dirty") else "")
    lines = ["# tqpatch bench", "",
             f"- card: {e.get('card')} ({e.get('device')}" + (f", {e['sm_count']} SMs" if e.get("sm_count") else "") + ")",
             f"- torch {e.get('torch')} (CUDA {e.get('cuda')}), triton {e.get('triton')}, "
             f"transformers {e.get('transformers')}, python {e.get('python')}, tqpatch {e.get('tqpatch')}",
             f"- commit: {commit}",
             f"- command: `{e.get('command')}`",
             f"- date: {e.get('date_utc')}; total time {result.get('seconds', 0):.0f} s",
             f"- suites: {', '.join(result.get('suites', []))}", ""]
    corr = result.get("correctness")
    if corr:
        lines += ["## Correctness", ""]
        if corr.get("e2e"):
            c = corr["e2e"]
            lines += [f"{c.get('model')}, {c.get('dtype')} logits over 44 decode steps (relative error): "
                      f"eager Triton vs torch reference {_f(c.get('eager_triton_vs_torch_reference'), '.2e')}; "
                      f"compiled (CUDA graphs) vs eager {_f(c.get('compiled_vs_eager'), '.2e')}. "
                      f"Chunked prefill (64-token chunks over 300 tokens), fused SDPA path "
                      f"({c.get('fused_attention_backend', '-')}) vs reference path: "
                      f"{_f(c.get('fused_prefill_vs_reference'), '.2e')}.", ""]
    k = result.get("kernel")
    if k and k.get("rows"):
        lines += ["## Decode attention kernel", "",
                  f"Shape: {k.get('shape')}. Timer: {k.get('timer')}. Device-to-device copy: "
                  f"{_f(k.get('copy', {}).get('GBps'), '.0f')} GB/s (read + write). 'MB read' = K and V codes plus "
                  "fp16 scales (the kernel) vs bf16 K/V (SDPA, `enable_gqa=True`).", ""]
        rows = []
        for r in k["rows"]:
            if r.get("status") != "ok":
                rows.append([str(r["bits"]), str(r["B"]), str(r["T"]), r.get("status", "?")] + [""] * 8)
                continue
            rows.append([str(r["bits"]), str(r["B"]), str(r["T"]), _f(r["kernel_us"], ".1f"),
                         _f(r["sdpa_bf16_us"], ".1f", "OOM"), _f(r["bytes"] / 1e6, ".1f"),
                         _f(r["sdpa_bytes"] / 1e6, ".1f"), _f(r["GBps"], ".0f"), _f(r["pct_copy"], ".0f") + "%",
                         _f(r.get("sdpa_GBps"), ".0f"), _f(r["ratio_vs_sdpa"], ".3f"), _f(r["kernel_eager_us"], ".1f")])
        lines += _table(["bits", "B", "T", "kernel µs", "SDPA bf16 µs", "MB read", "SDPA MB read", "GB/s",
                         "% of copy", "SDPA GB/s", "kernel / SDPA", "kernel µs, eager call"], rows)
        lines += ["", f"Goals: {k.get('goals')}", ""]
    if k and k.get("check"):
        kc = k["check"]
        lines += [f"Triton kernel vs `history_attention` (float32): {sum(r['ok'] for r in kc)}/{len(kc)} variants "
                  "within 1e-3 (out and lse, queries x1/x4; x8 reported).", ""]
        lines += _table(["K bits", "V bits", "d", "G", "ring", "softcap", "lut", "out", "lse", "ok", "out (q x8)",
                         "lse (q x8)"],
                        [[str(r["key_bits"]), str(r["value_bits"]), str(r["d"]), str(r["G"]), str(r["ring"]),
                          str(r["softcap"]), r["lut"], _f(r["max_rel_err_out"], ".1e"),
                          _f(r["max_rel_err_lse"], ".1e"), _f(r["ok"]), _f(r["q_x8_rel_err_out"], ".1e"),
                          _f(r["q_x8_rel_err_lse"], ".1e")] for r in kc]) + [""]
    e2e = result.get("e2e", {})
    if e2e.get("rows"):
        lines += ["## Decode step (random-weight models, bf16)", "",
                  "ms per decode step (median; CUDA events), one new token per row. tqpatch: one compiled step per "
                  "(model, bits, batch), allocated for the largest context, every context by setting the device-side "
                  "length. Static: allocation = context + margin, one compile per point. Dynamic: eager. K/V bytes "
                  "are measured allocations at the context (static: its allocation, context + margin); peak = max_memory_allocated over the timed steps "
                  "(tqpatch: with its allocation for the largest context; 'est.' = that minus the unused positions). "
                  "host ms (CUDA): median wall time until the step call returns (guards, graph replay), included in "
                  "ms/step. " + ("Steps (tqpatch and static): compiled with fullgraph=True and replayed as one captured "
                                 "CUDA graph (tqpatch.compile_step; no guard evaluation per call)."
                                 if result.get("config", {}).get("step_graph") else
                                 "Steps: torch.compile(fullgraph=True, mode='reduce-overhead') (CUDA graph trees)."),
                  ""]
        rows = []
        for r in sorted(e2e["rows"], key=lambda r: (r["model"], r["batch"], r.get("context") or 0, r["method"])):
            ok = r.get("status") == "ok"
            label = _method_label(r["method"]) + (" (not compiled)" if r["method"] != "dynamic"
                                                  and r.get("compiled") is False else "")
            rows.append([r["model"], label, str(r["batch"]), _f(r.get("context"), "d"),
                         _f(r.get("ms")) if ok else r.get("status", "?"), _f(r.get("ms_p10")), _f(r.get("ms_p90")),
                         _f(r.get("host_ms")), _f(r.get("tokens_per_s"), ".0f"), _gb(r.get("kv_bytes")),
                         _gb(r.get("peak_memory_bytes")), _gb(r.get("peak_memory_bytes_at_context_est")),
                         _f(r.get("compile_s"), ".0f")])
        lines += _table(["model", "method", "B", "context", "ms/step", "p10", "p90", "host ms", "tokens/s", "K/V GB",
                         "peak GB", "peak GB (est.)", "compile s"], rows)
        comp = e2e.get("compiles", [])
        if comp:
            lines += ["", "Compiles (tqpatch): " + "; ".join(
                f"{c['model']} {c['method']} B={c['batch']}: {c['compile_s']:.0f} s, recompiles over "
                f"{len(c['contexts'])} contexts: {c['recompiles_over_contexts']}" for c in comp)]
        lines += [""]
    if e2e.get("generate"):
        lines += ["### generate() at B=1", "", "decode tokens/s = (new tokens - 1) / (t(new) - t(1)).", ""]
        lines += _table(["model", "method", "prompt", "new", "total s", "prefill+1 s", "decode tokens/s"],
                        [[r["model"], _method_label(r["method"]), str(r["prompt"]), str(r.get("new_tokens", "")),
                          _f(r.get("seconds_total")), _f(r.get("seconds_prefill_plus_1")),
                          _f(r.get("decode_tokens_per_s"), ".1f") if r.get("status") == "ok" else r.get("status")]
                         for r in e2e["generate"]]) + [""]
    cap = result.get("capacity", {})
    if cap.get("rows"):
        lines += ["## Capacity", "",
                  "Largest batch at the context that fits free memory after the model: computed = (free - fixed "
                  "workspace - headroom) / (K/V bytes per row + workspace per row), from a measured B=8 cache and "
                  "eager decode-step workspace at B=1 and B=8; verified = allocated and one eager decode step ran.", ""]
        lines += _table(["model", "method", "context", "free GB", "K/V MB/row", "ws fixed MB", "ws MB/row",
                         "computed", "verified", "x bf16 (verified)"],
                        [[r["model"], _method_label(r["method"]), str(r["context"]), _gb(r["free_bytes"]),
                          _f(r["kv_bytes_per_row"] / 1e6, ".1f"), _f(r["workspace_fixed"] / 1e6, ".0f"),
                          _f(r["workspace_per_row"] / 1e6, ".1f"), str(r["computed_batch"]),
                          _f(r.get("verified_batch"), "d", "none"), _f(r.get("ratio_vs_bf16_verified"), ".2f")]
                         for r in cap["rows"]]) + [""]
    pre = result.get("prefill", {})
    if pre.get("rows"):
        lines += ["## Prefill (eager, B=1, logits_to_keep=1; chunked = model-level chunks of "
                  f"{pre['rows'][0].get('prefill_chunk') or 4096} tokens; the faster of 2 runs)", ""]
        lines += _table(["model", "method", "prompt", "seconds", "tokens/s", "vs bf16 one forward", "peak GB",
                         "peak above weights GB", "K/V GB"],
                        [[r["model"], _method_label(r["method"]), str(r["prompt"]),
                          _f(r.get("seconds")) if r.get("status") == "ok" else r.get("status"),
                          _f(r.get("tokens_per_s"), ".0f"),
                          _f(100 * r["slowdown_vs_bf16"], "+.1f") + "%" if r.get("slowdown_vs_bf16") is not None else "-",
                          _gb(r.get("peak_memory_bytes")),
                          _gb(r.get("peak_above_weights")), _gb(r.get("kv_bytes"))] for r in pre["rows"]]) + [""]
    enc = result.get("encode", {})
    if enc.get("rows"):
        lines += ["## Encode cost per decode step", ""]
        lines += [enc["rows"][0].get("how", ""), ""]
        rows = []
        for r in enc["rows"]:
            share = ", ".join(f"{c}: {100 * s:.1f}%" for c, s in r.get("share_of_step", {}).items())
            extra = ""
            if isinstance(r.get("store_ms_in_step"), dict):
                extra = ", ".join(f"{c}: {v:.3f}" for c, v in r["store_ms_in_step"].items())
            rows.append([r["model"], _method_label(r["method"]), str(r["batch"]), _f(r["store_ms"], ".3f"), share,
                         extra or "-"])
        lines += _table(["model", "method", "B", "store ms (all layers)", "share of step by context",
                         "in-step ms (ablation)"], rows) + [""]
    if result.get("profile"):
        p = result["profile"]
        lines += ["## Profile", "", f"{p['model']} B={p['batch']} context {p['context']}: {p['ms']:.3f} ms/step; "
                  f"kernel table in `{p['table_file']}`.", ""]
    if result.get("skipped"):
        lines += ["## Skipped", ""] + [f"- {s['what']}: {s['why']}" for s in result["skipped"]] + [""]
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {s['what']}: `{s['error'][:300]}`" for s in result["errors"]] + [""]
    return "\n".join(lines)


def write_plots(result: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """PNG plots (matplotlib, Agg): ms/step vs context and memory vs context per model; kernel µs
    vs length. Returns the paths written (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plotting is optional
        logger.warning("matplotlib is not installed: no plots")
        return []
    paths = []
    rows = [r for r in result.get("e2e", {}).get("rows", []) if r.get("status") == "ok" and r.get("context")]
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        series: dict[tuple[str, int], list] = {}
        for r in mine:
            series.setdefault((r["method"], r["batch"]), []).append(r)
        for what, ylabel, fname in (("ms", "ms per decode step", "ms_vs_context"),
                                    ("memory", "GB", "memory_vs_context")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for (method, B), pts in sorted(series.items()):
                pts = sorted(pts, key=lambda r: r["context"])
                xs = [p["context"] for p in pts]
                if what == "ms":
                    ax.plot(xs, [p["ms"] for p in pts], marker="o", label=f"{_method_label(method)}, B={B}")
                else:
                    ax.plot(xs, [(p.get("kv_bytes") or 0) / 1e9 for p in pts], marker="o",
                            label=f"K/V {_method_label(method)}, B={B}")
                    peak = [p.get("peak_memory_bytes_at_context_est") or p.get("peak_memory_bytes") for p in pts]
                    if all(v for v in peak):
                        ax.plot(xs, [v / 1e9 for v in peak], marker="x", linestyle="--",
                                label=f"peak {_method_label(method)}, B={B}")
            paths.append(_finish_plot(plt, fig, ax, "context (tokens)", ylabel,
                                      f"{model} ({result['environment'].get('card')})", out / f"{stem}_{fname}_{model}.png"))
    krows = [r for r in result.get("kernel", {}).get("rows", []) if r.get("status") == "ok"]
    if krows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for bits in sorted({r["bits"] for r in krows}):
            for B in sorted({r["B"] for r in krows}):
                pts = sorted([r for r in krows if r["bits"] == bits and r["B"] == B], key=lambda r: r["T"])
                if pts:
                    ax.plot([p["T"] for p in pts], [p["kernel_us"] for p in pts], marker="o", label=f"{bits}-bit B={B}")
        for B in sorted({r["B"] for r in krows}):
            pts = sorted({r["T"]: r for r in krows if r["B"] == B and r.get("sdpa_bf16_us")}.values(),
                         key=lambda r: r["T"])
            if pts:
                ax.plot([p["T"] for p in pts], [p["sdpa_bf16_us"] for p in pts], linestyle="--", marker="x",
                        label=f"SDPA bf16 B={B}")
        ax.set_yscale("log")
        paths.append(_finish_plot(plt, fig, ax, "T (tokens)", "µs per call",
                                  f"decode attention ({result['environment'].get('card')})",
                                  out / f"{stem}_kernel_us_vs_length.png"))
    return paths


def _finish_plot(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: Path) -> Path:
    """Log-2 x axis, labels, grid and legend; save ``path`` and close the figure."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: dict[str, Any], out_dir: str | os.PathLike[str], stem: str = "bench",
                  plots: bool = True) -> list[Path]:
    """Write ``<stem>.json``, ``<stem>.md`` (and the plots) into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _jsonable(result)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    tmp = paths[0].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=1) + "\n", encoding="utf-8")
    tmp.replace(paths[0])
    paths[1].write_text(format_markdown(clean), encoding="utf-8")
    if plots:
        paths += write_plots(clean, out, stem)
    return paths


# ------------------------------------------------------------------------------------------------
# Command line (registered by tqpatch.cli)
# ------------------------------------------------------------------------------------------------
def add_arguments(p) -> None:
    """The ``tqpatch bench`` options (defaults None: ``--quick`` fills the reduced grid)."""
    p.add_argument("--suite", default=None,
                   help=f"comma-separated suites, from {','.join(SUITES)} (default: all)")
    p.add_argument("--models", default=None, help="comma-separated: llama-3.1-8b,qwen2.5-7b (tiny-llama, tiny-qwen2 "
                                                  "for CPU smoke runs)")
    p.add_argument("--batches", default=None, help="batch sizes (default 1,8,32)")
    p.add_argument("--contexts", default=None, help="decode contexts (default 1024,8192,32768; 1k/32k accepted)")
    p.add_argument("--methods", default=None, help="tq4,tq3,static,dynamic (default all)")
    p.add_argument("--static-batches", default=None,
                   help="batches at which the StaticCache baseline is compiled, one compile per context "
                        "(default 1)")
    p.add_argument("--kernel-bits", default=None, help="kernel suite bit widths (default 4,3,2)")
    p.add_argument("--kernel-lengths", default=None, help="kernel suite lengths (default 1024,8192,32768,131072)")
    p.add_argument("--no-kernel-check", action="store_true",
                   help="kernel suite: skip the kernel-vs-reference check (timing only)")
    p.add_argument("--kernel-sweep", action="store_true", help="kernel suite: also sweep launch configurations")
    p.add_argument("--capacity-context", type=int, default=None, help="capacity suite context (default 32768)")
    p.add_argument("--prefill-lengths", default=None, help="prefill prompts (default 8192,32768)")
    p.add_argument("--encode-ablation", action="store_true",
                   help="encode suite: also compile the step without the store (one more compile per batch)")
    p.add_argument("--generate", action="store_true",
                   help="e2e: also time model.generate at B=1 (tqpatch eager, static with generate's compile)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per point (default 30)")
    p.add_argument("--profile", type=int, default=0, metavar="CONTEXT",
                   help="profile 5 compiled tqpatch 4-bit steps of the first model at CONTEXT (kernel table); "
                        "alone unless --suite is given")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="skip work (recorded as skipped) that would end past this many seconds, estimating "
                        "compiles from those already measured in the run (0: no limit)")
    p.add_argument("--quick", action="store_true",
                   help="reduced grid: llama only, batches 1,8, contexts 1K,32K, tq4 + bf16 baselines, 4-bit kernel "
                        "at 8K/32K, no kernel check, prefill 32K only, 20 steps")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (debugging: eager, tiny models)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the decode steps (auto: on CUDA only)")
    p.add_argument("--step-graph", action="store_true",
                   help="compile the decode steps (tqpatch's and the static baseline's) without CUDA graph trees and "
                        "replay each as one captured CUDA graph (tqpatch.compile_step) instead of "
                        "mode='reduce-overhead'")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--stem", default="", help="output file stem (default bench_<suites>)")
    p.add_argument("--commit", default="", help="commit to record (default $TQPATCH_COMMIT or git rev-parse HEAD)")
    p.add_argument("--from-json", nargs="+", metavar="FILE",
                   help="measure nothing: merge these result files and write JSON, Markdown and plots to --out")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def config_from_args(args) -> BenchConfig:
    """A :class:`BenchConfig` from parsed ``tqpatch bench`` arguments."""
    def tup(text, conv=parse_ints):
        return None if text is None else tuple(conv(text))

    def names(text):
        return [v.strip() for v in text.split(",") if v.strip()]

    given = {
        "suites": tup(args.suite, names), "models": tup(args.models, names), "batches": tup(args.batches),
        "contexts": tup(args.contexts), "methods": tup(args.methods, names),
        "static_batches": tup(args.static_batches), "kernel_bits": tup(args.kernel_bits),
        "kernel_lengths": tup(args.kernel_lengths), "capacity_context": args.capacity_context,
        "prefill_lengths": tup(args.prefill_lengths), "steps": args.steps,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if args.profile and args.suite is None:
        given["suites"] = ()
    flags = dict(kernel_sweep=args.kernel_sweep, encode_ablation=args.encode_ablation, generate=args.generate,
                 profile=args.profile, budget_s=args.budget_s, device=args.device,
                 compile={"auto": None, "on": True, "off": False}[args.compile], step_graph=args.step_graph,
                 out=args.out, stem=args.stem,
                 commit=args.commit, command=getattr(args, "command_line", ""), progress=not args.no_progress)
    if args.no_kernel_check:
        flags["kernel_check"] = False
    if args.quick:
        return BenchConfig.quick(**given, **flags)
    return BenchConfig(**given, **flags)


def run_from_args(args) -> tuple[int, list[Path]]:
    """The ``tqpatch bench`` runner: ``(exit status, paths written)``. Raises ``ValueError`` for bad
    options (the CLI prints it). Status 1 when a measurement raised (listed under ``errors``)."""
    if args.from_json:
        results = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.from_json]
        merged = merge_results(results)
        for problem in validate_result(merged):
            logger.warning("merged result: %s", problem)
        return 0, write_outputs(merged, args.out, args.stem or "bench_merged")
    cfg = config_from_args(args)
    cfg.validate()
    result = run_bench(cfg)
    stem = cfg.output_stem()
    out = Path(cfg.out)
    paths = sorted(p for p in out.glob(f"{stem}*") if p.suffix in (".json", ".md", ".png"))
    paths += sorted(out.glob("profile_*.txt")) if cfg.profile else []
    return (1 if result["errors"] else 0), paths
