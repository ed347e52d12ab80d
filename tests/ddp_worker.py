"""Worker for tests/test_ddp.py: run under ``torchrun --standalone --nproc_per_node=2`` or plain python.

Writes OUT/rank<R>.pt with (a) the gradient of the two-pass RTB objective on this rank's half of a
fixed batch (all-reduced by DDP when distributed) and (b) the weights after a few trainer steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def build():
    from pipeline.diffusion.prior import GaussianMixturePrior
    from pipeline.problems import DenseLinearProblem
    from pipeline.rtb.config import RTBConfig
    from pipeline.rtb.posterior import make_posterior

    prior = GaussianMixturePrior([0.4, 0.6], [[-2.0, 0.0], [2.0, 1.0]], 0.5)
    problem = DenseLinearProblem([[1.0, 0.5]], 0.5)
    y = torch.tensor([1.0])
    cfg = RTBConfig().with_fields(batch_size=8, steps=3, chunk_size=2, head_hidden=16, head_layers=2, features=[],
                                  replay_rate=0.0, prior_rate=0.0, tempered_rate=0.0, seed=3)
    torch.manual_seed(0)  # same initial weights on every rank
    post = make_posterior(prior, prior.schedule.chain(6), cfg)
    with torch.no_grad():  # leave the zero init so every layer gets a gradient
        for p in post.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return prior, problem, y, cfg, post


def half(batch, rank, world):
    """Rank's contiguous share of an RTBBatch (the whole batch when world == 1)."""
    from pipeline.rtb.objective import RTBBatch

    n = batch.n // world
    sl = slice(rank * n, (rank + 1) * n)
    pick = lambda d: {k: (None if v is None else v[sl]) for k, v in d.items()}  # noqa: E731
    return RTBBatch(xs=pick(batch.xs), eps_p=pick(batch.eps_p), guide=pick(batch.guide),
                    log_p_steps=pick(batch.log_p_steps), log_q_steps=pick(batch.log_q_steps),
                    log_r=batch.log_r[sl], y=None if batch.y is None else batch.y[sl], problem=batch.problem)


def main(out: Path):
    from pipeline import distributed
    from pipeline.rtb.objective import deltas_scalar, policy_rollout, two_pass_backward
    from pipeline.rtb.trainer import RTBTrainer

    torch.set_num_threads(1)
    rank, world = distributed.init_from_env(torch.device("cpu"))
    prior, problem, y, cfg, post = build()
    # (a) gradient on a fixed batch of 16 trajectories, split over the ranks
    full = policy_rollout(post, 16, y, problem=problem, generator=torch.Generator().manual_seed(11))
    mine = half(full, rank, world)
    with torch.no_grad():
        post.log_z.fill_(0.3)
    post.model = distributed.wrap(post.model)
    delta = deltas_scalar(mine, post.log_z)
    model = post.model
    two_pass_backward(post, mine, delta, chunk_size=2,
                      sync_context=lambda last: distributed.sync_context(model, last))
    distributed.all_reduce_mean_(post.log_z.grad)
    grads = {n: p.grad.detach().clone() for n, p in distributed.unwrap(post.model).named_parameters()}
    grads["log_z"] = post.log_z.grad.detach().clone()
    # (b) a few trainer steps: weights must stay identical across ranks
    post.model = distributed.unwrap(post.model)
    for p in post.model.parameters():
        p.grad = None
    post.log_z.grad = None
    trainer = RTBTrainer(post, cfg, problem=problem, y=y)
    trainer.train(cfg.run.steps)
    weights = {n: p.detach().clone() for n, p in distributed.unwrap(post.model).named_parameters()}
    weights["log_z"] = post.log_z.detach().clone()
    torch.save({"grads": grads, "weights": weights, "world": world}, out / f"rank{rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
