"""GPU check of the patched decode path: a thin wrapper over ``tqpatch bench`` (the code lives in
:mod:`tqpatch.bench`).

    python tools/gpu_check.py --out DIR [--contexts 1024,32768]   # correctness + e2e (Llama-8B shape, B=1,
                                                                 # tqpatch 4-bit vs StaticCache + compile)
    python tools/gpu_check.py --out DIR --profile 32768          # kernel table of 5 compiled tqpatch steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--contexts", default="1024,32768")
    ap.add_argument("--profile", type=int, default=0, metavar="CONTEXT",
                    help="only profile the tqpatch compiled step at this context: top CUDA kernels")
    args = ap.parse_args()
    from tqpatch.cli import main as cli_main

    argv = ["-v", "bench", "--out", args.out, "--models", "llama-3.1-8b", "--batches", "1",
            "--contexts", args.contexts]
    if args.profile:
        argv += ["--profile", str(args.profile)]
    else:
        argv += ["--suite", "correctness,e2e", "--methods", "tq4,static", "--static-batches", "1"]
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
