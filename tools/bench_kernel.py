#!/usr/bin/env python
"""Check and time the Triton decode-attention kernel: a thin wrapper over ``tqpatch bench --suite kernel``
(the code lives in :mod:`tqpatch.bench`).

    PYTHONUNBUFFERED=1 python tools/bench_kernel.py --out $OUT [--sweep] [--skip-check] [--bits 4,3]
        [--batches 1,8,32] [--lengths 1024,8192,32768,131072] [--commit SHA]
    python tools/bench_kernel.py --profile     # only the B=8 T=32K 4-bit call a few times (for ncu)

Writes ``bench_kernel.json`` / ``bench_kernel.md`` (+ a plot) to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configurations")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--lengths", default="1024,8192,32768,131072")
    ap.add_argument("--commit", default="")
    ap.add_argument("--profile", action="store_true", help="only run the B=8 T=32K 4-bit call a few times (for ncu)")
    args = ap.parse_args()
    if args.profile:
        from tqpatch.bench import kernel_ncu_target

        kernel_ncu_target()
        return 0
    from tqpatch.cli import main as cli_main

    argv = ["-v", "bench", "--suite", "kernel", "--out", args.out, "--kernel-bits", args.bits,
            "--batches", args.batches, "--kernel-lengths", args.lengths]
    argv += ["--kernel-sweep"] if args.sweep else []
    argv += ["--no-kernel-check"] if args.skip_check else []
    argv += ["--commit", args.commit] if args.commit else []
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
