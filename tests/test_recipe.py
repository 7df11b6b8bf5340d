"""Recipes: format, round trips, validation errors, bundled recipes, and the Hub (offline, through
a local Hub-protocol server in tests/hubserver.py)."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    Gemma2Config,
    Gemma3Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

from tqpatch import recipe as rmod
from tqpatch.recipe import (
    NotARecipeError,
    Recipe,
    RecipeError,
    RecipeFileError,
    RecipeHubError,
    RecipeMismatchError,
    RecipeNotFoundError,
    RecipeSchemaError,
    RecipeVersionError,
    list_recipes,
)

try:
    from hubserver import FakeHub, git_blob_sha
except ImportError:  # pragma: no cover (importlib import mode)
    from tests.hubserver import FakeHub, git_blob_sha

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def tiny_llama(**kw) -> LlamaConfig:
    args = dict(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    args.update(kw)
    return LlamaConfig(**args)


def full_recipe() -> Recipe:
    """A recipe using every optional field."""
    L, H, d, n = 3, 2, 64, 16
    g = torch.Generator().manual_seed(0)
    kch = torch.stack([torch.stack([torch.randperm(d, generator=g)[:n] for _ in range(H)]) for _ in range(L)])
    vch = torch.full((L, H, n), -1, dtype=torch.int16)
    vch[1] = torch.arange(n, dtype=torch.int16)
    return Recipe(
        model_type="llama",
        num_hidden_layers=L,
        num_key_value_heads=H,
        head_dim=d,
        key_bits=[16, 2, 4],
        value_bits=[16, 3, 4],
        rotation_seed=[7, 8, 9],
        window=[0, 32, 64],
        key_outlier_channels=kch.to(torch.int16),
        key_outlier_bits=[0, 4, 8],
        value_outlier_channels=vch,
        value_outlier_bits=[0, 8, 0],
        key_channel_scale=torch.rand(L, H, d, generator=g) + 0.5,
        source_model="org/some-model",
        source_revision="0123456789abcdef0123456789abcdef01234567",
        provenance={"kind": "calibrated", "texts": 64, "target_bits": 3.5, "seed": 0},
        quality={"kl": 0.0123, "ppl_delta_pct": 1.5, "heldout": {"top1": 0.97}},
        extra_metadata={"note": "kept on round trips"},
    )


def write_raw(path: Path, tensors: dict, metadata: dict | None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def valid_parts(recipe: Recipe | None = None) -> tuple[dict, dict]:
    r = recipe or Recipe.uniform(tiny_llama())
    return dict(r.tensors()), dict(r.metadata())


def file_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# ------------------------------------------------------------------------------------------------
# construction, round trip
# ------------------------------------------------------------------------------------------------
def test_uniform_from_config():
    r = Recipe.uniform(tiny_llama(num_hidden_layers=4), key_bits=3, value_bits=8, window=16, seed=5, skip_layers=(0, -1))
    assert (r.model_type, r.num_hidden_layers, r.num_key_value_heads, r.head_dim) == ("llama", 4, 2, 64)
    assert r.key_bits.dtype == torch.int8 and r.key_bits.tolist() == [16, 3, 3, 16]
    assert r.value_bits.tolist() == [16, 8, 8, 16]
    assert r.window.dtype == torch.int32 and r.window.tolist() == [16] * 4
    assert r.rotation_seed.dtype == torch.int64 and r.rotation_seed.tolist() == [5, 6, 7, 8]
    assert r.provenance == {"kind": "uniform", "key_bits": 3, "value_bits": 8, "window": 16, "seed": 5,
                            "skip_layers": [0, 3]}
    assert r.created_with == __import__("tqpatch").__version__
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        Recipe.uniform(tiny_llama(), skip_layers=[9])


def test_uniform_head_dim_and_model_object():
    # no head_dim attribute: hidden_size // num_attention_heads
    r = Recipe.uniform(Qwen2Config(num_hidden_layers=3, hidden_size=3584, num_attention_heads=28, num_key_value_heads=4))
    assert r.head_dim == 128 and r.num_key_value_heads == 4
    # explicit head_dim wins over hidden_size // heads (gemma2: 3584 / 16 = 224, head_dim 256)
    g = Gemma2Config(num_hidden_layers=2, hidden_size=3584, num_attention_heads=16, num_key_value_heads=8, head_dim=256)
    assert Recipe.uniform(g).head_dim == 256
    # a model (anything with .config) works too
    assert Recipe.uniform(SimpleNamespace(config=tiny_llama())).num_hidden_layers == 2


def test_save_load_identical_tensors_and_metadata(tmp_path):
    r = full_recipe()
    path = r.save(tmp_path / "r.safetensors")
    loaded = Recipe.load(path)
    assert loaded == r
    for name, t in r.tensors().items():
        u = getattr(loaded, name)
        assert u.dtype == t.dtype and u.shape == t.shape and torch.equal(u, t), name
    assert set(r.tensors()) == set(rmod._TENSORS)  # every optional tensor exercised
    assert loaded.quality == r.quality and loaded.provenance == r.provenance
    assert loaded.extra_metadata == {"note": "kept on round trips"}
    md = file_metadata(path)
    assert md == r.metadata()
    assert md["format"] == "tqpatch-recipe" and md["format_version"] == "1"
    assert md["num_hidden_layers"] == "3" and md["head_dim"] == "64" and md["num_key_value_heads"] == "2"
    assert json.loads(md["provenance"])["kind"] == "calibrated"
    # save(load(x)) is byte-identical, and equal recipes give equal bytes
    again = loaded.save(tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes() == full_recipe().to_bytes()
    assert file_metadata(again) == md


def test_load_by_path_forms(tmp_path):
    r = Recipe.uniform(tiny_llama())
    d = tmp_path / "dir"
    d.mkdir()
    r.save(d / "recipe.safetensors")
    assert Recipe.load(str(d / "recipe.safetensors")) == r
    assert Recipe.load(d) == r  # a directory with recipe.safetensors
    other = tmp_path / "other"
    other.mkdir()
    r.save(other / "x.safetensors")
    assert Recipe.load(other) == r  # a directory with exactly one .safetensors file
    r.save(other / "y.safetensors")
    with pytest.raises(RecipeNotFoundError, match="several .safetensors files"):
        Recipe.load(other)
    assert Recipe.load(r) is r
    r.key_bits[0] = 11  # edited in place: saving re-validates
    with pytest.raises(RecipeSchemaError, match=r"key_bits\[0\] = 11"):
        r.save(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="revision"):
        Recipe.load(d / "recipe.safetensors", revision="main")


def test_unknown_names_and_paths():
    with pytest.raises(RecipeNotFoundError, match="no bundled recipe named 'nope'.*qwen2.5-7b"):
        Recipe.load("nope")
    with pytest.raises(RecipeNotFoundError, match="does not exist"):
        Recipe.load("somewhere/missing.safetensors")
    with pytest.raises(RecipeNotFoundError, match="does not exist"):
        Recipe.load("./missing.safetensors")


def test_construction_validates():
    base = dict(model_type="llama", num_hidden_layers=2, num_key_value_heads=1, head_dim=64)
    with pytest.raises(RecipeSchemaError, match=r"key_bits\[1\] = 9: bits must be 1..8, or 16"):
        Recipe(**base, key_bits=[4, 9], value_bits=4)
    with pytest.raises(RecipeSchemaError, match=r"value_bits\[0\] = 0"):
        Recipe(**base, key_bits=4, value_bits=[0, 4])
    with pytest.raises(RecipeSchemaError, match=r"window\[1\] = -1"):
        Recipe(**base, key_bits=4, value_bits=4, window=[0, -1])
    with pytest.raises(RecipeSchemaError, match="rotation must be 'haar' or 'hadamard'"):
        Recipe(**base, key_bits=4, value_bits=4, rotation="dct")
    with pytest.raises(RecipeSchemaError, match="power-of-two head_dim"):
        Recipe(**{**base, "head_dim": 96}, key_bits=4, value_bits=4, rotation="hadamard")
    with pytest.raises(RecipeSchemaError, match="provenance\\['kind'\\]"):
        Recipe(**base, key_bits=4, value_bits=4, provenance={"kind": "magic"})
    with pytest.raises(RecipeSchemaError, match="key_outlier_channels is set but key_outlier_bits is not"):
        Recipe(**base, key_bits=4, value_bits=4, key_outlier_channels=torch.zeros(2, 1, 8, dtype=torch.int16))
    with pytest.raises(RecipeSchemaError, match="distinct"):
        Recipe(**base, key_bits=4, value_bits=4, key_outlier_channels=torch.zeros(2, 1, 8, dtype=torch.int16),
               key_outlier_bits=[8, 0])
    with pytest.raises(RecipeSchemaError, match="do not fill whole bytes"):
        Recipe(**base, key_bits=3, value_bits=4, key_outlier_channels=torch.arange(4).repeat(2, 1, 1),
               key_outlier_bits=[4, 4])  # 60 channels at 3 bits
    with pytest.raises(RecipeSchemaError, match="finite and > 0"):
        Recipe(**base, key_bits=4, value_bits=4, key_channel_scale=torch.zeros(2, 1, 64))
    with pytest.raises(RecipeSchemaError, match="shape"):
        Recipe(**base, key_bits=[4, 4, 4], value_bits=4)
    with pytest.raises(RecipeSchemaError, match="do not fit"):
        Recipe(**base, key_bits=4, value_bits=4, window=[0, 2**40])


# ------------------------------------------------------------------------------------------------
# bad files: each problem gets its own error class and a message that says what to do
# ------------------------------------------------------------------------------------------------
def test_corrupt_files(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(RecipeFileError, match="not a safetensors file.*Re-create the recipe"):
        Recipe.load(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(RecipeFileError, match="only 0 bytes"):
        Recipe.load(empty)
    text = tmp_path / "text.safetensors"
    text.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    with pytest.raises(RecipeFileError, match="not valid JSON"):
        Recipe.load(text)
    # a valid recipe cut short: header fine, data missing
    good = Recipe.uniform(tiny_llama()).to_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-5])
    with pytest.raises(RecipeFileError, match="truncated or corrupt"):
        Recipe.load(cut)
    for err in (garbage, empty, text, cut):
        with pytest.raises(RecipeError):
            Recipe.load(err)
        with pytest.raises(ValueError):
            Recipe.load(err)


def test_not_a_recipe(tmp_path):
    weights = write_raw(tmp_path / "model.safetensors", {"lm_head.weight": torch.zeros(4, 4)}, None)
    with pytest.raises(NotARecipeError, match="not a tqpatch recipe.*no 'format' entry"):
        Recipe.load(weights)
    other = write_raw(tmp_path / "other.safetensors", {"x": torch.zeros(2)}, {"format": "pt"})
    with pytest.raises(NotARecipeError, match="format='pt'"):
        Recipe.load(other)


def test_future_and_bad_format_version(tmp_path):
    tensors, md = valid_parts()
    future = write_raw(tmp_path / "future.safetensors", tensors, {**md, "format_version": "2", "created_with": "9.0"})
    with pytest.raises(RecipeVersionError, match=r"format version 2 \(written by tqpatch 9.0\).*Upgrade tqpatch"):
        Recipe.load(future)
    bad = write_raw(tmp_path / "bad.safetensors", tensors, {**md, "format_version": "one"})
    with pytest.raises(RecipeSchemaError, match="format_version='one' is not an integer"):
        Recipe.load(bad)
    missing = {k: v for k, v in md.items() if k != "format_version"}
    with pytest.raises(RecipeSchemaError, match="'format_version' is missing"):
        Recipe.load(write_raw(tmp_path / "nov.safetensors", tensors, missing))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda t, m: t.update(key_bits=t["key_bits"].to(torch.int32)), "'key_bits' has dtype torch.int32, expected torch.int8"),
        (lambda t, m: t.update(window=t["window"].to(torch.float32)), "'window' has dtype torch.float32, expected torch.int32"),
        (lambda t, m: t.update(value_bits=torch.full((3,), 4, dtype=torch.int8)), "axis 0 must be num_hidden_layers = 2"),
        (lambda t, m: t.update(rotation_seed=torch.zeros(2, 1, dtype=torch.int64)), "expected 1 dimensions"),
        (lambda t, m: t.update(key_bits=torch.tensor([4, 9], dtype=torch.int8)), r"key_bits\[1\] = 9: bits must be 1..8, or 16"),
        (lambda t, m: t.update(value_bits=torch.tensor([12, 4], dtype=torch.int8)), r"value_bits\[0\] = 12"),
        (lambda t, m: t.update(key_bits=torch.tensor([0, 4], dtype=torch.int8)), r"key_bits\[0\] = 0"),
        (lambda t, m: t.pop("window"), r"required tensor\(s\) \['window'\] missing"),
        (lambda t, m: t.update(surprise=torch.zeros(2)), r"unknown tensor\(s\) \['surprise'\]"),
        (lambda t, m: t.update(key_outlier_bits=torch.zeros(2, dtype=torch.int8)), "present without its partner"),
        (lambda t, m: t.update(key_channel_scale=torch.ones(2, 2, 32)), "axis 2 must be head_dim = 64"),
        (lambda t, m: m.pop("model_type"), "metadata is missing 'model_type'"),
        (lambda t, m: m.update(num_hidden_layers="two"), "num_hidden_layers='two' is not a positive integer"),
        (lambda t, m: m.update(provenance="{not json"), "'provenance' is not valid JSON"),
        (lambda t, m: m.update(provenance='{"kind": "magic"}'), r"provenance\['kind'\] must be one of"),
        (lambda t, m: m.update(rotation="fft"), "rotation must be 'haar' or 'hadamard'"),
    ],
)
def test_schema_errors(tmp_path, mutate, match):
    tensors, md = valid_parts()
    mutate(tensors, md)
    path = write_raw(tmp_path / "r.safetensors", tensors, md)
    with pytest.raises(RecipeSchemaError, match=match) as info:
        Recipe.load(path)
    msg = str(info.value)
    assert str(path) in msg  # says which file
    assert isinstance(info.value, RecipeError) and isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------
# validate_for
# ------------------------------------------------------------------------------------------------
def test_validate_for_match_and_mismatch():
    r = Recipe.uniform(tiny_llama())
    r.validate_for(tiny_llama())
    r.validate_for(SimpleNamespace(config=tiny_llama()))
    cases = [
        (tiny_llama(num_hidden_layers=3), "num_hidden_layers", (2, 3)),
        (tiny_llama(num_key_value_heads=4), "num_key_value_heads", (2, 4)),
        (tiny_llama(head_dim=32), "head_dim", (64, 32)),
        (Qwen2Config(num_hidden_layers=2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2), "model_type",
         ("llama", "qwen2")),
    ]
    for cfg, field, values in cases:
        with pytest.raises(RecipeMismatchError) as info:
            r.validate_for(cfg)
        err = info.value
        assert err.field == field and err.mismatches == {field: values}
        assert f"{field}: recipe {values[0]!r}, model {values[1]!r}" in str(err)
        assert "Recipe.uniform(model.config)" in str(err)
        assert isinstance(err, ValueError)
    with pytest.raises(RecipeMismatchError) as info:
        r.validate_for(tiny_llama(num_hidden_layers=5, num_key_value_heads=1))
    assert list(info.value.mismatches) == ["num_hidden_layers", "num_key_value_heads"]


def test_validate_for_multimodal_text_config():
    cfg = Gemma3Config(text_config=dict(num_hidden_layers=2, num_key_value_heads=1, head_dim=256, hidden_size=640,
                                        num_attention_heads=4))
    r = Recipe.uniform(cfg)
    assert (r.model_type, r.num_hidden_layers, r.head_dim) == ("gemma3", 2, 256)
    r.validate_for(cfg)
    r.validate_for(cfg.get_text_config())  # gemma3_text: same family


# ------------------------------------------------------------------------------------------------
# bundled recipes
# ------------------------------------------------------------------------------------------------
BUNDLED_CONFIGS = {
    "qwen2.5-7b": Qwen2Config(num_hidden_layers=28, num_key_value_heads=4, hidden_size=3584, num_attention_heads=28),
    "llama-3.1-8b": LlamaConfig(num_hidden_layers=32, num_key_value_heads=8, hidden_size=4096, num_attention_heads=32),
    "mistral-7b": MistralConfig(num_hidden_layers=32, num_key_value_heads=8, hidden_size=4096, num_attention_heads=32),
    "gemma-2-9b": Gemma2Config(num_hidden_layers=42, num_key_value_heads=8, hidden_size=3584, num_attention_heads=16,
                               head_dim=256),
    "phi-4": Phi3Config(num_hidden_layers=40, num_key_value_heads=10, hidden_size=5120, num_attention_heads=40),
    "qwen2.5-32b": Qwen2Config(num_hidden_layers=64, num_key_value_heads=8, hidden_size=5120, num_attention_heads=40),
    "llama-3.3-70b": LlamaConfig(num_hidden_layers=80, num_key_value_heads=8, hidden_size=8192, num_attention_heads=64),
}


def test_list_recipes():
    assert set(BUNDLED_CONFIGS) <= set(list_recipes())
    assert list_recipes() == sorted(list_recipes())


@pytest.mark.parametrize("name", sorted(BUNDLED_CONFIGS))
def test_bundled_recipe_loads_and_validates(name):
    r = Recipe.load(name)
    cfg = BUNDLED_CONFIGS[name]
    r.validate_for(cfg)
    L = cfg.num_hidden_layers
    assert r.provenance["kind"] == "published"
    assert isinstance(r.provenance["reference"], str) and "config.json" in r.provenance["reference"]
    assert r.rotation == "haar" and r.window.tolist() == [64] * L
    assert r.rotation_seed.tolist() == list(range(L))
    kb, vb = r.key_bits.tolist(), r.value_bits.tolist()
    assert set(kb[1:-1]) - {8} == {4} and set(vb[1:-1]) - {8} == {3}  # keys get the bits
    assert kb[0] == kb[-1] == vb[-1] == 4 or name == "qwen2.5-7b"
    if name == "qwen2.5-7b":
        assert kb[0] == kb[27] == vb[0] == vb[27] == 8  # published key-norm outliers
    assert r.provenance["average_bits"] == pytest.approx(r.average_bits(), abs=1e-4)
    assert r.average_bits() <= 4.0 and r.provenance["budget"]["met"]
    # with another config shape, apply would refuse it
    other = Qwen2Config(num_hidden_layers=L + 1, num_key_value_heads=cfg.num_key_value_heads,
                        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads)
    with pytest.raises(RecipeMismatchError, match="num_hidden_layers"):
        r.validate_for(other)


def test_bundled_files_are_up_to_date():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_published_recipes
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert make_published_recipes.main(["--check"]) == 0


def test_bundled_name_with_revision_is_an_error():
    with pytest.raises(ValueError, match="revision"):
        Recipe.load("qwen2.5-7b", revision="main")


# ------------------------------------------------------------------------------------------------
# average bits, tables
# ------------------------------------------------------------------------------------------------
def test_average_bits_by_hand():
    d128 = dict(model_type="llama", num_key_value_heads=1, head_dim=128)
    r = Recipe(**d128, num_hidden_layers=1, key_bits=4, value_bits=4)
    assert r.average_bits() == pytest.approx((128 * 4 + 16) / 128)  # 4.125
    assert r.average_bits(scale_bytes=0) == pytest.approx(4.0)
    assert r.average_bits(scale_bytes=4) == pytest.approx(4.25)
    # mixed layers: bf16 counts 16, no scale
    r = Recipe(**d128, num_hidden_layers=4, key_bits=[16, 8, 4, 2], value_bits=[16, 4, 4, 3])
    keys = [16, 8 + 1 / 8, 4 + 1 / 8, 2 + 1 / 8]
    values = [16, 4 + 1 / 8, 4 + 1 / 8, 3 + 1 / 8]
    assert r.average_bits() == pytest.approx((sum(keys) + sum(values)) / 8)
    assert r.bits_per_layer()[:, 0].tolist() == pytest.approx(keys)
    # outlier split (paper's 2.5 bits): 32 channels at 3 bits + 96 at 2 bits + two fp16 scales
    r = Recipe(**d128, num_hidden_layers=2, key_bits=[2, 2], value_bits=[4, 4],
               key_outlier_channels=torch.arange(32).repeat(2, 1, 1), key_outlier_bits=[3, 0])
    split = (32 * 3 + 96 * 2 + 2 * 16) / 128  # = 2.5
    assert split == 2.5
    assert r.bits_per_layer()[:, 0].tolist() == pytest.approx([split, 2 + 1 / 8])
    assert r.average_bits() == pytest.approx((split + 2.125 + 4.125 * 2) / 4)
    # the full-precision window, when a context length is given
    r = Recipe(**d128, num_hidden_layers=1, key_bits=4, value_bits=4, window=64)
    assert r.average_bits(context_length=128) == pytest.approx((64 * 16 + 64 * 4.125) / 128)
    assert r.average_bits(context_length=32) == pytest.approx(16.0)
    # bundled Qwen2.5-7B: layers 0 and 27 at K8/V8, the others K4/V3 (fp16 scales: 1/8 bit each)
    assert Recipe.load("qwen2.5-7b").average_bits() == pytest.approx((2 * 8.125 + 26 * (4.125 + 3.125) / 2) / 28)


def test_to_table_and_model_card():
    table = Recipe.load("qwen2.5-7b").to_table()
    assert "qwen2, 28 layers, 4 KV heads, head_dim 128" in table
    lines = table.splitlines()
    assert any(line.split()[:3] == ["0", "8", "8"] for line in lines)
    assert any(line.split()[:3] == ["1-26", "4", "3"] for line in lines)
    assert any(line.split()[:3] == ["27", "8", "8"] for line in lines)
    assert "3.946" in table
    bf16 = Recipe.uniform(tiny_llama(), skip_layers=[0]).to_table()
    assert any(line.split()[:3] == ["0", "bf16", "bf16"] for line in bf16.splitlines())
    r = full_recipe()
    t = r.to_table()
    assert "16 ch @ 4 bits" in t and "kl: 0.0123" in t and "heldout.top1: 0.97" in t
    card = r.model_card("me/rec", "recipe.safetensors")
    head = card.split("---")[1]
    assert "library_name: tqpatch" in head and 'base_model: "org/some-model"' in head
    assert "- tqpatch\n- turboquant\n- kv-cache" in head
    assert "| layers | key bits | value bits |" in card and "| kl | 0.0123 |" in card
    assert 'recipe="me/rec/recipe.safetensors"' in card


def test_apply_settings():
    r = full_recipe()
    s = r.apply_settings({"key_bits": [4] * 3, "other": 1})
    assert s["other"] == 1 and s["key_bits"] == [16, 2, 4] and s["value_bits"] == [16, 3, 4]
    assert s["window"] == [0, 32, 64] and s["seed"] == [7, 8, 9] and s["rotation"] == "haar"
    assert torch.equal(s["key_channel_scale"], r.key_channel_scale)
    assert s["key_outliers"][0] is None  # bf16 layer
    ch, bits = s["key_outliers"][1]
    assert bits == 4 and ch.shape == (2, 16)
    assert s["value_outliers"][2] is None and s["value_outliers"][1][1] == 8
    plain = Recipe.uniform(tiny_llama()).apply_settings({"key_channel_scale": torch.ones(1)})
    assert "key_channel_scale" not in plain and "key_outliers" not in plain


# ------------------------------------------------------------------------------------------------
# the Hub, through a local Hub-protocol server
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A FakeHub on 127.0.0.1 with huggingface_hub pointed at it and a fresh HF home/cache."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    server = FakeHub().start()
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    # huggingface_hub reads these at import time: patch the constants too
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # huggingface_hub retries 5xx answers with exponential backoff (up to 23 s): record, don't sleep
    server.sleeps = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=server.sleeps.append))
    _http.close_session()
    yield server
    server.stop()
    _http.close_session()


def _go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_push_then_pull_at_revision(hub):
    from huggingface_hub import hf_hub_download

    r = full_recipe()
    info = r.push_to_hub("me/rec")
    oid = info.oid
    assert oid == hub.head("me/rec")
    assert hub.file("me/rec", oid, "recipe.safetensors") == r.to_bytes()
    card = hub.file("me/rec", oid, "README.md").decode()
    assert card.startswith("---\nlibrary_name: tqpatch\n") and "kv-cache" in card
    # pull at that revision: the identical file, and the identical recipe
    path = hf_hub_download("me/rec", "recipe.safetensors", revision=oid)
    assert Path(path).read_bytes() == r.to_bytes()
    assert Recipe.from_hub("me/rec", revision=oid) == r
    # the same through load(): "org/repo" and "org/repo/file"
    assert Recipe.load("me/rec") == r
    assert Recipe.load("me/rec/recipe.safetensors", revision=oid) == r
    methods = [m for m, _ in hub.requests]
    assert ("POST", "/api/models/me/rec/commit/main") in hub.requests and "HEAD" in methods


def test_push_other_filename_and_token(hub):
    hub.require_token = "hf_secret"
    r = Recipe.uniform(tiny_llama(), key_bits=8)
    with pytest.raises(RecipeHubError, match="uploading 'k8/recipe-k8.safetensors' to Hub repo 'me/rec' failed.*token"):
        r.push_to_hub("me/rec", "k8/recipe-k8.safetensors")
    r.push_to_hub("me/rec", "k8/recipe-k8.safetensors", token="hf_secret", commit_message="k8")
    assert Recipe.load("me/rec/k8/recipe-k8.safetensors") == r
    with pytest.raises(ValueError, match="must end in .safetensors"):
        r.push_to_hub("me/rec", "recipe.bin", token="hf_secret")


def test_overwrite_keeps_old_revision(hub):
    r1 = Recipe.uniform(tiny_llama(), key_bits=4)
    r2 = Recipe.uniform(tiny_llama(), key_bits=8, window=32)
    oid1 = r1.push_to_hub("me/rec").oid
    oid2 = r2.push_to_hub("me/rec", commit_message="better recipe").oid
    assert oid1 != oid2 and hub.head("me/rec") == oid2
    assert Recipe.from_hub("me/rec") == r2  # main: the new file
    assert Recipe.from_hub("me/rec", revision=oid1) == r1  # the old revision still pulls the old file
    assert Recipe.from_hub("me/rec", revision=oid2) == r2
    assert ("HEAD", f"/me/rec/resolve/{oid1}/recipe.safetensors") in hub.requests
    # pushing identical content again makes no new commit
    n = hub.commit_count("me/rec")
    assert r2.push_to_hub("me/rec").oid == oid2
    assert hub.commit_count("me/rec") == n


def test_missing_file_repo_and_revision(hub):
    Recipe.uniform(tiny_llama()).push_to_hub("me/rec")
    with pytest.raises(RecipeNotFoundError, match=r"there is no 'other.safetensors' in Hub repo 'me/rec'.*"
                                                  r"Recipe files there: recipe.safetensors"):
        Recipe.from_hub("me/rec", "other.safetensors")
    with pytest.raises(RecipeNotFoundError, match="Hub repository 'me/nothing' was not found"):
        Recipe.load("me/nothing")
    with pytest.raises(RecipeNotFoundError, match="revision 'v9' does not exist in Hub repository 'me/rec'"):
        Recipe.from_hub("me/rec", revision="v9")
    with pytest.raises(RecipeNotFoundError, match="read as a Hub reference"):
        Recipe.load("me/rec/missing.safetensors")


def test_not_a_recipe_on_the_hub(hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo("me/weights")
    data = __import__("safetensors.torch", fromlist=["save"]).save({"w": torch.zeros(2)})
    api.create_commit("me/weights", [CommitOperationAdd("recipe.safetensors", data)], commit_message="weights")
    with pytest.raises(NotARecipeError, match="'recipe.safetensors' in Hub repo 'me/weights'.*not a tqpatch recipe"):
        Recipe.load("me/weights")


def test_server_error_is_clear(hub):
    r = Recipe.uniform(tiny_llama())
    hub.fail(500, path="/commit/")
    with pytest.raises(RecipeHubError, match="uploading 'recipe.safetensors' to Hub repo 'me/rec' failed.*500"):
        r.push_to_hub("me/rec")
    hub.clear_failures()
    oid = r.push_to_hub("me/rec").oid
    hub.fail(500, path="/resolve/")
    with pytest.raises(RecipeHubError, match=r"could not download 'recipe.safetensors' in Hub repo 'me/rec'.*500"):
        Recipe.from_hub("me/rec")
    assert hub.sleeps  # huggingface_hub retried with backoff (sleeps skipped in tests)
    hub.clear_failures()
    assert Recipe.from_hub("me/rec") == r
    # once cached, a server error on a branch falls back to the cached copy
    hub.fail(500)
    assert Recipe.from_hub("me/rec") == r
    assert Recipe.from_hub("me/rec", revision=oid) == r


def test_hub_unreachable(hub):
    hub.stop()  # connection refused
    with pytest.raises(RecipeHubError, match="could not download 'recipe.safetensors' in Hub repo 'me/rec'.*connection"):
        Recipe.load("me/rec")
    with pytest.raises(RecipeHubError, match="could not reach the Hub to upload"):
        Recipe.uniform(tiny_llama()).push_to_hub("me/rec")


def test_offline_from_populated_cache(hub, monkeypatch):
    r = Recipe.uniform(tiny_llama(), key_bits=3)
    oid = r.push_to_hub("me/rec").oid
    assert Recipe.load("me/rec") == r  # populates the cache (main and the commit)
    hub.stop()  # nothing answers any more
    _go_offline(monkeypatch)
    n = len(hub.requests)
    assert Recipe.load("me/rec") == r
    assert Recipe.from_hub("me/rec", revision=oid) == r
    assert Recipe.load("me/rec/recipe.safetensors") == r
    assert len(hub.requests) == n
    with pytest.raises(RecipeNotFoundError, match="not in the local Hugging Face cache.*HF_HUB_OFFLINE"):
        Recipe.from_hub("me/rec", "never-downloaded.safetensors")


def test_download_through_cdn_redirect(hub):
    r = Recipe.uniform(tiny_llama(), value_bits=2)
    r.push_to_hub("me/rec")
    hub.cdn = True  # resolve answers 302 to another origin, like LFS files on the real Hub
    assert Recipe.from_hub("me/rec") == r
    blob = git_blob_sha(r.to_bytes())
    assert ("GET", f"/__cdn/{blob}") in hub.requests


# ------------------------------------------------------------------------------------------------
# with the patcher: apply(model, recipe=...) by bundled name, by path and by Hub reference
# ------------------------------------------------------------------------------------------------
def qwen25_7b_shaped_model():
    """Random weights with Qwen2.5-7B's attention shape (28 layers, 4 KV heads, d 128), tiny widths."""
    from transformers import Qwen2ForCausalLM

    cfg = Qwen2Config(num_hidden_layers=28, num_attention_heads=4, num_key_value_heads=4, head_dim=128,
                      hidden_size=128, intermediate_size=64, vocab_size=64, max_position_embeddings=256)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture
