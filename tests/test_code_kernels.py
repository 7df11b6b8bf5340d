"""The many-row code kernels (``tqpatch.kernels.codes``) against the torch encoder and decoder.

GPU tests (``-m gpu``; also run on CPU under ``TRITON_INTERPRET=1``): fresh random vectors for
every case, 2/3/4 bits, head_dim 64/128, a row count that does not fill the last block, slots in
random order. Encoding: at most 0.2% of codes differ from ``TurboQuantizer.encode_indices`` (a
rotated coordinate on a threshold under a different float32 summation order), by one level, and
the scales agree to fp16 rounding; slots not written stay untouched. Decoding: equal to
``dequantize_rotated`` (exactly on the GPU), only into the given slots.
"""

from __future__ import annotations

import pytest
import torch

from tqpatch import packing
from tqpatch.kernels import codes
from tqpatch.kernels import triton_decode as td
from tqpatch.kernels.reference import dequantize_rotated
from tqpatch.quantizer import TurboQuantizer

pytestmark = pytest.mark.gpu


def _device() -> torch.device:
    if codes.available() and torch.cuda.is_available():
        return torch.device("cuda")
    if td.interpreting():
        return torch.device("cpu")
    pytest.skip("needs CUDA and Triton (or TRITON_INTERPRET=1 with Triton installed)")


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_encode_rows_matches_quantizer(bits, d):
    dev = _device()
    B, H, N, C = 2, 3, 45, 64
    g = torch.Generator().manual_seed(100 * bits + d)
    quant = TurboQuantizer(d, bits, seed=7, scale_dtype=torch.float16)
    t = quant.tensors(dev)
    x = (torch.randn(B, H, N, d, generator=g) * (torch.rand(B, H, N, 1, generator=g) * 4 + 0.1)).to(dev)
    x[0, 1, 3] = 0  # a zero vector: scale 0
    slots = torch.randperm(C, generator=g)[:N].to(dev)
    kc = torch.full((B, H, C, d * bits // 8), 0xAB, dtype=torch.uint8, device=dev)
    ks = torch.full((B, H, C), 7.0, dtype=torch.float16, device=dev)
    y = x.reshape(-1, d) @ t["matrix"].T
    codes.encode_rows(y.reshape(B, H, N, d), slots, t["thresholds"], t["centroids"], bits, kc, ks)
    idx, scales = quant.encode_indices(x)
    got = packing.unpack(kc[:, :, slots], bits, d).long()
    differ = (got != idx).float().mean().item()
    assert differ < 2e-3 and (got - idx).abs().max() <= 1, f"{differ:.2e} of codes differ"
    torch.testing.assert_close(ks[:, :, slots].float(), scales.half().float(), rtol=2e-3, atol=0)
    assert ks[0, 1, slots[3]] == 0
    untouched = torch.ones(C, dtype=torch.bool, device=dev)
    untouched[slots] = False
    assert (kc[:, :, untouched] == 0xAB).all() and (ks[:, :, untouched] == 7.0).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (128, torch.bfloat16), (128, torch.float16)])
def test_dequantize_rows_matches_reference(bits, d, dtype):
    dev = _device()
    B, H, C, lo, hi, T = 2, 3, 80, 7, 52, 60
    g = torch.Generator().manual_seed(10 * bits + d)
    kc = torch.randint(0, 256, (B, H, C, d * bits // 8), generator=g, dtype=torch.uint8).to(dev)
    ks = (torch.rand(B, H, C, generator=g) * 3 + 0.05).half().to(dev)
    cent = torch.sort(torch.randn(1 << bits, generator=g)).values.to(dev)
    out = torch.full((B, H, T, d), float("nan"), dtype=dtype, device=dev)
    codes.dequantize_rows(kc, ks, cent, bits, lo, hi, out[:, :, 3:3 + hi - lo])
    ref = dequantize_rotated(kc[:, :, lo:hi], ks[:, :, lo:hi], cent, bits, dtype)
    # exact on the GPU; Triton's CPU interpreter rounds float32 to bf16 by truncation (one ulp)
    rtol = 2**-7 if dtype == torch.bfloat16 and dev.type == "cpu" else 0
    torch.testing.assert_close(out[:, :, 3:3 + hi - lo], ref, rtol=rtol, atol=0)
    assert out[:, :, :3].isnan().all() and out[:, :, 3 + hi - lo:].isnan().all()


def test_kernels_reject_what_they_do_not_serve():
    assert not codes.serves(5, 128) and not codes.serves(4, 96) and codes.serves(3, 256)
    if codes.available():
        with pytest.raises(ValueError, match="2-4 bits"):
            codes.dequantize_rows(torch.zeros(1, 1, 4, 60, dtype=torch.uint8), torch.zeros(1, 1, 4), torch.zeros(16),
                                  4, 0, 4, torch.empty(1, 1, 4, 120))
