"""Outlier-channel split of one layer's keys or values (fractional bits per coordinate).

The paper's split (arXiv 2504.19874, section 4): per KV head, ``n`` outlier channels are quantized
by one TurboQuant instance at ``outlier_bits`` and the other ``d - n`` channels by a second at
``bits``, each with its own rotation and norm-corrected scale. E.g. 16 of 64 channels at 4 bits
and 48 at 3 bits store 3.25 bits per coordinate (plus two fp16 scales per vector).

The outlier channels may differ per head (a recipe stores ``[H, n]`` indices); the rotations and
codebooks are shared by the heads. The "rotated domain" of a split vector ``x`` is the
concatenation ``(Pi_1 x[outliers_h], Pi_2 x[rest_h])``: an orthogonal map of ``x``, so attention
over dequantized codes works exactly as for one rotation (queries go through the same map, the
attention output comes back through its transpose).

Storage per vector: the outlier part's packed codes, then the rest's; scales ``[..., 2]``.
"""

from __future__ import annotations

import torch

from . import packing
from .kernels.reference import dequantize_rotated
from .quantizer import TurboQuantizer
from .rotation import RotationKind, matmul_rows

__all__ = ["HeadSplit"]


class HeadSplit:
    """The outlier-channel split of one layer side (keys or values).

    Args:
        head_dim: ``d``.
        channels: ``int [H, n]`` outlier channel indices per KV head (distinct within a row).
        outlier_bits: bits of the outlier channels.
        bits: bits of the other ``d - n`` channels.
        seed: rotation seed (the rest uses ``seed + 1``); rotation: ``"haar"`` (a split part's
            dimension is rarely a power of two).

    Raises:
        ValueError: channel indices out of range or repeated, a part that does not fill whole
            bytes, or a Hadamard rotation.
    """

    def __init__(self, head_dim: int, channels: torch.Tensor, outlier_bits: int, bits: int, *, seed: int = 0,
                 rotation: RotationKind = "haar") -> None:
        ch = torch.as_tensor(channels, dtype=torch.int64)
        if ch.ndim != 2:
            raise ValueError(f"outlier channels must be [heads, n], got shape {tuple(ch.shape)}")
        H, n = ch.shape
        if not 2 <= n <= head_dim - 2:
            raise ValueError(f"need between 2 and {head_dim - 2} outlier channels per head, got {n}")
        if int(ch.min()) < 0 or int(ch.max()) >= head_dim:
            raise ValueError(f"outlier channels must lie in [0, {head_dim})")
        ch = torch.sort(ch, dim=-1).values
        if bool((ch[:, 1:] == ch[:, :-1]).any()):
            raise ValueError("outlier channels must be distinct within a head")
        if rotation != "haar":
            raise ValueError("an outlier-channel split needs the Haar rotation (its parts are rarely powers of two)")
        rest = torch.stack([torch.tensor([c for c in range(head_dim) if c not in set(row.tolist())]) for row in ch])
        self.head_dim, self.num_heads, self.n = head_dim, H, n
        self.outlier_bits, self.bits = int(outlier_bits), int(bits)
        self.perm = torch.cat([ch, rest], dim=1)  # [H, d]: rotated-part order of the channels
        self.inverse = torch.argsort(self.perm, dim=1)
        self.outlier = TurboQuantizer(n, outlier_bits, seed=seed, rotation=rotation, scale_dtype=torch.float16)
        self.regular = TurboQuantizer(head_dim - n, bits, seed=seed + 1, rotation=rotation,
                                      scale_dtype=torch.float16)
        self._device_cache: dict[torch.device, dict[str, torch.Tensor]] = {}

    @property
    def channels(self) -> torch.Tensor:
        """``int64 [H, n]`` outlier channels per head (sorted)."""
        return self.perm[:, : self.n]

    @property
    def code_bytes(self) -> int:
        """Packed code bytes per vector (both parts)."""
        return self.outlier.code_bytes + self.regular.code_bytes

    def bytes_per_vector(self) -> int:
        """Stored bytes per vector: codes plus two fp16 scales."""
        return self.outlier.bytes_per_vector() + self.regular.bytes_per_vector()

    @property
    def average_bits(self) -> float:
        """Code bits per coordinate (without the scales)."""
        return 8 * self.code_bytes / self.head_dim

    def tensors(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Index maps, rotations and codebooks on ``device`` (cached)."""
        device = torch.device(device)
        if device not in self._device_cache:
            a, b = self.outlier.tensors(device), self.regular.tensors(device)
            self._device_cache[device] = {
                "perm": self.perm.to(device), "inverse": self.inverse.to(device),
                "r1": a["matrix"], "r2": b["matrix"], "c1": a["centroids"], "c2": b["centroids"],
            }
        return self._device_cache[device]

    def _heads(self, t: dict[str, torch.Tensor], name: str, heads: int) -> torch.Tensor:
        """The ``[heads, d]`` index map for ``heads`` rows (query head ``h`` uses KV head
        ``h // G``)."""
        idx = t[name]
        return idx if heads == self.num_heads else idx.repeat_interleave(heads // self.num_heads, dim=0)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, heads, T, d]`` (KV heads, or query heads grouped per KV head) -> the rotated
        domain, float32."""
        t = self.tensors(x.device)
        B, Hx, T, d = x.shape
        idx = self._heads(t, "perm", Hx).reshape(1, Hx, 1, d).expand(B, Hx, T, d)
        xp = torch.gather(x.to(torch.float32), -1, idx)
        n = self.n
        return torch.cat([matmul_rows(xp[..., :n], t["r1"].T), matmul_rows(xp[..., n:], t["r2"].T)], dim=-1)

    def unrotate(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`rotate` (float32)."""
        t = self.tensors(y.device)
        B, Hx, T, d = y.shape
        n = self.n
        yp = torch.cat([matmul_rows(y[..., :n].to(torch.float32), t["r1"]),
                        matmul_rows(y[..., n:].to(torch.float32), t["r2"])], dim=-1)
        idx = self._heads(t, "inverse", Hx).reshape(1, Hx, 1, d).expand(B, Hx, T, d)
        return torch.gather(yp, -1, idx)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, H, T, d]`` -> packed codes ``uint8 [B, H, T, code_bytes]`` and float32 scales
        ``[B, H, T, 2]`` (outlier part, rest)."""
        t = self.tensors(x.device)
        B, H, T, d = x.shape
        xp = torch.gather(x.to(torch.float32), -1, t["perm"].reshape(1, H, 1, d).expand(B, H, T, d))
        i1, s1 = self.outlier.encode_indices(xp[..., : self.n])
        i2, s2 = self.regular.encode_indices(xp[..., self.n :])
        codes = torch.cat([packing.pack(i1, self.outlier_bits), packing.pack(i2, self.bits)], dim=-1)
        return codes, torch.stack([s1, s2], dim=-1)

    def dequantize_rotated(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32,
                           out: torch.Tensor | None = None) -> torch.Tensor:
        """Codes and scales -> scaled vectors ``[.., d]`` in the rotated domain (``dtype``)."""
        t = self.tensors(codes.device)
        nb = self.outlier.code_bytes
        if out is None:  # (no writes into views: torch.compile takes this form)
            return torch.cat([dequantize_rotated(codes[..., :nb], scales[..., 0], t["c1"], self.outlier_bits, dtype),
                              dequantize_rotated(codes[..., nb:], scales[..., 1], t["c2"], self.bits, dtype)], dim=-1)
        dequantize_rotated(codes[..., :nb], scales[..., 0], t["c1"], self.outlier_bits, dtype, out=out[..., : self.n])
        dequantize_rotated(codes[..., nb:], scales[..., 1], t["c2"], self.bits, dtype, out=out[..., self.n :])
        return out

    def __repr__(self) -> str:
        return (f"HeadSplit(head_dim={self.head_dim}, heads={self.num_heads}, outliers={self.n}@"
                f"{self.outlier_bits}b, rest={self.head_dim - self.n}@{self.bits}b)")
