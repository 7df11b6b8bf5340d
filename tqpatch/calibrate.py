"""Calibration: per-layer key/value bits for one model, chosen by measured sensitivity.

:func:`calibrate` runs the model on calibration text and

1. collects key/value statistics over every token of every segment (per layer and KV head): the
   median key and value norms, which flag outlier layers (norms far from the model's median),
   and the per-channel key RMS, which gives the key-smoothing scale ``D = rms^0.5`` (design.md);
2. measures sensitivity: the mean KL(unquantized || quantized) of the next-token distributions of
   a chunk of text that attends to a history in which *one* layer's keys (or values) are
   quantized at ``b`` bits, for every layer, side and measured bit width (and, for keys, with and
   without smoothing, keeping whichever is lower);
3. finds outlier channels per layer, side and head (the largest RMS over every calibration token;
   keys as stored, i.e. smoothed where smoothing won) and their share of the energy, for the
   fractional-bit option of the paper's outlier-channel split (``outlier_fraction`` of the
   channels one bit above the rest; its KL is estimated from the measured widths by the split's
   relative distortion);
4. allocates bits under the average-bits budget (codes and the fp16 scales of every vector
   counted; a layer kept in bf16 costs 16) by a Lagrangian over per-layer options, then greedily
   spends what is left, assuming per-layer KLs add up; this is done with and without split
   options, the joint KL of both allocations is measured on the calibration chunk and the lower
   is kept (both stored in the provenance), next to a uniform recipe's KL in ``quality``.

Why this is cheap: a prompt's prefill is exact whatever the cache stores, so the prompt runs once
and every candidate only re-runs the chunk over the prefill's K/V with one layer quantized ->
dequantized (the reference semantics of tqpatch's attention: ordinary attention over the
reconstruction equals rotated-domain attention over the codes). The full-precision window of the
most recent ``window`` prompt tokens is honoured. Bits above the largest measured width are
extrapolated from it by the codebooks' distortion ratio (recorded in the provenance).

Without ``texts`` a bundled text is used (``tqpatch/data/calibration.txt``: original prose,
dialogue, code and instructions written for this), so a default recipe has never seen an
evaluation text.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicCache

from .codebook import distortion
from .quantizer import TurboQuantizer
from .recipe import BF16_BITS, Recipe, _model_shape
from .split import HeadSplit

__all__ = ["CalibrationConfig", "Sensitivity", "calibrate", "default_texts", "measure_sensitivity"]

logger = logging.getLogger(__name__)

#: The text used when :func:`calibrate` gets none: original mixed-register prose, dialogue, code
#: and instructions written for this purpose (so no evaluation text is ever calibrated on).
DEFAULT_TEXT = "data/calibration.txt"


def default_texts() -> list[str]:
    """The bundled calibration text (about 1.5K tokens)."""
    return [importlib.resources.files("tqpatch").joinpath(DEFAULT_TEXT).read_text(encoding="utf-8")]


@dataclass
class CalibrationConfig:
    """Settings of :func:`calibrate` (all recorded in the recipe's provenance).

    Attributes:
        target_bits: average stored bits per K/V value, codes and scales counted (bf16 layers 16).
        candidate_bits: bit widths a layer side may get (a layer may also be kept in bf16 when
            ``allow_bf16_layers``).
        measured_bits: widths whose sensitivity is measured; the others are interpolated between
            them (log KL linear in log codebook distortion) or extrapolated from the nearest one
            by the distortion ratio.
        allow_bf16_layers: let the allocation keep a whole layer in bf16 (costs 16 bits).
        key_smoothing: measure key smoothing per layer and keep it where it lowers the KL.
        window: full-precision recent tokens per layer (also honoured during calibration).
        segments, prompt_len, chunk_len: ``segments`` pieces of text of ``prompt_len`` tokens of
            history followed by ``chunk_len`` scored tokens.
        rotation: ``"haar"`` or ``"hadamard"``; seed: layer ``i`` uses rotation seed ``seed + i``.
        outlier_ratio: a layer whose median key or value norm is this many times above (or
            below) the median over layers is reported as an outlier layer.
        outlier_fraction: fractional-bit options: a layer side at ``b`` bits may instead split
            off this fraction of its channels (per head, the largest by RMS over the calibration
            tokens; rounded to a multiple of 8) at ``b + 1`` bits (the paper's outlier-channel
            split; two scales per vector counted). 0 disables splits.
    """

    target_bits: float = 4.0
    candidate_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    measured_bits: tuple[int, ...] = (2, 4)
    allow_bf16_layers: bool = True
    key_smoothing: bool = True
    window: int = 64
    segments: int = 4
    prompt_len: int = 256
    chunk_len: int = 32
    rotation: str = "haar"
    seed: int = 0
    outlier_ratio: float = 8.0
    outlier_fraction: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction must be in [0, 1), got {self.outlier_fraction}")
        if not self.candidate_bits or any(not 1 <= b <= 8 for b in self.candidate_bits):
            raise ValueError(f"candidate_bits must be bit widths in 1..8, got {self.candidate_bits}")
        if not self.measured_bits or not set(self.measured_bits) <= set(self.candidate_bits):
            raise ValueError(f"measured_bits {self.measured_bits} must be a non-empty subset of candidate_bits")
        if min(self.segments, self.prompt_len, self.chunk_len) < 1:
            raise ValueError("segments, prompt_len and chunk_len must be positive")
        if self.window >= self.prompt_len:
            raise ValueError(f"window ({self.window}) must be shorter than prompt_len ({self.prompt_len}) "
                             "or nothing is quantized during calibration")


def _outlier_count(cfg: CalibrationConfig, d: int) -> int:
    """Channels a split gives ``b + 1`` bits: ``outlier_fraction * d`` rounded to a multiple of 8
    (whole bytes at every width), or 0 when splits are off, the head is too small or the rotation is
    Hadamard (a split's parts are rarely powers of two: splits need the Haar rotation)."""
    if cfg.rotation != "haar":
        return 0
    n = 8 * round(cfg.outlier_fraction * d / 8)
    return n if 8 <= n <= d - 8 else 0


@dataclass
class _Measurements:
    key_kl: dict[int, list[float]] = field(default_factory=dict)  # bits -> per layer
    value_kl: dict[int, list[float]] = field(default_factory=dict)
    smoothing: list[bool] = field(default_factory=list)
    # splits: bits b of the rest (outliers at b + 1) -> per layer, estimated from the distortion
    key_split_kl: dict[int, list[float]] = field(default_factory=dict)
    value_split_kl: dict[int, list[float]] = field(default_factory=dict)


# -- text ------------------------------------------------------------------------------------------
def _segments_from_texts(tokenizer, texts: Sequence[str], cfg: CalibrationConfig) -> torch.Tensor:
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    need = cfg.prompt_len + cfg.chunk_len
    if ids.numel() < need * cfg.segments:
        raise ValueError(
            f"calibration text has {ids.numel()} tokens; {cfg.segments} segments of {need} need "
            f"{need * cfg.segments}. Give more text or lower segments/prompt_len/chunk_len."
        )
    starts = torch.linspace(0, ids.numel() - need, cfg.segments).long()  # spread over the text
    return torch.stack([ids[s : s + need] for s in starts.tolist()])


# -- the cheap chunk evaluation -------------------------------------------------------------------
class _Bench:
    """The exact prefill of the calibration prompts, and KL of the chunk under a quantized history."""

    def __init__(self, model, segments: torch.Tensor, cfg: CalibrationConfig):
        self.model, self.cfg = model, cfg
        dev = model.device
        self.prompt = segments[:, : cfg.prompt_len].to(dev)
        self.chunk = segments[:, cfg.prompt_len :].to(dev)
        cache = DynamicCache()
        with torch.no_grad():
            model(self.prompt, past_key_values=cache, use_cache=True)
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.ref = self._logprobs(self.keys, self.values)

    def _logprobs(self, keys, values) -> torch.Tensor:
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(keys, values)):
            cache.update(k, v, i)
        with torch.no_grad():
            logits = self.model(self.chunk, past_key_values=cache, use_cache=True).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def kl(self, keys, values) -> float:
        lq = self._logprobs(keys, values)
        return float((self.ref.exp() * (self.ref - lq)).sum(-1).mean())

    def quantized_history(self, x: torch.Tensor, q: "TurboQuantizer | HeadSplit", scale: torch.Tensor | None
                          ) -> torch.Tensor:
        """``x [B, H, P, d]`` with its first ``P - window`` tokens quantized -> dequantized (by a
        quantizer, or a layer's outlier-channel split)."""
        hist = x.shape[2] - self.cfg.window
        h = x[:, :, :hist].float()
        if scale is not None:
            h = h / scale.reshape(1, -1, 1, h.shape[-1])
        if isinstance(q, HeadSplit):
            codes, scales = q.encode(h)
            r = q.unrotate(q.dequantize_rotated(codes, scales.to(torch.float16)))  # fp16 scales, as stored
        else:
            r = q.dequantize(q.quantize(h, check_finite=False))
        if scale is not None:
            r = r * scale.reshape(1, -1, 1, h.shape[-1])
        return torch.cat([r.to(x.dtype), x[:, :, hist:]], dim=2)


def _smoothing_scale(keys: torch.Tensor) -> torch.Tensor:
    """``D = rms^0.5`` per (head, channel), normalised to geometric mean 1 per head."""
    rms = keys.float().pow(2).mean(dim=(0, 2)).sqrt().clamp_min(1e-6)  # [H, d]
    d = rms.sqrt()
    return d / d.log().mean(-1, keepdim=True).exp()


def _estimate(kl: dict[int, list[float]], bits: int, d: int) -> list[float]:
    """KL at an unmeasured width: log KL is taken linear in log codebook distortion between the
    two nearest measured widths (the distortion ratio from the nearest one outside them)."""
    if bits in kl:
        return list(kl[bits])
    return _estimate_at(kl, [distortion(d, bits)] * len(next(iter(kl.values()))), d)


def _estimate_at(kl: dict[int, list[float]], target: Sequence[float], d: int) -> list[float]:
    """Per layer ``i``, the KL at relative distortion ``target[i]`` (see :func:`_estimate`)."""
    measured = sorted(kl)  # more bits: less distortion
    dist = {b: distortion(d, b) for b in measured}
    out = []
    for i, D in enumerate(target):
        lo = max((b for b in measured if dist[b] >= D), default=None)  # the noisier side
        hi = min((b for b in measured if dist[b] < D), default=None)
        if lo is None or hi is None:
            ref = hi if lo is None else lo
            out.append(kl[ref][i] * D / dist[ref])
            continue
        t = math.log(D / dist[lo]) / math.log(dist[hi] / dist[lo])
        out.append(math.exp((1 - t) * math.log(max(kl[lo][i], 1e-12)) + t * math.log(max(kl[hi][i], 1e-12))))
    return out


def _top_channels(x: torch.Tensor, n: int, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The ``n`` channels of largest RMS per head of ``x [B, H, T, d]`` (divided by ``scale``
    first: smoothed keys) as ``[H, n]``, and the share of the energy they hold (mean over heads)."""
    x = x.float()
    if scale is not None:
        x = x / scale.reshape(1, -1, 1, x.shape[-1])
    ms = x.pow(2).mean(dim=(0, 2))  # [H, d]
    top = torch.topk(ms, n, dim=-1).indices.sort(dim=-1).values
    share = (ms.gather(-1, top).sum(-1) / ms.sum(-1).clamp_min(1e-30)).mean()
    return top, float(share)


def _split_distortion(d: int, n: int, bits: int, share: float) -> float:
    """Relative squared error of a split at ``bits`` (outliers at ``bits + 1``) for vectors whose
    outlier channels hold ``share`` of the energy (each part is quantized with its own norm)."""
    return share * distortion(n, bits + 1) + (1 - share) * distortion(d - n, bits)


# -- allocation ------------------------------------------------------------------------------------
def _side_options(kl: dict[int, list[float]], split_kl: dict[int, list[float]], layer: int, d: int, n: int
                  ) -> list[tuple[float, float, tuple[int, int]]]:
    """(bits per value, predicted KL, (bits, outlier bits or 0)) of every choice for one side."""
    opts = [(b + 16.0 / d, kl[b][layer], (b, 0)) for b in kl]  # codes + one fp16 scale per vector
    opts += [(b + n / d + 32.0 / d, split_kl[b][layer], (b, b + 1)) for b in split_kl]  # two scales
    return opts


def _options(meas: _Measurements, layer: int, cfg: CalibrationConfig, d: int) -> list[tuple]:
    """(cost in bits per value, predicted KL, key spec, value spec) of every choice for a layer;
    a spec is ``(bits, outlier bits)`` (0: no split)."""
    n = _outlier_count(cfg, d)
    keys = _side_options({b: meas.key_kl[b] for b in cfg.candidate_bits}, meas.key_split_kl, layer, d, n)
    values = _side_options({b: meas.value_kl[b] for b in cfg.candidate_bits}, meas.value_split_kl, layer, d, n)
    opts = [((kc + vc) / 2, kk + vk, ks, vs) for kc, kk, ks in keys for vc, vk, vs in values]
    if cfg.allow_bf16_layers:
        opts.append((16.0, 0.0, (BF16_BITS, 0), (BF16_BITS, 0)))
    return opts


def _allocate(meas: _Measurements, L: int, cfg: CalibrationConfig, d: int) -> list[tuple[int, int]]:
    options = [_options(meas, i, cfg, d) for i in range(L)]
    budget = cfg.target_bits * L
    cheapest = sum(min(o[0] for o in opts) for opts in options)
    if cheapest > budget + 1e-9:
        raise ValueError(
            f"target_bits={cfg.target_bits} is below the cheapest allocation ({cheapest / L:.3f} bits per value "
            f"with candidate_bits={cfg.candidate_bits} at head_dim {d}, scales counted); raise target_bits "
            "or allow fewer bits."
        )

    def pick(lam: float) -> list[tuple[float, float, int, int]]:
        return [min(opts, key=lambda o: (o[1] + lam * o[0], o[0])) for opts in options]

    lo, hi = 0.0, 1.0
    while sum(o[0] for o in pick(hi)) > budget:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(o[0] for o in pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi)
    # Spend what is left: the single-layer change with the best KL saved per bit, while it fits.
    while True:
        spent = sum(o[0] for o in chosen)
        best, best_gain = None, 0.0
        for i, opts in enumerate(options):
            for o in opts:
                extra = o[0] - chosen[i][0]
                saved = chosen[i][1] - o[1]
                if saved > 0 and spent + extra <= budget + 1e-9:
                    gain = saved / max(extra, 1e-9)
                    if gain > best_gain:
                        best, best_gain = (i, o), gain
        if best is None:
            break
        chosen[best[0]] = best[1]
    return [(o[2], o[3]) for o in chosen]


# -- the public functions --------------------------------------------------------------------------
@dataclass
class Sensitivity:
    """What :func:`measure_sensitivity` found; :meth:`recipe` turns it into a recipe for a budget
    (one measurement serves every budget)."""

    config: CalibrationConfig
    shape: dict
    text_source: dict
    outlier_layers: list[int]
    key_norms: list[float]
    value_norms: list[float]
    smoothing_scales: list[torch.Tensor]
    measurements: _Measurements
    key_channels: list[torch.Tensor]  # per layer [H, n]: outlier channels of a split (n = 0: none)
    value_channels: list[torch.Tensor]
    key_outlier_share: list[float]  # energy share of those channels
    value_outlier_share: list[float]
    source_model: str
    _bench: _Bench = field(repr=False)

    def _quantizer(self, layer: int, bits: int) -> TurboQuantizer:
        return TurboQuantizer(self.shape["head_dim"], bits, seed=self.config.seed + layer,
                              rotation=self.config.rotation, scale_dtype=torch.float16)

    def _side(self, layer: int, spec: "int | tuple[int, int]", side: str) -> "TurboQuantizer | HeadSplit":
        bits, outlier_bits = (spec, 0) if isinstance(spec, int) else spec
        if not outlier_bits:
            return self._quantizer(layer, bits)
        channels = (self.key_channels if side == "key" else self.value_channels)[layer]
        return HeadSplit(self.shape["head_dim"], channels, outlier_bits, bits, seed=self.config.seed + layer,
                         rotation=self.config.rotation)

    def joint_kl(self, key_bits: Sequence, value_bits: Sequence, channel_scale: torch.Tensor | None) -> float:
        """KL on the calibration chunk with every layer quantized as given (all at once); an entry
        is a width or ``(bits, outlier bits)`` (an outlier-channel split when outlier bits > 0)."""
        bench = self._bench
        keys, values = list(bench.keys), list(bench.values)
        with torch.no_grad():
            for i, (kb, vb) in enumerate(zip(key_bits, value_bits)):
                if (kb if isinstance(kb, int) else kb[0]) != BF16_BITS:
                    scale = None if channel_scale is None else channel_scale[i]
                    keys[i] = bench.quantized_history(bench.keys[i], self._side(i, kb, "key"), scale)
                    values[i] = bench.quantized_history(bench.values[i], self._side(i, vb, "value"), None)
            return bench.kl(keys, values)

    def _scale(self, alloc) -> tuple[list[int], torch.Tensor]:
        L, H, d = self.shape["num_hidden_layers"], self.shape["num_key_value_heads"], self.shape["head_dim"]
        smoothed = [i for i in range(L) if self.measurements.smoothing[i] and alloc[i][0][0] != BF16_BITS]
        return smoothed, torch.stack([self.smoothing_scales[i] if i in smoothed else torch.ones(H, d)
                                      for i in range(L)]).float()

    def recipe(self, target_bits: float, splits: bool | None = None) -> Recipe:
        """The allocation with the lowest predicted KL at ``target_bits`` average bits per value
        (codes and fp16 scales counted), its joint KL measured next to a uniform recipe's.

        Args:
            target_bits: the budget.
            splits: ``None`` (default): allocate with and without outlier-channel splits, measure
                both joint KLs on the calibration chunk and keep the lower (both recorded in the
                provenance); ``True`` / ``False``: only that way.

        Raises:
            ValueError: no allocation meets ``target_bits``.
        """
        cfg = CalibrationConfig(**{**asdict(self.config), "target_bits": float(target_bits)})
        L, H, d = self.shape["num_hidden_layers"], self.shape["num_key_value_heads"], self.shape["head_dim"]
        meas = self.measurements
        plain = dataclasses.replace(meas, key_split_kl={}, value_split_kl={})
        has_splits = bool(meas.key_split_kl or meas.value_split_kl)
        candidates = {}
        if splits is not False and has_splits:
            candidates["with splits"] = _allocate(meas, L, cfg, d)
        if splits is not True or not has_splits:
            candidates["without splits"] = _allocate(plain, L, cfg, d)
        measured_kl = {}
        for label, alloc in candidates.items():
            if label == "without splits" and alloc == candidates.get("with splits"):
                measured_kl[label] = measured_kl["with splits"]
                continue
            measured_kl[label] = self.joint_kl([a[0] for a in alloc], [a[1] for a in alloc], self._scale(alloc)[1])
        choice = min(measured_kl, key=lambda k: (measured_kl[k], k != "without splits"))
        alloc, kl = candidates[choice], measured_kl[choice]
        key_bits = [a[0][0] for a in alloc]
        value_bits = [a[1][0] for a in alloc]
        key_outlier_bits = [a[0][1] for a in alloc]
        value_outlier_bits = [a[1][1] for a in alloc]
        smoothed, channel_scale = self._scale(alloc)
        splits = {}
        for side, ob, channels in (("key", key_outlier_bits, self.key_channels),
                                   ("value", value_outlier_bits, self.value_channels)):
            if any(ob):
                splits[f"{side}_outlier_channels"] = torch.stack(channels).to(torch.int16)
                splits[f"{side}_outlier_bits"] = ob
        affordable = [b for b in cfg.candidate_bits if b + 16.0 / d <= cfg.target_bits + 1e-9]
        uniform_bits = max(affordable) if affordable else min(cfg.candidate_bits)
        kl_uniform = self.joint_kl([uniform_bits] * L, [uniform_bits] * L, None)
        recipe = Recipe(
            model_type=self.shape["model_type"], num_hidden_layers=L, num_key_value_heads=H, head_dim=d,
            key_bits=key_bits, value_bits=value_bits, rotation_seed=[cfg.seed + i for i in range(L)],
            window=cfg.window, rotation=cfg.rotation, key_channel_scale=channel_scale if smoothed else None,
            source_model=self.source_model, **splits,
            provenance={
                "kind": "calibrated",
                "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                "text": self.text_source,
                "tokens": {"segments": cfg.segments, "history": cfg.prompt_len, "scored": cfg.chunk_len},
                "outlier_layers": self.outlier_layers,
                "median_key_norm": [round(x, 4) for x in self.key_norms],
                "median_value_norm": [round(x, 4) for x in self.value_norms],
                "key_smoothing_layers": smoothed,
                "outlier_split": {
                    "channels": _outlier_count(cfg, d),
                    "key_layers": [i for i in range(L) if key_outlier_bits[i]],
                    "value_layers": [i for i in range(L) if value_outlier_bits[i]],
                    "key_energy_share": [round(x, 4) for x in self.key_outlier_share],
                    "value_energy_share": [round(x, 4) for x in self.value_outlier_share],
                    "kl": "estimated from the measured widths by the split's relative distortion",
                    "calibration_chunk_kl": {k: round(v, 6) for k, v in measured_kl.items()},
                    "chosen": choice,
                },
                "sensitivity_kl": {
                    "key": {str(b): [round(x, 7) for x in meas.key_kl[b]] for b in cfg.measured_bits},
                    "value": {str(b): [round(x, 7) for x in meas.value_kl[b]] for b in cfg.measured_bits},
                    "estimated_bits": sorted(set(cfg.candidate_bits) - set(cfg.measured_bits)),
                },
            },
            quality={
                "calibration_chunk_kl": round(kl, 6),
                f"uniform_{uniform_bits}bit_calibration_chunk_kl": round(kl_uniform, 6),
            },
        )
        logger.info("calibrate: %.3f average bits, chunk KL %.5f (uniform %d-bit %.5f)",
                    recipe.average_bits(), kl, uniform_bits, kl_uniform)
        return recipe


def measure_sensitivity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    config: CalibrationConfig | None = None,
    source_model: str | None = None,
    progress: bool = True,
) -> Sensitivity:
    """Steps 1 and 2 of the module docstring: statistics and per-layer sensitivities.

    Args: as :func:`calibrate` (``config.target_bits`` is not used here).

    Raises:
        ValueError: a patched model, too little text, or hadamard with a non-power-of-two head_dim.
    """
    from .patch import is_patched

    if is_patched(model):
        raise ValueError("calibrate needs the unpatched model: call tqpatch.unapply(model) first")
    cfg = config or CalibrationConfig()
    shape = _model_shape(model)
    L, d = shape["num_hidden_layers"], shape["head_dim"]
    if cfg.rotation == "hadamard" and d & (d - 1):
        raise ValueError(f"rotation 'hadamard' needs a power-of-two head_dim, this model has {d}")

    was_training = model.training
    model.eval()
    used = list(texts) if texts is not None else default_texts()
    with torch.no_grad():
        bench = _Bench(model, _segments_from_texts(tokenizer, used, cfg), cfg)

    # 1. statistics over every prompt token
    knorm = torch.stack([k.float().norm(dim=-1).median() for k in bench.keys])
    vnorm = torch.stack([v.float().norm(dim=-1).median() for v in bench.values])
    kmed, vmed = knorm.median(), vnorm.median()
    outliers = sorted({i for i in range(L) for r in (knorm[i] / kmed, vnorm[i] / vmed)
                       if r > cfg.outlier_ratio or r < 1 / cfg.outlier_ratio})
    scales = [_smoothing_scale(k) for k in bench.keys]
    logger.info("calibrate: outlier layers by K/V norm (ratio %.0f): %s", cfg.outlier_ratio, outliers)
    sens = Sensitivity(
        config=cfg, shape=shape,
        text_source={"kind": "given" if texts is not None else f"bundled {DEFAULT_TEXT}",
                     "characters": sum(len(t) for t in used)},
        outlier_layers=outliers, key_norms=[float(x) for x in knorm], value_norms=[float(x) for x in vnorm],
        smoothing_scales=scales, measurements=_Measurements(smoothing=[False] * L),
        key_channels=[], value_channels=[], key_outlier_share=[], value_outlier_share=[],
        source_model=source_model or str(getattr(model.config, "name_or_path", "") or ""), _bench=bench,
    )

    # 2. sensitivities
    meas = sens.measurements
    n_evals = L * (2 * len(cfg.measured_bits) + int(cfg.key_smoothing))
    bar = tqdm(total=n_evals, desc="calibrate: layer sensitivity", disable=not progress)
    for b in cfg.measured_bits:
        meas.key_kl[b], meas.value_kl[b] = [0.0] * L, [0.0] * L
    top = max(cfg.measured_bits)
    with torch.no_grad():
        for i in range(L):
            def key_kl(b: int, smooth: bool) -> float:
                keys = list(bench.keys)
                keys[i] = bench.quantized_history(bench.keys[i], sens._quantizer(i, b), scales[i] if smooth else None)
                return bench.kl(keys, bench.values)

            if cfg.key_smoothing:
                plain, smoothed = key_kl(top, False), key_kl(top, True)
                meas.smoothing[i] = smoothed < plain
                meas.key_kl[top][i] = min(plain, smoothed)
                bar.update(2)
            for b in cfg.measured_bits:
                if not (cfg.key_smoothing and b == top):
                    meas.key_kl[b][i] = key_kl(b, meas.smoothing[i])
                    bar.update()
                values = list(bench.values)
                values[i] = bench.quantized_history(bench.values[i], sens._quantizer(i, b), None)
                meas.value_kl[b][i] = bench.kl(bench.keys, values)
                bar.update()
    bar.close()
    for b in sorted(set(cfg.candidate_bits) - set(cfg.measured_bits)):
        meas.key_kl[b] = _estimate(meas.key_kl, b, d)
        meas.value_kl[b] = _estimate(meas.value_kl, b, d)
    # 3. outlier channels (per head, largest RMS; keys as stored: smoothed where smoothing won)
    n = _outlier_count(cfg, d)
    if n:
        for i in range(L):
            kc, ks = _top_channels(bench.keys[i], n, scales[i] if meas.smoothing[i] else None)
            vc, vs = _top_channels(bench.values[i], n)
            sens.key_channels.append(kc)
            sens.value_channels.append(vc)
            sens.key_outlier_share.append(ks)
            sens.value_outlier_share.append(vs)
        measured = {b: meas.key_kl[b] for b in cfg.measured_bits}
        measured_v = {b: meas.value_kl[b] for b in cfg.measured_bits}
        for b in cfg.candidate_bits:
            if b + 1 > 8:
                continue
            meas.key_split_kl[b] = _estimate_at(
                measured, [_split_distortion(d, n, b, x) for x in sens.key_outlier_share], d)
            meas.value_split_kl[b] = _estimate_at(
                measured_v, [_split_distortion(d, n, b, x) for x in sens.value_outlier_share], d)
    model.train(was_training)
    return sens


def calibrate(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | None = None,
    *,
    target_bits: float = 4.0,
    config: CalibrationConfig | None = None,
    source_model: str | None = None,
    progress: bool = True,
) -> Recipe:
    """Measure ``model`` and return a recipe that meets ``target_bits`` with the lowest predicted KL.

    Args:
        model: an unpatched transformers causal LM (any device; float32 recommended on CPU).
        tokenizer: its tokenizer.
        texts: calibration texts; ``None``: the bundled text (see module docstring).
        target_bits: average stored bits per K/V value, codes and fp16 scales counted.
        config: everything else (:class:`CalibrationConfig`).
        source_model: Hub id recorded in the recipe (default: ``model.config.name_or_path``).
        progress: show tqdm progress bars.

    Returns:
        A :class:`Recipe` with provenance ``"calibrated"`` (settings, text source, outlier layers,
        per-layer sensitivities) and ``quality`` (joint KL of the recipe and of a uniform recipe,
        measured on the calibration chunk). For several budgets, call :func:`measure_sensitivity`
        once and :meth:`Sensitivity.recipe` per budget.

    Raises:
        ValueError: a patched model, too little text, or a budget no allocation can meet.
    """
    sens = measure_sensitivity(model, tokenizer, texts, config=config, source_model=source_model, progress=progress)
    return sens.recipe(target_bits)
