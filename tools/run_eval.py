"""The issue-5 comparison for one model: every method of ``tqpatch.evaluate.full_methods``.

    python tools/run_eval.py smollm2-135m                 # writes results/eval/smollm2-135m.{json,md,png}
    python tools/run_eval.py gemma3-270m --passkey-lengths 1024,2048,4096,8192
    python tools/run_eval.py smollm2-135m --quick         # small settings, to check the set-up

Calibrated recipes named ``<model>``, ``<model>-3.5bit`` and ``<model>-2.5bit`` are included when
bundled (``tqpatch.list_recipes()``); missing ones are skipped with a logged note. The JSON and
Markdown name the command, git commit, device, torch/transformers versions and the wall time of
every method.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="smollm2-135m, gemma3-270m, or a model directory")
    p.add_argument("--text", default=str(DEFAULT_TEXT), help=f"evaluation text (default {DEFAULT_TEXT})")
    p.add_argument("--out", default=str(ROOT / "results" / "eval"), help="output directory (default results/eval)")
    p.add_argument("--scored-tokens", type=int, default=4096)
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--passkey-lengths", type=_ints, default=(1024, 2048, 4096, 8000))
    p.add_argument("--only", default="", help="comma-separated substrings: run only methods whose name has one")
    p.add_argument("--exact", action="store_true", help="--only lists exact method names, not substrings")
    p.add_argument("--quick", action="store_true",
                   help="small settings (256 scored tokens, 4 segments, passkey 512/1024) to check the set-up")
    p.add_argument("--passkey-only", action="store_true",
                   help="skip decode and chunk modes; writes <model>-passkey.{json,md}")
    p.add_argument("--stem", default="", help="output file stem (default: the model name, + -passkey / -quick)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="torch device (e.g. cuda); the model runs in float32")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from tqpatch import evaluate as E
    from tqpatch.evalcli import run_info
    from tqpatch.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.scored_tokens, args.segments, args.prompt_len, args.passkey_lengths = 256, 4, 256, (512, 1024)
    name = Path(args.model).name if Path(args.model).exists() else args.model
    methods = E.full_methods(name)
    if args.only:
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        hit = (lambda k, n: k == n) if args.exact else (lambda k, n: k in n)
        methods = [m for m in methods if m.kind == "unquantized" or any(hit(k, m.name) for k in keys)]
    config = E.EvalConfig(prompt_len=args.prompt_len, scored_tokens=args.scored_tokens, segments=args.segments,
                          chunk=0 if args.passkey_only else args.chunk, decode=not args.passkey_only,
                          passkey_lengths=tuple(args.passkey_lengths))
    t0 = time.perf_counter()
    command = "python tools/run_eval.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    info = run_info(command)  # now: the commit whose code this process imported
    model, tok = load_model(args.model, dtype=torch.float32, device=args.device)
    result = E.evaluate(model, tok, Path(args.text).read_text(encoding="utf-8"), methods, config, model_name=name)
    result.info.update(info, text=str(args.text), total_wall_seconds=time.perf_counter() - t0,
                       method_seconds={r.method["name"]: round(r.seconds, 1) for r in result.methods})
    stem = args.stem or (name + ("-quick" if args.quick else "") + ("-passkey" if args.passkey_only else ""))
    for path in E.write_results(result, args.out, stem):
        print(f"wrote {path}")
    print(E.format_markdown(result))
    return 1 if any(r.error for r in result.methods) else 0


if __name__ == "__main__":
    sys.exit(main())
