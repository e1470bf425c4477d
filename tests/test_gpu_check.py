"""benchmarks/gpu_check.py --smoke: every section runs its tiny version on the CPU, one JSON line per result, and
the summary says PASS."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~30 s on 2 idle cores (a subprocess running every section on CPU): make test-slow
def test_gpu_check_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PMF_CHECK_PORT": "29731",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--json",
                           str(tmp_path / "r.jsonl")], capture_output=True, text=True, env=env, timeout=300)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = lines[-1]
    assert summary["summary"] == "PASS" and summary["fail"] == 0 and summary["pass"] >= 8
    sections = {ln["section"] for ln in lines[:-1]}
    assert sections == {"env", "attn_jvp", "train_step", "step", "max_micro", "train", "sample", "data", "h16", "fsdp"}
    assert lines[2]["section"] == "fsdp"  # the collective check runs first, after the environment line
    by = {(ln["section"], ln["name"]): ln for ln in lines[:-1]}
    assert by[("train", "pMF-tiny 60 steps")]["loss_u_last"] < by[("train", "pMF-tiny 60 steps")]["loss_u_first"]
    assert by[("attn_jvp", "default/bf16")]["rel_err_dO"] < 0.05
    assert by[("fsdp", "DCP save / load round trip")]["status"] == "PASS"
    step = by[("train_step", "pMF-tiny micro 4 eager")]  # the real train_step: time, FLOPs, plan vs measured peak
    assert step["tflop_per_step"] > 0 and 0.7 < step["plan_over_measured"] < 1.3, step
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == len(lines) - 1  # --json copy, summary aside
