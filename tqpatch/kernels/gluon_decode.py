"""Gluon history kernel for 4-bit keys and values: code expansion straight into tensor-core operands.

The Triton kernel (:mod:`.triton_decode`) expands packed codes in a blocked layout and lets the
compiler move the expanded tiles into the dot-operand layout through shared memory, with a
CTA-wide barrier each time (seven per 64-slot block): the loop is latency-bound
(``results/h100/kernel_notes.md``). Gluon lets the kernel name its layouts, so here every tensor of
the loop is built in the register layout the ``mma.sync`` (m16n8k16) instruction reads:

* each warp owns its own ``BNW`` (16 or 32) slots of every block of ``4 * BNW`` and its own online
  softmax (the batch axis of the 3-D layouts is the warp), so the loop has no barrier and no shared
  memory; the four warps' partials are written as four splits and merged by the usual combine
  kernel;
* scores ``S^T [16, BNW] = Q [16, d] . K^T [d, BNW]``: rows 0..7 of ``Q`` hold the high fp16 parts
  of the (up to 8) queries of the KV head, rows 8..15 the low parts (the score of query ``g`` is
  ``S[g] + S[g + 8] / 2048``, both in one thread). Each thread's share of ``K^T`` is 4-bit codes
  of one slot at ``d / 4`` coordinates: the coordinates are permuted (``pi_K``) so that these are
  contiguous bytes of the packed row (one 16-byte load at d = 128), expanded with the ``prmt``
  routine of :mod:`.triton_decode` directly into the operand registers. The query is loaded in the
  same permuted order (a dot product does not care about the order of its terms);
* ``O [d, 8] += V^T [d, BNW] . P [BNW, 8]``: ``P`` is the score accumulator's registers as they are
  (the thread holding query ``g``'s scores of slots ``2c, 2c+1, 2c+8, 2c+9`` is the one the operand
  wants them in); ``V^T``'s operand pairs two slots per register, so a second ``prmt`` routine
  expands the words of two slots at once into ``(slot 2i, slot 2i+1)`` pairs. Its coordinates are
  permuted too (``pi_V``: each thread reads 8 contiguous bytes per slot at d = 128) and the output
  is written back in natural order.

Precision is that of the Triton kernel (fp16 operands, fp32 accumulation, the query split in two
fp16 parts). :func:`history_partials` computes the same split partials as the Triton kernel's
stage 1, so the same combine kernels merge them.

Measured on an H200 (``results/h200/gluon_kernel_h200.md``, analysis in ``results/h200/notes.md``):
0.75-0.82x the Triton kernel's time from B x Hkv = 64 up, slower at B = 1; the loop is bound by
the integer pipe that runs the code expansion (2.7 ``prmt``/``lop3`` per code).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["available", "decode_attention", "default_splits", "history_partials", "serves", "step_config"]

log = logging.getLogger(__name__)

try:  # Gluon ships with Triton >= 3.5; CPU-only installs have neither.
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .triton_decode import _ASM4_SRC, _lookup4, _one_line
    from .triton_decode import _split_blocks as _split_blocks_tl

    _HAS_GLUON = True
except Exception:  # pragma: no cover - depends on the environment
    _HAS_GLUON = False
    log.debug("triton.experimental.gluon is not importable: the Gluon decode kernel is off")

_W = 4  # warps per program, each its own BNW-slot share of every block of 4 * BNW slots
_BNW = 16  # the default share (the decode step picks 32: step_config)


def available() -> bool:
    """Gluon importable and a CUDA device of compute capability >= 8.0 (mma.sync m16n8k16)."""
    return _HAS_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def serves(key_bits: int, value_bits: int, head_dim: int, group: int) -> bool:
    """Shapes this kernel handles: 4-bit keys and values, d in {64, 128, 256}, at most 8 query
    heads per KV head (the rest stays with the Triton kernel)."""
    return key_bits == 4 and value_bits == 4 and head_dim in (64, 128, 256) and 1 <= group <= 8


if _HAS_GLUON:
    # Two slots' words at once: x = word of slot a, y = word of slot b (8 codes each, code k at
    # nibble k); outputs $0..$7 = (a_k, b_k) as fp16 pairs, k = 0..7. The per-word lookup is the
    # one of _ASM4_SRC (selectors s = x & 0x77777777, bit 3 of each code picks the table half
    # through a sign-replicated byte mask); two more prmt per output pair the slots.
    # Operands: x = $8 (x16), y = $24 (x16), table words L0..L3, H0..H3 = $40..$47.
    def _asmv_half(mask: str, outs: tuple[int, int, int, int]) -> str:
        # codes 0-3 (mask 0xD9C8) or 4-7 (0xFBEA, selectors shifted down first) of both words
        return (_lookup4("$8", "x4", mask, "s", 40, "la", "ha") + _lookup4("$24", "y4", mask, "t", 40, "lb", "hb")
                + "prmt.b32 u, la, ha, 0x5140; prmt.b32 v, lb, hb, 0x5140; "
                f"prmt.b32 ${outs[0]}, u, v, 0x5410; prmt.b32 ${outs[1]}, u, v, 0x7632; "
                "prmt.b32 u, la, ha, 0x7362; prmt.b32 v, lb, hb, 0x7362; "
                f"prmt.b32 ${outs[2]}, u, v, 0x5410; prmt.b32 ${outs[3]}, u, v, 0x7632; ")

    _ASMV_SRC = (
        "{ .reg .b32 s, t, x4, y4, m, a0, a1, b0, b1, la, ha, lb, hb, u, v;"
        " and.b32 s, $8, 0x77777777; and.b32 t, $24, 0x77777777; shl.b32 x4, $8, 4; shl.b32 y4, $24, 4; "
        + _asmv_half("0xD9C8", (0, 1, 2, 3))
        + "shr.u32 s, s, 16; shr.u32 t, t, 16; "
        + _asmv_half("0xFBEA", (4, 5, 6, 7))
        + "}"
    )
    _split_blocks = gluon.jit(_split_blocks_tl.fn)  # the Triton kernel's helper, scalars only
    _ASMK = gl.constexpr(_one_line(_ASM4_SRC))
    _ASMV = gl.constexpr(_one_line(_ASMV_SRC))
    _CONSK = gl.constexpr("=r,=r,=r,=r" + ",r" * 16)
    _CONSV = gl.constexpr("=r" + ",=r" * 7 + ",r" * 48)

    @gluon.constexpr_function
    def _k_layout(W, D, BNW):
        # [W, words (4 * NWT), 8 codes, BNW slots]: a thread holds NWT contiguous words of one
        # slot (lane bits 0-1 pick which NWT), the 8 codes of each word in consecutive registers.
        nwt = D // 32
        reg = [[0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]]
        reg += [[0, 1 << i, 0, 0] for i in range((nwt).bit_length() - 1)]
        reg += [[0, 0, 0, 8 << i] for i in range((BNW // 8).bit_length() - 1)]
        lane = [[0, nwt, 0, 0], [0, 2 * nwt, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4]]
        warp = [[1 << i, 0, 0, 0] for i in range((W).bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [W, 4 * nwt, 8, BNW])

    @gluon.constexpr_function
    def _v_layout(W, D, BNW):
        # [W, words (D / 8), 8 codes, 2 slots of a pair, BNW / 2 pairs]: a thread holds NWVT
        # contiguous words of the slots 2c, 2c+1, 2c+8, 2c+9 (c = lane % 4); the pack of 16
        # consecutive registers is (slot in pair, code).
        nwvt = D // 64
        reg = [[0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 0, 2, 0, 0], [0, 0, 4, 0, 0]]
        reg += [[0, 1 << i, 0, 0, 0] for i in range((nwvt).bit_length() - 1)]
        reg += [[0, 0, 0, 0, 4 << i] for i in range((BNW // 8).bit_length() - 1)]
        lane = [[0, 0, 0, 0, 1], [0, 0, 0, 0, 2], [0, nwvt, 0, 0, 0], [0, 2 * nwvt, 0, 0, 0], [0, 4 * nwvt, 0, 0, 0]]
        warp = [[1 << i, 0, 0, 0, 0] for i in range((W).bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [W, D // 8, 8, 2, BNW // 2])

    @gluon.constexpr_function
    def _s_layout(W, BNW):
        # [W, 8 queries, BNW slots]: the high (or low) half of the score accumulator.
        reg = [[0, 0, 1]] + [[0, 0, 8 << i] for i in range((BNW // 8).bit_length() - 1)]
        lane = [[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]]
        warp = [[1 << i, 0, 0] for i in range((W).bit_length() - 1)]
        return gl.DistributedLinearLayout(reg, lane, warp, [], [W, 8, BNW])

    @gluon.jit
    def _idx3(N: gl.constexpr, AXIS: gl.constexpr, L: gl.constexpr):
        # arange(N) along AXIS of a rank-3 layout L, shaped for broadcasting.
        if AXIS == 0:
            return gl.expand_dims(gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(1, gl.SliceLayout(2, L))), 1), 2)
        elif AXIS == 1:
            return gl.expand_dims(gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(2, L))), 0), 2)
        else:
            return gl.expand_dims(gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, L))), 0), 1)

    @gluon.jit
    def _tables(CENT, L: gl.constexpr):
        # fp16 centroid bytes as prmt tables: word w of L holds the low bytes of centroids
        # 4w..4w+3, word w of H their high bytes (same as triton_decode._byte_tables).
        i = gl.arange(0, 16, layout=L)
        h = gl.load(CENT + i).to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
        sh = (i % 4) * 8
        lo = (h & 0xFF) << sh
        hi = (h >> 8) << sh
        w = i // 4
        return (gl.sum(gl.where(w == 0, lo, 0), axis=0), gl.sum(gl.where(w == 1, lo, 0), axis=0),
                gl.sum(gl.where(w == 2, lo, 0), axis=0), gl.sum(gl.where(w == 3, lo, 0), axis=0),
                gl.sum(gl.where(w == 0, hi, 0), axis=0), gl.sum(gl.where(w == 1, hi, 0), axis=0),
                gl.sum(gl.where(w == 2, hi, 0), axis=0), gl.sum(gl.where(w == 3, hi, 0), axis=0))

    @gluon.jit
    def _pick8(e, t0, t1, t2, t3, t4, t5, t6, t7):
        # element e (0..7) of the eight table words; e is known per register, so this folds.
        return gl.where(e == 0, t0, gl.where(e == 1, t1, gl.where(e == 2, t2, gl.where(e == 3, t3, gl.where(
            e == 4, t4, gl.where(e == 5, t5, gl.where(e == 6, t6, gl.where(e == 7, t7, 0))))))))

    @gluon.jit
    def _load_block(KC, VC, KS, VS, row0, base, lim, kw_w, kw_i, kw_n, vw_w, vw_i, vw_p, s_w, s_n,
                    BNW: gl.constexpr, NW: gl.constexpr):
        ks_t = base + kw_w * BNW + kw_n
        kwords = gl.load(KC + (row0 + ks_t) * NW + kw_i, mask=ks_t < lim, other=0)
        va_t = base + vw_w * BNW + 2 * vw_p
        va = gl.load(VC + (row0 + va_t) * NW + vw_i, mask=va_t < lim, other=0)
        vb = gl.load(VC + (row0 + va_t + 1) * NW + vw_i, mask=va_t + 1 < lim, other=0)
        t = base + s_w * BNW + s_n
        ks = gl.load(KS + row0 + t, mask=t < lim, other=0.0).to(gl.float32)
        vs = gl.load(VS + row0 + t, mask=t < lim, other=0.0).to(gl.float32)
        return kwords, va, vb, ks, vs

    @gluon.jit
    def _gl_history_kernel(
        Q, KC, KS, VC, VS, KCENT, VCENT, NPTR, START, ACC, MAX, SUM,
        C, HKV, SPLITS, NSUB, q_scale, softcap,
        G: gl.constexpr, D: gl.constexpr, BNW: gl.constexpr, RING: gl.constexpr, SOFTCAP: gl.constexpr,
        PREFETCH: gl.constexpr,
    ):
        W: gl.constexpr = gl.num_warps()
        BN: gl.constexpr = W * BNW
        NW: gl.constexpr = D // 8  # int32 words per packed 4-bit row
        NWT: gl.constexpr = D // 32  # K words per thread per slot
        NWVT: gl.constexpr = D // 64  # V words per thread per slot
        MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[W, 1, 1], instr_shape=[1, 16, 8])
        OPA: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
        OPB: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
        LK: gl.constexpr = _k_layout(W, D, BNW)
        LV: gl.constexpr = _v_layout(W, D, BNW)
        LS: gl.constexpr = _s_layout(W, BNW)
        L1: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])

        q_scale = q_scale.to(gl.float32)
        softcap = softcap.to(gl.float32)
        bh = gl.program_id(0)
        sp = gl.program_id(1)
        b = bh // HKV
        h = bh % HKV
        n = gl.maximum(gl.load(NPTR).to(gl.int32) - NSUB, 0)  # history tokens (NSUB: those in a window)
        st = gl.load(START + b).to(gl.int32)

        # The slot range of this split: whole blocks of BN slots, as in the Triton kernel.
        filled, b0, b1 = _split_blocks(n, st, C, sp, SPLITS, BN, RING)
        row0 = bh.to(gl.int64) * C

        # Queries as the A operand, coordinates in pi_K order: logical k = 16t + 8x + 2c + y
        # (c: lane bits 0-1, y/x/t: register bits) is code 4*(t%2) + 2x + y of word c*NWT + t//2.
        qr = _idx3(16, 1, OPA)
        qk = _idx3(D, 2, OPA)
        kt = qk >> 4
        kp = 8 * (((qk >> 1) & 3) * NWT + (kt >> 1)) + (qk & 1) + 2 * ((qk >> 3) & 1) + 4 * (kt & 1)
        g16 = qr % 8
        qrow = (b * HKV * G + h * G + g16).to(gl.int64)
        q = gl.load(Q + qrow * D + kp, mask=(g16 < G) & (qk < D), other=0.0)  # [1, 16, D]
        qmax = gl.max(gl.abs(q), axis=2)
        qmax = gl.where(qmax > 0, qmax, 1.0)
        qn = q / gl.expand_dims(qmax, 2)
        q_hi = qn.to(gl.float16)
        q_lo = ((qn - q_hi.to(gl.float32)) * 2048.0).to(gl.float16)
        qa = gl.where(qr < 8, q_hi, q_lo)
        qa = gl.convert_layout((qa).broadcast_to(W, 16, D), OPA)

        # Per-query score factor (qmax * q_scale) in the softmax layout.
        sd = _idx3(D, 2, gl.BlockedLayout([1, 1, 4], [1, 8, 4], [1, 1, W], [2, 1, 0]))
        sgq = _idx3(8, 1, gl.BlockedLayout([1, 1, 4], [1, 8, 4], [1, 1, W], [2, 1, 0]))
        q2 = gl.load(Q + (b * HKV * G + h * G + sgq).to(gl.int64) * D + sd, mask=(sgq < G) & (sd < D), other=0.0)
        qm2 = gl.max(gl.abs(q2), axis=2)
        qm2 = gl.where(qm2 > 0, qm2, 1.0) * q_scale  # [1, 8]
        qsc = gl.expand_dims(gl.convert_layout((qm2).broadcast_to(W, 8), gl.SliceLayout(2, LS)), 2)

        kt0, kt1, kt2, kt3, kt4, kt5, kt6, kt7 = _tables(KCENT, L1)
        vt0, vt1, vt2, vt3, vt4, vt5, vt6, vt7 = _tables(VCENT, L1)

        # K words [W, 4*NWT, BNW] (layout: LK without its code axis) and their tables operand.
        LKW: gl.constexpr = gl.SliceLayout(2, LK)
        kw_w = _idx3(W, 0, LKW)
        kw_i = _idx3(4 * NWT, 1, LKW)
        kw_n = _idx3(BNW, 2, LKW)
        ke = gl.expand_dims(gl.expand_dims(gl.expand_dims(
            gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, LK)))), 0), 1), 3)
        ktab = (_pick8(ke, kt0, kt1, kt2, kt3, kt4, kt5, kt6, kt7)).broadcast_to(W, 4 * NWT, 8, BNW)

        # V words [W, NW, BNW/2] per slot of a pair (layout: LV without its code and slot axes).
        LVW: gl.constexpr = gl.SliceLayout(2, gl.SliceLayout(3, LV))
        vw_w = _idx3(W, 0, LVW)
        vw_i = _idx3(NW, 1, LVW)
        vw_p = _idx3(BNW // 2, 2, LVW)
        LVE: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(4, LV)))  # [8, 2]
        ve_j = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, LVE)), 1)
        ve_s = gl.expand_dims(gl.arange(0, 2, layout=gl.SliceLayout(0, LVE)), 0)
        ve = gl.expand_dims(gl.expand_dims(gl.expand_dims(ve_s + 2 * ve_j, 0), 1), 4)  # [1, 1, 8, 2, 1]
        vtab = (_pick8(ve, vt0, vt1, vt2, vt3, vt4, vt5, vt6, vt7)).broadcast_to(W, NW, 8, 2, BNW // 2)

        # Slots of the softmax layout.
        s_w = _idx3(W, 0, LS)
        s_n = _idx3(BNW, 2, LS)

        m_i = gl.full([W, 8], float("-inf"), gl.float32, layout=gl.SliceLayout(2, LS))
        l_i = gl.zeros([W, 8], gl.float32, layout=gl.SliceLayout(2, LS))
        acc = gl.zeros([W, D, 8], gl.float32, layout=MMA)  # O in pi_V order, one column per query

        # Loads of block blk (slots >= lim masked): the key words, the two slots' value words and
        # the scales. With PREFETCH the next block's loads are issued before this block's work.
        lim = gl.where(b0 < b1, filled, 0)
        kwords_n, va_n, vb_n, ks_n, vs_n = _load_block(KC, VC, KS, VS, row0, b0 * BN, lim, kw_w, kw_i, kw_n, vw_w,
                                                      vw_i, vw_p, s_w, s_n, BNW, NW)
        for blk in range(b0, b1):
            base = blk * BN
            if PREFETCH:
                kwords, va, vb, ks, vs = kwords_n, va_n, vb_n, ks_n, vs_n
                lim_n = gl.where(blk + 1 < b1, filled, 0)
                kwords_n, va_n, vb_n, ks_n, vs_n = _load_block(KC, VC, KS, VS, row0, base + BN, lim_n, kw_w, kw_i, kw_n,
                                                              vw_w, vw_i, vw_p, s_w, s_n, BNW, NW)
            else:
                kwords, va, vb, ks, vs = _load_block(KC, VC, KS, VS, row0, base, filled, kw_w, kw_i, kw_n, vw_w, vw_i,
                                                     vw_p, s_w, s_n, BNW, NW)
            # keys: expanded into the B operand of S^T
            kx = (gl.expand_dims(kwords, 2)).broadcast_to(W, 4 * NWT, 8, BNW)
            kc = gl.inline_asm_elementwise(_ASMK, _CONSK, [kx, ktab], dtype=gl.float16, is_pure=True, pack=8)
            kc = kc.reshape(W, 4, NWT, 2, 2, 2, BNW).permute(0, 2, 3, 4, 1, 5, 6).reshape(W, D, BNW)
            kc = gl.convert_layout(kc, OPB)
            s2 = gl.zeros([W, 16, BNW], gl.float32, layout=MMA)
            s2 = mma_v2(qa, kc, s2)
            s_hi, s_lo = s2.reshape(W, 2, 8, BNW).permute(0, 2, 3, 1).split()
            s_hi = gl.convert_layout(s_hi, LS)
            s_lo = gl.convert_layout(s_lo, LS)

            t = base + s_w * BNW + s_n  # [W, 1, BNW]
            tmask = t < filled
            if RING:
                wrapped = t + C * ((n - 1 - t) // C)
                pos = gl.where(n > C, wrapped, t)
                vis = tmask & (pos >= st)
            else:
                vis = tmask & (t >= st)
            s = (s_hi + s_lo * (1.0 / 2048.0)) * ks * qsc
            if SOFTCAP:
                e = gl.exp2(s * (2.0 * 1.4426950408889634 / softcap))
                s = (softcap * 1.4426950408889634) * (1.0 - 2.0 / (e + 1.0))
            s = gl.where(vis, s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=2))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - gl.expand_dims(m_safe, 2))
            l_i = l_i * alpha + gl.sum(p, axis=2)
            m_i = m_new
            pv = (p * vs).to(gl.float16)  # [W, 8, BNW]
            pb = gl.convert_layout(pv.permute(0, 2, 1), OPB)  # [W, BNW, 8]: the score registers as they are

            # values: two slots per register pair, expanded into the A operand of O [d, 8]
            vxa = (gl.expand_dims(gl.expand_dims(va, 2), 3)).broadcast_to(W, NW, 8, 2, BNW // 2)
            vxb = (gl.expand_dims(gl.expand_dims(vb, 2), 3)).broadcast_to(W, NW, 8, 2, BNW // 2)
            vc = gl.inline_asm_elementwise(_ASMV, _CONSV, [vxa, vxb, vtab], dtype=gl.float16, is_pure=True, pack=16)
            vc = vc.reshape(W, 8, NWVT, 8, 2, BNW // 2).permute(0, 2, 3, 1, 5, 4).reshape(W, D, BNW)
            vc = gl.convert_layout(vc, OPA)

            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, MMA)), 1)
            acc = mma_v2(vc, pb, acc)

        # Coordinates back from pi_V order (logical n = 64u + 8j + g is code j of word g*NWVT + u).
        out_n = _idx3(D, 1, MMA)
        out_r = _idx3(8, 2, MMA)
        out_w = _idx3(W, 0, MMA)
        phys = 8 * ((out_n % 8) * NWVT + (out_n >> 6)) + ((out_n >> 3) & 7)
        hq = (b * HKV * G + h * G + out_r).to(gl.int64)
        part = (hq * SPLITS + sp) * W + out_w
        gl.store(ACC + part * D + phys, acc, mask=(out_r < G) & (out_n < D))
        LM: gl.constexpr = gl.SliceLayout(2, gl.BlockedLayout([1, 1, 1], [1, 8, 4], [W, 1, 1], [2, 1, 0]))
        mg = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(0, LM)), 0)
        mw = gl.expand_dims(gl.arange(0, W, layout=gl.SliceLayout(1, LM)), 1)
        mpart = ((b * HKV * G + h * G + mg).to(gl.int64) * SPLITS + sp) * W + mw
        gl.store(MAX + mpart, gl.convert_layout(m_i, LM), mask=mg < G)
        gl.store(SUM + mpart, gl.convert_layout(l_i, LM), mask=mg < G)


def history_partials(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start,
                     splits: int, q_scale: float, softcap: float, ring: bool, bnw: int = _BNW,
                     prefetch: bool = True, maxnreg: int = 0, nsub: int = 0):
    """Launch the Gluon history kernel; returns ``(acc [B*Hq*parts*d], mx, sm [B*Hq*parts])``
    with ``parts = splits * 4`` partials per query head (one per split and warp; log2 units,
    unnormalised), the layout the combine kernels of :mod:`.triton_decode` read with
    ``SPLITS = parts``. The history holds ``max(n - nsub, 0)`` tokens (``nsub``: the decode step's
    window ring).

    Arguments are those of :func:`decode_attention` after its conversions (float32 ``q_rot``,
    contiguous codes and scales, int32 ``n [1]`` and ``start [B]``); ``q_scale`` includes
    ``log2(e)`` unless ``softcap``; ``bnw`` slots per warp and block (16 or 32), ``prefetch``: the
    next block's loads issued before this block's work (``maxnreg``: a register cap, 0: none)."""
    B, Hq, d = q_rot.shape
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    parts = splits * _W
    dev = q_rot.device
    acc = torch.empty((B * Hq * parts * d,), device=dev, dtype=torch.float32)
    mx = torch.empty((B * Hq * parts,), device=dev, dtype=torch.float32)
    sm = torch.empty((B * Hq * parts,), device=dev, dtype=torch.float32)
    with torch.cuda.device(dev):  # Triton launches on the current device
        _gl_history_kernel[(B * Hkv, splits)](
            q_rot, k_codes.view(torch.int32), k_scales, v_codes.view(torch.int32), v_scales, k_centroids,
            v_centroids, n, start, acc, mx, sm, C, Hkv, splits, int(nsub), float(q_scale),
            float(softcap) if softcap else 1.0, G=Hq // Hkv, D=d, BNW=bnw, RING=bool(ring), SOFTCAP=bool(softcap),
            PREFETCH=bool(prefetch), num_warps=_W, **({"maxnreg": maxnreg} if maxnreg else {}),
        )
    return acc, mx, sm


def default_splits(batch: int, kv_heads: int, capacity: int, sm_count: int = 132, per_sm: int = 3,
                   bnw: int = _BNW) -> int:
    """Splits whose programs (4 warps, ~165 registers: 3 resident per SM) fill whole waves."""
    from .triton_decode import _fit_splits

    return _fit_splits(batch * kv_heads, max(1, -(-capacity // (_W * bnw))), per_sm * sm_count)


def decode_attention(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, *,
                     scaling: float, softcap: float = 0.0, ring: bool = False, splits: int | None = None,
                     bnw: int = _BNW, prefetch: bool = True, maxnreg: int = 0):
    """Same contract as :func:`tqpatch.kernels.triton_decode.decode_attention` (``(out_rot float32
    [B, Hq, d], lse float32 [B, Hq])``) for the shapes :func:`serves` accepts, on CUDA; eager: the
    Gluon history kernel, then the Triton split merge. ``splits``: programs per (row, KV head)
    (default :func:`default_splits`); ``bnw``, ``prefetch``, ``maxnreg``: see
    :func:`history_partials`."""
    from .triton_decode import _LOG2E, _launch_combine

    B, Hq, d = q_rot.shape
    Hkv, C = k_codes.shape[1], k_codes.shape[2]
    if not serves(k_codes.shape[-1] * 8 // d, v_codes.shape[-1] * 8 // d, d, Hq // Hkv):
        raise ValueError("the Gluon kernel takes 4-bit keys and values, d in {64, 128, 256} and at most 8 query "
                         "heads per KV head; use tqpatch.kernels.triton_decode.decode_attention")
    splits = splits or default_splits(B, Hkv, C, bnw=bnw)
    out = torch.empty((B, Hq, d), device=q_rot.device, dtype=torch.float32)
    lse = torch.empty((B, Hq), device=q_rot.device, dtype=torch.float32)
    q_scale = float(scaling) * (1.0 if softcap else _LOG2E)
    acc, mx, sm = history_partials(
        q_rot.to(torch.float32).contiguous(), k_codes.contiguous(), k_scales.contiguous(), v_codes.contiguous(),
        v_scales.contiguous(), k_centroids.to(torch.float32).contiguous(), v_centroids.to(torch.float32).contiguous(),
        n.reshape(1).to(torch.int32), start.reshape(B).to(torch.int32), splits, q_scale, softcap, ring, bnw=bnw,
        prefetch=prefetch, maxnreg=maxnreg)
    _launch_combine(acc, mx, sm, out, lse, splits * _W)
    return out, lse


def step_config(batch: int, kv_heads: int, capacity: int, head_dim: int, group: int, key_bits: int,
                value_bits: int, sm_count: int = 132) -> dict | None:
    """Whether the decode step's history part runs here, and how: ``{"bnw", "splits"}`` or None.

    Measured on an H200 (results/h200/gluon_kernel_h200.md): 32-slot warp shares without prefetch
    were fastest from B*Hkv = 64 up (0.75-0.82x the Triton kernel's time); with fewer (row, KV head)
    pairs (B = 1) the Triton kernel was faster, and d = 256 needs 243 registers here (not measured),
    so those stay with Triton."""
    if not (available() and serves(key_bits, value_bits, head_dim, group) and head_dim <= 128
            and batch * kv_heads >= 64):
        return None
    return {"bnw": 32, "splits": default_splits(batch, kv_heads, capacity, sm_count, bnw=32)}


if _HAS_GLUON:

    @torch.library.custom_op("tqpatch::gluon_history", mutates_args=())
    def _gluon_history_op(q_rot: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
                          v_scales: torch.Tensor, k_centroids: torch.Tensor, v_centroids: torch.Tensor,
                          n: torch.Tensor, start: torch.Tensor, nsub: int, splits: int, bnw: int, q_scale: float,
                          softcap: float, ring: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return history_partials(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start,
                                splits, q_scale, softcap, ring, bnw=bnw, prefetch=False, nsub=nsub)

    @_gluon_history_op.register_fake
    def _(q_rot, k_codes, k_scales, v_codes, v_scales, k_centroids, v_centroids, n, start, nsub, splits, bnw,
          q_scale, softcap, ring):
        B, Hq, d = q_rot.shape
        parts = splits * _W
        return (q_rot.new_empty((B * Hq * parts * d,)), q_rot.new_empty((B * Hq * parts,)),
                q_rot.new_empty((B * Hq * parts,)))
