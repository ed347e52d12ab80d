"""The RTB posterior policy q_phi over the strided chain.

Every reverse step k = 2..K of q_phi is Gaussian. Its variance is the prior chain's only when
``learn_variance`` is off; by default (``learn_variance: true``) the network also outputs a
per-coordinate log-variance offset, so q's variance is learned (see below). Its mean is

    mean_q(x_k) = reverse_mean(x_k, eps_q, k) + g_k(x_k),

where ``g_k`` is an optional *guidance* mean offset computed from the FROZEN prior (DPS, DPS+CLA),
detached and cached from the rollout, and ``eps_q`` is either

* ``residual`` mode: ``eps_prior(x_k, t_k) + c_phi(x_k, t_k, cond, feats)`` with a zero-initialised
  correction ``c_phi`` (an MLP for vector priors, a small zero-init U-Net head for images). The
  prior's eps at every visited state is computed once in the rollout and reused for log p, the
  mean and the gradient pass, so the gradient pass backpropagates only through the head; or
* ``replace`` mode: ``e_phi(x_k, t_k, ...)``, a full trainable copy of the prior network
  (initialised as the prior, so q = p at initialisation too), or with ``lora_rank > 0`` the frozen
  copy plus zero-initialised low-rank adapters on its linear and conv layers (:mod:`.lora`).

With ``learn_variance`` (the default) the model also outputs a bounded per-coordinate log-variance offset v,
and q's step std is ``std_p * exp(v / 2)``: with coarse chains (K = 20-50) the posterior's steps are narrower
than the prior's, so a fixed-variance q has an irreducible KL (on a 1-D mixture at K = 20: ~0.07 nat).
With ``step_variance_tau2`` set, the prior's std is first narrowed per pixel by the data precision of the
observation's own lens (:mod:`.step_variance`; ``step_variance_mode``: how the model's prior variance is
set), and the learned offset applies on top; ``step_mean_shift`` moves the step's mean towards the data
(``step_mean_cg_iters``: by CG on the whole operator; ``step_model_chain_x0``: the model's x_0 is the chain's
f(x_1)); the head's correction applies unless ``use_head`` is off.

The sample is ``x0 = f(x_1)``, the frozen prior's final denoise; ``cond`` carries y when amortized.

Features for the correction (no backprop through the prior needed): ``x0hat`` = Tweedie estimate
from the cached prior eps, and ``grad`` = sqrt(1 - abar_k) * grad log p(y | x0hat) (a sparse
product A^T r for linear problems), scaled so its size does not blow up at low noise.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pipeline.diffusion.schedule import Chain, gaussian_log_prob
from pipeline.diffusion.unet import build_unet
from pipeline.rtb.config import STEP_OPTIONS
from pipeline.rtb.lora import apply_lora
from pipeline.rtb.step_variance import MODES as STEP_VARIANCE_MODES, likelihood_step, tweedie_x0
from pipeline.samplers.guidance import frozen_guidance_shift

FEATURES = ("x0hat", "grad")
VAR_BOUND = 4.0  # bound of the learned log-variance offset


def time_features(t: torch.Tensor, T: int, dim: int = 32) -> torch.Tensor:
    """Sinusoidal embedding of t/T in [0, 1] (B,) -> (B, dim), float32."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device))
    arg = (t.float() / T)[:, None] * freqs[None] * math.pi
    return torch.cat([torch.cos(arg), torch.sin(arg)], 1)


class MLPCorrection(nn.Module):
    """Zero-initialised MLP correction c(x, t, cond, feats) -> (B, d) for vector-valued priors.

    ``in_scale`` divides x and the x0hat feature (a fixed input normalisation, network units).
    """

    def __init__(self, dim: int, cond_dim: int = 0, feat_dim: int = 0, hidden: int = 128, layers: int = 3,
                 emb_dim: int = 32, T: int = 1000, in_scale: float = 1.0, out_mult: int = 1):
        super().__init__()
        if layers < 1 or hidden < 1:
            raise ValueError("MLPCorrection needs layers >= 1 and hidden >= 1")
        self.dim, self.cond_dim, self.feat_dim, self.emb_dim, self.T = dim, cond_dim, feat_dim, emb_dim, T
        self.in_scale = float(in_scale)
        n_in = dim + cond_dim + feat_dim + emb_dim
        mods: list[nn.Module] = []
        for i in range(layers):
            mods += [nn.Linear(n_in if i == 0 else hidden, hidden), nn.SiLU()]
        self.body = nn.Sequential(*mods)
        self.out_mult = out_mult  # 2 when a log-variance offset is output next to the eps correction
        self.out = nn.Linear(hidden, dim * out_mult)
        nn.init.zeros_(self.out.weight)  # q = p at initialisation
        nn.init.zeros_(self.out.bias)

    def forward(self, x, t, cond=None, feats=None):
        parts = [x.reshape(x.shape[0], -1) / self.in_scale, time_features(t, self.T, self.emb_dim).to(x.dtype)]
        if self.cond_dim:
            if cond is None:
                raise ValueError(f"this correction needs cond of size {self.cond_dim}")
            parts.append(cond.reshape(x.shape[0], -1).to(x.dtype))
        if self.feat_dim:
            parts.append(feats.reshape(x.shape[0], -1).to(x.dtype))
        out = self.out(self.body(torch.cat(parts, 1)))
        return out.reshape(x.shape[0], self.out_mult * x.shape[1], *x.shape[2:])


