"""Calibrate the bundled recipes of the test models and check them on held-out text.

    python tools/make_calibrated_recipes.py smollm2-135m gemma3-270m

For each model: one sensitivity measurement on the bundled calibration text
(``tqpatch/data/calibration.txt``), then recipes for 4.0 average bits (``recipes/<model>``, the
default), 3.5 (``<model>-3.5bit``), 3.0 (``<model>-3bit``) and 2.5 (``<model>-2.5bit``), plus recipes at exactly the cost
of uniform 4-bit and 3-bit K/V (codes + scales) for a same-bits comparison. Every recipe and the
uniform settings (and the same budgets without outlier-channel splits) are then applied (the real patched path) and scored in chunk mode on held-out
text (tiny Shakespeare from character 300,000: a 384-token exact prompt, then 64 tokens that
attend to the compressed history, 8 segments): mean KL(unquantized || patched), against the
unpatched model. Writes ``results/calibration/<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tqpatch  # noqa: E402
from tqpatch import evaluate as E  # noqa: E402
from tqpatch.calibrate import measure_sensitivity  # noqa: E402
from tqpatch.loading import load_model  # noqa: E402

TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
BUDGETS = {"": 4.0, "-3.5bit": 3.5, "-3bit": 3.0, "-2.5bit": 2.5}


def held_out_kl(model, tok, methods: dict[str, dict], offset: int = 300_000) -> dict[str, float]:
    prompt, chunk, segments = 384, 64, 8
    ids = E.text_segments(tok, TEXT.read_text(encoding="utf-8"), segments, prompt + chunk + 1, offset=offset)
    _, ref = E.run_teacher_forced(model, E.Method("unquantized", "unquantized"), ids, prompt, chunk, None,
                                  record=True, progress=False)
    out = {}
    for name, settings in methods.items():
        metrics, _ = E.run_teacher_forced(model, E.Method(name, "tqpatch", settings), ids, prompt, chunk, ref,
                                          progress=False)
        out[name] = metrics.kl
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", default=str(ROOT / "results" / "calibration"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    for name in args.models:
        model, tok = load_model(name)
        d = model.config.get_text_config().head_dim
        t0 = time.perf_counter()
        sens = measure_sensitivity(model, tok, source_model=name)
        measure_s = time.perf_counter() - t0
        recipes = {}
        for suffix, bits in BUDGETS.items():
            r = sens.recipe(bits)
            r.provenance["command"] = "python tools/make_calibrated_recipes.py " + " ".join(map(shlex.quote, sys.argv[1:]))
            r.save(ROOT / "recipes" / f"{name}{suffix}.safetensors")
            recipes[f"{name}{suffix}"] = r
        same = {b: sens.recipe(b + 16 / d) for b in (4, 3)}
        methods = {n: {"recipe": r} for n, r in recipes.items()}
        for suffix, bits in BUDGETS.items():  # the same budgets without outlier-channel splits
            methods[f"{name}{suffix} without splits"] = {"recipe": sens.recipe(bits, splits=False)}
        for b, r in same.items():
            methods[f"calibrated @ uniform-{b}-bit cost"] = {"recipe": r}
            methods[f"uniform K{b}/V{b}"] = {"key_bits": b, "value_bits": b, "window": 64}
        methods["uniform K4/V3"] = {"key_bits": 4, "value_bits": 3, "window": 64}
        bits = {n: s["recipe"].average_bits() if "recipe" in s else ((s["key_bits"] + s["value_bits"]) / 2 + 16 / d)
                for n, s in methods.items()}
        kl = held_out_kl(model, tok, methods)
        info = {
            "command": "python tools/make_calibrated_recipes.py " + " ".join(map(shlex.quote, sys.argv[1:])),
            "commit": commit, "device": "cpu", "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "model": name, "measure_seconds": round(measure_s, 1),
            "held_out": "tiny Shakespeare from char 300000, 8 segments x (384 exact + 64 chunk tokens), chunk mode",
            "rows": [{"method": n, "average_bits": round(bits[n], 4), "held_out_kl": round(kl[n], 6),
                      "calibration_chunk_kl": methods[n]["recipe"].quality.get("calibration_chunk_kl")
                      if "recipe" in methods[n] else None} for n in methods],
            "recipes": {n: {"key_bits": r.key_bits.tolist(), "value_bits": r.value_bits.tolist(),
                            "key_smoothing_layers": r.provenance["key_smoothing_layers"],
                            "outlier_split": r.provenance["outlier_split"]} for n, r in recipes.items()},
            "outlier_layers": sens.outlier_layers,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(info, indent=2))
        lines = [f"# Calibrated recipes: {name}", "",
                 f"command `{info['command']}`, commit {commit}, CPU ({info['threads']} threads), torch {torch.__version__}, "
                 f"transformers {transformers.__version__}. Sensitivity measurement: {info['measure_seconds']} s. "
                 f"Outlier layers by K/V norm: {sens.outlier_layers}.", "",
                 f"Held-out check: {info['held_out']}; KL(unquantized || patched), real patched path.", "",
                 "| method | average bits (codes + scales) | held-out KL | calibration-chunk KL |", "|---|---|---|---|"]
        for row in info["rows"]:
            c = row["calibration_chunk_kl"]
            lines.append(f"| {row['method']} | {row['average_bits']:.3f} | {row['held_out_kl']:.5f} | "
                         f"{'' if c is None else f'{c:.5f}'} |")
        lines += ["", "Outlier-channel splits in the bundled recipes (layers whose keys/values store "
                  "`outlier_fraction` of their channels, the largest by RMS per head, one bit above the rest; "
                  "chosen over the no-split allocation when its joint calibration-chunk KL is lower):", ""]
        for n, r in recipes.items():
            o = r.provenance["outlier_split"]
            lines.append(f"- {n}: {o['chosen']}; {o['channels']} channels; key layers {o['key_layers']}, "
                         f"value layers {o['value_layers']}; calibration-chunk KL {o['calibration_chunk_kl']}")
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