def one_thread():
    """Small CPU linear algebra (e.g. the 128x128 QR of each Haar rotation) is up to 100x slower with
    several OpenMP threads on a busy 2-core machine; one thread keeps this test fast."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_apply_with_recipe_by_name_path_and_hub(hub, tmp_path, one_thread):
    import tqpatch

    model = qwen25_7b_shaped_model()
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    bundled = Recipe.load("qwen2.5-7b")
    path = bundled.save(tmp_path / "q.safetensors")
    bundled.push_to_hub("me/qwen")
    for ref in ("qwen2.5-7b", path, "me/qwen/recipe.safetensors"):
        tqpatch.apply(model, recipe=ref)
        try:
            settings = model._tqpatch_state["settings"]
            assert settings["key_bits"] == bundled.key_bits.tolist() and settings["window"] == [64] * 28
            if ref == "qwen2.5-7b":  # one generation is enough to show the patched model runs
                out = model.generate(ids, max_new_tokens=2, do_sample=False)
                assert out.shape == (1, 12)
        finally:
            tqpatch.unapply(model)
    with pytest.raises(RecipeMismatchError, match="num_hidden_layers: recipe 32, model 28"):
        tqpatch.apply(model, recipe="llama-3.1-8b")
    assert not tqpatch.is_patched(model)


# ------------------------------------------------------------------------------------------------
# command line: recipe show / list, push
# ------------------------------------------------------------------------------------------------
def test_cli_recipe_show_and_list(capsys, tmp_path):
    from tqpatch.cli import main

    assert main(["recipe", "show", "qwen2.5-7b"]) == 0
    out = capsys.readouterr().out
    assert "qwen2, 28 layers" in out and "published" in out
    path = full_recipe().save(tmp_path / "r.safetensors")
    assert main(["recipe", "show", str(path)]) == 0
    assert Recipe.load(path).to_table() in capsys.readouterr().out
    assert main(["recipe", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in list_recipes())


def test_cli_push_then_pull(hub, tmp_path, capsys):
    from tqpatch.cli import main

    r = full_recipe()
    path = r.save(tmp_path / "mine.safetensors")
    assert main(["push", str(path), "me/cli", "--message", "first"]) == 0
    assert Recipe.from_hub("me/cli") == r
    assert hub.file("me/cli", hub.head("me/cli"), "recipe.safetensors") == path.read_bytes()
    assert main(["push", "qwen2.5-7b", "me/cli", "--filename", "qwen.safetensors"]) == 0
    assert Recipe.from_hub("me/cli", "qwen.safetensors") == Recipe.load("qwen2.5-7b")
