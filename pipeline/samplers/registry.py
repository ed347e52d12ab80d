"""The one registry of posterior sampling methods: a builder and the declared properties per name.

Every method list in the package (``METHODS``, ``RTB_METHODS``, ``TRAINING_FREE``, ...) is derived
from :data:`REGISTRY`, so a method is added in one place. ``make_sampler(name, prior, chain, **opts)``
builds any of them; the trained RTB methods take the trained posterior as the option ``posterior``
(and the amortized ones the conditioning function ``cond_fn``). Unknown options are an error.

What a method returns instead of (or beside) its samples is declared in ``logz``:

* ``"trajectory"``: ``Samples.log_q_traj`` / ``log_p_traj`` per sample, so the ELBO and the
  importance-weighted log Z come from :func:`pipeline.metrics.logz.estimate_logz_samples`;
* ``"info"``: the returned samples are resampled from more proposals; ``Samples.info["logz"]`` holds
  ``{"elbo", "elbo_se", "iw"}`` (nats) over all proposals of one observation, ``log_w`` is zero
  (``inversion``: exact draws and its closed-form log Z, ``log_w`` None);
* ``"none"``: no log Z estimate (``info["logz"]`` is None and ``info["logz_note"]`` says why).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # the registry stays importable without torch: sampler modules load on use
    from pipeline.samplers.base import Sampler

LOGZ_KINDS = ("trajectory", "info", "none")


@dataclass(frozen=True)
class MethodSpec:
    """One method: where its sampler class lives, the options fixed by the name, and its properties.

    ``trained``: needs a fine-tuned RTB posterior (option ``posterior``); ``amortized``: one network for
    every observation (option ``cond_fn``); ``linear_only``: needs a linear forward model; ``tuned``: a
    heuristic guidance scale tuned on a separate seed; ``particle``: returns ``log_w`` (zero after
    resampling) instead of per-sample trajectory log-probs; ``logz``: see the module docstring;
    ``cpu_only``: no network to run, so a GPU does not speed it up (its workflow jobs ask for none).
    """

    name: str
    module: str
    cls: str
    fixed: tuple = ()
    trained: bool = False
    amortized: bool = False
    linear_only: bool = False
    tuned: bool = False
    particle: bool = False
    logz: str = "trajectory"
    cpu_only: bool = False

    def sampler_class(self):
        return getattr(importlib.import_module(self.module), self.cls)

    def options(self) -> set[str]:
        """The keyword options ``make_sampler`` accepts for this method."""
        params = set(inspect.signature(self.sampler_class().__init__).parameters)
        return params - {"self", "prior", "chain", "name"} - {k for k, _ in self.fixed}


_RTB = ("pipeline.rtb.sampler", "RTBSampler")
_POLICY = (("last_step", "policy"), ("particles", 1))
_SPECS = (
    MethodSpec("rtb", *_RTB, fixed=_POLICY, trained=True),
    MethodSpec("rtb_amortized", *_RTB, fixed=_POLICY, trained=True, amortized=True),
    MethodSpec("rtb_dps", *_RTB, fixed=_POLICY, trained=True),
    MethodSpec("rtb_dps_cla", *_RTB, fixed=_POLICY, trained=True, linear_only=True),
    MethodSpec("rtb_amortized_is", *_RTB, fixed=(("last_step", "policy"),), trained=True, amortized=True,
               particle=True, logz="info"),
    MethodSpec("rtb_amortized_smc", *_RTB, fixed=(("last_step", "policy"),), trained=True, amortized=True,
               particle=True, logz="info"),
    MethodSpec("rtb_amortized_gn", *_RTB, fixed=(("last_step", "gauss_newton"), ("particles", 1)), trained=True,
               amortized=True),
    MethodSpec("dps", "pipeline.samplers.dps", "DPSSampler", tuned=True),
    MethodSpec("dps_cla", "pipeline.samplers.cla", "DPSCLASampler", linear_only=True, tuned=True),
    MethodSpec("cla", "pipeline.samplers.cla", "CLASampler", linear_only=True),
    MethodSpec("exact_guidance", "pipeline.samplers.exact_guidance", "ExactGuidanceSampler", linear_only=True),
    MethodSpec("prior_is", "pipeline.samplers.prior_is", "PriorISSampler", particle=True, logz="info"),
    MethodSpec("fps", "pipeline.samplers.fps", "FPSSampler", linear_only=True),
    MethodSpec("fps_smc", "pipeline.samplers.fps", "FPSSMCSampler", linear_only=True, particle=True, logz="none"),
    MethodSpec("inversion", "pipeline.samplers.inversion", "InversionSampler", linear_only=True, logz="info",
               cpu_only=True),
)
REGISTRY: dict[str, MethodSpec] = {s.name: s for s in _SPECS}

METHODS: tuple[str, ...] = tuple(REGISTRY)
RTB_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if s.trained)
AMORTIZED_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if s.amortized)  # one network, many y
TRAINING_FREE: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if not s.trained)
TUNED_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if s.tuned)  # tune on a separate seed
LINEAR_ONLY: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if s.linear_only)
PARTICLE_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if s.particle)
CPU_METHODS: tuple[str, ...] = tuple(m for m, s in REGISTRY.items() if s.cpu_only)  # jobs ask for no GPU


def method_spec(name: str) -> MethodSpec:
    """The registry entry of ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in REGISTRY:
        raise PipelineError(f"unknown sampling method {name!r}; known: {', '.join(METHODS)}")
    return REGISTRY[name]


def sampler_class(name: str):
    """The class implementing ``name`` (RTB methods share :class:`pipeline.rtb.sampler.RTBSampler`)."""
    return method_spec(name).sampler_class()


def make_sampler(name: str, prior, chain, **opts) -> Sampler:
    """Build the sampler of ``name``; unknown options raise a one-line error.

    Training-free methods get ``prior`` and ``chain``; trained ones need ``posterior=`` (an
    :class:`pipeline.rtb.posterior.RTBPosterior`, which carries its own prior and chain: a ``prior`` or
    ``chain`` given beside it must be the posterior's)."""
    spec = method_spec(name)
    bad = sorted(set(opts) - spec.options())
    if bad:
        raise PipelineError(f"method '{name}': unknown option(s) {', '.join(bad)}; "
                            f"allowed: {', '.join(sorted(spec.options()))}")
    cls = spec.sampler_class()
    if not spec.trained:
        return cls(prior, chain, **opts)
    post = opts.pop("posterior", None)
    if post is None:
        raise PipelineError(f"method '{name}' samples a trained RTB posterior: pass posterior=<RTBPosterior> "
                            f"(fine-tune with pipeline.rtb, then load it)")
    if (prior is not None and prior is not post.prior) or (chain is not None and chain.K != post.chain.K):
        raise PipelineError(f"method '{name}': the prior/chain given differ from the posterior's own")
    if spec.amortized and opts.get("cond_fn") is None:
        raise PipelineError(f"method '{name}' is amortized: pass cond_fn (observation -> conditioning input)")
    return cls(post, name, **dict(spec.fixed), **opts)
