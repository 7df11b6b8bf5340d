"""Bit packing: property-based round trips, exact sizes, the documented layout by hand, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tqpatch.packing import SUPPORTED_BITS, group_size, pack, packed_size, unpack

GROUP = {1: 8, 2: 4, 3: 8, 4: 2, 5: 8, 6: 4, 7: 8, 8: 1}

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops: see conftest


def random_codes(shape: tuple[int, ...], bits: int, seed: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.int64).to(dtype)


@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    groups=st.integers(0, 40),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.int16]),
)
def test_round_trip_property(bits, lead, groups, seed, dtype):
    n = groups * GROUP[bits]
    codes = random_codes((*lead, n), bits, seed, dtype)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, n * bits // 8)
    out = unpack(packed, bits)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out.to(torch.int64), codes.to(torch.int64))
    assert torch.equal(unpack(packed, bits, n), out)


@given(bits=st.sampled_from(SUPPORTED_BITS), seed=st.integers(0, 2**31 - 1))
def test_extreme_values_round_trip(bits, seed):
    n = 4 * GROUP[bits]
    top = (1 << bits) - 1
    for codes in (torch.zeros(3, n, dtype=torch.int64), torch.full((3, n), top), random_codes((3, n), bits, seed)):
        assert torch.equal(unpack(pack(codes, bits), bits).long(), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_group_and_packed_sizes(bits):
    assert group_size(bits) == GROUP[bits]
    for n in (0, GROUP[bits], 64, 96, 128, 256):
        if n % GROUP[bits] == 0:
            assert packed_size(n, bits) * 8 == n * bits  # exactly n*bits/8, no padding
    if GROUP[bits] > 1:
        with pytest.raises(ValueError, match="multiple"):
            packed_size(GROUP[bits] + 1, bits)


@pytest.mark.parametrize("d,bits,nbytes", [(64, 4, 32), (128, 4, 64), (128, 3, 48), (128, 2, 32), (128, 1, 16), (256, 3, 96), (96, 2, 24), (32, 3, 12)])
def test_packed_sizes_head_dims(d, bits, nbytes):
    codes = random_codes((2, 5, d), bits, 0)
    assert pack(codes, bits).shape == (2, 5, nbytes)


def test_layout_4bit_by_hand():
    # byte j = code[2j] | code[2j+1] << 4
    codes = torch.tensor([[0x1, 0x2, 0x3, 0x4, 0xF, 0x0, 0xA, 0x5]])
    assert pack(codes, 4).tolist() == [[0x21, 0x43, 0x0F, 0x5A]]


def test_layout_2bit_by_hand():
    # byte j = code[4j] | code[4j+1] << 2 | code[4j+2] << 4 | code[4j+3] << 6
    codes = torch.tensor([1, 2, 3, 0, 3, 3, 3, 3])
    assert pack(codes, 2).tolist() == [1 | 2 << 2 | 3 << 4 | 0 << 6, 0xFF]
    assert pack(codes, 2).tolist() == [0x39, 0xFF]


def test_layout_3bit_by_hand():
    # 8 codes -> 24-bit little-endian stream, code i at bits [3i, 3i+3):
    # codes 0..7 = 000 001 010 011 100 101 110 111 (each written LSB first)
    # byte 0 = bits 0-7  : code0 (0) | code1 (1) << 3 | low 2 bits of code2 (2 -> 0b10) << 6 = 0x88
    # byte 1 = bits 8-15 : high bit of code2 (0) | code3 (3) << 1 | code4 (4) << 4 | low bit of code5 (1) << 7 = 0xC6
    # byte 2 = bits 16-23: high 2 bits of code5 (0b10) | code6 (6) << 2 | code7 (7) << 5 = 0xFA
    codes = torch.arange(8)
    assert pack(codes, 3).tolist() == [0x88, 0xC6, 0xFA]
    # a single set code at each position shows where its 3 bits land
    for i in range(8):
        one = torch.zeros(8, dtype=torch.int64)
        one[i] = 0b111
        stream = int.from_bytes(bytes(pack(one, 3).tolist()), "little")
        assert stream == 0b111 << (3 * i)
    # two groups: 16 codes -> 6 bytes, the second group's bytes follow the first's
    two = torch.cat([torch.arange(8), torch.arange(8).flip(0)])
    assert pack(two, 3)[:3].tolist() == [0x88, 0xC6, 0xFA]
    assert pack(two, 3)[3:].tolist() == pack(torch.arange(8).flip(0), 3).tolist()


def test_layout_1bit_and_8bit_by_hand():
    assert pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1]), 1).tolist() == [0b10001101]
    codes = torch.tensor([0, 17, 255, 128])
    assert pack(codes, 8).tolist() == [0, 17, 255, 128]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_layout_is_a_little_endian_bit_stream(bits):
    """The general rule of the docstring for every width, checked with Python integers."""
    n = 3 * GROUP[bits]
    codes = random_codes((n,), bits, bits)
    stream = sum(int(c) << (bits * i) for i, c in enumerate(codes.tolist()))
    expected = list(stream.to_bytes(n * bits // 8, "little"))
    assert pack(codes, bits).tolist() == expected


def test_non_contiguous_input():
    codes = random_codes((16, 6), 4, 3).T  # [6, 16], not contiguous
    assert not codes.is_contiguous()
    assert torch.equal(unpack(pack(codes, 4), 4).long(), codes)
    packed = pack(random_codes((6, 16), 3, 4), 3)
    view = packed.T.contiguous().T  # same values, transposed strides
    assert torch.equal(unpack(view, 3), unpack(packed, 3))


def test_errors():
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(8), 4)
    with pytest.raises(TypeError, match="integer"):
        pack(torch.zeros(8, dtype=torch.bool), 1)
    with pytest.raises(TypeError, match="uint8"):
        unpack(torch.zeros(4, dtype=torch.int64), 4)
    for bad in (0, 9, -1, 2.0, None):
        with pytest.raises(ValueError):
            pack(torch.zeros(8, dtype=torch.int64), bad)
        with pytest.raises(ValueError):
            unpack(torch.zeros(8, dtype=torch.uint8), bad)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(12, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="multiple of 2"):
        pack(torch.zeros(7, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="expected 10 codes"):
        unpack(torch.zeros(4, dtype=torch.uint8), 4, 10)
    with pytest.raises(ValueError, match="whole number"):
        unpack(torch.zeros(4, dtype=torch.uint8), 3)
