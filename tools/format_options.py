"""What a code format that Hopper can expand cheaply would cost in distortion (issue 6's re-plan).

    python tools/format_options.py --out results/cpu [--dim 128] [--vectors 20000]

The decode kernels are bound by expanding Lloyd-Max codes (a table lookup: ``prmt`` byte
permutes, 2.7 integer instructions per code, ``results/h200/notes.md``). Evenly spaced levels
``step * (idx - (2^b - 1) / 2)`` can instead be expanded with the fp16 "magic number" trick (mask
the code into the mantissa of 1024.0, subtract 1024 + the offset): about one integer and one fp16
instruction per two codes, and the step folds into the per-vector scale. This script measures
what that costs on the quantity TurboQuant minimises: the relative MSE ``|x - x_hat|^2 / |x|^2``
of random vectors after the random rotation, with tqpatch's norm correction (scale
``|x| / |c[idx]|``), for the Lloyd-Max codebook, for the best uniform step at each width (the
step searched with scipy), and for levels that an odd polynomial of the level index gives (a few
fp16 FMAs after the same conversion). Writes ``format_options.json`` and ``format_options.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqpatch.codebook import lloyd_max  # noqa: E402
from tqpatch.rotation import rotation_matrix  # noqa: E402


def relative_mse(u: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean ``|u - s c[idx]|^2`` over unit rows ``u`` (already rotated), nearest-centroid codes,
    ``s = 1 / |c[idx]|`` (tqpatch's norm correction)."""
    thresholds = (centroids[1:] + centroids[:-1]) / 2
    c = centroids[torch.bucketize(u, thresholds)]
    xh = c / torch.linalg.vector_norm(c, dim=-1, keepdim=True)
    return float(((u - xh) ** 2).sum(-1).mean())


def uniform_levels(bits: int, step: float) -> torch.Tensor:
    return (torch.arange(1 << bits, dtype=torch.float64) - ((1 << bits) - 1) / 2) * step


def odd_polynomial_levels(centroids: torch.Tensor, degree: int) -> torch.Tensor:
    """The least-squares fit of ``centroids`` by an odd polynomial of ``t = idx - (2^b - 1) / 2``
    (terms t, t^3, .., t^degree): levels an fp16 expansion reaches with one FMA per term after the
    magic-number conversion of ``idx``."""
    n = centroids.shape[0]
    t = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    basis = torch.stack([t ** k for k in range(1, degree + 1, 2)], 1)
    coef = torch.linalg.lstsq(basis, centroids.unsqueeze(1)).solution
    return (basis @ coef).squeeze(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--vectors", type=int, default=20000)
    ap.add_argument("--commit", default="")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.vectors, a.dim, generator=g, dtype=torch.float64)
    u = x @ rotation_matrix(a.dim, seed=1).to(torch.float64).T
    u = u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    rows = []
    for bits in (2, 3, 4):
        lm = relative_mse(u, torch.tensor(lloyd_max(a.dim, bits), dtype=torch.float64))
        sigma = a.dim ** -0.5
        best = minimize_scalar(lambda s: relative_mse(u, uniform_levels(bits, s * sigma)), bounds=(0.05, 2.0),
                               method="bounded", options={"xatol": 1e-4})
        cents = torch.tensor(lloyd_max(a.dim, bits), dtype=torch.float64)
        cubic = relative_mse(u, odd_polynomial_levels(cents, 3))
        quintic = relative_mse(u, odd_polynomial_levels(cents, 5))
        rows.append(dict(bits=bits, lloyd_max_rel_mse=lm, uniform_rel_mse=float(best.fun),
                         uniform_step_in_sigma=float(best.x), uniform_over_lloyd_max=float(best.fun) / lm,
                         odd_cubic_rel_mse=cubic, odd_cubic_over_lloyd_max=cubic / lm,
                         odd_quintic_rel_mse=quintic, odd_quintic_over_lloyd_max=quintic / lm))
    res = dict(command="python " + " ".join(sys.argv), commit=a.commit, dim=a.dim, vectors=a.vectors,
               torch=torch.__version__, numpy=np.__version__, python=platform.python_version(), rows=rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "format_options.json").write_text(json.dumps(res, indent=1))
    lines = ["# Lloyd-Max vs evenly spaced levels: relative MSE after the rotation", "",
             f"Command: `{res['command']}`, commit {a.commit}, d = {a.dim}, {a.vectors} random Gaussian vectors, "
             f"norm-corrected scales as tqpatch stores them; the uniform step (in units of the coordinate's "
             "standard deviation 1/sqrt(d)) minimises the measured MSE.", "",
             "Odd cubic / quintic: the Lloyd-Max centroids fitted by a t + b t^3 (+ c t^5) of the centred level "
             "index t (least squares), used as the levels.", "",
             "| bits | Lloyd-Max rel. MSE | uniform rel. MSE | uniform step / sigma | uniform / Lloyd-Max | "
             "odd cubic / Lloyd-Max | odd quintic / Lloyd-Max |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['lloyd_max_rel_mse']:.5f} | {r['uniform_rel_mse']:.5f} | "
                     f"{r['uniform_step_in_sigma']:.3f} | {r['uniform_over_lloyd_max']:.3f} | "
                     f"{r['odd_cubic_over_lloyd_max']:.4f} | {r['odd_quintic_over_lloyd_max']:.4f} |")
    (out / "format_options.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
