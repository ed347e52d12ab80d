"""The RTB trainer's stability guards and checkpoint I/O, as mixins of :class:`~pipeline.rtb.trainer.RTBTrainer`.

Guards: a snapshot of the last good state (network, optimizer, log Z, per-step scalars, EMA), the
learning-rate schedule with its rollback scale, and the rollback itself. Checkpoints
(:mod:`pipeline.io.checkpoint`): the model, EMA, optimizer, log Z, replay buffer, all RNG states, step,
rollback count, learning-rate scale and the recipe hash; a resume with a different recipe, another
prior or another chain is refused. Both read and write the trainer's own attributes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import distributed
from pipeline.errors import InputFileError
from pipeline.io.atomic import write_text
from pipeline.io.checkpoint import has_checkpoints, load_checkpoint, restore_rng_state, rng_state, save_checkpoint
from pipeline.rtb.config import legacy_v1_hash
from pipeline.rtb.loading import _load_per_step, check_prior_record, prior_record

log = logging.getLogger("pipeline.rtb.trainer")


class TrainerGuards:
    """Snapshots, learning rate and rollbacks (see the trainer's module docstring for the rules)."""

    def _take_snapshot(self):
        self._snapshot = {"model": copy.deepcopy(self._model().state_dict()),
                          "optim": copy.deepcopy(self.opt.state_dict()),
                          "log_z": self.post.log_z.detach().clone(), "per_step": self._per_step_state(),
                          "ema": copy.deepcopy(self.ema), "step": self.step_idx}

    def _per_step_state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.post.per_step_parameters().items()}

    def _params_finite(self) -> bool:
        if not torch.isfinite(self.post.log_z).all():
            return False
        return all(torch.isfinite(p).all() for p in self.post.trainable_parameters())

    def lr_factor(self) -> float:
        """Cosine decay from 1 to ``lr_final_frac`` over ``steps``, times the rollback scale."""
        c = self.cfg
        f = min(1.0, self.step_idx / max(1, c.run.steps))
        return self.lr_scale * (c.optim.lr_final_frac + (1 - c.optim.lr_final_frac) * 0.5 * (1 + math.cos(math.pi * f)))

    def _set_lr(self):
        self.opt.param_groups[0]["lr"] = self.cfg.optim.lr * self.lr_factor()
        self.opt.param_groups[1]["lr"] = self.cfg.optim.lr_logz * self.lr_factor()
        if len(self.opt.param_groups) > 2:
            self.opt.param_groups[2]["lr"] = self.cfg.optim.lr_per_step * self.lr_factor()

    def rollback(self, reason: str, non_finite: bool = True) -> None:
        """Restore the last good snapshot and lower the learning rate. With the rollback budget spent, a
        non-finite value marks the run diverged; a loss spike (``non_finite=False``) restores the snapshot
        and stops training there."""
        if self.rollbacks >= self.cfg.guards.max_rollbacks:
            if non_finite:
                self.diverged = True
                log.warning("step %d: %s after %d rollbacks: run diverged", self.step_idx, reason, self.rollbacks)
                self._write({"step": self.step_idx, "event": "diverged", "reason": reason,
                             "rollbacks": self.rollbacks})
                return
            self._restore_snapshot()
            self.stopped_early = True
            log.warning("step %d: %s after %d rollbacks: training stops at the last good state (step %s)",
                        self.step_idx, reason, self.rollbacks, None if self._snapshot is None else self._snapshot["step"])
            self._write({"step": self.step_idx, "event": "stopped", "reason": reason, "rollbacks": self.rollbacks})
            return
        self.rollbacks += 1
        self.lr_scale *= self.cfg.guards.rollback_lr_factor
        self._restore_snapshot()
        self._set_lr()
        self.opt.zero_grad(set_to_none=True)
        log.warning("step %d: %s -> rollback %d to step %s, lr x%.3g", self.step_idx, reason, self.rollbacks,
                    None if self._snapshot is None else self._snapshot["step"], self.lr_scale)
        self._write({"step": self.step_idx, "event": "rollback", "reason": reason, "rollbacks": self.rollbacks,
                     "lr_scale": self.lr_scale})

    def _restore_snapshot(self) -> None:
        if self._snapshot is not None:
            self._model().load_state_dict(self._snapshot["model"])
            self.opt.load_state_dict(self._snapshot["optim"])
            with torch.no_grad():
                self.post.log_z.copy_(self._snapshot["log_z"])
            self.post.load_per_step_state(self._snapshot["per_step"])
            self.ema = copy.deepcopy(self._snapshot["ema"])


