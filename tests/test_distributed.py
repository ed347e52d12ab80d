"""Data parallelism: two CPU ranks (gloo, torchrun) give the single-process gradient and stay in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_worker(out: Path, ranks: int):
    env = dict(os.environ, PIPELINE_NUM_THREADS="1", OMP_NUM_THREADS="1")
    if ranks == 1:
        cmd = [sys.executable, str(WORKER), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(WORKER), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    run_worker(one, 1)
    run_worker(two, 2)
    return (torch.load(one / "rank0.pt"),
            torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt"))


@pytest.mark.slow
def test_two_rank_gradient_equals_single_process_gradient(results):
    single, r0, r1 = results
    assert single["world"] == 1 and r0["world"] == 2
    for name, g in single["grads"].items():
        assert g.abs().max() > 0, name  # a real gradient, not a vacuous zero
        torch.testing.assert_close(r0["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(r1["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_weights_stay_in_sync_across_ranks(results):
    _, r0, r1 = results
    for name, w in r0["weights"].items():
        torch.testing.assert_close(r1["weights"][name], w, rtol=0, atol=0, msg=name)
