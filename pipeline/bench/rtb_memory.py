"""Memory benchmark of one RTB step: two-pass chunked gradient vs naive full backprop.

Each (method, K) runs in a fresh subprocess (``python -m pipeline.bench.rtb_memory --worker ...``):
it imports torch, builds a default-size eps U-Net (random weights: memory does not depend on them),
wraps it as the frozen prior, and builds the **full-network** posterior (a trainable copy, not the
head). The baseline is the process's resident memory after imports and model construction; the
kernel's peak-RSS counter (VmHWM) is reset there (``/proc/self/clear_refs``), and the figure reported is
``peak - baseline`` over one complete step (rollout without grad + gradient):

* ``two_pass``: pass 1 rolls out with no grad and stores O(K B d) states and prior eps; pass 2
  recomputes log q per chunk of ``chunk`` steps and backprops each chunk separately;
* ``naive``: one autograd graph for ``1/2 (log Z + sum log q - sum log p - log r)^2`` over all K steps
  (states detached), so activations grow with K.

A subprocess that exceeds the address-space limit (``--memory-limit-gb``) or is killed is recorded as
``oom``. On a CUDA device the peak is ``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipeline.diffusion.network_prior import NetworkPrior
from pipeline.diffusion.schedule import NoiseSchedule
from pipeline.diffusion.unet import build_unet, count_parameters
from pipeline.io.atomic import write_json
from pipeline.problems import InverseProblem
from pipeline.rtb.objective import deltas_scalar, naive_loss, policy_rollout, two_pass_backward
from pipeline.rtb.posterior import EpsNetModel, RTBPosterior, copy_network
from pipeline.runtime import choose_device, configure_threads


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _inpaint_problem(image_size: int):
    """y = mask * x + noise (sigma 0.1) on a fixed random half of the pixels: a cheap linear likelihood."""
    class Inpaint(InverseProblem):
        def __init__(self):
            g = torch.Generator().manual_seed(1)
            mask = torch.rand((1, image_size, image_size), generator=g) < 0.5
            super().__init__(torch.full((1, image_size, image_size), 0.1), mask)
            self.x_shape = self.y_shape = (1, image_size, image_size)

        def forward(self, x):
            return x * self.mask.to(x.device)

    return Inpaint()


def _peak_fields(cuda: bool, base, reset_ok: bool) -> dict:
    """Peak memory above the baseline in MiB (``base``: allocated bytes on CUDA, else resident KiB)."""
    if cuda:
        return {"peak_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20,
                "memory": "cuda max_memory_allocated - baseline"}
    # the kernel updates VmHWM lazily, so the resident size now is a lower bound of the peak as well
    peak = max(_rss_kib("VmHWM") if reset_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               _rss_kib("VmRSS"))
    return {"peak_mib": (peak - base) / 1024, "baseline_mib": base / 1024,
            "memory": "VmHWM (reset at baseline) - VmRSS after imports and model build" if reset_ok else
            "ru_maxrss - VmRSS after imports and model build"}


def worker(method: str, K: int, batch: int, chunk: int, preset: str, image_size: int, seed: int = 0) -> dict:
    """One RTB step in this process; returns the measurement record."""
    configure_threads()
    device = choose_device("auto")
    torch.manual_seed(seed)
    net = build_unet(preset, in_channels=1, image_size=image_size).to(device)
    prior = NetworkPrior(net, NoiseSchedule(), (1, image_size, image_size))
    chain = prior.schedule.chain(K)

    problem = _inpaint_problem(image_size).to(device)
    post = RTBPosterior(prior, chain, EpsNetModel(copy_network(net)), mode="replace")
    post.to(device)
    y = torch.zeros((1, image_size, image_size), device=device)
    gen = torch.Generator().manual_seed(seed)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    # reset the high-water mark first, then read the baseline: the peak window then starts no later than
    # the baseline, so peak >= baseline (read the other way round, memory freed in between can make a
    # tiny step's increase negative)
    reset_ok = _reset_peak()
    base_rss = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    batch_ = policy_rollout(post, batch, y, problem=problem, generator=gen)
    t_roll = time.perf_counter() - t0
    delta = deltas_scalar(batch_, post.log_z)
    post.zero_grad(set_to_none=True)
    t1 = time.perf_counter()
    if method == "two_pass":
        two_pass_backward(post, batch_, delta, chunk_size=chunk)
    elif method == "naive":
        naive_loss(post, batch_).backward()
    else:
        raise ValueError(f"unknown method {method!r}")
    if cuda:
        torch.cuda.synchronize()
    t_grad = time.perf_counter() - t1
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in post.parameters() if p.grad is not None)))
    rec = {"method": method, "K": K, "batch": batch, "chunk": chunk if method == "two_pass" else None,
           "preset": preset, "image_size": image_size, "parameters": count_parameters(net), "device": str(device),
           "rollout_seconds": t_roll, "grad_seconds": t_grad, "step_seconds": t_roll + t_grad,
           "grad_norm": grad_norm, "status": "ok"}
    rec.update(_peak_fields(cuda, base if cuda else base_rss, reset_ok))
    return rec


def _run_one(method, K, batch, chunk, preset, image_size, timeout, memory_limit_gb) -> dict:
    cmd = [sys.executable, "-m", "pipeline.bench.rtb_memory", "--worker", "--method", method, "--K", str(K),
           "--batch", str(batch), "--chunk", str(chunk), "--preset", preset, "--image-size", str(image_size)]
    if memory_limit_gb:
        cmd += ["--memory-limit-gb", str(memory_limit_gb)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "K": K, "status": "timeout", "wall_seconds": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.strip().splitlines()):
        if line.startswith("{"):
            rec = json.loads(line)
            rec["wall_seconds"] = wall
            return rec
    err = p.stderr.strip().splitlines()[-1:] if p.stderr else []
    oom = p.returncode in (-9, 137) or any("MemoryError" in e or "out of memory" in e.lower()
                                           or "can't allocate" in e.lower() or "not enough memory" in e.lower()
                                           for e in p.stderr.splitlines()[-5:])
    return {"method": method, "K": K, "status": "oom" if oom else "error", "returncode": p.returncode,
            "error": err[0] if err else "", "wall_seconds": wall}


def _checks(runs: list[dict], Ks) -> dict:
    """The memory criteria: two-pass at K_max <= 1.3 x at K_min; naive at K_max >= 3 x at K_min (or OOM)."""
    def get(m, K):
        return next((r for r in runs if r["method"] == m and r["K"] == K), None)

    kmin, kmax = min(Ks), max(Ks)
    out = {"K_min": kmin, "K_max": kmax}
    a, b = get("two_pass", kmin), get("two_pass", kmax)
    if a and b and a.get("status") == "ok" and b.get("status") == "ok":
        out["two_pass_ratio"] = b["peak_mib"] / max(a["peak_mib"], 1e-9)
        out["two_pass_ok"] = bool(out["two_pass_ratio"] <= 1.3)
    a, b = get("naive", kmin), get("naive", kmax)
    if a and b and a.get("status") == "ok":
        if b.get("status") == "oom":
            out["naive_ratio"] = None
            out["naive_ok"] = True
            out["naive_note"] = f"naive K={kmax} ran out of memory (counts as showing the difference)"
        elif b.get("status") == "ok":
            out["naive_ratio"] = b["peak_mib"] / max(a["peak_mib"], 1e-9)
            out["naive_ok"] = bool(out["naive_ratio"] >= 3.0)
    return out


def run_memory_benchmark(out_dir, *, Ks=(20, 50, 100, 200), batch: int = 16, chunk: int = 4, preset: str = "small",
                         image_size: int = 32, timeout: float = 900.0, memory_limit_gb: float | None = None) -> dict:
    """Run every (method, K) in a fresh subprocess and write ``out_dir/rtb_memory.json`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = []
    for method in ("two_pass", "naive"):
        for K in Ks:
            rec = _run_one(method, K, batch, chunk, preset, image_size, timeout, memory_limit_gb)
            runs.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    res = {"benchmark": "rtb_memory", "batch": batch, "chunk": chunk, "preset": preset, "image_size": image_size,
           "posterior": "full network copy (replace mode)", "memory_limit_gb": memory_limit_gb,
           "runs": runs, "checks": _checks(runs, Ks), "wall_seconds": time.perf_counter() - t0}
    write_json(out_dir / "rtb_memory.json", res, indent=1)
    return res


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description="worker of the RTB memory benchmark (one step, one process)")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--method", required=True, choices=["two_pass", "naive"])
    p.add_argument("--K", type=int, required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4)
    p.add_argument("--preset", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--memory-limit-gb", type=float, default=None)
    a = p.parse_args(argv)
    if a.memory_limit_gb:
        # cap the address space above what the process already maps (torch and the package, imported at
        # module top), so an exceeded cap reads as OOM
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:"))
        lim = int(vm * 1024 + a.memory_limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        rec = worker(a.method, a.K, a.batch, a.chunk, a.preset, a.image_size)
    except (MemoryError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, MemoryError) or "memory" in msg.lower() or "allocate" in msg.lower():
            print(json.dumps({"method": a.method, "K": a.K, "status": "oom", "error": msg[:200]}))
            return 0
        raise
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