class UNetCorrection(nn.Module):
    """Zero-initialised U-Net correction head for image priors (C, H, W).

    Feature images (x0hat, grad: ``feat_channels``) and an observation mapped to the source plane
    (``cond_channels``) enter as extra input channels.
    """

    def __init__(self, channels: int, feat_channels: int = 0, cond_channels: int = 0, preset: str = "tiny",
                 out_mult: int = 1, **overrides):
        super().__init__()
        self.feat_channels, self.cond_channels = feat_channels, cond_channels
        extra = feat_channels + cond_channels
        self.net = build_unet(preset, in_channels=channels, out_channels=channels * out_mult, cond_channels=extra,
                              zero_init_output=True, **overrides)

    def forward(self, x, t, cond=None, feats=None):
        extra = [v for v in (feats, cond) if v is not None]
        img = torch.cat(extra, 1) if extra else None
        return self.net(x, t, cond_image=img)


class RTBPosterior(nn.Module):
    """q_phi over ``chain`` with a frozen ``prior`` (see module docstring).

    ``model``: the correction (residual mode) or the full eps-network copy (replace mode), called as
    ``model(x, t, cond, feats)``. ``guidance``: optional callable ``(x, k, eps_prior, y, problem) -> mean
    offset`` built from the frozen prior (:func:`make_frozen_guidance`). The inverse problem is not
    stored: every call that needs it (the ``grad`` feature, guidance) takes it as
    an argument, one problem for all rows or a per-sample one (e.g. a
    :class:`~pipeline.lensing.amortized.LensBatch`). ``log_z`` is a learnable scalar (single
    observation; the amortized posterior uses VarGrad per y-group instead, see the trainer).
    """

    def __init__(self, prior, chain: Chain, model: nn.Module, *, mode: str = "residual",
                 features: tuple[str, ...] = (), guidance=None, learn_variance: bool = False,
                 learn_guidance_gain: bool = False, guidance_gain_init: float = 1.0,
                 step_variance_tau2: float | None = None, step_variance_mode: str = "prior",
                 step_mean_shift: bool = False, step_mean_cg_iters: int = 0, use_head: bool = True,
                 step_model_chain_x0: bool = False):
        super().__init__()
        if step_variance_tau2 is not None and not step_variance_tau2 > 0:
            raise ValueError(f"step_variance_tau2 must be > 0 or None, got {step_variance_tau2!r}")
        if step_variance_mode not in STEP_VARIANCE_MODES:
            raise ValueError(f"step_variance_mode must be one of {STEP_VARIANCE_MODES}, got {step_variance_mode!r}")
        if step_mean_shift and step_variance_tau2 is None:
            raise ValueError("step_mean_shift needs step_variance_tau2 (the model's prior variance)")
        if step_mean_cg_iters < 0 or (step_mean_cg_iters and not step_mean_shift):
            raise ValueError(f"step_mean_cg_iters must be >= 0 and needs step_mean_shift, got {step_mean_cg_iters!r}")
        self.step_variance_tau2 = None if step_variance_tau2 is None else float(step_variance_tau2)
        self.step_variance_mode, self.step_mean_shift = step_variance_mode, bool(step_mean_shift)
        self.step_mean_cg_iters, self.use_head = int(step_mean_cg_iters), bool(use_head)
        self.step_model_chain_x0 = bool(step_model_chain_x0)
        if mode not in ("residual", "replace"):
            raise ValueError(f"posterior mode must be 'residual' or 'replace', got {mode!r}")
        bad = [f for f in features if f not in FEATURES]
        if bad:
            raise ValueError(f"unknown posterior features {bad} (known: {FEATURES})")
        # The frozen prior is deliberately NOT registered as a submodule: its weights stay out of
        # the posterior's parameters and checkpoints (they live in the prior's own checkpoint).
        self.__dict__["prior"] = prior
        self.chain, self.model, self.mode = chain, model, mode
        self.features, self.guidance = tuple(features), guidance
        self.learn_variance = bool(learn_variance)
        self.log_z = nn.Parameter(torch.zeros((), dtype=torch.float64))
        # One log-gain per chain step on the frozen guidance offset: lets training set the guidance
        # strength step by step (a head must otherwise learn a d -> d linear map of the guidance).
        if not guidance_gain_init > 0:
            raise ValueError(f"guidance_gain_init must be > 0, got {guidance_gain_init!r}")
        self.guidance_log_gain = (nn.Parameter(torch.full((chain.K + 1,), math.log(guidance_gain_init)))
                                  if learn_guidance_gain and guidance is not None else None)
        self.eval()  # deterministic everywhere (pass 1 and pass 2 must agree)

    @property
    def cond_shape(self) -> tuple[int, ...] | None:
        """Shape of ONE observation's conditioning input (amortized posteriors): ``(cond_dim,)`` for the
        MLP head, ``(cond_channels, H, W)`` for the U-Net head; ``()`` when unconditioned; ``None``
        where the model does not say (the full eps-network copy)."""
        m = self.model
        if isinstance(m, MLPCorrection):
            return (m.cond_dim,) if m.cond_dim else ()
        if isinstance(m, UNetCorrection):
            return (m.cond_channels, *tuple(self.prior.event_shape)[1:]) if m.cond_channels else ()
        return None

    # -- pieces ------------------------------------------------------------------------------
    def timesteps(self, k: int | torch.Tensor, n: int, device) -> torch.Tensor:
        if isinstance(k, torch.Tensor):
            return self.chain.t.to(device)[k.to(device)]
        return torch.full((n,), int(self.chain.t[k]), dtype=torch.long, device=device)

    def feats(self, x, k, eps_p, y, problem=None):
        """Likelihood features at x_k from the cached prior eps (no grad). k: int or (B,) tensor;
        ``problem``: the observation's inverse problem (needed by the ``grad`` feature)."""
        if not self.features:
            return None
        with torch.no_grad():
            ab = self._abar(k, x)
            x0hat = tweedie_x0(x, eps_p, ab)
            out = []
            if "x0hat" in self.features:
                out.append(x0hat)
            if "grad" in self.features:
                if problem is None:
                    raise ValueError("the 'grad' feature needs the inverse problem")
                g = problem.grad_log_likelihood(x0hat, y)
                out.append((1 - ab).sqrt() * g.to(x.dtype))
            return torch.cat(out, 1)

    def _abar(self, k, x):
        """abar_k broadcastable to x (k int or (B,) tensor), in x's dtype."""
        ab = self.chain.abar.to(x.device)[k] if isinstance(k, torch.Tensor) else self.chain.abar[k]
        ab = torch.as_tensor(ab, dtype=x.dtype, device=x.device)
        return ab.reshape(-1, *([1] * (x.ndim - 1))) if ab.ndim else ab

    def _model_out(self, x, k, eps_p, y=None, cond=None, problem=None):
        """(eps_q, log-variance offset v or None) at x_k; k int or per-sample (B,) tensor."""
        t = self.timesteps(k, x.shape[0], x.device)
        f = self.feats(x, k, eps_p, y, problem)
        out = self.model(x, t, cond, f)
        v = None
        if self.learn_variance:
            out, v_raw = out.chunk(2, dim=1)
            v = VAR_BOUND * torch.tanh(v_raw / VAR_BOUND)  # bounded: std_q / std_p in [e^-2, e^2]
        eps = eps_p + out if self.mode == "residual" else out
        return eps, v

    def step_params(self, x, k, eps_p, y=None, cond=None, guide=None, problem=None):
        """(mean, std) of q(x_{k-1} | x_k); k is an int or a per-sample (B,) tensor of chain indices;
        ``problem``: the inverse problem of ``y`` (one for all rows, or per sample).

        std is the chain's reverse std (a float) or, with a learned variance, a tensor shaped like x.
        """
        eps, v = self._model_out(x, k, eps_p, y, cond, problem) if self.use_head else (eps_p, None)
        mean, std = self.chain.reverse_mean(x, eps, k), self.chain.reverse_std(k, like=x)
        if guide is not None:
            if self.guidance_log_gain is not None:
                guide = guide * self._per_step(self.guidance_log_gain, k, x).exp()
            mean = mean + guide
        if self.step_variance_tau2 is not None:
            narrow, shift = self.likelihood_step(x, k, eps_p, y, problem)
            std = std * narrow
            if shift is not None:
                mean = mean + shift
        if v is not None:
            std = std * torch.exp(0.5 * v)
        return mean, std

    def likelihood_step(self, x, k, eps_p, y, problem, shift: bool | None = None):
        """(narrowing factor in (0, 1] on the prior's step std, mean offset or None) at x_k under the model
        of :mod:`.step_variance`; (ones, None) when ``step_variance_tau2`` is off; ``shift=False``: the
        narrowing alone. Both are functions of x_k and y only (detached): the step stays Gaussian, log q exact."""
        if self.step_variance_tau2 is None:
            return torch.ones_like(x), None
        return likelihood_step(problem, x, y, eps_p, self._abar(k, x), self._abar(k - 1, x),
                               self.chain.reverse_std(k, like=x), self.step_variance_tau2, self.step_variance_mode,
                               shift=self.step_mean_shift if shift is None else shift,
                               cg_iters=self.step_mean_cg_iters,
                               chain_x0=(self.chain, k) if self.step_model_chain_x0 else None)

    @staticmethod
    def _per_step(param, k, x):
        """param[k] in x's dtype, broadcastable to x (k int or per-sample (B,) tensor)."""
        v = param.to(x.device)[k].to(x.dtype)
        return v.reshape(-1, *([1] * (x.ndim - 1))) if isinstance(k, torch.Tensor) else v

    def mean_q(self, x, k, eps_p, y=None, cond=None, guide=None, problem=None):
        """Mean of q(x_{k-1} | x_k)."""
        return self.step_params(x, k, eps_p, y, cond, guide, problem)[0]

    def log_q_step(self, x, x_prev, k, eps_p, y=None, cond=None, guide=None, problem=None):
        """log q(x_{k-1} | x_k) per sample (B,) float64 (k int or (B,) tensor), with grad w.r.t. the model."""
        mean, std = self.step_params(x, k, eps_p, y, cond, guide, problem)
        return gaussian_log_prob(x_prev, mean, std)

    def guide(self, x, k, eps_p, y, problem=None):
        """Guidance mean offset at x_k (detached) under ``problem``, or None without guidance."""
        if self.guidance is None:
            return None
        return self.guidance(x, k, eps_p, y, problem).detach()

    def trainable_parameters(self):
        return [p for n, p in self.named_parameters() if p.requires_grad and n != "log_z"]

    def per_step_parameters(self) -> dict:
        """The per-chain-step scalars that are switched on (``guidance_log_gain``)."""
        return {n: p for n, p in (("guidance_log_gain", self.guidance_log_gain),) if p is not None}

    def load_per_step_state(self, state: dict | None) -> None:
        """Copy saved per-step scalars in (a checkpoint from before they existed has none)."""
        for n, p in self.per_step_parameters().items():
            if state is None or n not in state:
                raise KeyError(f"checkpoint has no {n!r} for this posterior (spec asks for it)")
            with torch.no_grad():
                p.copy_(state[n])


