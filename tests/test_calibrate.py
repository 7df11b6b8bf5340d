"""Calibration: the allocation meets its budget and follows the measurements; on SmolLM2 a
calibrated recipe beats a uniform recipe of the same average bits on held-out text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

import tqpatch
from tqpatch.calibrate import CalibrationConfig, _allocate, _estimate, _Measurements, calibrate
from tqpatch.codebook import distortion

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def _synthetic(L: int, rng: random.Random) -> _Measurements:
    m = _Measurements(smoothing=[False] * L)
    for b in (2, 3, 4, 5, 6, 8):
        m.key_kl[b] = [0.0] * L
        m.value_kl[b] = [0.0] * L
    for i in range(L):
        ks, vs = rng.uniform(0.01, 1.0), rng.uniform(0.001, 0.1)
        for b in m.key_kl:
            m.key_kl[b][i] = ks * 4.0 ** -b
            m.value_kl[b][i] = vs * 4.0 ** -b
    return m


@pytest.mark.parametrize("target", [2.6, 3.0, 3.5, 4.0, 4.25, 5.0])
@pytest.mark.parametrize("d", [64, 128])
def test_allocation_meets_budget_and_spends_it(target, d):
    rng = random.Random(int(target * 100) + d)
    L = 24
    meas = _synthetic(L, rng)
    cfg = CalibrationConfig(target_bits=target, allow_bf16_layers=False)
    alloc = _allocate(meas, L, cfg, d)
    cost = [((kb + 16 / d) + (vb + 16 / d)) / 2 for (kb, _), (vb, _) in alloc]
    assert all(kob == 0 and vob == 0 for (_, kob), (_, vob) in alloc)  # no split options given
    assert sum(cost) / L <= target + 1e-9
    # Nothing affordable is left: no single layer can move up one candidate step within the budget.
    cands = sorted(cfg.candidate_bits)
    slack = target * L - sum(cost)
    for (kb, _), (vb, _) in alloc:
        for b in (kb, vb):
            up = [c for c in cands if c > b]
            if up:
                assert (up[0] - b) / 2 > slack - 1e-9
    # Sensitive keys get at least as many bits as values of the same layer (keys are 10x as sensitive here).
    assert sum(kb for (kb, _), _ in alloc) >= sum(vb for _, (vb, _) in alloc)
    assert alloc == _allocate(meas, L, cfg, d)  # deterministic


def test_allocation_prefers_the_sensitive_layer():
    L = 6
    meas = _synthetic(L, random.Random(0))
    for b in meas.key_kl:
        meas.key_kl[b][3] *= 1000.0
    alloc = _allocate(meas, L, CalibrationConfig(target_bits=3.25, allow_bf16_layers=False), 64)
    assert alloc[3][0][0] == max(kb for (kb, _), _ in alloc)


@pytest.mark.parametrize("target", [3.3, 3.6])
def test_allocation_uses_outlier_splits_for_fractional_budgets(target):
    """With split options (16 of 64 channels one bit up: +0.25 + 0.25 bits of codes and scale),
    a budget between integer widths is met by splits where they are predicted to pay, and the
    cost counts the split's codes and both scales."""
    d, L = 64, 8
    meas = _synthetic(L, random.Random(3))
    for b in (2, 3, 4, 5, 6):  # a split at b removes 60% of the way to b + 1
        meas.key_split_kl[b] = [x + 0.6 * (y - x) for x, y in zip(meas.key_kl[b], meas.key_kl[b + 1 if b < 6 else 8])]
        meas.value_split_kl[b] = [x + 0.6 * (y - x) for x, y in zip(meas.value_kl[b], meas.value_kl[b + 1 if b < 6 else 8])]
    cfg = CalibrationConfig(target_bits=target, allow_bf16_layers=False, candidate_bits=(2, 3, 4, 5, 6, 8))
    alloc = _allocate(meas, L, cfg, d)

    def side(b, ob):
        return b + 16 / d if not ob else b + 16 / d + 16 / d + 16 / d  # 16 channels one bit up, 2 scales

    cost = sum((side(*k) + side(*v)) / 2 for k, v in alloc) / L
    assert cost <= target + 1e-9
    assert any(ob for k, v in alloc for _, ob in (k, v)), alloc
    assert all(ob in (0, b + 1) for k, v in alloc for b, ob in (k, v))


