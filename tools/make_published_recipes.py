#!/usr/bin/env python
"""Write the bundled "published" recipes ``recipes/<name>.safetensors``.

These recipes are not calibrated by tqpatch: their layer shapes come from each model's
``config.json`` (the numbers are hard-coded below, so no network is needed) and their per-layer
choices from published measurements and the project's design (see ``REFERENCE`` and the
``reference`` string stored in every file's provenance):

* middle layers: 4-bit keys and 3-bit values (keys are the bottleneck: design.md's reference
  simulation, K8/V4 +0.6% perplexity vs K4/V8 +4.6% on SmolLM2-135M);
* the first and last layer: 4-bit keys and values (one bit more for the values);
* layers that published K/V-norm measurements mark as outliers (Qwen2.5-7B: layers 0 and 27, key
  norms ~16x the median): 8-bit keys and values. Keeping them in bf16 would cost 16 bits per value
  and break the 4.0-bit budget (Qwen2.5-7B: 4.51 bits); 8-bit TurboQuant codes are within
  d*MSE 4e-5 of the vector. The CUDA decode kernel handles 2-4 bits: 8-bit layers attend through
  the plain-torch path (slower);
* a 64-token full-precision window in every layer; Haar rotations, seed ``l`` for layer ``l``.

The average stored bits per value (codes plus one fp16 scale per vector, bf16 layers as 16) is
written into the provenance. A 4-bit code with its fp16 scale alone costs 4.125 bits per value
at head_dim 128 (4.0625 at 256), which is why the middle layers store 3-bit values: every recipe
here meets the 4.0-bit budget (the provenance records the average and the check).

Usage::

    python tools/make_published_recipes.py [--out recipes] [--check]

``--check`` rewrites nothing and exits with status 1 if a bundled file differs from what this
script would write (the output is byte-deterministic).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tqpatch.recipe import Recipe  # noqa: E402

MIDDLE_KEY_BITS, MIDDLE_VALUE_BITS = 4, 3
BOUNDARY_BITS = 4
OUTLIER_BITS = 8
WINDOW = 64
ROTATION = "haar"
BUDGET = 4.0

REFERENCE = (
    "Layer shapes: the model's config.json ({source}), hard-coded in tools/make_published_recipes.py. "
    "Middle layers at 4-bit keys and 3-bit values (3.5 bits of codes): the TurboQuant paper (Zandieh et "
    "al., arXiv 2504.19874) reports KV-cache quality neutrality at 3.5 bits per channel; the bits go to "
    "the keys because keys are the bottleneck (design.md: K8/V4 +0.6% vs K4/V8 +4.6% on SmolLM2-135M). "
    "First and last layer at {boundary}: tqpatch design "
    "(issue 4: 'boundary layers kept at higher bits'), motivated by the per-layer K/V-norm outliers "
    "the project measured at the first layers (SmolLM2-135M layer 0 values 17x below the median, "
    "Gemma-3-270M layers 0-1 values 5-7x above; design.md).{outliers} 64-token full-precision "
    "window: the project's reference simulation (design.md; SmolLM2-135M K4/V4 perplexity +8.2% "
    "without it, +1.0% with it). Haar rotation: the paper's. Not calibrated or measured by tqpatch "
    "on this model."
)


@dataclass(frozen=True)
class ModelSpec:
    """Numbers from a model's config.json."""

    name: str
    source_model: str
    model_type: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    hidden_size: int
    head_dim: int
    outlier_layers: tuple[int, ...] = ()  # published outlier layers, stored at OUTLIER_BITS
    outlier_reference: str = ""
    also_for: tuple[str, ...] = ()


MODELS = (
    ModelSpec(
        "qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", "qwen2", 28, 28, 4, 3584, 128,
        outlier_layers=(0, 27),
        outlier_reference=(
            " Layers 0 and 27 at 8-bit keys and values: published key-norm measurements of Qwen2.5-7B show "
            "them as outliers at about 16x the median key norm (cited in tqpatch issue 4); bf16 there would "
            "cost 4.51 average bits, over the 4.0 budget."
        ),
        also_for=("Qwen/Qwen2.5-7B",),
    ),
    ModelSpec("llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "llama", 32, 32, 8, 4096, 128,
              also_for=("meta-llama/Llama-3.1-8B",)),
    ModelSpec("mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "mistral", 32, 32, 8, 4096, 128,
              also_for=("mistralai/Mistral-7B-v0.3",)),
    ModelSpec("gemma-2-9b", "google/gemma-2-9b-it", "gemma2", 42, 16, 8, 3584, 256,
              also_for=("google/gemma-2-9b",)),
    ModelSpec("phi-4", "microsoft/phi-4", "phi3", 40, 40, 10, 5120, 128),
    ModelSpec("qwen2.5-32b", "Qwen/Qwen2.5-32B-Instruct", "qwen2", 64, 40, 8, 5120, 128,
              also_for=("Qwen/Qwen2.5-32B",)),
    ModelSpec("llama-3.3-70b", "meta-llama/Llama-3.3-70B-Instruct", "llama", 80, 64, 8, 8192, 128),
)


