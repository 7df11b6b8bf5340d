"""Triton decode attention over packed TurboQuant codes (one query token per sequence).

Computes exactly what :func:`tqpatch.kernels.reference.history_attention` computes for ``Q == 1``,
reading only the packed codes and the fp16 scales:

``score_t = scaling * s_t * (q~ . c_K[idx_t])`` (optionally ``softcap * tanh(score / softcap)``),
``out = sum_t softmax(score)_t * s^V_t * c_V[idx^V_t]`` in the rotated domain, and the
log-sum-exp of the scores.

Layout of the work (flash-decoding):

* Stage 1, grid ``(B * Hkv, SPLITS)``: one program handles all ``G = Hq / Hkv`` query heads of one
  KV head (so every code byte is read once) over one contiguous range of slots. The ranges are
  computed on the device from ``n`` (an int32 tensor), so the cost follows the current length and
  the launch is the same at every step (CUDA graphs). Each program streams its slots in blocks of
  ``BLOCK_N``: the packed codes arrive through a ``STAGES``-deep cp.async pipeline (16-byte
  copies), are expanded in registers to fp16 centroid values, and meet the queries in two
  ``tl.dot`` (wgmma on Hopper) with the slots as the long M axis: scores ``[BLOCK_N, 2*GP]`` (the
  ``G`` queries padded to ``GP >= 8``, high and low fp16 parts side by side) and the rotated-domain
  accumulator ``[d, 2*GP]``. The softmax is online, in fp32 and base 2. Each program writes its
  partial ``(acc, max, sum)``.
* Stage 2, grid ``(B * Hq,)``: merges the splits with their log-sum-exp.

``SPLITS`` is chosen from the shapes (:func:`default_config`) so that the programs fill whole
waves of the GPU: the kernel is latency-bound per program (results/h100/kernel_notes.md).

Code expansion ("LUT"): on the GPU, an inline-PTX routine turns packed codes into fp16 centroid
values with byte permutes (``prmt``) over the fp16 codebook held in registers: about 2.6 (4-bit),
2.1 (3-bit) and 1.7 (2-bit) integer instructions per code and no memory lookups. The portable
fallback (``lut="gather"``, also the one Triton's CPU interpreter runs) unpacks with shifts and
gathers the centroids with loads (2.7x slower at 4 bits on an H100).

Precision: the dots take fp16 operands with fp32 accumulation. The query is divided by its largest
magnitude and split into a high and a low fp16 part (two columns of the score dot, so the query
keeps about 22 bits); centroids are rounded to fp16 (relative 2^-12) and the probabilities times the
value scales are rounded to fp16; the softmax, the running sums and the accumulators are fp32.
Measured against the float32 reference: relative error of the output <= 6e-4 and of the
log-sum-exp <= 5e-4 for logits up to ~20; with logits up to ~40 the log-sum-exp error reaches
~2e-3 relative (fp16 centroids).

The op is registered as ``tqpatch::decode_attention`` with :func:`torch.library.triton_op`, so it
can sit inside a ``torch.compile(fullgraph=True, mode="reduce-overhead")`` graph.

What a patched model's decode step runs (three launches per layer, ``results/h200/notes.md``):

* :func:`decode_step` (``tqpatch::decode_step``): the history splits above plus one program per
  (row, KV head), launched first, for the full-precision window ring and the new token's own key;
  its stage 2 merges the history splits in the rotated domain, rotates the sum back once, adds the
  window part and writes the output in the model's dtype.
* :func:`store_step` (``tqpatch::store_step``): the token leaving the window is encoded into its
  history slot (rotation, norm, bucketize, norm-corrected fp16 scale, packing) and the new token
  takes its window slot.
This module imports without Triton (CPU-only installs); :func:`decode_attention` then falls back to
the reference.
"""

from __future__ import annotations

import logging
import os

import torch

from .reference import history_attention

__all__ = ["available", "decode_attention", "decode_step", "default_config", "store_step"]

log = logging.getLogger(__name__)

try:  # Triton is optional: CPU-only installs (and CI) have none.
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _HAS_TRITON = False
    log.debug("triton is not importable: tqpatch.kernels.triton_decode falls back to the reference")

_LOG2E = 1.4426950408889634
_SUPPORTED_BITS = (2, 3, 4)
_SUPPORTED_DIMS = (64, 128, 256)


def available() -> bool:
    """Whether the Triton kernel can run here (Triton importable and a CUDA device present)."""
    return _HAS_TRITON and torch.cuda.is_available()


def serves(key_bits: int, value_bits: int, head_dim: int) -> bool:
    """Whether the kernel takes these widths (2-4 bits) and this head_dim (64/128/256); other
    layers (8-bit, other head sizes) run the torch/Inductor path."""
    return key_bits in _SUPPORTED_BITS and value_bits in _SUPPORTED_BITS and head_dim in _SUPPORTED_DIMS