class TrainerCheckpoints:
    """Rolling checkpoints of the trainer and the exact resume from them."""

    def config_hash(self) -> str:
        """The versioned recipe hash of the config (:meth:`~pipeline.rtb.config.RTBConfig.recipe_hash`)."""
        return self.cfg.recipe_hash()

    def _accepts_hash(self, saved) -> bool:
        """A checkpoint's recorded hash matches this config: today's recipe hash, or for a checkpoint written
        before the versioned hash, the legacy hash of this config on this chain."""
        if saved == self.config_hash():
            return True
        return (isinstance(saved, str) and "-" not in saved
                and saved == legacy_v1_hash(self.cfg, self.post.chain.K, self.post.chain.variance))

    def hparams(self) -> dict:
        return {"kind": "rtb_posterior", "spec": self.spec, "config": asdict(self.cfg),
                "config_hash": self.config_hash(), "prior": prior_record(self.post.prior, self.post.chain),
                **self.extra_hparams}

    def save(self) -> Path | None:
        """Write a rolling checkpoint ``run_dir/step-N`` (main rank only)."""
        if self.run_dir is None or not distributed.is_main():
            return None
        states = {"model": self._model().state_dict(), "optim": self.opt.state_dict(),
                  "buffer": self.buffer.state_dict()}
        if self.post.per_step_parameters():
            states["per_step"] = self._per_step_state()
        if self.ema is not None:
            states["ema"] = self.ema
        state = {"log_z": self.post.log_z.detach().cpu(), "rng": rng_state({"train": self.gen}),
                 "rollbacks": self.rollbacks, "lr_scale": self.lr_scale, "diverged": self.diverged,
                 "stopped_early": self.stopped_early,
                 "log_z_init": self.log_z_init, "config_hash": self.config_hash()}
        return save_checkpoint(self.run_dir, self.step_idx, states, self.hparams(), state,
                               keep=self.cfg.run.keep_checkpoints)

    def resume(self) -> bool:
        """Restore everything from the newest readable checkpoint in ``run_dir``; False if none."""
        if self.run_dir is None:
            return False
        if not has_checkpoints(self.run_dir):
            return False
        ck = load_checkpoint(self.run_dir, map_location="cpu")
        check_prior_record(ck.path, ck.hparams, self.post.prior, self.post.chain)
        if not self._accepts_hash(ck.state.get("config_hash")):
            raise InputFileError(ck.path, f"checkpoint was written with a different rtb config (hash "
                                 f"{ck.state.get('config_hash')} != {self.config_hash()}); use a new run dir",
                                 field="config_hash")
        self._model().load_state_dict(ck.states["model"])
        self.opt.load_state_dict(ck.states["optim"])
        self.buffer.load_state_dict(ck.states["buffer"], y_shape=getattr(self.problem, "y_shape", None))
        _load_per_step(self.post, ck)
        if self.ema is not None and "ema" in ck.states:
            saved = {n: v.to(self.device) for n, v in ck.states["ema"].items()}
            self.ema = {n: saved.get(n, p.detach().clone()) for n, p in self._ema_targets().items()}
        with torch.no_grad():
            self.post.log_z.copy_(ck.state["log_z"])
        restore_rng_state(ck.state["rng"], {"train": self.gen})
        self.rollbacks, self.lr_scale = int(ck.state["rollbacks"]), float(ck.state["lr_scale"])
        self.diverged, self.log_z_init = bool(ck.state["diverged"]), bool(ck.state["log_z_init"])
        self.stopped_early = bool(ck.state.get("stopped_early", False))
        self.step_idx = ck.step
        self._set_lr()
        self._snapshot = None
        if self.metrics_path is not None and distributed.is_main():
            _truncate_metrics(self.metrics_path, ck.step)
        log_z = ("" if self.cfg.objective.amortized  # log Z is per observation then: the global one is unused
                 else f", log Z {float(self.post.log_z.detach()):.4f}")
        log.info("resumed RTB training from %s (step %d%s)", ck.path, ck.step, log_z)
        return True


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop the metric lines written after the checkpoint resumed from (they are written
    again by the resumed run); a line cut by a kill is dropped too. Atomic rewrite."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, TypeError, AttributeError):
            continue
    write_text(path, "".join(line + "\n" for line in keep))
