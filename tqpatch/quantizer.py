"""TurboQuant vector quantizers (arXiv 2504.19874) with norm-corrected scales.

Encode one vector ``x`` in R^d: ``n = ||x||``, ``y = Pi x / n`` (``Pi``: seeded random rotation),
``idx_j`` = the Lloyd-Max bucket of ``y_j`` for the law of one coordinate of a random unit vector,
and the stored scale ``s = n / ||c[idx]||``. Decoding is ``x_hat = s Pi^T c[idx]``: it has exactly
the norm of ``x``, and encoding ``x_hat`` again returns the same codes and scale (a fixed point).
Storing ``n`` itself instead would shrink a vector by ``||c[idx]||`` at every re-encode.

``qjl=True`` is the paper's TurboQuant_prod: ``bits - 1`` bit MSE codes plus a 1-bit QJL sign
sketch of the residual with its norm, which makes inner products unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from . import packing
from .codebook import boundaries, lloyd_max
from .rotation import RotationKind, matmul_rows, rotation_matrix

__all__ = ["QuantizedVectors", "TurboQuantizer", "SplitQuantizer"]


@dataclass
class QuantizedVectors:
    """Packed codes and scales for a batch of vectors.

    Attributes:
        codes: ``uint8 [..., code_bytes]``: the packed codes (layout: :mod:`tqpatch.packing`).
            For the QJL variant, the ``(bits-1)``-bit MSE codes followed by the packed QJL signs;
            for a :class:`SplitQuantizer`, the outlier part followed by the rest.
        scales: ``[...]`` norm-corrected scales ``||x|| / ||c[idx]||`` (``[..., 2]`` for a
            :class:`SplitQuantizer`: outlier part, rest). For the QJL variant, the norms ``||x||``
            themselves (the paper's MSE stage, which leaves the smallest residual).
        residual_scales: ``[...]`` residual norms of the QJL variant, else ``None``.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    residual_scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors."""
        total = self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()
        if self.residual_scales is not None:
            total += self.residual_scales.numel() * self.residual_scales.element_size()
        return total


def _check_input(x: torch.Tensor, dim: int, check_finite: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != dim:
        raise ValueError(f"expected vectors of dimension {dim} in the last axis, got shape {tuple(x.shape)}")
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("input contains NaN or Inf; TurboQuant encodes finite vectors only")


class TurboQuantizer:
    """TurboQuant quantizer for vectors of one dimension.

    Args:
        dim: vector dimension (>= 2).
        bits: bits per coordinate, 1..8 (``qjl=True``: total bits including the 1-bit sketch).
        seed: rotation seed (and, with ``qjl``, the seed of the Gaussian sketch, ``seed + 1``).
        rotation: ``"haar"`` (dense Haar-random, the paper's) or ``"hadamard"`` (randomized
            Hadamard; ``dim`` must be a power of two).
        qjl: use TurboQuant_prod (unbiased inner products) instead of TurboQuant_mse.
        scale_dtype: dtype of the stored scales (the K/V cache uses ``float16``).

    Zero vectors encode to scale 0 and decode to zero. ``quantize`` rejects NaN/Inf input, and
    finite input whose norm overflows the scale (float32 norms past ~1.8e19, or past 65504 with
    ``scale_dtype=torch.float16``), with ``ValueError`` unless ``check_finite=False`` (then the
    result for such vectors is undefined). Norms below ~1e-19 underflow in float32: such vectors
    decode to zero.
    """

    def __init__(
        self,
        dim: int,
        bits: int,
        *,
        seed: int = 0,
        rotation: RotationKind = "haar",
        qjl: bool = False,
        scale_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(dim, int) or dim < 2:
            raise ValueError(f"dim must be an integer >= 2, got {dim!r}")
        if not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
        if not scale_dtype.is_floating_point:
            raise TypeError(f"scale_dtype must be a floating-point dtype, got {scale_dtype}")
        self.dim, self.bits, self.seed, self.rotation, self.qjl = dim, bits, seed, rotation, qjl
        self.scale_dtype = scale_dtype
        self.mse_bits = bits - 1 if qjl else bits
        packing.packed_size(dim, max(self.mse_bits, 1))  # dim must fill whole bytes
        if qjl:
            packing.packed_size(dim, 1)
        self.matrix = rotation_matrix(dim, seed, rotation)
        if self.mse_bits:
            self.centroids = torch.from_numpy(lloyd_max(dim, self.mse_bits).copy())
            self.thresholds = torch.from_numpy(boundaries(dim, self.mse_bits).copy())
        self.sketch = None
        if qjl:
            g = torch.Generator().manual_seed(seed + 1)
            self.sketch = torch.randn(dim, dim, generator=g, dtype=torch.float64).to(torch.float32)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def code_bytes(self) -> int:
        """Packed code bytes per vector: exactly ``dim * bits / 8``."""
        return self.dim * self.bits // 8

    def bytes_per_vector(self) -> int:
        """Stored bytes per vector: codes plus the scale(s)."""
        scale = torch.empty((), dtype=self.scale_dtype).element_size()
        return self.code_bytes + scale * (2 if self.qjl else 1)

    # -- device copies -------------------------------------------------------------------------
    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """The rotation, codebook and sketch as float32 tensors on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._device_cache:
            t = {"matrix": self.matrix.to(device)}
            if self.mse_bits:
                t["centroids"] = self.centroids.to(device=device, dtype=torch.float32)
                t["thresholds"] = self.thresholds.to(device=device, dtype=torch.float32)
            if self.sketch is not None:
                t["sketch"] = self.sketch.to(device)
            self._device_cache[device] = t
        return self._device_cache[device]

    # -- encode / decode -----------------------------------------------------------------------
    def encode_indices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked MSE codes (``int64 [..., dim]``) and norm-corrected float32 scales of ``x``.

        No input checks: the building block for compiled code (the K/V cache)."""
        t = self.tensors(x.device)
        xf = x.to(torch.float32)
        norm = torch.linalg.vector_norm(xf, dim=-1)
        y = matmul_rows(xf, t["matrix"].T) / torch.where(norm > 0, norm, 1.0).unsqueeze(-1)
        idx = torch.bucketize(y, t["thresholds"])
        cnorm = torch.linalg.vector_norm(t["centroids"][idx], dim=-1)
        return idx, norm / cnorm

    def decode_indices(self, idx: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """``s * Pi^T c[idx]`` in float32."""
        t = self.tensors(idx.device)
        return matmul_rows(t["centroids"][idx.long()], t["matrix"]) * scales.to(torch.float32).unsqueeze(-1)

    def quantize(self, x: torch.Tensor, *, check_finite: bool = True) -> QuantizedVectors:
        """Encode vectors ``x [..., dim]`` (any float dtype, any device)."""
        _check_input(x, self.dim, check_finite)
        lead = x.shape[:-1]
        if self.mse_bits:
            idx, scales = self.encode_indices(x)
            codes = packing.pack(idx, self.mse_bits)
        else:
            codes = torch.empty(*lead, 0, dtype=torch.uint8, device=x.device)
            scales = torch.zeros(lead, dtype=torch.float32, device=x.device)
        if not self.qjl:
            return self._checked(QuantizedVectors(codes, scales.to(self.scale_dtype)), check_finite)
        # TurboQuant_prod (paper, Algorithm 2): the MSE stage is the paper's x_hat = ||x|| Pi^T c[idx]
        # (no norm correction: it leaves the smaller residual, hence the smaller QJL variance), and
        # the residual is taken against exactly what the decoder will rebuild (the stored scale).
        scales = torch.linalg.vector_norm(x.to(torch.float32), dim=-1).to(self.scale_dtype)
        if self.mse_bits:
            mse = self.decode_indices(idx, scales)
        else:
            mse = torch.zeros(*lead, self.dim, dtype=torch.float32, device=x.device)
        residual = x.to(torch.float32) - mse
        signs = (residual @ self.tensors(x.device)["sketch"].T) >= 0
        codes = torch.cat([codes, packing.pack(signs.to(torch.uint8), 1)], dim=-1)
        rnorm = torch.linalg.vector_norm(residual, dim=-1)
        return self._checked(QuantizedVectors(codes, scales, rnorm.to(self.scale_dtype)), check_finite)

    def _checked(self, qv: QuantizedVectors, check_finite: bool) -> QuantizedVectors:
        """Finite input can still overflow: the float32 norm past ~1.8e19, a float16 scale past 65504."""
        if check_finite:
            bad = ~torch.isfinite(qv.scales)
            if qv.residual_scales is not None:
                bad |= ~torch.isfinite(qv.residual_scales)
            if bool(bad.any()):
                raise ValueError(
                    f"{int(bad.sum())} vector(s) have a norm too large for the {self.scale_dtype} scale "
                    f"(largest finite {torch.finfo(self.scale_dtype).max:.4g}; float32 norms overflow near 1.8e19): "
                    "scale the input down or use a wider scale_dtype"
                )
        return qv

    def dequantize(self, qv: QuantizedVectors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reconstruct ``[..., dim]`` vectors (a reference path: attention never needs this)."""
        if qv.codes.shape[-1] != self.code_bytes:
            raise ValueError(f"expected {self.code_bytes} code bytes per vector, got {qv.codes.shape[-1]}")
        mse_bytes = self.dim * self.mse_bits // 8
        if self.mse_bits:
            idx = packing.unpack(qv.codes[..., :mse_bytes].contiguous(), self.mse_bits)
            out = self.decode_indices(idx, qv.scales)
        else:
            out = torch.zeros(*qv.codes.shape[:-1], self.dim, dtype=torch.float32, device=qv.codes.device)
        if self.qjl:
            if qv.residual_scales is None:
                raise ValueError("QJL-quantized vectors need residual_scales")
            signs = packing.unpack(qv.codes[..., mse_bytes:].contiguous(), 1).to(torch.float32) * 2 - 1
            corr = (signs @ self.tensors(qv.codes.device)["sketch"]) * (math.sqrt(math.pi / 2) / self.dim)
            out = out + corr * qv.residual_scales.to(torch.float32).unsqueeze(-1)
        return out.to(dtype)

    def __repr__(self) -> str:
        return (
            f"TurboQuantizer(dim={self.dim}, bits={self.bits}, seed={self.seed}, "
            f"rotation={self.rotation!r}, qjl={self.qjl})"
        )


class SplitQuantizer:
    """Fractional bits by an outlier-channel split.

    The channels in ``channels`` are quantized by one :class:`TurboQuantizer` at ``outlier_bits``
    and the others by a second one at ``bits``, each with its own rotation and scale. For example
    32 of 128 channels at 3 bits and 96 at 2 bits store 2.5 bits per coordinate.

    Args:
        dim: vector dimension.
        channels: indices of the outlier channels (distinct, in ``[0, dim)``, at least 2 and at
            most ``dim - 2``).
        outlier_bits: bits for the outlier channels.
        bits: bits for the other channels.
        seed, rotation, scale_dtype: as for :class:`TurboQuantizer` (the second part uses
            ``seed + 1``).
    """

    def __init__(
        self,
        dim: int,
        channels: Sequence[int] | torch.Tensor,
        outlier_bits: int,
        bits: int,
        *,
        seed: int = 0,
        rotation: RotationKind = "haar",
        scale_dtype: torch.dtype = torch.float32,
    ) -> None:
        ch = torch.as_tensor(channels, dtype=torch.int64).flatten()
        if ch.numel() != torch.unique(ch).numel():
            raise ValueError("outlier channels must be distinct")
        if ch.numel() and (ch.min() < 0 or ch.max() >= dim):
            raise ValueError(f"outlier channels must lie in [0, {dim})")
        if not 2 <= ch.numel() <= dim - 2:
            raise ValueError(f"need between 2 and {dim - 2} outlier channels, got {ch.numel()}")
        self.dim = dim
        self.channels = torch.sort(ch).values
        mask = torch.ones(dim, dtype=torch.bool)
        mask[self.channels] = False
        self.rest = torch.arange(dim)[mask]
        self.outlier = TurboQuantizer(
            len(self.channels), outlier_bits, seed=seed, rotation=rotation, scale_dtype=scale_dtype
        )
        self.regular = TurboQuantizer(len(self.rest), bits, seed=seed + 1, rotation=rotation, scale_dtype=scale_dtype)

    @property
    def bits(self) -> float:
        """Average code bits per coordinate."""
        return (self.outlier.code_bytes + self.regular.code_bytes) * 8 / self.dim

    @property
    def code_bytes(self) -> int:
        return self.outlier.code_bytes + self.regular.code_bytes

    def bytes_per_vector(self) -> int:
        return self.outlier.bytes_per_vector() + self.regular.bytes_per_vector()

    def quantize(self, x: torch.Tensor, *, check_finite: bool = True) -> QuantizedVectors:
        """Encode ``x [..., dim]``: codes ``[..., code_bytes]``, scales ``[..., 2]``."""
        _check_input(x, self.dim, check_finite)
        a = self.outlier.quantize(x[..., self.channels.to(x.device)], check_finite=False)
        b = self.regular.quantize(x[..., self.rest.to(x.device)], check_finite=False)
        qv = QuantizedVectors(torch.cat([a.codes, b.codes], -1), torch.stack([a.scales, b.scales], -1))
        return self.outlier._checked(qv, check_finite)

    def dequantize(self, qv: QuantizedVectors, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n = self.outlier.code_bytes
        a = self.outlier.dequantize(QuantizedVectors(qv.codes[..., :n], qv.scales[..., 0]))
        b = self.regular.dequantize(QuantizedVectors(qv.codes[..., n:], qv.scales[..., 1]))
        out = torch.empty(*a.shape[:-1], self.dim, dtype=torch.float32, device=a.device)
        out[..., self.channels.to(a.device)] = a
        out[..., self.rest.to(a.device)] = b
        return out.to(dtype)