def copy_network(net: nn.Module) -> nn.Module:
    """A trainable deep copy of a prior eps-network (for ``replace`` mode)."""
    new = copy.deepcopy(net)
    for p in new.parameters():
        p.requires_grad_(True)
    return new


class EpsNetModel(nn.Module):
    """Adapter: a U-Net eps-network ``net(x, t, cond_image, cond_vec)`` as ``model(x, t, cond, feats)``.

    Used for ``replace`` mode (a full trainable copy of the prior network). Feature/cond images are
    only passed if the copied net was built with the matching ``cond_channels``.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t, cond=None, feats=None):
        extra = [v for v in (feats, cond) if v is not None]
        img = torch.cat(extra, 1) if extra and getattr(self.net, "cond_channels", 0) else None
        return self.net(x, t, img)


def make_frozen_guidance(method: str, chain: Chain, scale: float):
    """Guidance hook ``(x, k, eps_prior, y, problem) -> mean offset`` from the frozen prior's detached
    x0_hat (``pipeline.samplers.guidance.frozen_guidance_shift``; no backprop through any network);
    the problem is the caller's, per call."""
    def guide(x, k, eps_p, y, problem):
        return frozen_guidance_shift(method, chain, problem, y, x, eps_p, k, scale)

    return guide


def make_posterior(prior, chain: Chain, cfg, cond_dim: int = 0, cond_channels: int = 0) -> RTBPosterior:
    """Build q_phi on ``chain`` from an :class:`~pipeline.rtb.config.RTBConfig` (see :func:`posterior_spec`)."""
    return build_posterior(prior, posterior_spec(prior, chain, cfg, cond_dim, cond_channels))


