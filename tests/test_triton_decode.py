"""The Triton decode-attention kernel against the plain-torch reference.

GPU tests (``-m gpu``) draw fresh random codes, scales and queries for every case and compare
``decode_attention`` with ``history_attention`` (Q = 1) at queries x1 and x4 (logits up to ~20):
relative error of the output < 1e-3, of the log-sum-exp < 1e-3 (relative to max(1, |lse|)),
identical sets of rows with no visible slot (lse = -inf, out = 0). The outputs and the caching
allocator's free memory are poisoned with NaN first, so an element the kernel forgets to write
fails the test. The CPU tests (run in CI) check that the module imports
without Triton and that the wrapper falls back to the reference off CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tqpatch.codebook import lloyd_max
from tqpatch.kernels import triton_decode as td
from tqpatch.kernels.reference import history_attention

cuda = pytest.mark.skipif(not td.available(), reason="needs CUDA and Triton")


def _inputs(B, Hq, Hkv, C, d, kb, vb, n, starts, device, seed, q_scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, d, generator=g) * q_scale
    kc = torch.randint(0, 256, (B, Hkv, C, d * kb // 8), generator=g, dtype=torch.uint8)
    vc = torch.randint(0, 256, (B, Hkv, C, d * vb // 8), generator=g, dtype=torch.uint8)
    ks = (torch.rand(B, Hkv, C, generator=g) * 3 + 0.05).half()
    vs = (torch.rand(B, Hkv, C, generator=g) * 3 + 0.05).half()
    kcent = torch.tensor(lloyd_max(d, kb), dtype=torch.float32)
    vcent = torch.tensor(lloyd_max(d, vb), dtype=torch.float32)
    nn = torch.tensor([n], dtype=torch.int32)
    st = torch.tensor(starts, dtype=torch.int32)
    return [t.to(device) for t in (q, kc, ks, vc, vs, kcent, vcent, nn, st)]


def _reference(args, kb, vb, scaling, softcap, ring):
    q, kc, ks, vc, vs, kcent, vcent, n, st = args
    out, lse = history_attention(
        q.unsqueeze(2), kc, ks, vc, vs, kcent, vcent, n, st,
        key_bits=kb, value_bits=vb, scaling=scaling, softcap=softcap or None, ring=ring,
    )
    return out.squeeze(2), lse.squeeze(2)


def _compare(out, lse, ref_out, ref_lse):
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten (NaN) outputs"
    empty = ~torch.isfinite(ref_lse)
    assert torch.equal(empty, ~torch.isfinite(lse)), "rows with no visible slot differ"
    assert torch.all(lse[empty] == float("-inf"))
    assert torch.all(out[empty] == 0)
    if (~empty).any():
        err = ((out - ref_out).norm() / ref_out.norm()).item()
        assert err < 1e-3, f"relative error {err:.2e}"
        # lse: relative to its own magnitude (fp16 operands give logits ~1e-4 relative error)
        lerr = ((lse[~empty] - ref_lse[~empty]).abs() / ref_lse[~empty].abs().clamp_min(1.0)).max().item()
        assert lerr < 1e-3, f"lse relative error {lerr:.2e}"


def test_imports_and_falls_back_on_cpu():
    """CPU (CI): the wrapper runs the reference off CUDA and checks its arguments."""
    args = _inputs(2, 8, 2, 40, 64, 4, 3, 33, [0, 5], "cpu", 0)
    out, lse = td.decode_attention(*args, key_bits=4, value_bits=3, scaling=0.125)
    ref_out, ref_lse = _reference(args, 4, 3, 0.125, 0.0, False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    with pytest.raises(ValueError):
        td.decode_attention(*args, key_bits=5, value_bits=3, scaling=0.125)
    cfg = td.default_config(8, 8, 32768, 128, 4, 4, 132)
    assert cfg["splits"] >= 1 and cfg["BLOCK_N"] in (32, 64, 128)


# (key_bits, value_bits, d, G, ring, softcap, lut): each entry is one compiled variant, chosen to
# cover every bit width, head size and group size, both slot layouts, softcap and both code paths.
_CASES = [
    (2, 2, 64, 4, False, 0.0, "prmt"),
    (3, 3, 64, 4, False, 0.0, "prmt"),
    (4, 4, 64, 4, False, 0.0, "prmt"),
    (2, 2, 128, 4, False, 0.0, "prmt"),
    (3, 3, 128, 4, False, 0.0, "prmt"),
    (4, 4, 128, 4, False, 0.0, "prmt"),
    (2, 2, 256, 4, False, 0.0, "prmt"),
    (3, 3, 256, 4, False, 0.0, "prmt"),
    (4, 4, 256, 4, False, 0.0, "prmt"),
    (4, 2, 128, 7, True, 0.0, "prmt"),
    (2, 3, 128, 7, True, 0.0, "prmt"),
    (3, 4, 64, 7, True, 50.0, "prmt"),
    (4, 4, 64, 1, True, 30.0, "prmt"),
    (4, 3, 128, 8, False, 20.0, "prmt"),
    (4, 4, 128, 4, False, 0.0, "gather"),
    (3, 2, 64, 1, True, 0.0, "gather"),
]


def _poison_allocator(device):
    # Fill free blocks of the caching allocator with NaN so that buffers the kernel allocates
    # (partials) start as NaN rather than zeros.
    junk = torch.full((64 << 20,), float("nan"), device=device)
    del junk


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("kb,vb,d,G,ring,softcap,lut", _CASES)
def test_matches_reference(kb, vb, d, G, ring, softcap, lut):
    dev = torch.device("cuda")
    Hkv = 2
    Hq = G * Hkv
    C = 300
    scaling = d ** -0.5
    # (B, n, starts): n < C with left padding; a row that sees nothing; wrapped rings (n > C).
    scenarios = [(3, 250, [0, 17, 249]), (2, 37, [0, 40]), (1, 0, [0])]
    scenarios += [(2, 777, [0, 600]), (2, C, [5, 0])] if ring else [(2, C, [0, 299])]
    for i, (B, n, starts) in enumerate(scenarios):
        for q_scale in (1.0, 4.0):
            args = _inputs(B, Hq, Hkv, C, d, kb, vb, n, starts, dev, seed=hash((kb, vb, d, G, i, q_scale)) % 10000,
                           q_scale=q_scale)
            ref_out, ref_lse = _reference(args, kb, vb, scaling, softcap, ring)
            for splits in (1, 5):
                cfg = td.default_config(B, Hkv, C, d, kb, vb)
                cfg["splits"] = splits
                out = torch.full((B, Hq, d), float("nan"), device=dev)
                lse = torch.full((B, Hq), float("nan"), device=dev)
                _poison_allocator(dev)
                q, kc, ks, vc, vs, kcent, vcent, nn, st = args
                td._launch(q, kc, ks, vc, vs, kcent, vcent, nn, st, out, lse, kb, vb, scaling, softcap, ring, cfg, lut)
                torch.cuda.synchronize()
                _compare(out, lse, ref_out, ref_lse)
            # and through the public wrapper (the registered op), default configuration
            out, lse = td.decode_attention(*args, key_bits=kb, value_bits=vb, scaling=scaling, softcap=softcap,
                                           ring=ring, lut=lut)
            _compare(out, lse, ref_out, ref_lse)


@pytest.mark.gpu
@cuda
def test_compiled_cuda_graph_follows_n():
    """Inside torch.compile(fullgraph, reduce-overhead): n changes on the device between replays."""
    dev = torch.device("cuda")
    B, Hq, Hkv, C, d = 2, 8, 2, 512, 128
    args = _inputs(B, Hq, Hkv, C, d, 4, 4, 100, [0, 7], dev, seed=3)
    q, kc, ks, vc, vs, kcent, vcent, n, st = args

    def step(q, n):
        out, lse = td.decode_attention(q, kc, ks, vc, vs, kcent, vcent, n, st, key_bits=4, value_bits=4,
                                       scaling=d ** -0.5)
        return out * 1.0, lse * 1.0

    fn = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for nv in (100, 101, 350, 512, 3):
        n.fill_(nv)
        for _ in range(2):
            out, lse = fn(q, n)
        ref_out, ref_lse = _reference((q, kc, ks, vc, vs, kcent, vcent, n, st), 4, 4, d ** -0.5, 0.0, False)
        _compare(out.clone(), lse.clone(), ref_out, ref_lse)


# ---------------------------------------------------------------------------------------------
# decode_step: the whole decode-step attention of a layer (history + window + own token, merged and
# rotated back) in two launches. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1.
# ---------------------------------------------------------------------------------------------

def _kernel_device() -> torch.device:
    if td.available():
        return torch.device("cuda")
    if td.interpreting():
        return torch.device("cpu")
    pytest.skip("needs CUDA and Triton (or TRITON_INTERPRET=1 with Triton installed)")


def _step_reference(q, q_rot, kc, ks, vc, vs, kcent, vcent, wk, wv, kn, vn, rot_v, n, st, kb, vb, scaling, softcap,
                    ring, sliding):
    """The torch path's three parts, in float64 where it computes densely: own token, history
    (``history_attention``, rotated back), window ring."""
    from tqpatch.attention import dense_attention, merge_attention
    from tqpatch.kernels.reference import slot_positions

    R = wk.shape[2]
    q_pos = n.reshape(1)
    cap = softcap or None
    own = dense_attention(q.unsqueeze(2).double(), kn.unsqueeze(2).double(), vn.unsqueeze(2).double(), q_pos,
                          torch.ones(1, dtype=torch.bool, device=q.device), q_pos, st, scaling=scaling, softcap=cap,
                          window=sliding)
    o, lse = history_attention(q_rot.unsqueeze(2), kc, ks, vc, vs, kcent, vcent, (n - R).clamp(min=0), st,
                               key_bits=kb, value_bits=vb, scaling=scaling, softcap=cap, ring=ring)
    parts = [tuple(t.double() for t in own), ((o.double() @ rot_v.double()), lse.double())]
    if R:
        pos, filled = slot_positions(n, R, True, q.device)
        parts.append(dense_attention(q.unsqueeze(2).double(), wk.double(), wv.double(), pos, filled, q_pos, st,
                                     scaling=scaling, softcap=cap, window=sliding))
    out, _ = merge_attention(parts)
    return out[:, :, 0]


# (key_bits, value_bits, d, G, R, ring, softcap, sliding, n, starts, C)
_STEP_CASES = [
    (4, 4, 128, 4, 64, False, 0.0, 0, 900, [0, 13], 1000),      # history + full window
    (4, 4, 128, 4, 64, False, 0.0, 0, 40, [0, 3], 1000),        # n < R: window only, part filled
    (3, 2, 64, 7, 16, False, 30.0, 0, 300, [0, 299], 400),      # softcap; a row sees one token
    (2, 4, 256, 2, 32, True, 0.0, 100, 777, [0, 700], 67),      # wrapped ring, sliding window
    (4, 3, 64, 1, 0, False, 0.0, 0, 200, [0, 250], 300),        # no window; a fully padded row
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kb,vb,d,G,R,ring,softcap,sliding,n,starts,C", _STEP_CASES)
def test_decode_step_matches_reference(kb, vb, d, G, R, ring, softcap, sliding, n, starts, C, dtype):
    """bf16 model: 16-bit window dots, bf16 output (its rounding, 2^-9, sets the tolerance);
    float32 model: exact window dots and a float32 output, held to 1e-3 like the history kernel."""
    _check_step(_kernel_device(), kb, vb, d, G, R, ring, softcap, sliding, n, starts, C, dtype, {"gluon_bnw": 0})


_GLUON_CASES = [  # 4-bit keys and values, d <= 128, G <= 8 (what the Gluon history kernel takes)
    (4, 4, 128, 4, 64, False, 0.0, 0, 900, [0, 13], 1000),
    (4, 4, 64, 8, 16, True, 20.0, 50, 500, [0, 100], 200),      # ring, softcap, sliding window
    (4, 4, 128, 7, 0, False, 0.0, 0, 333, [0, 332], 400),       # no window; a row sees one token
]


@pytest.mark.gpu
@pytest.mark.parametrize("bnw", [16, 32])
@pytest.mark.parametrize("kb,vb,d,G,R,ring,softcap,sliding,n,starts,C", _GLUON_CASES)
def test_decode_step_gluon_history_matches_reference(kb, vb, d, G, R, ring, softcap, sliding, n, starts, C, bnw):
    """The decode step with its history splits in the Gluon kernel (tqpatch/kernels/gluon_decode.py)."""
    from tqpatch.kernels import gluon_decode

    if not gluon_decode.available():
        pytest.skip("the Gluon kernel needs Triton's Gluon and a CUDA device (no interpreter)")
    _check_step(torch.device("cuda"), kb, vb, d, G, R, ring, softcap, sliding, n, starts, C, torch.bfloat16,
                {"gluon_bnw": bnw})


@pytest.mark.gpu
def test_decode_step_gluon_history_compiled_cuda_graph():
    """The Gluon history op inside torch.compile(fullgraph, CUDA graphs) equals the eager call."""
    from tqpatch.kernels import gluon_decode

    if not gluon_decode.available():
        pytest.skip("the Gluon kernel needs Triton's Gluon and a CUDA device (no interpreter)")
    B, G, Hkv, d, C, R = 8, 4, 8, 128, 2048, 32
    q, kc, ks, vc, vs, kcent, vcent, _, st = _inputs(B, G * Hkv, Hkv, C, d, 4, 4, 1500, [0] * B, "cuda", seed=3)
    g = torch.Generator(device="cuda").manual_seed(5)
    rot_v = torch.linalg.qr(torch.randn(d, d, generator=g, device="cuda", dtype=torch.float64))[0].float()
    wk, wv = (torch.randn(B, Hkv, R, d, generator=g, device="cuda").bfloat16() for _ in range(2))
    kn, vn = (torch.randn(B, Hkv, d, generator=g, device="cuda").bfloat16() for _ in range(2))
    n = torch.tensor(1500, device="cuda")
    q16 = q.bfloat16()

    def step(q_rot, n):
        return td.decode_step(q16, q_rot, kc, ks, vc, vs, kcent, vcent, wk, wv, kn, vn, rot_v, n, st.long(),
                              key_bits=4, value_bits=4, scaling=d ** -0.5, config={"gluon_bnw": 32})

    fn = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for nv in (1500, 1501, 2000):
        n.fill_(nv)
        for _ in range(2):
            out = fn(q, n).clone()
        ref = step(q, n)
        assert torch.equal(out, ref), f"n={nv}: compiled != eager"


def _check_step(dev, kb, vb, d, G, R, ring, softcap, sliding, n, starts, C, dtype, extra):
    Hkv = 2
    B = len(starts)
    g = torch.Generator().manual_seed(hash((kb, vb, d, G, R, n)) % 10000)
    q, kc, ks, vc, vs, kcent, vcent, _, st = _inputs(B, G * Hkv, Hkv, C, d, kb, vb, n, starts, "cpu",
                                                    seed=hash((d, G, R)) % 1000, q_scale=2.0)
    rot_k = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()
    rot_v = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()
    q16 = q.to(dtype)
    q_rot = q16.float() @ rot_k.T
    wk = torch.randn(B, Hkv, R, d, generator=g).to(dtype)
    wv = torch.randn(B, Hkv, R, d, generator=g).to(dtype)
    kn = (2 * torch.randn(B, Hkv, d, generator=g)).to(dtype)
    vn = torch.randn(B, Hkv, d, generator=g).to(dtype)
    nt = torch.tensor(n)  # int64, as the cache holds it
    st = st.long()
    args = [t.to(dev) for t in (q16, q_rot, kc, ks, vc, vs, kcent, vcent, wk, wv, kn, vn, rot_v, nt, st)]
    ref = _step_reference(*(a.float() if a.dtype == torch.bfloat16 else a for a in args), kb, vb, d ** -0.5,
                          softcap, ring, sliding)
    for splits in (1, 4, None):
        if dev.type == "cuda":
            _poison_allocator(dev)
        cfg = dict(extra, **({"splits": splits} if splits else {}))
        out = td.decode_step(*args, key_bits=kb, value_bits=vb, scaling=d ** -0.5, softcap=softcap, ring=ring,
                             sliding=sliding, config=cfg)
        assert out.shape == (B, G * Hkv, d) and out.dtype == q16.dtype
        out = out.float()
        assert not torch.isnan(out).any(), "unwritten (NaN) outputs"
        empty = ref.abs().sum(-1) == 0
        assert torch.all(out[empty] == 0)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        assert err < (5e-3 if dtype == torch.bfloat16 else 1e-3), f"splits={splits}: relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral"])
def test_model_decode_kernel_path_matches_torch_path(arch, monkeypatch):
    """A patched tiny model (head_dim 64): teacher-forced decode steps through the Triton decode step
    give the logits of the torch path (full windows, wrapped windows, sliding rings, soft caps)."""
    import tqpatch
    from tqpatch import attention
    from tqpatch.cache import TurboQuantCache

    from tiny_models import tiny_model

    dev = _kernel_device()
    model = tiny_model(arch, head_dim=64).to(dev)
    tqpatch.apply(model, key_bits=4, value_bits=3, window=16)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (1, 70), generator=g).to(dev)
    steps = torch.randint(0, 256, (1, 20), generator=g).to(dev)

    def run(kernel: bool) -> torch.Tensor:
        if not kernel:
            monkeypatch.setattr(attention, "_decode_kernel_applies", lambda layer, q: False)
        cache = TurboQuantCache(model, max_cache_len=128, batch_size=1)
        logits = []
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
            for i in range(steps.shape[1]):
                logits.append(model(steps[:, i:i + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        monkeypatch.undo()
        return torch.stack(logits)

    used = []
    real = attention._decode_kernel_attention
    monkeypatch.setattr(attention, "_decode_kernel_attention", lambda *a: used.append(1) or real(*a))
    fast = run(True)
    assert used, "the decode kernel path was not taken"
    ref = run(False)
    err = ((fast - ref).norm() / ref.norm()).item()
    assert err < 2e-3, f"relative logits error {err:.2e}"
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))
    tqpatch.unapply(model)


@pytest.mark.gpu
@pytest.mark.parametrize("kb,vb,d,key_scale", [(4, 4, 128, False), (3, 2, 64, True), (2, 3, 256, False)])
def test_store_step_matches_torch_store(kb, vb, d, key_scale, monkeypatch):
    """The one-launch store equals the torch store: the leaving window token's codes and scales in
    its history slot, the new token in its window slot, over wrapped windows and early steps (n < R)."""
    import copy

    from tqpatch import attention
    from tqpatch.cache import LayerPlan, TurboQuantLayer
    from tqpatch.packing import unpack
    from tqpatch.quantizer import TurboQuantizer

    dev = _kernel_device()
    B, Hkv, R, C = 2, 2, 16, 40
    g = torch.Generator().manual_seed(kb * 10 + vb)
    plan_kwargs = dict(layer_idx=0, num_heads=2 * Hkv, num_kv_heads=Hkv, head_dim=d, key_bits=kb, value_bits=vb,
                       window=R, scaling=d ** -0.5,
                       key_quantizer=TurboQuantizer(d, kb, seed=1, scale_dtype=torch.float16),
                       value_quantizer=TurboQuantizer(d, vb, seed=2, scale_dtype=torch.float16))
    if key_scale:
        plan_kwargs["key_scale"] = torch.rand(Hkv, d, generator=g) + 0.5
    layer = TurboQuantLayer(LayerPlan(**plan_kwargs), max_cache_len=C + R)
    layer.allocate(B, torch.bfloat16, dev, C + R)
    for n in (3, 16, 17, 45, 90):  # window filling, just full, wrapped; history wrapping past C
        layer.win_k.copy_(torch.randn(layer.win_k.shape, generator=g))
        layer.win_v.copy_(torch.randn(layer.win_v.shape, generator=g))
        layer.n.fill_(n)
        layer.host_n = n
        k = torch.randn(B, Hkv, 1, d, generator=g).bfloat16().to(dev)
        v = torch.randn(B, Hkv, 1, d, generator=g).bfloat16().to(dev)
        ref = copy.deepcopy(layer)
        attention._store(layer, k, v)
        with monkeypatch.context() as m:
            m.setattr(attention, "_decode_kernel_applies", lambda layer, q: False)
            attention._store(ref, k, v)
        assert int(layer.n) == int(ref.n) == n + 1
        torch.testing.assert_close(layer.win_k, ref.win_k, rtol=0, atol=0)
        torch.testing.assert_close(layer.win_v, ref.win_v, rtol=0, atol=0)
        for side, bits in (("k", kb), ("v", vb)):
            a, b = getattr(layer, f"{side}_codes"), getattr(ref, f"{side}_codes")
            ia, ib = unpack(a, bits, d), unpack(b, bits, d)
            differ = (ia != ib).float().mean().item()
            assert differ < 2e-3 and (ia.long() - ib.long()).abs().max() <= 1, f"{side}: {differ:.2e} of codes differ"
            torch.testing.assert_close(getattr(layer, f"{side}_scales"), getattr(ref, f"{side}_scales"), rtol=2e-3,
                                       atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,k,n,transposed", [(32, 128, 128, True), (256, 128, 128, False), (7, 64, 64, True),
                                                 (40, 256, 256, True)])
def test_rows_matmul_matches_float64(rows, k, n, transposed):
    """The decode step's rotations (tqpatch/kernels/rows.py): x @ m in float32 vs float64, m also as
    a transposed view (how the layers pass Pi^T)."""
    from tqpatch.kernels import rows as rk

    dev = _kernel_device()
    g = torch.Generator().manual_seed(rows + k)
    x = torch.randn(rows, k, generator=g) * 3
    m = torch.linalg.qr(torch.randn(max(k, n), max(k, n), generator=g, dtype=torch.float64))[0][:k, :n].float()
    mm = m.T.contiguous().T if transposed else m
    y = rk.rows_matmul(x.to(dev), mm.to(dev)).cpu()
    ref = x.double() @ m.double()
    assert y.dtype == torch.float32 and y.shape == (rows, n)
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-6
