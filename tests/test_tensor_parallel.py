"""tqpatch on a tensor-parallel model (``tp_plan="auto"``): 2 CPU processes over gloo.

Runs ``tools/tp_check.py --device cpu`` (torchrun, 2 ranks): each rank must hold only its own KV
heads and recipe rows, its greedy tokens must equal single-process patched generation, and its
compiled decode step (fullgraph) must give the tokens of its eager step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "tp_check.py"


def test_two_rank_greedy_equals_single_process(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--device", "cpu", "--nproc", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=660, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    result = json.loads((tmp_path / "tp_check.json").read_text())
    assert result["backend"] == "gloo"
    assert result["errors"] == []
    ref = result["reference_patched"]
    assert result["distinct_tokens"] > 8, "degenerate reference: the equality below would be too easy"
    for rank in result["ranks"]:
        assert rank["tokens"] == ref, f"rank {rank['rank']} generated other tokens than one process"
        assert rank["compiled_equals_eager"], f"rank {rank['rank']}: compiled decode steps differ from eager"
        # 4 KV heads over 2 ranks: every stored tensor of every layer holds 2 heads
        assert all(h == [2] for h in rank["cache_heads_per_layer"].values()), rank["cache_heads_per_layer"]
    assert {r["rank"] for r in result["ranks"]} == {0, 1}