def posterior_spec(prior, chain: Chain, cfg, cond_dim: int = 0, cond_channels: int = 0) -> dict:
    """JSON-able description from which :func:`build_posterior` rebuilds q_phi (stored in checkpoints):
    the network, the policy options of ``cfg.policy`` and the chain (K, variance, timestep grid)."""
    p = cfg.policy
    features = list(p.features)
    shape = tuple(prior.event_shape)
    learn_var = bool(p.learn_variance)
    mult = 2 if learn_var else 1
    if p.parameterisation == "full":
        model = {"type": "copy", "lora_rank": int(p.lora_rank)}
        mode = "replace"
        features = []
        learn_var = False  # the copied eps-network has no variance output
    elif len(shape) == 1:
        model = {"type": "mlp", "dim": shape[0], "cond_dim": cond_dim, "feat_dim": shape[0] * len(features),
                 "hidden": p.head_hidden, "layers": p.head_layers, "T": prior.schedule.T,
                 "in_scale": p.in_scale, "out_mult": mult}
        mode = "residual"
    else:
        model = {"type": "unet_head", "channels": shape[0], "feat_channels": shape[0] * len(features),
                 "cond_channels": cond_channels, "preset": p.head_preset, "out_mult": mult}
        mode = "residual"
    return {"model": model, "mode": mode, "features": features, "K": chain.K, "variance": chain.variance,
            "timesteps": [int(t) for t in chain.t.tolist()],
            "guidance": p.guidance, "guidance_scale": p.guidance_scale, "learn_variance": learn_var,
            "learn_guidance_gain": bool(p.learn_guidance_gain), "guidance_gain_init": float(p.guidance_gain_init),
            "step_variance_tau2": p.step_variance_tau2,
            **{k: getattr(p, k) for k, neutral in STEP_OPTIONS if getattr(p, k) != neutral}}


