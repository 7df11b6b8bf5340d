"""Arguments and runner of ``tqpatch eval`` (registered in :mod:`tqpatch.cli`)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

__all__ = ["add_arguments", "run_from_args", "methods_from_args"]

logger = logging.getLogger(__name__)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``tqpatch eval`` arguments to ``p``."""
    p.add_argument("model", help="a test model name (smollm2-135m, gemma3-270m), a model directory or a .gguf file")
    p.add_argument("--text", required=True, metavar="FILE", help="evaluation text (e.g. tinyshakespeare.txt)")
    p.add_argument("--recipe", action="append", default=[], metavar="R",
                   help="evaluate tqpatch with this recipe: a bundled name, a path or a Hub reference (repeatable)")
    p.add_argument("--bits", action="append", default=[], metavar="K/V",
                   help="evaluate tqpatch with uniform K/V bits, e.g. 4/4 or 4/2 (repeatable)")
    p.add_argument("--methods", choices=("default", "all", "none"), default=None,
                   help="method set: default (unquantized, tqpatch 4/3/2 bits, QuantizedCache int4/int2), all (the "
                        "issue-5 comparison), none (only --recipe/--bits). Default: 'default' without "
                        "--recipe/--bits, else 'none'")
    p.add_argument("--hf", action="append", default=[], metavar="BACKEND:BITS",
                   help="also evaluate transformers' QuantizedCache, e.g. quanto:4 or hqq:2 (repeatable)")
    p.add_argument("--window", type=int, default=None, help="full-precision window for --bits methods (default 64)")
    p.add_argument("--rotation", choices=("haar", "hadamard"), default=None, help="rotation for --bits methods")
    p.add_argument("--out", metavar="DIR", default="results/eval", help="output directory (default results/eval)")
    p.add_argument("--stem", default=None, help="output file name stem (default: the model name)")
    p.add_argument("--prompt-len", type=int, default=512, help="exact prompt tokens per segment (default 512)")
    p.add_argument("--scored-tokens", type=int, default=4096, help="scored tokens per mode (default 4096)")
    p.add_argument("--segments", type=int, default=8, help="text segments, run as one batch (default 8)")
    p.add_argument("--chunk", type=int, default=64, help="tokens per step in chunk mode (default 64; 0 skips it)")
    p.add_argument("--no-decode", action="store_true", help="skip decode mode")
    p.add_argument("--passkey-lengths", type=_ints, default=(1024, 2048, 4096, 8000),
                   help="passkey prompt lengths in tokens (default 1024,2048,4096,8000; empty string skips passkey)")
    p.add_argument("--passkey-depths", type=_floats, default=(0.1, 0.3, 0.5, 0.7, 0.9),
                   help="needle depths (default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--memory-len", type=int, default=4096,
                   help="tokens of the memory probe when passkey is skipped (default 4096)")
    p.add_argument("--text-offset", type=int, default=0, help="characters of the text to skip (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default cpu); the model runs in float32")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def methods_from_args(args: argparse.Namespace, model_name: str) -> list:
    """The :class:`tqpatch.evaluate.Method` list the arguments ask for."""
    from . import evaluate as E

    which = args.methods or ("none" if (args.recipe or args.bits) else "default")
    methods = {"default": E.default_methods, "all": lambda: E.full_methods(model_name), "none": list}[which]()
    extra = {k: v for k, v in (("window", args.window), ("rotation", args.rotation)) if v is not None}
    for spec in args.bits:
        kb, vb = E.parse_bits(spec)
        methods.append(E.tqpatch_bits_method(kb, vb, **extra))
    methods += [E.recipe_method(r) for r in args.recipe]
    for spec in args.hf:
        m = re.fullmatch(r"(quanto|hqq):(\d)", spec)
        if not m:
            raise ValueError(f"--hf takes BACKEND:BITS with BACKEND quanto or hqq, e.g. quanto:4; got {spec!r}")
        methods.append(E.hf_method(m.group(1), int(m.group(2))))
    seen, unique = set(), []
    for m in methods:
        if m.name not in seen:
            seen.add(m.name)
            unique.append(m)
    return unique


def run_from_args(args: argparse.Namespace) -> tuple[int, list[Path]]:
    """Run ``tqpatch eval``; returns ``(exit status, written paths)``."""
    import time

    import torch

    from . import evaluate as E
    from .loading import load_model

    text_path = Path(args.text)
    if not text_path.is_file():
        raise ValueError(f"--text {args.text!r} is not a file")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = Path(args.model).stem if Path(args.model).exists() else args.model
    methods = methods_from_args(args, model_name)
    config = E.EvalConfig(
        prompt_len=args.prompt_len, scored_tokens=args.scored_tokens, segments=args.segments, chunk=args.chunk,
        decode=not args.no_decode, passkey_lengths=tuple(args.passkey_lengths),
        passkey_depths=tuple(args.passkey_depths), memory_len=args.memory_len, text_offset=args.text_offset,
    )
    config.check()
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=args.device)
    load_s = time.perf_counter() - t0
    result = E.evaluate(model, tokenizer, text_path.read_text(encoding="utf-8"), methods, config,
                        model_name=model_name, progress=not args.no_progress)
    result.info.update(run_info(getattr(args, "command_line", "")), model_load_seconds=load_s,
                       text=str(text_path))
    paths = E.write_results(result, args.out, args.stem or model_name, plot=not args.no_plot)
    print(E.format_markdown(result), end="")
    failed = [r.method["name"] for r in result.methods if r.error]
    if failed:
        print(f"tqpatch eval: {len(failed)} method(s) failed: {', '.join(failed)} (see the table)", file=sys.stderr)
    return (1 if failed else 0), paths


def run_info(command: str) -> dict:
    """Provenance of a run: command, git commit (``$TQPATCH_COMMIT`` where the copy's git is stale),
    device, versions."""
    import os
    import platform
    import subprocess

    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10, cwd=Path(__file__).resolve().parent).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    commit = os.environ.get("TQPATCH_COMMIT") or commit
    device = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            device = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), device)
    except OSError:
        pass
    return {"command": command, "commit": commit, "dirty_tree": dirty, "device": f"CPU: {device}",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}