def transformers_config(spec: ModelSpec):
    """A transformers config of the model's shape (no weights, no network)."""
    from transformers import AutoConfig

    kwargs = dict(
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        hidden_size=spec.hidden_size,
    )
    if spec.hidden_size // spec.num_attention_heads != spec.head_dim:
        kwargs["head_dim"] = spec.head_dim
    return AutoConfig.for_model(spec.model_type, **kwargs)


def build(spec: ModelSpec) -> Recipe:
    L = spec.num_hidden_layers
    kbits = torch.full((L,), MIDDLE_KEY_BITS, dtype=torch.int8)
    vbits = torch.full((L,), MIDDLE_VALUE_BITS, dtype=torch.int8)
    boundary = (0, L - 1)
    for i in boundary:
        kbits[i] = vbits[i] = BOUNDARY_BITS
    for i in spec.outlier_layers:
        kbits[i] = vbits[i] = OUTLIER_BITS
    boundary_text = (
        "4-bit keys and values"
        if not spec.outlier_layers
        else "4-bit keys and values unless an outlier layer (8 bits)"
    )
    recipe = Recipe(
        model_type=spec.model_type,
        num_hidden_layers=L,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        key_bits=kbits,
        value_bits=vbits,
        rotation_seed=torch.arange(L, dtype=torch.int64),
        window=WINDOW,
        rotation=ROTATION,
        source_model=spec.source_model,
        provenance={"kind": "published"},
        created_with=_version(),
    )
    avg = recipe.average_bits()
    code_only = recipe.average_bits(scale_bytes=0)
    scale_cost = 16 / spec.head_dim
    recipe.provenance = {
        "kind": "published",
        "reference": REFERENCE.format(source=spec.source_model, boundary=boundary_text, outliers=spec.outlier_reference),
        "applies_to": [spec.source_model, *spec.also_for],
        "settings": {
            "middle_key_bits": MIDDLE_KEY_BITS,
            "middle_value_bits": MIDDLE_VALUE_BITS,
            "boundary_layers": list(boundary),
            "boundary_bits": BOUNDARY_BITS,
            "outlier_layers": list(spec.outlier_layers),
            "outlier_bits": OUTLIER_BITS,
            "window": WINDOW,
            "rotation": ROTATION,
            "rotation_seed": "layer index",
        },
        "config": {
            "num_attention_heads": spec.num_attention_heads,
            "hidden_size": spec.hidden_size,
        },
        "average_bits": round(avg, 4),
        "average_bits_codes_only": round(code_only, 4),
        "average_bits_counts": (
            "codes plus one fp16 scale per vector; bf16 layers as 16 bits; the 64-token window not counted"
        ),
        "budget": {
            "target_average_bits": BUDGET,
            "met": avg <= BUDGET,
            "note": "met" if avg <= BUDGET else f"not met: {avg:.4f} > {BUDGET} (fp16 scale {scale_cost:.4g} bits per value)",
        },
        "measured_quality": "none: not measured by tqpatch on this model",
    }
    return recipe


def _version() -> str:
    import tqpatch

    return tqpatch.__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "recipes", help="output directory (default: recipes/)")
    p.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = p.parse_args(argv)
    stale = []
    for spec in MODELS:
        recipe = build(spec)
        recipe.validate_for(transformers_config(spec))
        path = args.out / f"{spec.name}.safetensors"
        data = recipe.to_bytes()
        if args.check:
            if not path.is_file() or path.read_bytes() != data:
                stale.append(path)
            continue
        path.write_bytes(data)
        # the written file must load back to the same recipe
        assert Recipe.load(path) == recipe, path
        print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {spec.model_type}, "
              f"{spec.num_hidden_layers} layers, {spec.num_key_value_heads} KV heads, d {spec.head_dim}, "
              f"{recipe.average_bits():.3f} average bits")
    if stale:
        print("out of date (run tools/make_published_recipes.py):", *map(str, stale), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