def build_model(spec: dict, prior=None) -> nn.Module:
    kind = spec["type"]
    kw = {k: v for k, v in spec.items() if k != "type"}
    if kind == "mlp":
        return MLPCorrection(**kw)
    if kind == "unet_head":
        return UNetCorrection(**kw)
    if kind == "copy":
        if prior is None or not hasattr(prior, "net"):
            raise ValueError("parameterisation 'full' needs a network prior (with .net) to copy")
        net = copy_network(prior.net)
        if kw.get("lora_rank", 0):
            net = apply_lora(net, int(kw["lora_rank"]), kw.get("lora_alpha"))
        return EpsNetModel(net)
    raise ValueError(f"unknown posterior model type {kind!r}")


REMOVED_SPEC_OPTIONS = ("learn_step_scale", "guided_variance")  # per-step variance options no longer built


def build_posterior(prior, spec: dict) -> RTBPosterior:
    removed = [k for k in REMOVED_SPEC_OPTIONS if spec.get(k)]
    if removed:
        raise ValueError(f"the posterior spec uses the removed option {removed[0]!r}; retrain without it")
    chain = prior.schedule.chain(spec["K"], spec["variance"], spec.get("timesteps"))  # no grid: uniform
    model = build_model(spec["model"], prior)
    if hasattr(prior, "device"):
        model = model.to(prior.device)
    guidance = None
    if spec.get("guidance", "none") != "none":
        guidance = make_frozen_guidance(spec["guidance"], chain, spec["guidance_scale"])
    return RTBPosterior(prior, chain, model, mode=spec["mode"], features=tuple(spec["features"]),
                        guidance=guidance, learn_variance=spec.get("learn_variance", False),
                        learn_guidance_gain=spec.get("learn_guidance_gain", False),
                        guidance_gain_init=spec.get("guidance_gain_init", 1.0),
                        step_variance_tau2=spec.get("step_variance_tau2"),
                        **{k: spec.get(k, neutral) for k, neutral in STEP_OPTIONS})
