"""The RTB trainer: exploration, two-pass gradient, stability guards, logging, checkpoints.

One iteration:

1. pick a behaviour policy (probabilities from :class:`~pipeline.rtb.config.RTBConfig`: replay via
   backtracking from the reward-prioritised buffer, prior rollouts, tempered-noise rollouts, DPS-guided
   rollouts; on-policy otherwise) and draw a batch of detached trajectories, scored under q_phi and p;
2. pass 1: delta per trajectory with log Z (learned scalar, or VarGrad per y-group for amortized
   posteriors) and the temperature beta (ramped to 1; logged);
3. pass 2: the chunked exact gradient (:func:`~pipeline.rtb.objective.two_pass_backward`), grad-norm
   clipping, Adam step (separate learning rate for log Z);
4. guards: a non-finite delta / gradient / parameter, or a loss spike (loss > ``spike_factor`` x the
   running median of the same behaviour source; with a Huber bound, a robust statistic of the batch,
   see :meth:`RTBTrainer._spike_statistic`), restores the last good snapshot and lowers the
   learning rate (a *rollback*). Once ``max_rollbacks`` are spent, a further non-finite value marks
   the run diverged; a further loss spike restores the last good snapshot and
   ends training there (``stopped_early``: a spike is a warning, not a failure, and the run is then
   judged like any other). Ending with |log Z_IW - log Z_ref| > ``diverged_logz_tol`` when a reference
   is given also marks it diverged.

Why VarGrad for the amortized posterior: Z depends on y, so a shared scalar is wrong; a network
log Z_psi(y) adds a second regression problem whose error enters every delta, while the VarGrad
estimate (mean over trajectories of one y of beta log r - sum(log q - log p)) is the loss-minimising
log Z for that group, needs no parameters, and is exact in the limit of a perfect posterior. Each
batch therefore holds ``batch_size / group_size`` observations with ``group_size``
trajectories each. The per-y evidence is then reported by the IW/ELBO estimators. With a Huber bound
(``objective.huber``) the loss is linear beyond it, log Z_g is that loss's minimiser (a Huber
M-estimate of location) and one wildly wrong draw, common while the policy is still far from the
posterior, moves a step by at most huber / B; the fixed point, every delta equal, is the same.

The guards and the checkpoint I/O live in :mod:`pipeline.rtb.trainer_guards`. Checkpoints
(``pipeline.io.checkpoint``) hold the model, EMA, optimizer, log Z, replay buffer, all
RNG states, step, rollback count, learning-rate scale and the recipe hash; a resume with a
different recipe (:meth:`~pipeline.rtb.config.RTBConfig.recipe`) is refused.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections import defaultdict, deque
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import distributed
from pipeline.errors import ConfigError
from pipeline.metrics.logz import estimate_logz, estimate_logz_grouped, log_weights
from pipeline.rtb.config import RTBConfig
from pipeline.rtb.exploration import ReplayBuffer, backtrack
from pipeline.rtb.loading import PER_STEP_EMA
from pipeline.rtb.objective import (RTBBatch, deltas_scalar, deltas_vargrad, evaluate_states, is_per_sample,
                                    loss_value, policy_rollout, prior_rollout, trajectory_loss, two_pass_backward)
from pipeline.rtb.trainer_guards import TrainerCheckpoints, TrainerGuards
from pipeline.runtime import tqdm_disable
from pipeline.samplers.guidance import dps_guidance

log = logging.getLogger(__name__)



class RTBTrainer(TrainerGuards, TrainerCheckpoints):
    """Fine-tunes ``posterior`` (an :class:`~pipeline.rtb.posterior.RTBPosterior`).

    ``problem``: the inverse problem, passed with every call of the posterior. Single observation:
    pass ``y`` (shape ``problem.y_shape``). Amortized (``cfg.objective.amortized``): pass
    ``obs_sampler(G, generator) -> (y (G, *y_shape), lens index (G,) or None)`` (e.g. prior-predictive
    draws or a fixed set) and ``cond_fn(problem, y) -> cond`` (default: y flattened); with a lens index
    the observations' problem is ``problem.take(index)`` (a pool of lenses, e.g.
    :class:`~pipeline.lensing.amortized.MultiLensProblem`), otherwise ``problem`` itself.
    ``run_dir``: rolling checkpoints; ``metrics_path``:
    JSONL log; ``log_z_ref``: the reference evidence for the divergence criterion (optional).
    ``spec``: the posterior spec (:func:`~pipeline.rtb.posterior.posterior_spec`) stored in checkpoints;
    ``extra_hparams``: more JSON-serialisable records for every checkpoint's hparams (e.g. how the
    training data were drawn).
    """

    def __init__(self, posterior, cfg: RTBConfig, *, problem=None, y=None, obs_sampler=None, cond_fn=None,
                 run_dir=None, metrics_path=None, log_z_ref: float | None = None, spec: dict | None = None,
                 dtype=torch.float32, extra_hparams: dict | None = None):
        self.post, self.cfg, self.spec = posterior, cfg, spec or {}
        self.extra_hparams = dict(extra_hparams or {})  # recorded in every checkpoint's hparams
        if cfg.objective.amortized:
            if obs_sampler is None:
                raise ValueError("an amortized posterior needs obs_sampler")
        elif y is None:
            raise ValueError("a single-observation posterior needs y")
        self.problem, self.y, self.obs_sampler = problem, y, obs_sampler
        self.cond_fn = cond_fn or (lambda _problem, yy: yy.reshape(yy.shape[0], -1))
        self.run_dir = Path(run_dir) if run_dir else None
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.log_z_ref, self.dtype = log_z_ref, dtype
        self.device = posterior.prior.device
        rank = distributed.rank()
        self.gen = torch.Generator().manual_seed(cfg.run.seed * 7919 + 17 + 1000003 * rank)
        # under DDP only the correction model is wrapped; log Z is all-reduced by hand
        self.post.model = distributed.wrap(self.post.model)
        per_step = {id(p) for p in posterior.per_step_parameters().values()}
        network = [p for p in posterior.trainable_parameters() if id(p) not in per_step]
        groups = [{"params": network, "lr": cfg.optim.lr},
                  {"params": [posterior.log_z], "lr": cfg.optim.lr_logz}]
        if per_step:  # one scalar per chain step: its gradient pools every coordinate, so a larger step size
            groups.append({"params": list(posterior.per_step_parameters().values()), "lr": cfg.optim.lr_per_step})
        self.opt = torch.optim.Adam(groups)
        self.buffer = ReplayBuffer(cfg.exploration.replay_capacity, cfg.exploration.replay_priority_frac)
        self.ema = ({n: p.detach().clone() for n, p in self._ema_targets().items()}
                    if cfg.optim.ema_decay > 0 else None)
        self.step_idx, self.rollbacks, self.diverged, self.stopped_early = 0, 0, False, False
        self.lr_scale, self.log_z_init = 1.0, False
        self.loss_hist: dict[str, deque] = defaultdict(lambda: deque(maxlen=100))
        self._snapshot = None
        self.history: list[dict] = []
        self._dps_behaviour = None
        if cfg.exploration.dps_rate > 0:
            self._dps_behaviour = self._make_dps_behaviour()

    # -- helpers --------------------------------------------------------------------------------
    def _model(self):
        return distributed.unwrap(self.post.model)

    def _ema_targets(self) -> dict:
        """The parameters the EMA averages: the network's, and the per-step scalars (gains, step
        variances) under ``per_step/<name>``."""
        out = dict(self._model().named_parameters())
        out.update({f"{PER_STEP_EMA}{n}": p for n, p in self.post.per_step_parameters().items()})
        return out

    def beta(self, step: int | None = None) -> float:
        s = self.step_idx if step is None else step
        if self.cfg.objective.beta_ramp_steps <= 0:
            return 1.0
        f = min(1.0, s / self.cfg.objective.beta_ramp_steps)
        return self.cfg.objective.beta_start + (1.0 - self.cfg.objective.beta_start) * f

    def _make_dps_behaviour(self):
        """DPS guidance through the frozen prior as an exploration-only mean offset."""
        post = self.post

        def behaviour(x, k, eps_p, y, problem):
            return dps_guidance(post.prior, post.chain, problem, y, x, k, self.cfg.exploration.dps_scale).shift

        return behaviour

    def _observations(self):
        """(y per sample, problem, cond per sample, groups) for one batch."""
        B = self.cfg.optim.batch_size
        if not self.cfg.objective.amortized:
            return self.y, self.problem, None, torch.zeros(B, dtype=torch.long)
        G, gs = B // self.cfg.objective.group_size, self.cfg.objective.group_size
        yg, lens = self.obs_sampler(G, self.gen)
        ys = yg.to(self.device).repeat_interleave(gs, 0)
        problem = self._problem_for(None if lens is None else torch.as_tensor(lens).repeat_interleave(gs))
        return ys, problem, self.cond_fn(problem, ys), torch.arange(G).repeat_interleave(gs)

    def _problem_for(self, lens):
        """The problem of observations with lens indices ``lens`` (None: the trainer's own problem)."""
        return self.problem if lens is None else self.problem.take(lens)

    def _choose_source(self) -> str:
        c = self.cfg
        u = float(torch.rand((), generator=self.gen))
        e = c.exploration
        for name, rate in (("replay", e.replay_rate), ("prior", e.prior_rate), ("tempered", e.tempered_rate),
                           ("dps", e.dps_rate)):
            if u < rate:
                empty = len(self.buffer) == 0 or (c.objective.amortized and not self.buffer.can_sample_groups())
                if name == "replay" and empty:
                    return "policy"
                return name
            u -= rate
        return "policy"

    def draw_batch(self, source: str) -> RTBBatch:
        c, B = self.cfg, self.cfg.optim.batch_size
        kw = dict(generator=self.gen, dtype=self.dtype)
        if source == "replay":
            if c.objective.amortized:  # groups of distinct stored x_1 of one observation (VarGrad keeps the rewards)
                ent = self.buffer.sample_groups(B // c.objective.group_size, c.objective.group_size, self.gen)
                ys, cond, groups = ent["y"].to(self.device), ent["cond"].to(self.device), ent["groups"]
                problem = self._problem_for(ent["lens"])
            else:
                ent = self.buffer.sample(B, self.gen)
                ys, problem, cond, groups = self.y, self.problem, None, torch.zeros(B, dtype=torch.long)
            x1 = ent["x1"].to(self.device, self.dtype)
            xs = backtrack(self.post.chain, x1, generator=self.gen)
            return evaluate_states(self.post, xs, ys, cond, problem=problem, groups=groups, source="replay")
        ys, problem, cond, groups = self._observations()
        kw.update(problem=problem, groups=groups)
        if source == "prior":
            return prior_rollout(self.post, B, ys, cond, **kw)
        if source == "tempered":
            return policy_rollout(self.post, B, ys, cond, std_scale=c.exploration.tempered_std_scale, source="tempered",
                                  **kw)
        if source == "dps":
            return policy_rollout(self.post, B, ys, cond, behaviour=self._dps_behaviour, source="dps", **kw)
        return policy_rollout(self.post, B, ys, cond, **kw)

    # -- one iteration ----------------------------------------------------------------------------
    def train_step(self) -> dict | None:
        """One iteration; returns its log record (None if it was rolled back)."""
        c = self.cfg
        t0 = time.perf_counter()
        if self._snapshot is None:
            self._take_snapshot()
        beta = self.beta()
        source = self._choose_source()
        batch = self.draw_batch(source)
        vargrad = c.objective.logz == "vargrad"
        if vargrad:
            delta, logz_groups = deltas_vargrad(batch, beta, huber=c.objective.huber)
            log_z_learned = float(logz_groups.mean())
        else:
            if not self.log_z_init:
                # start log Z at the batch's importance-weighted estimate logmeanexp(beta log r - log q/p):
                # at q = p that is the prior-IS evidence, close to log Z. (The VarGrad value, the ELBO,
                # can be tens of nats too low when the prior barely overlaps the posterior, and Adam
                # moves log Z by about lr_logz per step.)
                with torch.no_grad():
                    s = (beta * batch.log_r - batch.log_ratio()).double()
                    self.post.log_z.fill_(float(torch.logsumexp(s, 0) - math.log(s.numel())))
                    # each rank saw its own batch: start every rank from the same (mean) value
                    distributed.all_reduce_mean_(self.post.log_z.data)
                self.log_z_init = True
            delta = deltas_scalar(batch, self.post.log_z, beta)
            log_z_learned = float(self.post.log_z.detach())
        if not torch.isfinite(delta).all():
            self.rollback(f"non-finite delta ({source})")
            return None
        loss = loss_value(delta, c.objective.dead_zone, c.objective.huber)
        watched = self._spike_statistic(delta, loss, batch.groups)
        hist = self.loss_hist[source]
        if (c.guards.spike_factor > 0 and self.step_idx >= c.guards.spike_warmup and len(hist) >= 10
                and watched > c.guards.spike_factor * max(statistics.median(hist), 1e-8)):
            self.rollback(f"loss spike ({source}) {watched:.3g} > {c.guards.spike_factor:g} x median "
                          f"{statistics.median(hist):.3g}",
                          non_finite=False)
            return None
        self.opt.zero_grad(set_to_none=True)
        self._set_lr()
        model = self.post.model
        two_pass_backward(self.post, batch, delta, chunk_size=c.run.chunk_size, dead_zone=c.objective.dead_zone,
                          huber=c.objective.huber, learn_log_z=not vargrad,
                          sync_context=lambda last: distributed.sync_context(model, last))
        # parameters outside the DDP-wrapped model: their gradients are averaged over ranks by hand
        for p in [self.post.log_z, *self.post.per_step_parameters().values()]:
            if p.grad is not None:
                distributed.all_reduce_mean_(p.grad)
        params = self.post.trainable_parameters()
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, c.optim.grad_clip))
        if not math.isfinite(gnorm):
            self.rollback("non-finite gradient")
            return None
        self.opt.step()
        if not self._params_finite():
            self.rollback("non-finite parameters")
            return None
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self._ema_targets().items():
                    self.ema[n].lerp_(p.detach(), 1.0 - c.optim.ema_decay)
        hist.append(watched)
        if source != "replay":
            amortized = c.objective.amortized
            lens = batch.problem.index if amortized and is_per_sample(batch.problem) else None
            self.buffer.add(batch.x1, batch.log_r, batch.y if amortized else None, batch.cond if amortized else None,
                            groups=batch.groups if amortized else None, lens=lens)
        self.step_idx += 1
        # a snapshot is only taken after a step whose loss looked healthy (also during the spike warmup),
        # so a rollback never restores a state that an outlier batch has just wrecked
        spike = c.guards.spike_factor
        healthy = len(hist) < 10 or watched <= spike * max(statistics.median(hist), 1e-8) or spike <= 0
        if self.step_idx % c.guards.snapshot_every == 0 and healthy:
            self._take_snapshot()
        rec = {"step": self.step_idx, "source": source, "loss": loss, "mean_log_r": float(batch.log_r.mean()),
               "log_z": log_z_learned, "beta": beta, "grad_norm": gnorm, "rollbacks": self.rollbacks,
               "lr": self.opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
        if source == "policy":
            est = self._batch_estimates(batch)
            rec.update(est)
        return rec

    def _spike_statistic(self, delta: torch.Tensor, loss: float, groups=None) -> float:
        """What the spike guard watches: the batch's loss. With a Huber bound one trajectory moves the step
        by at most huber / B, so wildly wrong draws, and observations the policy cannot fit yet, are data,
        not a failure: the guard then watches each observation's median trajectory loss and takes the
        lower median over the batch's observations, which only rises when at least half of them got worse
        (a policy that degrades as a whole)."""
        o = self.cfg.objective
        if o.huber <= 0:
            return loss
        rho = trajectory_loss(delta, 0.0, o.huber).cpu()  # not the dead zone's: a well-fit batch would read 0
        if groups is None:
            return float(rho.median())
        _, inv = torch.unique(torch.as_tensor(groups).cpu(), return_inverse=True)
        return float(torch.stack([rho[inv == g].median() for g in range(int(inv.max()) + 1)]).median())

    def _batch_estimates(self, batch: RTBBatch) -> dict:
        """IW log Z and ESS fraction (beta = 1) of an on-policy batch, averaged over its y-groups."""
        lw = log_weights(batch.log_r, batch.log_p(), batch.log_q())
        groups = batch.groups if batch.groups is not None else torch.zeros(batch.n, dtype=torch.long)
        per = estimate_logz_grouped(lw, groups)
        return {"log_z_iw": statistics.fmean(e.iw for e in per.values()),
                "log_z_elbo": statistics.fmean(e.elbo for e in per.values()),
                "ess_frac": statistics.fmean(e.ess / e.n for e in per.values())}

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, steps: int | None = None) -> dict:
        """Train up to ``steps`` (default cfg.run.steps) total iterations (a resumed run continues)."""
        total = self.cfg.run.steps if steps is None else steps
        if self.step_idx < total and not self.cfg.policy.use_head:
            raise ConfigError("<rtb config>", "rtb.policy.use_head", "false: the head is not sampled, so training "
                              "it changes nothing; set it to true to train")
        bar = tqdm(total=total, initial=self.step_idx, disable=tqdm_disable(), desc="rtb")
        while self.step_idx < total and not self.diverged and not self.stopped_early:
            rec = self.train_step()
            if rec is None:
                continue
            bar.update(1)
            self.history.append(rec)
            if self.step_idx % self.cfg.run.log_every == 0 or self.step_idx == total:
                self._write(rec)
            if self.run_dir and (self.step_idx % self.cfg.run.checkpoint_every == 0 or self.step_idx == total):
                self.save()
        bar.close()
        if self.stopped_early and self.run_dir:
            self.save()  # the restored last good state, so a resume or a load sees what was sampled
        return self.summary()

    def summary(self) -> dict:
        return {"steps": self.step_idx, "rollbacks": self.rollbacks, "diverged": self.diverged,
                "stopped_early": self.stopped_early,
                "log_z": float(self.post.log_z.detach()) if self.cfg.objective.logz == "scalar" else None}

    def _write(self, rec: dict) -> None:
        if self.metrics_path is None or not distributed.is_main():
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, n: int | None = None, y=None, cond=None, batch_size: int = 4096, problem=None):
        """On-policy samples for one observation ``y`` of ``problem`` (default: the trainer's) at beta = 1.

        Returns (x0, LogZEstimate). Updates ``diverged`` against ``log_z_ref`` when one is set.
        """
        n = n or self.cfg.run.eval_samples
        y = self.y if y is None else y
        problem = self.problem if problem is None else problem
        if self.cfg.objective.amortized and cond is None:
            cond = self.cond_fn(problem, torch.as_tensor(y).reshape(1, *problem.y_shape))[0]
        with self.ema_weights():
            x0s, lws = [], []
            for s in range(0, n, batch_size):
                m = min(batch_size, n - s)
                b = policy_rollout(self.post, m, y, cond, problem=problem, generator=self.gen, dtype=self.dtype)
                x0s.append(b.x0)
                lws.append(log_weights(b.log_r, b.log_p(), b.log_q()))
        est = estimate_logz(torch.cat(lws))
        if self.log_z_ref is not None and (not math.isfinite(est.iw)
                                           or abs(est.iw - self.log_z_ref) > self.cfg.guards.diverged_logz_tol):
            self.diverged = True
        return torch.cat(x0s), est

    def ema_weights(self):
        """Context manager that swaps the EMA weights in (no-op without EMA)."""
        trainer = self

        class _Swap:
            def __enter__(self_inner):
                if trainer.ema is None:
                    return
                self_inner.saved = {n: p.detach().clone() for n, p in trainer._ema_targets().items()}
                with torch.no_grad():
                    for n, p in trainer._ema_targets().items():
                        if n in trainer.ema:
                            p.copy_(trainer.ema[n])

            def __exit__(self_inner, *exc):
                if trainer.ema is None:
                    return False
                with torch.no_grad():
                    for n, p in trainer._ema_targets().items():
                        p.copy_(self_inner.saved[n])
                return False

        return _Swap()