# Read once at import: the wrapper must not touch os.environ while torch.compile traces it.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_ENV_LUT = os.environ.get("TQPATCH_TRITON_LUT", "")


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs the kernels (``TRITON_INTERPRET=1`` at import, Triton
    installed): the kernels then take CPU tensors, slowly; for tests without a GPU."""
    return _INTERPRET and _HAS_TRITON


if _HAS_TRITON:

    # ------------------------------------------------------------------------------------------
    # Codebook in registers: byte tables for prmt. Word w of the L table holds the low bytes of the
    # fp16 centroids 4w..4w+3 (byte i%4 = centroid i), the H table the high bytes.
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _byte_tables(CENT, BITS: tl.constexpr):
        NC: tl.constexpr = 1 << BITS
        i = tl.arange(0, 16)
        c = tl.load(CENT + i, mask=i < NC, other=0.0)
        h = c.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        sh = (i % 4) * 8
        lo = (h & 0xFF) << sh
        hi = (h >> 8) << sh
        w = i // 4
        l0 = tl.sum(tl.where(w == 0, lo, 0), axis=0)
        l1 = tl.sum(tl.where(w == 1, lo, 0), axis=0)
        l2 = tl.sum(tl.where(w == 2, lo, 0), axis=0)
        l3 = tl.sum(tl.where(w == 3, lo, 0), axis=0)
        h0 = tl.sum(tl.where(w == 0, hi, 0), axis=0)
        h1 = tl.sum(tl.where(w == 1, hi, 0), axis=0)
        h2 = tl.sum(tl.where(w == 2, hi, 0), axis=0)
        h3 = tl.sum(tl.where(w == 3, hi, 0), axis=0)
        return l0, l1, l2, l3, h0, h1, h2, h3

    # ------------------------------------------------------------------------------------------
    # Code expansion with prmt (GPU).
    #
    # The packed words are replicated (tl.join, which keeps the new axes inside one thread) along a
    # new last axis of one element per code, so that one asm invocation (pack = codes per word or
    # group) sees one word and writes its fp16 pairs in natural order straight into the registers
    # the dot operand is built from. The tables ride along as one more operand whose element k is
    # table word k; operand j of input i of an invocation is $(outputs + i*pack + j).
    # ------------------------------------------------------------------------------------------

    # 4 bits, 16 centroids, pack 8 (one word x = 8 codes, nibble k = code k). Selectors
    # s = x & 0x77777777 index each 8-entry half of the table; bit 3 of each code picks the half
    # through a byte mask built with prmt's sign-replicate mode (bit 7 of byte j of x << 4 is bit 3
    # of code 2j, bit 7 of byte j of x is bit 3 of code 2j+1); two more prmt interleave the low and
    # high bytes into fp16 pairs. Outputs $0..$3 = (c0,c1),(c2,c3),(c4,c5),(c6,c7).
    # Operands: x = $4 (x8), table words L0..L3, H0..H3 = $12..$19.
    def _lookup4(x: str, x4: str, mask: str, sel: str, tab: int, lo: str, hi: str) -> str:
        """PTX: the low (``lo``) and high (``hi``) centroid bytes of the 4 codes whose selectors are
        the low 16 bits of ``sel`` (``mask``: 0xD9C8 for codes 0-3 of word ``x``, 0xFBEA for 4-7;
        table words L0..L3, H0..H3 at operands ``$tab .. $tab+7``; scratch m, a0, a1, b0, b1)."""
        return (f"prmt.b32 m, {x4}, {x}, {mask}; "
                f"prmt.b32 a0, ${tab}, ${tab + 1}, {sel}; prmt.b32 a1, ${tab + 2}, ${tab + 3}, {sel}; "
                f"prmt.b32 b0, ${tab + 4}, ${tab + 5}, {sel}; prmt.b32 b1, ${tab + 6}, ${tab + 7}, {sel}; "
                f"lop3.b32 {lo}, a0, a1, m, 0xD8; lop3.b32 {hi}, b0, b1, m, 0xD8; ")

    _ASM4_SRC = (
        "{ .reg .b32 s, x4, m, a0, a1, b0, b1, l, h; and.b32 s, $4, 0x77777777; shl.b32 x4, $4, 4; "
        + _lookup4("$4", "x4", "0xD9C8", "s", 12, "l", "h")
        + "prmt.b32 $0, l, h, 0x5140; prmt.b32 $1, l, h, 0x7362; shr.u32 s, s, 16; "
        + _lookup4("$4", "x4", "0xFBEA", "s", 12, "l", "h")
        + "prmt.b32 $2, l, h, 0x5140; prmt.b32 $3, l, h, 0x7362; }"
    )

    # 2 bits, 4 centroids, pack 16 (one word x = 16 codes, code k at bits 2k). The prmt pool is
    # (L, H): selector c -> low byte of centroid c, c + 4 -> its high byte, so a selector byte
    # c*0x11 + 0x40 yields one whole fp16 value. y_k = (x >> 2k) & 0x03030303 has code 4j+k in
    # byte j; interleaving y0/y1 (and y2/y3) gives the selectors of natural pairs.
    # Outputs $0..$7 = (c0,c1)..(c14,c15). Operands: x = $8 (x16), L = $24, H = $25.
    _ASM2_SRC = """
    {
    .reg .b32 y0, y1, y2, y3, a, s;
    and.b32 y0, $8, 0x03030303;
    shr.u32 y1, $8, 2;
    and.b32 y1, y1, 0x03030303;
    shr.u32 y2, $8, 4;
    and.b32 y2, y2, 0x03030303;
    shr.u32 y3, $8, 6;
    and.b32 y3, y3, 0x03030303;
    prmt.b32 a, y0, y1, 0x5140;
    mad.lo.u32 s, a, 0x11, 0x40404040;
    prmt.b32 $0, $24, $25, s;
    shr.u32 s, s, 16;
    prmt.b32 $2, $24, $25, s;
    prmt.b32 a, y0, y1, 0x7362;
    mad.lo.u32 s, a, 0x11, 0x40404040;
    prmt.b32 $4, $24, $25, s;
    shr.u32 s, s, 16;
    prmt.b32 $6, $24, $25, s;
    prmt.b32 a, y2, y3, 0x5140;
    mad.lo.u32 s, a, 0x11, 0x40404040;
    prmt.b32 $1, $24, $25, s;
    shr.u32 s, s, 16;
    prmt.b32 $3, $24, $25, s;
    prmt.b32 a, y2, y3, 0x7362;
    mad.lo.u32 s, a, 0x11, 0x40404040;
    prmt.b32 $5, $24, $25, s;
    shr.u32 s, s, 16;
    prmt.b32 $7, $24, $25, s;
    }
    """

    # 3 bits, 8 centroids, pack 8 (one 24-bit group = 8 codes, taken from the 64-bit (hi:lo) at bit
    # offset sh). The group is spread into 8 nibbles with three mask-multiply-add steps (12->16,
    # 6->8, 3->4 bit lanes), then looked up 4 codes at a time in the pool (L0, L1) / (H0, H1).
    # Outputs $0..$3. Operands: lo = $4, hi = $12, sh = $20 (x8 each), L0, L1, H0, H1 = $28..$31.
    _ASM3_SRC = """
    {
    .reg .b32 g, u, t, l, h;
    shf.r.clamp.b32 g, $4, $12, $20;
    and.b32 u, g, 0xFFF000;
    and.b32 t, g, 0xFFF;
    mad.lo.u32 g, u, 16, t;
    and.b32 u, g, 0x0FC00FC0;
    mad.lo.u32 g, u, 3, g;
    and.b32 u, g, 0x38383838;
    add.u32 g, g, u;
    prmt.b32 l, $28, $29, g;
    prmt.b32 h, $30, $31, g;
    prmt.b32 $0, l, h, 0x5140;
    prmt.b32 $1, l, h, 0x7362;
    shr.u32 g, g, 16;
    prmt.b32 l, $28, $29, g;
    prmt.b32 h, $30, $31, g;
    prmt.b32 $2, l, h, 0x5140;
    prmt.b32 $3, l, h, 0x7362;
    }
    """

    def _one_line(src: str) -> str:
        # PTX statements end with ';', so the text can be one line. torch.compile (Inductor) copies
        # a user kernel's constexpr globals into generated source and cannot take multi-line ones.
        return " ".join(part.strip() for part in src.strip().splitlines() if part.strip())

    _ASM4 = tl.constexpr(_one_line(_ASM4_SRC))
    _ASM2 = tl.constexpr(_one_line(_ASM2_SRC))
    _ASM3 = tl.constexpr(_one_line(_ASM3_SRC))
    _CONSTRAINTS4 = tl.constexpr("=r,=r,=r,=r" + ",r" * 16)
    _CONSTRAINTS2 = tl.constexpr("=r" + ",=r" * 7 + ",r" * 32)
    _CONSTRAINTS3 = tl.constexpr("=r,=r,=r,=r" + ",r" * 32)

    # Joins: replicate or interleave along new trailing axes. tl.join keeps the new axis inside one
    # thread, which is what keeps every group of codes of one word in one thread for the asm.
    @triton.jit
    def _rep2(x):
        return tl.join(x, x)

    @triton.jit
    def _j4(a0, a1, a2, a3):
        # [..] x4 -> [.., 4] with element k = a_k (natural order after the reshape)
        return tl.join(tl.join(a0, a2), tl.join(a1, a3))

    @triton.jit
    def _j8(a0, a1, a2, a3, a4, a5, a6, a7):
        return tl.join(_j4(a0, a2, a4, a6), _j4(a1, a3, a5, a7))

    @triton.jit
    def _expand_prmt4(w, l0, l1, l2, l3, h0, h1, h2, h3, BN: tl.constexpr, D: tl.constexpr):
        # w [BN, D/8] -> [BN, D/8, 8], each word repeated over its 8 codes; the table operand
        # carries word k of the tables at position k.
        NW: tl.constexpr = D // 8
        x = _rep2(_rep2(_rep2(w))).reshape(BN, NW, 8)
        z = tl.zeros([BN, NW], tl.int32)
        tbl = _j8(z + l0, z + l1, z + l2, z + l3, z + h0, z + h1, z + h2, z + h3).reshape(BN, NW, 8)
        o = tl.inline_asm_elementwise(_ASM4, _CONSTRAINTS4, [x, tbl], dtype=tl.float16, is_pure=True, pack=8)
        return o.reshape(BN, D)

    @triton.jit
    def _expand_prmt2(w, l0, h0, BN: tl.constexpr, D: tl.constexpr):
        NW: tl.constexpr = D // 16
        x = _rep2(_rep2(_rep2(_rep2(w)))).reshape(BN, NW, 16)
        z = tl.zeros([BN, NW], tl.int32)
        # element 2k+j of the joined pair of 8-vectors is element k of operand j: L at 0, H at 1
        tbl = tl.join(_j8(z + l0, z, z, z, z, z, z, z), _j8(z + h0, z, z, z, z, z, z, z)).reshape(BN, NW, 16)
        o = tl.inline_asm_elementwise(_ASM2, _CONSTRAINTS2, [x, tbl], dtype=tl.float16, is_pure=True, pack=16)
        return o.reshape(BN, D)

    @triton.jit
    def _expand_prmt3(w0, w1, w2, l0, l1, h0, h1, BN: tl.constexpr, D: tl.constexpr):
        # 32 codes per (w0, w1, w2) = 4 groups of 8 codes (24 bits at offsets 0, 24, 48, 72).
        NG: tl.constexpr = D // 32
        lo = _j4(w0, w0, w1, w2).reshape(BN, NG, 4)
        hi = _j4(w1, w1, w2, w2).reshape(BN, NG, 4)
        z = tl.zeros([BN, NG], tl.int32)
        sh = _j4(z, z + 24, z + 16, z + 8).reshape(BN, NG, 4)
        lo = _rep2(_rep2(_rep2(lo))).reshape(BN, NG, 32)
        hi = _rep2(_rep2(_rep2(hi))).reshape(BN, NG, 32)
        sh = _rep2(_rep2(_rep2(sh))).reshape(BN, NG, 32)
        z4 = tl.zeros([BN, NG, 4], tl.int32)
        tbl = _j8(z4 + l0, z4 + l1, z4 + h0, z4 + h1, z4, z4, z4, z4).reshape(BN, NG, 32)
        o = tl.inline_asm_elementwise(_ASM3, _CONSTRAINTS3, [lo, hi, sh, tbl], dtype=tl.float16, is_pure=True, pack=8)
        return o.reshape(BN, D)

    # ------------------------------------------------------------------------------------------
    # Code expansion with shifts and a gathered load (portable; the interpreter's path).
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _codes_shift(w0, w1, w2, BITS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
        if BITS == 3:
            k = tl.arange(0, 32)[None, None, :]
            off = k * 3
            wi = off // 32
            sh = (off % 32).to(tl.uint32)
            a = w0.to(tl.uint32, bitcast=True)[:, :, None]
            b = w1.to(tl.uint32, bitcast=True)[:, :, None]
            c = w2.to(tl.uint32, bitcast=True)[:, :, None]
            low = tl.where(wi == 0, a, tl.where(wi == 1, b, c))
            high = tl.where(wi == 0, b, c)
            val = (low >> sh) | tl.where(sh > 29, high << ((32 - sh) & 31), 0)
            idx = (val & 7).to(tl.int32)
            return idx.reshape(BN, D)
        else:
            PER: tl.constexpr = 32 // BITS
            k = tl.arange(0, PER)[None, None, :].to(tl.uint32)
            a = w0.to(tl.uint32, bitcast=True)[:, :, None]
            idx = ((a >> (k * BITS)) & ((1 << BITS) - 1)).to(tl.int32)
            return idx.reshape(BN, D)

    # ------------------------------------------------------------------------------------------
    # Loading one block of codes, as int32 words (rows are d*bits/8 bytes, a multiple of 4).
    # 3-bit rows are read as three word planes (word 3i+r of each row), so that every group of 32
    # codes sits in one (w0, w1, w2) triple.
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _load_codes(CODES, row0, t, tmask, BITS: tl.constexpr, D: tl.constexpr):
        NW: tl.constexpr = D * BITS // 32  # words per row
        rows = (row0 + t.to(tl.int64))[:, None] * NW
        if BITS == 3:
            g = tl.arange(0, D // 32)[None, :] * 3
            m = tmask[:, None]
            w0 = tl.load(CODES + rows + g, mask=m, other=0)
            w1 = tl.load(CODES + rows + g + 1, mask=m, other=0)
            w2 = tl.load(CODES + rows + g + 2, mask=m, other=0)
            return w0, w1, w2
        else:
            w = tl.load(CODES + rows + tl.arange(0, NW)[None, :], mask=tmask[:, None], other=0)
            return w, w, w

    @triton.jit
    def _expand(r0, r1, r2, CENT, t0, t1, t2, t3, t4, t5, t6, t7,
                BITS: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, LUT: tl.constexpr):
        if LUT == 1:
            if BITS == 4:
                return _expand_prmt4(r0, t0, t1, t2, t3, t4, t5, t6, t7, BN, D)
            elif BITS == 3:
                return _expand_prmt3(r0, r1, r2, t0, t1, t4, t5, BN, D)
            else:
                return _expand_prmt2(r0, t0, t4, BN, D)
        else:
            idx = _codes_shift(r0, r1, r2, BITS, BN, D)
            return tl.load(CENT + idx).to(tl.float16)

    # ------------------------------------------------------------------------------------------
    # Stage 1: one program = one (batch row, KV head) x one range of slots.
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _to_log2(s, softcap, SOFTCAP: tl.constexpr):
        # scores times q_scale -> log2 units: with a cap, softcap * tanh(s / softcap) * log2(e),
        # tanh(x) = 1 - 2 / (exp(2x) + 1) (q_scale then holds no log2(e)).
        if SOFTCAP:
            e = tl.exp2(s * (2.0 * 1.4426950408889634 / softcap))
            s = (softcap * 1.4426950408889634) * (1.0 - 2.0 / (e + 1.0))
        return s

    @triton.jit
    def _split_blocks(n, st, C, sp, SPLITS, BN: tl.constexpr, RING: tl.constexpr):
        """Slots filled (``min(n, C)``) and the blocks ``[b0, b1)`` of ``BN`` slots that split ``sp``
        of ``SPLITS`` reads: whole blocks from the first one a row can see (``st``; all of a ring).
        Also called from the Gluon kernel (re-jitted there)."""
        filled = tl.minimum(n, C)
        if RING:
            lo = 0
        else:
            lo = tl.minimum(tl.maximum(st, 0), filled)
        blk_first = lo // BN
        blk_end = (filled + BN - 1) // BN
        per = (blk_end - blk_first + SPLITS - 1) // SPLITS
        b0 = blk_first + sp * per
        b1 = tl.minimum(b0 + per, blk_end)
        return filled, b0, b1

    @triton.jit
    def _history_partial(
        Q, KC, KS, VC, VS, KCENT, VCENT, n, st, C, b, h, HKV, sp, SPLITS, q_scale, softcap,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
        BN: tl.constexpr, RING: tl.constexpr, SOFTCAP: tl.constexpr, LUT: tl.constexpr, STAGES: tl.constexpr,
        EARLYV: tl.constexpr,
    ):
        """Split ``sp`` of the history of (row ``b``, KV head ``h``), ``n`` tokens ever written to it:
        returns the unnormalised rotated-domain accumulator ``[D, GP]``, the running max and sum
        ``[GP]`` (log2 units)."""
        filled, b0, b1 = _split_blocks(n, st, C, sp, SPLITS, BN, RING)
        bh = b * HKV + h

        # Queries of this KV head, [GP, D]; rows >= G are padding (zeros).
        g = tl.arange(0, GP)
        dcol = tl.arange(0, D)
        gmask = g < G
        qrow = (b * HKV * G + h * G + g).to(tl.int64)
        q = tl.load(Q + qrow[:, None] * D + dcol[None, :], mask=gmask[:, None], other=0.0)
        qmax = tl.max(tl.abs(q), axis=1)
        qmax = tl.where(qmax > 0, qmax, 1.0)
        qn = q / qmax[:, None]
        q_hi = qn.to(tl.float16)
        q_lo = ((qn - q_hi.to(tl.float32)) * 2048.0).to(tl.float16)  # what fp16 lost, scaled up
        # Columns 2g / 2g+1 of the score dot: high / low fp16 part of query g (fp32-like precision).
        qT2 = tl.trans(tl.permute(tl.join(q_hi, q_lo), (0, 2, 1)).reshape(2 * GP, D))  # [D, 2*GP]
        qsc = qmax * q_scale  # per-query factor of the fp32 scores

        kt0, kt1, kt2, kt3, kt4, kt5, kt6, kt7 = _byte_tables(KCENT, KBITS)
        vt0, vt1, vt2, vt3, vt4, vt5, vt6, vt7 = _byte_tables(VCENT, VBITS)

        # Everything is kept transposed (slots along rows): the dots are [BN, D] x [D, GP] and
        # [D, BN] x [BN, GP], so the expanded codes are the large (M) operand.
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_vec = tl.zeros([BN, GP], tl.float32)
        acc = tl.zeros([D, 2 * GP], tl.float32)  # column 2g: query g (odd columns stay 0)

        row0 = bh.to(tl.int64) * C
        offs = tl.arange(0, BN)

        # The codes are software-pipelined by Triton (cp.async into shared memory, STAGES deep);
        # the scales (2 bytes per slot, too small for cp.async) are prefetched one block ahead in
        # registers.
        t = b0 * BN + offs
        tmask = (t < filled) & (b0 < b1)
        ks_next = tl.load(KS + row0 + t, mask=tmask, other=0.0).to(tl.float32)
        vs_next = tl.load(VS + row0 + t, mask=tmask, other=0.0).to(tl.float32)
        for blk in tl.range(b0, b1, num_stages=STAGES):
            t = blk * BN + offs
            tmask = t < filled
            k0, k1, k2 = _load_codes(KC, row0, t, tmask, KBITS, D)
            v0, v1, v2 = _load_codes(VC, row0, t, tmask, VBITS, D)
            ks = ks_next
            vs = vs_next
            tn = t + BN
            tnmask = (tn < filled) & (blk + 1 < b1)
            ks_next = tl.load(KS + row0 + tn, mask=tnmask, other=0.0).to(tl.float32)
            vs_next = tl.load(VS + row0 + tn, mask=tnmask, other=0.0).to(tl.float32)

            # Visibility of the slots of this block.
            if RING:
                wrapped = t + C * ((n - 1 - t) // C)
                pos = tl.where(n > C, wrapped, t)
                vis = (t < filled) & (pos >= st)
            else:
                vis = (t < filled) & (t >= st)

            kc = _expand(k0, k1, k2, KCENT, kt0, kt1, kt2, kt3, kt4, kt5, kt6, kt7, KBITS, BN, D, LUT)
            if EARLYV:  # expand V before the score dot (independent work next to the dot and softmax)
                vc = _expand(v0, v1, v2, VCENT, vt0, vt1, vt2, vt3, vt4, vt5, vt6, vt7, VBITS, BN, D, LUT)
            s2 = tl.dot(kc, qT2)  # [BN, 2*GP] fp32
            s_hi, s_lo = tl.split(s2.reshape(BN, GP, 2))
            s = _to_log2((s_hi + s_lo * (1.0 / 2048.0)) * ks[:, None] * qsc[None, :], softcap, SOFTCAP)
            s = tl.where(vis[:, None], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[None, :])
            l_vec = l_vec * alpha[None, :] + p
            pv = (p * vs[:, None]).to(tl.float16)  # [BN, GP]
            pv2 = tl.join(pv, tl.zeros_like(pv)).reshape(BN, 2 * GP)  # padded to a 16-wide dot
            alpha2 = tl.join(alpha, alpha).reshape(2 * GP)
            if not EARLYV:
                vc = _expand(v0, v1, v2, VCENT, vt0, vt1, vt2, vt3, vt4, vt5, vt6, vt7, VBITS, BN, D, LUT)
            acc = acc * alpha2[None, :]
            acc = tl.dot(tl.trans(vc), pv2, acc)  # [D, 2*GP]
            m_i = m_new

        l_i = tl.sum(l_vec, axis=0)
        out_acc, _unused = tl.split(acc.reshape(D, GP, 2))
        return out_acc, m_i, l_i

    @triton.jit
    def _tq_decode_split_kernel(
        Q, KC, KS, VC, VS, KCENT, VCENT, NPTR, START,
        ACC, MAX, SUM,
        C, HKV, SPLITS, q_scale, softcap,
        G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, BN: tl.constexpr,
        RING: tl.constexpr, SOFTCAP: tl.constexpr, LUT: tl.constexpr, STAGES: tl.constexpr,
        EARLYV: tl.constexpr,
    ):
        # torch.compile passes Python floats as fp64: keep all score arithmetic in fp32.
        q_scale = tl.cast(q_scale, tl.float32)
        softcap = tl.cast(softcap, tl.float32)
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        n = tl.load(NPTR)
        st = tl.load(START + b)
        out_acc, m_i, l_i = _history_partial(
            Q, KC, KS, VC, VS, KCENT, VCENT, n, st, C, b, h, HKV, sp, SPLITS, q_scale, softcap,
            G, GP, D, KBITS, VBITS, BN, RING, SOFTCAP, LUT, STAGES, EARLYV)
        g = tl.arange(0, GP)
        dcol = tl.arange(0, D)
        gmask = g < G
        hq = (b * HKV * G + h * G + g).to(tl.int64)
        part = hq * SPLITS + sp
        tl.store(ACC + part[None, :] * D + dcol[:, None], out_acc, mask=gmask[None, :])
        tl.store(MAX + part, m_i, mask=gmask)
        tl.store(SUM + part, l_i, mask=gmask)

    # ------------------------------------------------------------------------------------------
    # The whole decode step of a layer (``decode_step``): stage 1 gets one more program per (row,
    # KV head), the last split, for the full-precision window and the new token's own K/V.
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _window_partial(
        QRAW, WK, WV, KNEW, VNEW, n, st, b, h, HKV, R, W, q_scale, softcap,
        G: tl.constexpr, GW: tl.constexpr, D: tl.constexpr, BW: tl.constexpr,
        SOFTCAP: tl.constexpr, SLIDING: tl.constexpr, EXACT: tl.constexpr,
    ):
        """The query token (position ``n``) over the window ring (``R`` slots, positions
        ``n - min(n, R) .. n - 1``) and over its own key, in the model's basis: returns the
        unnormalised accumulator ``[D, GW]`` (column g: query g), max and sum ``[GW]`` (log2 units).
        The window's dtype is the model's: 16-bit queries and keys multiply exactly in the dot; the
        probabilities enter the value dot as a high and a low 16-bit part. ``EXACT``: float32 dots
        without tf32 (float32 windows, and Triton's interpreter, whose 16-bit dots are wrong)."""
        WDT: tl.constexpr = tl.float32 if EXACT else WK.dtype.element_ty
        g = tl.arange(0, GW)
        dcol = tl.arange(0, D)
        gmask = g < G
        bh = (b * HKV + h).to(tl.int64)
        qrow = (b * HKV * G + h * G + g).to(tl.int64)
        q = tl.load(QRAW + qrow[:, None] * D + dcol[None, :], mask=gmask[:, None], other=0.0)  # [GW, D]
        qT = tl.trans(q.to(WDT))
        kn = tl.load(KNEW + bh * D + dcol).to(tl.float32)
        vn = tl.load(VNEW + bh * D + dcol).to(tl.float32)
        own = n >= st  # a padded row's own token is invisible too
        s_own = _to_log2(tl.sum(q.to(tl.float32) * kn[None, :], axis=1) * q_scale, softcap, SOFTCAP)
        m_i = tl.where(own & gmask, s_own, float("-inf"))
        l_i = tl.where(own & gmask, 1.0, 0.0)
        acc = tl.where(own, 1.0, 0.0) * vn[:, None] + tl.zeros([D, GW], tl.float32)
        for w0 in range(0, R, BW):
            j = w0 + tl.arange(0, BW)
            wrapped = j + R * ((n - 1 - j) // R)
            pos = tl.where(n > R, wrapped, j)
            vis = (j < R) & (j < n) & (pos >= st)
            if SLIDING:
                vis = vis & (pos > n - W)
            rows = (bh * R + j)[:, None] * D + dcol[None, :]
            kw = tl.load(WK + rows, mask=(j < R)[:, None], other=0.0).to(WDT)  # [BW, D]
            if EXACT:
                s = tl.dot(kw, qT, input_precision="ieee")
            else:
                s = tl.dot(kw, qT)
            s = _to_log2(s * q_scale, softcap, SOFTCAP)
            s = tl.where(vis[:, None] & gmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[None, :])  # [BW, GW]
            l_i = l_i * alpha + tl.sum(p, axis=0)
            vT = tl.trans(tl.load(WV + rows, mask=(j < R)[:, None], other=0.0).to(WDT))  # [D, BW]
            acc = acc * alpha[None, :]
            if EXACT:
                acc = tl.dot(vT, p, acc, input_precision="ieee")
            else:
                p_hi = p.to(WDT)
                acc = tl.dot(vT, p_hi, acc)
                acc = tl.dot(vT, (p - p_hi.to(tl.float32)).to(WDT), acc)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _tq_decode_step_kernel(
        Q, QRAW, KC, KS, VC, VS, KCENT, VCENT, WK, WV, KNEW, VNEW, NPTR, START,
        ACC, MAX, SUM, WACC, WMAX, WSUM,
        C, HKV, SPLITS, R, W, q_scale, softcap,
        G: tl.constexpr, GP: tl.constexpr, GW: tl.constexpr, D: tl.constexpr,
        KBITS: tl.constexpr, VBITS: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
        RING: tl.constexpr, SOFTCAP: tl.constexpr, SLIDING: tl.constexpr, EXACT: tl.constexpr,
        LUT: tl.constexpr, STAGES: tl.constexpr, EARLYV: tl.constexpr,
    ):
        q_scale = tl.cast(q_scale, tl.float32)
        softcap = tl.cast(softcap, tl.float32)
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        n = tl.load(NPTR).to(tl.int32)  # the layer's tokens: window holds the last min(n, R)
        st = tl.load(START + b).to(tl.int32)
        dcol = tl.arange(0, D)
        if sp == 0:  # first, so that the window programs start in the first wave
            gw = tl.arange(0, GW)
            hw = (b * HKV * G + h * G + gw).to(tl.int64)
            # (names differ from the other branch's: Triton wants equal types for names both define)
            w_acc, w_max, w_sum = _window_partial(QRAW, WK, WV, KNEW, VNEW, n, st, b, h, HKV, R, W, q_scale,
                                                  softcap, G, GW, D, BW, SOFTCAP, SLIDING, EXACT)
            tl.store(WACC + hw[None, :] * D + dcol[:, None], w_acc, mask=(gw < G)[None, :])
            tl.store(WMAX + hw, w_max, mask=gw < G)
            tl.store(WSUM + hw, w_sum, mask=gw < G)
        else:
            g = tl.arange(0, GP)
            gmask = g < G
            hq = (b * HKV * G + h * G + g).to(tl.int64)
            out_acc, m_i, l_i = _history_partial(
                Q, KC, KS, VC, VS, KCENT, VCENT, tl.maximum(n - R, 0), st, C, b, h, HKV, sp - 1, SPLITS, q_scale,
                softcap, G, GP, D, KBITS, VBITS, BN, RING, SOFTCAP, LUT, STAGES, EARLYV)
            part = hq * SPLITS + sp - 1
            tl.store(ACC + part[None, :] * D + dcol[:, None], out_acc, mask=gmask[None, :])
            tl.store(MAX + part, m_i, mask=gmask)
            tl.store(SUM + part, l_i, mask=gmask)

    @triton.jit
    def _tq_decode_step_combine_kernel(ACC, MAX, SUM, WACC, WMAX, WSUM, PV, OUT, SPLITS,
                                       SP: tl.constexpr, SB: tl.constexpr, D: tl.constexpr, CB: tl.constexpr):
        """One (row, query head): merge the history splits (rotated domain), rotate the sum back
        (``@ PV``, CB output columns at a time), add the window part, normalise."""
        row = tl.program_id(0).to(tl.int64)
        sidx = tl.arange(0, SP)
        smask = sidx < SPLITS
        m = tl.load(MAX + row * SPLITS + sidx, mask=smask, other=float("-inf"))
        l = tl.load(SUM + row * SPLITS + sidx, mask=smask, other=0.0)
        mh = tl.max(m, axis=0)
        mw = tl.load(WMAX + row)
        lw = tl.load(WSUM + row)
        mm = tl.maximum(mh, mw)
        ok = mm > float("-inf")
        msafe = tl.where(ok, mm, 0.0)
        w = tl.where(m > float("-inf"), tl.exp2(m - msafe), 0.0)
        ww = tl.where(mw > float("-inf"), tl.exp2(mw - msafe), 0.0)
        total = tl.sum(w * l, axis=0) + ww * lw
        denom = tl.where(ok & (total > 0), total, 1.0)
        drow = tl.arange(0, D)
        o = tl.zeros([D], tl.float32)
        for s0 in range(0, SPLITS, SB):  # contiguous [SB, D] tiles of partial accumulators
            si = s0 + tl.arange(0, SB)
            mi = tl.load(MAX + row * SPLITS + si, mask=si < SPLITS, other=float("-inf"))
            wi = tl.where(mi > float("-inf"), tl.exp2(mi - msafe), 0.0)
            a = tl.load(ACC + (row * SPLITS + si)[:, None] * D + drow[None, :], mask=(si < SPLITS)[:, None], other=0.0)
            o += tl.sum(a * wi[:, None], axis=0)
        for c0 in tl.static_range(0, D, CB):
            c = c0 + tl.arange(0, CB)
            pv = tl.load(PV + drow[:, None] * D + c[None, :])  # [D, CB]
            oc = tl.sum(o[:, None] * pv, axis=0) + ww * tl.load(WACC + row * D + c)
            tl.store(OUT + row * D + c, tl.where(ok, oc / denom, 0.0).to(OUT.dtype.element_ty))

    # ------------------------------------------------------------------------------------------
    # The decode step's store (``store_step``): the token leaving the window is encoded into the
    # history, and the new token takes its window slot.
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _encode_row(x, ROT, THR, CENT, CODES, SCALES, hrow, BITS: tl.constexpr, D: tl.constexpr):
        """TurboQuant MSE code of one vector ``x [D]`` (float32) into row ``hrow`` of the store:
        ``y = Pi x / |x|``, index = thresholds below ``y`` (bucketize), scale = ``|x| / |c[idx]|``
        (norm-corrected), codes packed little-endian within each byte group."""
        i = tl.arange(0, D)
        norm = tl.sqrt(tl.sum(x * x, axis=0))
        rot = tl.load(ROT + i[:, None] * D + i[None, :])  # Pi[j, i]
        y = tl.sum(rot * x[None, :], axis=1) / tl.where(norm > 0, norm, 1.0)
        k = tl.arange(0, 16)
        NT: tl.constexpr = (1 << BITS) - 1
        thr = tl.load(THR + k, mask=k < NT, other=float("inf"))
        idx = tl.sum((y[:, None] > thr[None, :]).to(tl.int32), axis=1)  # torch.bucketize(y, thr)
        c = tl.load(CENT + idx)
        scale = norm / tl.sqrt(tl.sum(c * c, axis=0))
        tl.store(SCALES + hrow, scale.to(tl.float16))
        NB: tl.constexpr = D * BITS // 8
        base = CODES + hrow * NB
        if BITS == 4:
            lo, hi = tl.split(idx.reshape(D // 2, 2))
            tl.store(base + tl.arange(0, D // 2), (lo | (hi << 4)).to(tl.uint8))
        elif BITS == 2:
            a, b = tl.split(idx.reshape(D // 2, 2))
            a0, a1 = tl.split(a.reshape(D // 4, 2))
            b0, b1 = tl.split(b.reshape(D // 4, 2))
            tl.store(base + tl.arange(0, D // 4), (a0 | (b0 << 2) | (a1 << 4) | (b1 << 6)).to(tl.uint8))
        else:  # 3 bits: groups of 8 codes -> 24-bit words -> 3 bytes
            sh = (tl.arange(0, 8) * 3)[None, :]
            word = tl.sum(idx.reshape(D // 8, 8) << sh, axis=1)
            gi = tl.arange(0, D // 8) * 3
            tl.store(base + gi, (word & 0xFF).to(tl.uint8))
            tl.store(base + gi + 1, ((word >> 8) & 0xFF).to(tl.uint8))
            tl.store(base + gi + 2, ((word >> 16) & 0xFF).to(tl.uint8))

    @triton.jit
    def _tq_store_step_kernel(
        WK, WV, KNEW, VNEW, NPTR, KEYSCALE, RK, RV, TK, TV, CK, CV, KC, KS, VC, VS,
        C, HKV, R,
        D: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, HAS_KEYSCALE: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        side = tl.program_id(1)
        n = tl.load(NPTR).to(tl.int64)
        slot = n % R  # the window slot of position n - R, which the new token takes
        hrow = bh * C + ((n - R) % C + C) % C  # its history slot (a negative position: a masked slot)
        i = tl.arange(0, D)
        wrow = (bh * R + slot) * D + i
        if side == 0:
            x = tl.load(WK + wrow).to(tl.float32)
            if HAS_KEYSCALE:
                x = x / tl.load(KEYSCALE + (bh % HKV) * D + i)
            _encode_row(x, RK, TK, CK, KC, KS, hrow, KBITS, D)
            tl.store(WK + wrow, tl.load(KNEW + bh * D + i))
        else:
            x = tl.load(WV + wrow).to(tl.float32)
            _encode_row(x, RV, TV, CV, VC, VS, hrow, VBITS, D)
            tl.store(WV + wrow, tl.load(VNEW + bh * D + i))

    # ------------------------------------------------------------------------------------------
    # Stage 2: merge the splits of one (batch row, query head).
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _tq_decode_combine_kernel(ACC, MAX, SUM, OUT, LSE, SPLITS, SP: tl.constexpr, D: tl.constexpr,
                                  SB: tl.constexpr):
        # Partials of one query row: maxima and sums over all SP slots, the accumulators in tiles of SB
        # splits (SP = splits * warps can reach a few hundred with the Gluon kernel).
        row = tl.program_id(0).to(tl.int64)
        sidx = tl.arange(0, SP)
        smask = sidx < SPLITS
        m = tl.load(MAX + row * SPLITS + sidx, mask=smask, other=float("-inf"))
        l = tl.load(SUM + row * SPLITS + sidx, mask=smask, other=0.0)
        mm = tl.max(m, axis=0)
        ok = mm > float("-inf")
        msafe = tl.where(ok, mm, 0.0)
        w = tl.where(m > float("-inf"), tl.exp2(m - msafe), 0.0)
        total = tl.sum(w * l, axis=0)
        dcol = tl.arange(0, D)
        o = tl.zeros([D], tl.float32)
        for s0 in tl.static_range(0, SP, SB):
            si = s0 + tl.arange(0, SB)
            mi = tl.load(MAX + row * SPLITS + si, mask=si < SPLITS, other=float("-inf"))
            wi = tl.where(mi > float("-inf"), tl.exp2(mi - msafe), 0.0)
            a = tl.load(ACC + (row * SPLITS + si)[:, None] * D + dcol[None, :], mask=(si < SPLITS)[:, None], other=0.0)
            o += tl.sum(a * wi[:, None], axis=0)
        denom = tl.where(ok, total, 1.0)
        o = tl.where(ok, o / denom, 0.0)
        lse = tl.where(ok, (msafe + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
        tl.store(OUT + row * D + dcol, o)
        tl.store(LSE + row, lse)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else 0
    if idx not in _SM_COUNT:
        if torch.compiler.is_compiling():  # no device queries while tracing; H100/H200 have 132
            return 132
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _fit_splits(programs_per_split: int, blocks: int, slots: int) -> int:
    """Number of splits whose programs best fill whole waves of ``slots`` resident programs (a
    partial last wave runs at the speed of a full one: this kernel is latency-bound per program)."""
    effs = {}
    for s in range(1, max(1, min(blocks, (4 * slots) // programs_per_split + 1)) + 1):
        p = programs_per_split * s
        effs[s] = p / (-(-p // slots) * slots)
    top = max(effs.values())
    return min(s for s, e in effs.items() if e >= top - 0.03)  # fewest splits within 3% of the best


def default_config(batch: int, kv_heads: int, capacity: int, head_dim: int, key_bits: int, value_bits: int,
                   sm_count: int = 132, register_cap: bool = True) -> dict:
    """Block size, warps, pipeline depth and number of splits for one launch (static: shapes only).

    Measured on an H100 (results/h100/kernel_notes.md): 64-slot blocks, 4 warps, 3 pipeline stages
    and a 128-register cap (4 resident programs per SM instead of 3) were fastest at d = 128. The
    cap is a launch option that torch.compile's handling of user Triton kernels does not carry
    (``register_cap=False`` there), so compiled graphs run uncapped, with 3 programs per SM.
    """
    small = head_dim <= 128
    block_n = 64 if small else 32  # d = 256: smaller tiles keep the expanded codes in registers
    cap = register_cap and small
    per_sm = 4 if cap else 3
    blocks = max(1, -(-capacity // block_n))
    splits = _fit_splits(batch * kv_heads, blocks, per_sm * sm_count)
    return {"BLOCK_N": block_n, "num_warps": 4, "splits": splits, "stages": 3, "early_v": False,
            "maxnreg": 128 if cap else 0}


def _check(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, key_bits, value_bits):
    if q_rot.ndim != 3:
        raise ValueError(f"q_rot must be [B, Hq, d], got shape {tuple(q_rot.shape)}")
    B, Hq, d = q_rot.shape
    if k_codes.ndim != 4 or v_codes.ndim != 4:
        raise ValueError("codes must be [B, Hkv, C, d*bits/8]")
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    if key_bits not in _SUPPORTED_BITS or value_bits not in _SUPPORTED_BITS:
        raise ValueError(f"key_bits/value_bits must be in {_SUPPORTED_BITS}, got {key_bits}/{value_bits}")
    if d not in _SUPPORTED_DIMS:
        raise ValueError(f"head_dim must be one of {_SUPPORTED_DIMS}, got {d}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if tuple(k_codes.shape) != (B, Hkv, C, d * key_bits // 8):
        raise ValueError(f"k_codes shape {tuple(k_codes.shape)} != {(B, Hkv, C, d * key_bits // 8)}")
    if tuple(v_codes.shape) != (B, Hkv, C, d * value_bits // 8):
        raise ValueError(f"v_codes shape {tuple(v_codes.shape)} != {(B, Hkv, C, d * value_bits // 8)}")
    if tuple(k_scales.shape) != (B, Hkv, C) or tuple(v_scales.shape) != (B, Hkv, C):
        raise ValueError("scales must be [B, Hkv, C]")
    if k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise TypeError("codes must be uint8")
    if k_centroids.numel() != 1 << key_bits or v_centroids.numel() != 1 << value_bits:
        raise ValueError("centroid tables must have 2**bits entries")
    if n.numel() != 1:
        raise ValueError("n must hold one value")
    if start.numel() != B:
        raise ValueError(f"start must be [B] = [{B}]")


def _launch(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, out, lse,
            key_bits, value_bits, scaling, softcap, ring, config, lut, wrap=None):
    """Allocate the partial buffers and launch both stages (``wrap``: torch.library.wrap_triton)."""
    B, Hq, d = q_rot.shape
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    G = Hq // Hkv
    GP = max(8, triton.next_power_of_2(G))  # the dots are 2*GP >= 16 wide
    splits = int(config["splits"])
    dev = q_rot.device
    acc = torch.empty((B * Hq * splits * d,), device=dev, dtype=torch.float32)
    mx = torch.empty((B * Hq * splits,), device=dev, dtype=torch.float32)
    sm = torch.empty((B * Hq * splits,), device=dev, dtype=torch.float32)
    softcap = float(softcap or 0.0)
    q_scale = float(scaling) * (1.0 if softcap else _LOG2E)
    kw = k_codes.view(torch.int32)
    vw = v_codes.view(torch.int32)
    k1 = _tq_decode_split_kernel if wrap is None else wrap(_tq_decode_split_kernel)
    k1[(B * Hkv, splits)](
        q_rot, kw, k_scales, vw, v_scales, k_centroids, v_centroids, n, start,
        acc, mx, sm,
        C, Hkv, splits, q_scale, softcap if softcap else 1.0,
        G=G, GP=GP, D=d, KBITS=key_bits, VBITS=value_bits, BN=int(config["BLOCK_N"]),
        RING=bool(ring), SOFTCAP=bool(softcap), LUT=1 if lut == "prmt" else 0, STAGES=int(config["stages"]),
        EARLYV=bool(config.get("early_v", False)), num_warps=int(config["num_warps"]),
        **({"maxnreg": int(config["maxnreg"])} if config.get("maxnreg") else {}),
    )
    _launch_combine(acc, mx, sm, out, lse, splits, wrap)


def _launch_combine(acc, mx, sm, out, lse, parts: int, wrap=None):
    """Stage 2 of :func:`decode_attention`: merge ``parts`` partials per query row into ``out [B,
    Hq, d]`` and ``lse`` (also the Gluon kernel's merge, with 4 partials per split)."""
    B, Hq, d = out.shape
    kern = _tq_decode_combine_kernel if wrap is None else wrap(_tq_decode_combine_kernel)
    sp2 = max(2, triton.next_power_of_2(parts))
    kern[(B * Hq,)](acc, mx, sm, out, lse, parts, SP=sp2, D=d, SB=min(sp2, 32 if d <= 128 else 16), num_warps=4)


def _launch_step(q, q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, win_k, win_v, k_new,
                 v_new, rotation_v, n, start, out, window, sliding, key_bits, value_bits, scaling, softcap, ring,
                 config, lut, wrap=None):
    """The launches of :func:`decode_step` (``wrap``: torch.library.wrap_triton). With
    ``config["gluon_bnw"]`` the history splits run in the Gluon kernel (:mod:`.gluon_decode`, its
    own op) and this kernel runs only the window programs."""
    B, Hq, d = q_rot.shape
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    G = Hq // Hkv
    GP = max(8, triton.next_power_of_2(G))
    splits = int(config["splits"])
    dev = q_rot.device
    softcap = float(softcap or 0.0)
    q_scale = float(scaling) * (1.0 if softcap else _LOG2E)
    bnw = int(config.get("gluon_bnw") or 0)
    if bnw:
        acc, mx, sm = torch.ops.tqpatch.gluon_history(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids,
                                                      v_centroids, n, start, int(window), splits, bnw, q_scale,
                                                      softcap, bool(ring))
        grid_splits, splits = 0, splits * 4  # the kernel below: window programs only; 4 warps' partials per split
    else:
        grid_splits = splits
        acc = torch.empty((B * Hq * splits * d,), device=dev, dtype=torch.float32)
        mx = torch.empty((B * Hq * splits,), device=dev, dtype=torch.float32)
        sm = torch.empty((B * Hq * splits,), device=dev, dtype=torch.float32)
    wacc = torch.empty((B * Hq * d,), device=dev, dtype=torch.float32)
    wmx = torch.empty((B * Hq,), device=dev, dtype=torch.float32)
    wsm = torch.empty((B * Hq,), device=dev, dtype=torch.float32)
    k1 = _tq_decode_step_kernel if wrap is None else wrap(_tq_decode_step_kernel)
    k1[(B * Hkv, grid_splits + 1)](
        q_rot, q, k_codes.view(torch.int32), k_scales, v_codes.view(torch.int32), v_scales, k_centroids, v_centroids,
        win_k, win_v, k_new, v_new, n, start,
        acc, mx, sm, wacc, wmx, wsm,
        C, Hkv, splits, int(window), int(sliding or 0), q_scale, softcap if softcap else 1.0,
        G=G, GP=GP, GW=max(16, triton.next_power_of_2(G)), D=d, KBITS=key_bits, VBITS=value_bits,
        BN=int(config["BLOCK_N"]), BW=16,  # 16-slot window tiles: 160 registers (64-slot: 255, spilling)
        RING=bool(ring), SOFTCAP=bool(softcap), SLIDING=bool(sliding),
        EXACT=win_k.dtype == torch.float32 or interpreting(), LUT=1 if lut == "prmt" else 0,
        STAGES=int(config["stages"]), EARLYV=bool(config.get("early_v", False)), num_warps=int(config["num_warps"]),
        **({"maxnreg": int(config["maxnreg"])} if config.get("maxnreg") else {}),
    )
    k2 = _tq_decode_step_combine_kernel if wrap is None else wrap(_tq_decode_step_combine_kernel)
    k2[(B * Hq,)](acc, mx, sm, wacc, wmx, wsm, rotation_v, out, splits, SP=max(2, triton.next_power_of_2(splits)),
                  SB=32 if d <= 128 else 16, D=d, CB=64 if d <= 128 else 32, num_warps=4)


def _launch_store(win_k, win_v, k_new, v_new, n, key_scale, has_key_scale, rotation_k, rotation_v, k_thresholds,
                  v_thresholds, k_centroids, v_centroids, k_codes, k_scales, v_codes, v_scales, key_bits, value_bits,
                  wrap=None):
    """The launch of :func:`store_step` (``key_scale`` is read only when ``has_key_scale``)."""
    B, Hkv, R, d = win_k.shape
    kern = _tq_store_step_kernel if wrap is None else wrap(_tq_store_step_kernel)
    kern[(B * Hkv, 2)](
        win_k, win_v, k_new, v_new, n, key_scale, rotation_k, rotation_v,
        k_thresholds, v_thresholds, k_centroids, v_centroids, k_codes, k_scales, v_codes, v_scales,
        k_codes.shape[2], Hkv, R, D=d, KBITS=key_bits, VBITS=value_bits, HAS_KEYSCALE=bool(has_key_scale),
        num_warps=4,
    )


def _default_lut() -> str:
    if _ENV_LUT in ("prmt", "gather"):
        return _ENV_LUT
    return "gather" if interpreting() else "prmt"


if _HAS_TRITON:
    from torch.library import triton_op, wrap_triton

    @triton_op("tqpatch::decode_attention", mutates_args=())
    def _decode_attention_op(
        q_rot: torch.Tensor,
        k_codes: torch.Tensor,
        k_scales: torch.Tensor,
        v_codes: torch.Tensor,
        v_scales: torch.Tensor,
        k_centroids: torch.Tensor,
        v_centroids: torch.Tensor,
        n: torch.Tensor,
        start: torch.Tensor,
        key_bits: int,
        value_bits: int,
        scaling: float,
        softcap: float,
        ring: bool,
        block_n: int,
        num_warps: int,
        splits: int,
        stages: int,
        early_v: bool,
        maxnreg: int,
        lut: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, Hq, d = q_rot.shape
        out = torch.empty((B, Hq, d), device=q_rot.device, dtype=torch.float32)
        lse = torch.empty((B, Hq), device=q_rot.device, dtype=torch.float32)
        config = {"BLOCK_N": block_n, "num_warps": num_warps, "splits": splits, "stages": stages,
                  "early_v": early_v, "maxnreg": maxnreg}
        _launch(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, out, lse,
                key_bits, value_bits, scaling, softcap, ring, config, lut, wrap=wrap_triton)
        return out, lse

    @triton_op("tqpatch::decode_step", mutates_args=())
    def _decode_step_op(
        q: torch.Tensor,
        q_rot: torch.Tensor,
        k_codes: torch.Tensor,
        k_scales: torch.Tensor,
        v_codes: torch.Tensor,
        v_scales: torch.Tensor,
        k_centroids: torch.Tensor,
        v_centroids: torch.Tensor,
        win_k: torch.Tensor,
        win_v: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        rotation_v: torch.Tensor,
        n: torch.Tensor,
        start: torch.Tensor,
        window: int,
        sliding: int,
        key_bits: int,
        value_bits: int,
        scaling: float,
        softcap: float,
        ring: bool,
        block_n: int,
        num_warps: int,
        splits: int,
        stages: int,
        maxnreg: int,
        lut: str,
        gluon_bnw: int,
    ) -> torch.Tensor:
        B, Hq, d = q_rot.shape
        out = torch.empty((B, Hq, d), device=q_rot.device, dtype=q.dtype)
        config = {"BLOCK_N": block_n, "num_warps": num_warps, "splits": splits, "stages": stages, "maxnreg": maxnreg,
                  "gluon_bnw": gluon_bnw}
        _launch_step(q, q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, win_k, win_v, k_new,
                     v_new, rotation_v, n, start, out, window, sliding, key_bits, value_bits, scaling, softcap, ring,
                     config, lut, wrap=wrap_triton)
        return out

    @triton_op("tqpatch::store_step", mutates_args=("win_k", "win_v", "k_codes", "k_scales", "v_codes", "v_scales"))
    def _store_step_op(
        win_k: torch.Tensor,
        win_v: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        n: torch.Tensor,
        key_scale: torch.Tensor,
        has_key_scale: bool,
        rotation_k: torch.Tensor,
        rotation_v: torch.Tensor,
        k_thresholds: torch.Tensor,
        v_thresholds: torch.Tensor,
        k_centroids: torch.Tensor,
        v_centroids: torch.Tensor,
        k_codes: torch.Tensor,
        k_scales: torch.Tensor,
        v_codes: torch.Tensor,
        v_scales: torch.Tensor,
        key_bits: int,
        value_bits: int,
    ) -> None:
        _launch_store(win_k, win_v, k_new, v_new, n, key_scale, has_key_scale, rotation_k, rotation_v, k_thresholds,
                      v_thresholds, k_centroids, v_centroids, k_codes, k_scales, v_codes, v_scales, key_bits,
                      value_bits, wrap=wrap_triton)


def _launch_config(q_rot: torch.Tensor, k_codes: torch.Tensor, key_bits: int, value_bits: int,
                   overrides: dict | None) -> dict:
    """:func:`default_config` for these shapes and this device, with ``overrides``; under
    torch.compile without the register cap (a launch option it cannot pass on)."""
    B, _, d = q_rot.shape
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    compiling = torch.compiler.is_compiling()
    cfg = default_config(B, Hkv, C, d, key_bits, value_bits, _sm_count(q_rot.device) if q_rot.is_cuda else 132,
                         register_cap=not compiling)
    if overrides:
        cfg.update(overrides)
    if compiling:
        cfg["maxnreg"] = 0
    return cfg


def _run_op(op, device: torch.device, args: tuple):
    """Call a registered op. Inside torch.compile, Inductor's generated code sets the device itself;
    eager, Triton launches on the *current* device, so a layer on another GPU than the current one
    (accelerate's device_map) would run there and read its cache over peer access: launch under
    the tensors' device."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch.cuda.device(device):
        return op(*args)


def decode_attention(
    q_rot: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    k_centroids: torch.Tensor,
    v_centroids: torch.Tensor,
    n: torch.Tensor,
    start: torch.Tensor,
    *,
    key_bits: int,
    value_bits: int,
    scaling: float,
    softcap: float = 0.0,
    ring: bool = False,
    config: dict | None = None,
    lut: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention (one query token) over packed TurboQuant codes.

    Same semantics as :func:`~tqpatch.kernels.reference.history_attention` with ``Q == 1`` and the
    query axis squeezed.

    Args:
        q_rot: ``float32 [B, Hq, d]`` rotated queries.
        k_codes, v_codes: ``uint8 [B, Hkv, C, d*bits/8]`` packed codes (contiguous).
        k_scales, v_scales: ``float16 [B, Hkv, C]``.
        k_centroids, v_centroids: ``float32 [2**bits]``.
        n: ``int32 [1]`` tokens ever written (read on the device).
        start: ``int32 [B]`` first non-padding position of each row.
        key_bits, value_bits: 2, 3 or 4. ``scaling``: softmax scale. ``softcap``: tanh logit cap
            (0: off). ``ring``: slots form a ring buffer (see ``slot_positions``).
        config: launch overrides (``BLOCK_N``, ``num_warps``, ``splits``, ``stages``); default from the
            shapes (:func:`default_config`).
        lut: ``"prmt"`` (GPU default) or ``"gather"`` code expansion.

    Returns:
        ``(out_rot float32 [B, Hq, d], lse float32 [B, Hq])``; rows with no visible slot get
        ``lse = -inf`` and ``out = 0``. Without Triton or off CUDA, the reference computes it.
    """
    _check(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, key_bits, value_bits)
    if not (_HAS_TRITON and (q_rot.is_cuda or interpreting())):
        out, lse = history_attention(
            q_rot.unsqueeze(2), k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start,
            key_bits=key_bits, value_bits=value_bits, scaling=scaling, softcap=softcap or None, ring=ring,
        )
        return out.squeeze(2), lse.squeeze(2)
    B, Hq, d = q_rot.shape
    cfg = _launch_config(q_rot, k_codes, key_bits, value_bits, config)
    lut = lut or _default_lut()
    q_rot = q_rot.to(torch.float32).contiguous()
    n = n.reshape(1).to(torch.int32)
    start = start.reshape(B).to(torch.int32)
    k_centroids = k_centroids.to(torch.float32).contiguous()
    v_centroids = v_centroids.to(torch.float32).contiguous()
    k_codes = k_codes.contiguous()
    v_codes = v_codes.contiguous()
    k_scales = k_scales.contiguous()
    v_scales = v_scales.contiguous()
    if interpreting() and not q_rot.is_cuda:
        out = torch.empty((B, Hq, d), dtype=torch.float32)
        lse = torch.empty((B, Hq), dtype=torch.float32)
        _launch(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, out, lse,
                key_bits, value_bits, scaling, softcap, ring, cfg, lut)
        return out, lse
    args = (
        q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start,
        int(key_bits), int(value_bits), float(scaling), float(softcap or 0.0), bool(ring),
        int(cfg["BLOCK_N"]), int(cfg["num_warps"]), int(cfg["splits"]), int(cfg["stages"]),
        bool(cfg.get("early_v", False)), int(cfg.get("maxnreg") or 0), str(lut),
    )
    return _run_op(torch.ops.tqpatch.decode_attention, q_rot.device, args)


def decode_step(
    q: torch.Tensor,
    q_rot: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    k_centroids: torch.Tensor,
    v_centroids: torch.Tensor,
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    rotation_v: torch.Tensor,
    n: torch.Tensor,
    start: torch.Tensor,
    *,
    key_bits: int,
    value_bits: int,
    scaling: float,
    softcap: float = 0.0,
    ring: bool = False,
    sliding: int = 0,
    config: dict | None = None,
    lut: str | None = None,
) -> torch.Tensor:
    """A layer's whole decode-step attention in two launches: one query token over the compressed
    history, the full-precision window and its own key, merged and rotated back to the model's basis.

    Stage 1 runs the history splits of :func:`decode_attention` plus one more program per (row, KV
    head) for the window ring and the new token (float32, model basis); stage 2 merges the history
    splits in the rotated domain, applies ``rotation_v`` once, adds the window part and normalises.
    For 4-bit keys and values at batch x KV heads >= 64 the history splits run in the Gluon kernel
    (:mod:`.gluon_decode`) instead, a third launch (``config={"gluon_bnw": 0}`` turns it off).

    Args:
        q: ``[B, Hq, d]`` queries in the model's basis (any float dtype); ``q_rot``: the same in the
            keys' rotated domain, float32 (``Pi_K D q``).
        k_codes .. v_centroids: the history store, as in :func:`decode_attention`.
        win_k, win_v: ``[B, Hkv, R, d]`` the window ring (position ``t`` at slot ``t % R``).
        k_new, v_new: ``[B, Hkv, d]`` the new token's key and value.
        rotation_v: ``float32 [d, d]``: history outputs are ``out_rot @ rotation_v``.
        n: tokens stored so far (one integer; the new token's position), on the device.
        start: ``[B]`` first non-padding position of each row.
        sliding: sliding-window size (0: off): keys at positions ``<= n - sliding`` are invisible.
        config: launch overrides, as in :func:`decode_attention`, and ``gluon_bnw`` (0: off).

    Returns:
        ``[B, Hq, d]`` attention output in the model's basis, in ``q``'s dtype.
    """
    if not (_HAS_TRITON and (q_rot.is_cuda or interpreting())):
        raise RuntimeError("decode_step needs Triton and a CUDA device (or TRITON_INTERPRET=1); "
                           "use tqpatch.attention's torch path instead")
    _check(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n.reshape(1), start.reshape(-1),
           key_bits, value_bits)
    B, Hq, d = q_rot.shape
    Hkv, R = k_codes.shape[1], win_k.shape[2]
    if tuple(win_k.shape) != (B, Hkv, R, d) or tuple(win_v.shape) != (B, Hkv, R, d):
        raise ValueError(f"window tensors must be [B, Hkv, R, d] = {(B, Hkv, R, d)}")
    cfg = _launch_config(q_rot, k_codes, key_bits, value_bits, config)
    C = k_codes.shape[2]
    if interpreting():
        cfg["gluon_bnw"] = 0  # Gluon has no interpreter
    elif "gluon_bnw" not in cfg:  # the Gluon history kernel where measured faster (its step_config)
        gcfg = gluon_decode.step_config(B, Hkv, C, d, Hq // Hkv, key_bits, value_bits, _sm_count(q_rot.device))
        cfg["gluon_bnw"] = gcfg["bnw"] if gcfg else 0
    if cfg["gluon_bnw"] and not (config and "splits" in config):
        cfg["splits"] = gluon_decode.default_splits(B, Hkv, C, _sm_count(q_rot.device), bnw=cfg["gluon_bnw"])
    lut = lut or _default_lut()
    args = [q.reshape(B, Hq, d).contiguous(), q_rot.to(torch.float32).contiguous(), k_codes.contiguous(),
            k_scales.contiguous(), v_codes.contiguous(), v_scales.contiguous(),
            k_centroids.to(torch.float32).contiguous(), v_centroids.to(torch.float32).contiguous(),
            win_k.contiguous(), win_v.contiguous(), k_new.reshape(B, Hkv, d).contiguous(),
            v_new.reshape(B, Hkv, d).contiguous(), rotation_v.to(torch.float32).contiguous(), n.reshape(1),
            start.reshape(B)]
    opts = (int(R), int(sliding or 0), int(key_bits), int(value_bits), float(scaling), float(softcap or 0.0),
            bool(ring), int(cfg["BLOCK_N"]), int(cfg["num_warps"]), int(cfg["splits"]), int(cfg["stages"]),
            int(cfg.get("maxnreg") or 0), str(lut), int(cfg["gluon_bnw"]))
    if interpreting() and not q_rot.is_cuda:
        out = torch.empty((B, Hq, d), dtype=q.dtype)
        _launch_step(*args, out, R, sliding, key_bits, value_bits, scaling, softcap, ring, cfg, lut)
        return out
    return _run_op(torch.ops.tqpatch.decode_step, q_rot.device, (*args, *opts))


def store_step(
    win_k: torch.Tensor,
    win_v: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    n: torch.Tensor,
    key_scale: torch.Tensor | None,
    rotation_k: torch.Tensor,
    rotation_v: torch.Tensor,
    k_thresholds: torch.Tensor,
    v_thresholds: torch.Tensor,
    k_centroids: torch.Tensor,
    v_centroids: torch.Tensor,
    k_codes: torch.Tensor,
    k_scales: torch.Tensor,
    v_codes: torch.Tensor,
    v_scales: torch.Tensor,
    *,
    key_bits: int,
    value_bits: int,
) -> None:
    """A decode step's store in one launch, in place: the token at position ``n - R`` leaves the
    window ring (slot ``n % R``) and is encoded into history slot ``(n - R) mod C`` (codes and
    norm-corrected fp16 scale, what ``TurboQuantQuantizer.encode_indices`` and ``packing.pack``
    give), then the new token (``k_new, v_new [B, Hkv, d]``) takes that window slot. ``n`` (tokens
    stored so far) is read on the device and not advanced. ``key_scale [Hkv, d]``: keys are divided
    by it before encoding (``None``: no smoothing). Needs ``R >= 1``; 2-4 bits, head_dim 64/128/256."""
    if not (_HAS_TRITON and (win_k.is_cuda or interpreting())):
        raise RuntimeError("store_step needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    B, Hkv, R, d = win_k.shape
    if R < 1 or not serves(key_bits, value_bits, d):
        raise ValueError(f"store_step takes a window (R={R} >= 1), 2-4 bits ({key_bits}/{value_bits}) and "
                         f"head_dim 64/128/256 ({d})")
    f32 = [t.to(torch.float32).contiguous() for t in (rotation_k, rotation_v, k_thresholds, v_thresholds, k_centroids,
                                                      v_centroids)]
    ks = f32[0] if key_scale is None else key_scale.to(torch.float32).contiguous()  # f32[0]: unused stand-in
    args = (win_k, win_v, k_new.reshape(B, Hkv, d).to(win_k.dtype).contiguous(),
            v_new.reshape(B, Hkv, d).to(win_v.dtype).contiguous(), n.reshape(1), ks, key_scale is not None, *f32,
            k_codes, k_scales, v_codes, v_scales)
    if interpreting() and not win_k.is_cuda:
        _launch_store(*args, key_bits, value_bits)
        return
    _run_op(torch.ops.tqpatch.store_step, win_k.device, (*args, int(key_bits), int(value_bits)))


from . import gluon_decode  # noqa: E402  (the Gluon history kernel and its op; imports this module)
