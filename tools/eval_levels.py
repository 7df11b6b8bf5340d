"""Quality of evenly spaced code levels against Lloyd-Max, on real text (issue 6's re-plan input).

    python tools/eval_levels.py smollm2-135m --out results/eval [--bits 4,3] [--threads 2]

``tqpatch eval``'s decode and chunk modes (KL and top-1 against the unquantized model, perplexity),
for tqpatch at each width twice: with its Lloyd-Max codebook, and with evenly spaced levels
``step * (idx - (2^b - 1) / 2)`` (thresholds at the midpoints), the step per width being the one that
minimised the measured relative MSE in ``results/cpu/format_options.json`` (in units of the
coordinate's standard deviation ``1/sqrt(d)``). Evenly spaced levels are what a kernel could expand
with a couple of instructions per code pair instead of a table lookup; this measures what they
cost in model quality, all methods in one run. Writes ``<model>-levels.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tqpatch import evaluate as E  # noqa: E402
from tqpatch import quantizer  # noqa: E402
from tqpatch.evalcli import run_info  # noqa: E402
from tqpatch.loading import load_model  # noqa: E402

_UNIFORM = " (evenly spaced levels)"


def _steps() -> dict[int, float]:
    rows = json.loads((ROOT / "results" / "cpu" / "format_options.json").read_text())["rows"]
    return {r["bits"]: r["uniform_step_in_sigma"] for r in rows}


@contextlib.contextmanager
def evenly_spaced_levels(steps: dict[int, float]):
    """Quantizers built inside use evenly spaced levels instead of Lloyd-Max's."""
    def levels(dim: int, bits: int) -> np.ndarray:
        return (np.arange(1 << bits) - ((1 << bits) - 1) / 2) * steps[bits] / np.sqrt(dim)

    def bounds(dim: int, bits: int) -> np.ndarray:
        c = levels(dim, bits)
        return (c[1:] + c[:-1]) / 2

    saved = quantizer.lloyd_max, quantizer.boundaries
    quantizer.lloyd_max, quantizer.boundaries = levels, bounds
    try:
        yield
    finally:
        quantizer.lloyd_max, quantizer.boundaries = saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    ap.add_argument("--out", default=str(ROOT / "results" / "eval"))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--segments", type=int, default=16)
    ap.add_argument("--scored-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = _steps()
    methods = []
    for b in (int(v) for v in a.bits.split(",")):
        base = E.tqpatch_bits_method(b, b)
        methods += [base, E.Method(base.name + _UNIFORM, "tqpatch", dict(base.settings), family="evenly spaced levels")]
    orig_prepared = E.prepared

    @contextlib.contextmanager
    def prepared(model, method):
        with evenly_spaced_levels(steps) if method.name.endswith(_UNIFORM) else contextlib.nullcontext():
            with orig_prepared(model, method):
                yield

    E.prepared = prepared
    config = E.EvalConfig(prompt_len=a.prompt_len, scored_tokens=a.scored_tokens, segments=a.segments,
                          passkey_lengths=())
    config.check()
    model, tokenizer = load_model(a.model, dtype=torch.float32, device="cpu")
    name = Path(a.model).stem if Path(a.model).exists() else a.model
    result = E.evaluate(model, tokenizer, Path(a.text).read_text(encoding="utf-8"), methods, config,
                        model_name=name, progress=not a.no_progress)
    result.info.update(run_info("python tools/eval_levels.py " + shlex.join(sys.argv[1:])), text=a.text,
                       uniform_step_in_sigma={str(k): v for k, v in steps.items()})
    E.write_results(result, a.out, f"{name}-levels")
    print(E.format_markdown(result), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