def test_hadamard_calibration_offers_no_outlier_splits():
    """Splits need the Haar rotation (their parts are rarely powers of two), so a Hadamard
    calibration must not offer them (it used to build one and fail)."""
    from tqpatch.calibrate import _outlier_count

    assert _outlier_count(CalibrationConfig(), 64) == 16
    assert _outlier_count(CalibrationConfig(rotation="hadamard"), 64) == 0


def test_budget_below_the_cheapest_allocation_is_an_error():
    meas = _synthetic(4, random.Random(1))
    with pytest.raises(ValueError, match="raise target_bits"):
        _allocate(meas, 4, CalibrationConfig(target_bits=2.0), 64)  # 2-bit codes + scales = 2.25


def test_estimate_interpolates_between_measurements():
    kl = {2: [0.5, 0.02], 4: [0.03, 0.001]}
    assert _estimate(kl, 4, 64) == pytest.approx(kl[4])
    three = _estimate(kl, 3, 64)
    assert all(lo > x > hi for lo, x, hi in zip(kl[2], three, kl[4]))
    eight = _estimate(kl, 8, 64)
    assert eight == pytest.approx([x * distortion(64, 8) / distortion(64, 4) for x in kl[4]])


def _chunk_kl(model, ids: torch.Tensor, prompt: int, ref: torch.Tensor) -> float:
    """Mean KL(unpatched || model) over the tokens after ``prompt``, which attend to compressed history."""
    with torch.no_grad():
        out = model(ids[:, :prompt], use_cache=True)
        logits = model(ids[:, prompt:], past_key_values=out.past_key_values, use_cache=True).logits
    lq = torch.log_softmax(logits.float(), -1)
    return float((ref.exp() * (ref - lq)).sum(-1).mean())


def _held_out_kls(model, tok, settings: list[dict]) -> list[float]:
    """Chunk KL of each ``apply`` setting on held-out Shakespeare (never seen by calibration):
    4 segments of a 384-token exact prompt then 64 tokens over the compressed history."""
    text = TEXT.read_text()[300_000:360_000]
    all_ids = tok(text, return_tensors="pt").input_ids[0]
    prompt, chunk = 384, 64
    ids = torch.stack([all_ids[i * 600 : i * 600 + prompt + chunk] for i in range(4)])
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[:, prompt:].float(), -1)
    kls = []
    for s in settings:
        tqpatch.apply(model, **s)
        try:
            kls.append(_chunk_kl(model, ids, prompt, ref))
        finally:
            tqpatch.unapply(model)
    return kls


def test_calibrated_beats_uniform_on_held_out_text(smollm2):
    model, tok = smollm2
    d = model.config.head_dim
    budget = 4 + 16 / d  # what uniform 4-bit K/V costs (codes + fp16 scales)
    recipe = calibrate(model, tok, target_bits=budget, config=CalibrationConfig(segments=4), progress=False)
    assert recipe.provenance["kind"] == "calibrated"
    assert recipe.average_bits() <= budget + 1e-9
    assert recipe.quality["calibration_chunk_kl"] < recipe.quality["uniform_4bit_calibration_chunk_kl"]

    kl_cal, kl_uni = _held_out_kls(model, tok, [{"recipe": recipe},
                                                {"key_bits": 4, "value_bits": 4, "window": int(recipe.window[0])}])
    assert kl_cal < kl_uni, (kl_cal, kl_uni)


def test_split_recipe_from_calibration_applies_and_beats_uniform_3bit(smollm2):
    """A fractional budget with split options: the recipe stores outlier channels (the largest-RMS
    channels per head), meets the budget counting both scales, and applied through the real
    patched path beats uniform 3-bit K/V (which costs less) on held-out text."""
    from tqpatch.calibrate import measure_sensitivity

    model, tok = smollm2
    sens = measure_sensitivity(model, tok, config=CalibrationConfig(segments=2), progress=False)
    recipe = sens.recipe(3.4, splits=True)
    assert recipe.average_bits() <= 3.4 + 1e-9
    split_layers = recipe.provenance["outlier_split"]["key_layers"] + recipe.provenance["outlier_split"]["value_layers"]
    assert split_layers, "expected some split layers at a fractional budget"
    ch = recipe.key_outlier_channels if recipe.key_outlier_channels is not None else recipe.value_outlier_channels
    assert ch.shape[-1] == 16  # 25% of head_dim 64
    kls = _held_out_kls(model, tok, [{"recipe": recipe},
                                     {"key_bits": 3, "value_bits": 3, "window": int(recipe.window[0])}])
    assert kls[0] < kls[1], kls
