"""Loading a trained RTB posterior from its checkpoint, and the record it keeps of its prior.

A posterior checkpoint (written by :class:`pipeline.rtb.trainer.RTBTrainer` or exported by the lensing
fine-tuning) holds the correction network (``model``), optionally its EMA (``ema``), the per-chain-step
scalars (``per_step``) and ``hparams.json`` with the network ``spec`` and a ``prior`` record (recipe hash
and chain). Inference code loads posteriors from here and never imports the trainer.
"""

from __future__ import annotations

import logging

import torch

from pipeline.errors import InputFileError
from pipeline.io.checkpoint import load_checkpoint
from pipeline.rtb.posterior import build_posterior

log = logging.getLogger(__name__)

PER_STEP_EMA = "per_step/"  # key prefix of the per-step scalars in the EMA state


def prior_record(prior, chain) -> dict:
    """What an RTB posterior checkpoint records about the prior it was fine-tuned against: the prior's
    recipe hash (its ``config_hash``; None for a prior not loaded from a checkpoint) and the chain
    (number of steps ``K``, variance rule, timestep grid) the posterior's trajectories live on."""
    h = (getattr(prior, "meta", None) or {}).get("config_hash")
    return {"recipe_hash": None if h is None else str(h), "K": int(chain.K), "variance": str(chain.variance),
            "timesteps": [int(t) for t in chain.t.tolist()]}


def check_prior_record(path, hparams: dict, prior, chain=None) -> None:
    """Refuse (one-line :class:`InputFileError` naming ``path`` and the field) a posterior checkpoint
    that was fine-tuned against another prior (recipe hash) or another chain than ``chain`` (the chain it
    is used with; None checks the prior only). A record without a grid means the uniform grid. A
    checkpoint without the record is accepted with a logged warning."""
    rec = hparams.get("prior")
    if not isinstance(rec, dict):
        log.warning("%s: the posterior checkpoint records no prior recipe hash or chain; it cannot be checked "
                    "against the prior it is loaded with", path)
        return
    have = {"recipe_hash": (getattr(prior, "meta", None) or {}).get("config_hash")}
    if chain is not None:
        want_t = rec.get("timesteps")
        if want_t is None and rec.get("K") is not None:
            want_t = prior.schedule.chain(int(rec["K"])).t.tolist()
        have.update(K=chain.K, variance=chain.variance)
        rec = {**rec, "timesteps": want_t}
        have["timesteps"] = chain.t.tolist()
    for key, now in have.items():
        want = rec.get(key)
        if want is None or now is None:
            continue  # nothing recorded, or a prior not loaded from a checkpoint
        if str(now) != str(want):
            raise InputFileError(path, f"posterior was fine-tuned with {key} {want!r}, but is loaded with "
                                       f"{now!r} (another prior or chain)", field=f"prior.{key}")


def _load_per_step(post, ck) -> None:
    """The posterior's per-step scalars from checkpoint ``ck``; a one-line error naming the file if absent."""
    try:
        post.load_per_step_state(ck.states.get("per_step"))
    except KeyError as exc:
        raise InputFileError(ck.path, exc.args[0], field="per_step") from None


def load_posterior(run_dir, prior, use_ema: bool = True, chain=None):
    """Rebuild a trained :class:`~pipeline.rtb.posterior.RTBPosterior` from a checkpoint alone.

    Returns (posterior, hparams). EMA weights are used when present and ``use_ema``. A checkpoint
    fine-tuned against another prior (recipe hash) than ``prior``, or on another chain (K, variance,
    grid) than ``chain`` (when given: the chain of the config it is used with), is refused with a
    one-line :class:`~pipeline.errors.InputFileError`.
    """
    ck = load_checkpoint(run_dir, map_location="cpu")
    if ck.hparams.get("kind") != "rtb_posterior":
        raise InputFileError(ck.path, "not an RTB posterior checkpoint", field="kind")
    check_prior_record(ck.path, ck.hparams, prior, chain)
    post = build_posterior(prior, ck.hparams["spec"])
    sd = ck.states["model"]
    ema = ck.states.get("ema") if use_ema else None
    if ema:
        sd = dict(sd)
        sd.update({n: v for n, v in ema.items() if not n.startswith(PER_STEP_EMA)})
    post.model.load_state_dict(sd)
    _load_per_step(post, ck)
    if ema:  # EMA of the per-step scalars, when the EMA recorded them
        ema_steps = {n[len(PER_STEP_EMA):]: v for n, v in ema.items() if n.startswith(PER_STEP_EMA)}
        with torch.no_grad():
            for n, p in post.per_step_parameters().items():
                if n in ema_steps:
                    p.copy_(ema_steps[n])
    with torch.no_grad():
        post.log_z.copy_(ck.state["log_z"])
    post.to(prior.device)
    return post, ck.hparams
