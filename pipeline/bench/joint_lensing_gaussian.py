"""Stage-B lensing check of the joint construction: the lens inferred with an exact source sampler.

The source has a Gaussian-process prior drawn through the K-step chain, whose x0 law N(m0, S0) is exact
(:func:`pipeline.diffusion.gaussian_chain.propagate_gaussian_chain`), so for every lens
p(y | theta) = N(y; A(theta) m0, A(theta) S0 A(theta)^T + sigma^2 I) and x0 | theta, y are exact. With
that lens-conditional sampler a trajectory's x-part contributes exactly log p(y | theta), and joint RTB's
delta becomes log Z(y) + log q(theta | y) - log p(theta) - log p(y | theta): trained amortized on fresh
(theta, x0, y) draws and/or over a fixed set of observations (VarGrad log Z per observation, on-policy
theta, gradient through log q only), and/or refined per observation
(:func:`pipeline.lensing.lens_head.refine`, tempered and widened early). theta are the free parameters of the lens prior
(:class:`pipeline.lensing.lens_prior.LensPrior`; the centre fixed at the origin); q(theta | y) is
:class:`pipeline.lensing.lens_head.LensThetaHead` on the image pixels over their prior-predictive RMS;
A(theta) for a batch of lenses is :class:`pipeline.lensing.lens_batch.LensBatchOperator`. The reference
is Metropolis-Hastings with the exact log p(y | theta), phi moved modulo pi; the lens calibration is
:func:`pipeline.metrics.lens_calibration.lens_calibration`. Run: ``python -m
pipeline.bench.joint_lensing_gaussian OUT.json`` (``--help``).
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pipeline.diffusion.chain_config import timestep_grid
from pipeline.diffusion.gaussian_chain import propagate_gaussian_chain
from pipeline.io.atomic import write_json
from pipeline.lensing.config import LensConfig
from pipeline.lensing.gp_prior import GaussianProcessPrior, se_covariance
from pipeline.lensing.lens_batch import LENS_KEYS, LensBatchOperator
from pipeline.lensing.lens_head import LensThetaHead, importance_check, refine, vargrad_loss
from pipeline.lensing.lens_head_mvn import make_head
from pipeline.lensing.lens_smc import smc_start
from pipeline.lensing.lens_prior import LensPrior
from pipeline.lensing.operator import gaussian_psf
from pipeline.metrics.lens_calibration import lens_calibration
from pipeline.bench.joint_lensing_mh import circular_mean, circular_unwrap, reference_chains
from pipeline.bench.joint_lensing_report import marginals_figure, summary
from pipeline.rtb.joint import AdamCosine, integrated_autocorr_time
from pipeline.runtime import configure_threads

log = logging.getLogger(__name__)
_LOG_2PI = math.log(2 * math.pi)


@dataclass
class Setup:
    """The check's constants. Geometry in pixels and arcsec; the source prior's amplitude in source
    units; ``snr``: sigma = (RMS of noiseless prior-predictive images) / snr."""

    source_npix: int = 12
    source_pixscale: float = 0.15    # arcsec / px: a 1.8" source field
    image_npix: int = 16
    image_pixscale: float = 0.15     # arcsec / px
    supersample: int = 1
    psf_fwhm: float = 0.2            # arcsec
    psf_npix: int = 5
    length_scale: float = 0.2        # arcsec
    amplitude: float = 1.0
    snr: float = 8.0
    K: int = 20
    spacing: str = "quadratic"
    lens: dict = field(default_factory=lambda: {"center": 0.0})   # LensConfig fields over its defaults


class GaussianSourceLensing:
    """The model: theta ~ LensPrior, x0 ~ the chain's N(m0, S0), y = A(theta) x0 + N(0, sigma^2 I)."""

    def __init__(self, setup: Setup, seed: int = 0):
        self.setup = s = setup
        self.prior = LensPrior(LensConfig(**{**asdict(LensConfig()), **s.lens}))
        gp = GaussianProcessPrior(se_covariance(s.source_npix, s.source_pixscale, s.length_scale, s.amplitude))
        chain = gp.schedule.chain(s.K, timesteps=timestep_grid(gp.schedule.T, s.K, s.spacing))
        law = propagate_gaussian_chain(chain, gp.mean, gp.cov)
        self.m0, self.S0 = law["x0_mean"], law["x0_cov"]
        self.L0 = torch.linalg.cholesky(self.S0 + 1e-9 * torch.eye(self.S0.shape[0], dtype=torch.float64))
        psf = gaussian_psf(s.psf_fwhm, s.image_pixscale / s.supersample, s.psf_npix)
        self.op = LensBatchOperator(image_shape=(s.image_npix, s.image_npix), image_pixscale=s.image_pixscale,
                                    source_npix=s.source_npix, source_pixscale=s.source_pixscale,
                                    supersample=s.supersample, psf=psf)
        gen = torch.Generator().manual_seed(seed + 7)
        theta, x0 = self.draw_theta(256, np.random.default_rng(seed + 7)), self.draw_source(256, gen)
        self.sigma = float(self.bind(theta).A(x0).pow(2).mean().sqrt()) / s.snr
        self.y_scale = float(math.sqrt(self.sigma ** 2 * (1 + s.snr ** 2)))   # prior-predictive RMS of y

    def draw_theta(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        return self.prior.sample(n, rng)

    def draw_source(self, n: int, generator) -> torch.Tensor:
        z = torch.randn(n, self.m0.shape[0], generator=generator, dtype=torch.float64)
        return self.m0 + z @ self.L0.T

    def bind(self, theta: torch.Tensor) -> LensBatchOperator:
        """The operator bound to the lenses of theta's rows (fixed parameters at their single value)."""
        fixed = self.prior.to_lens(torch.zeros(0))
        cols = {k: i for i, k in enumerate(self.prior.names)}
        lenses = {k: theta[:, cols[k]] if k in cols else torch.full((theta.shape[0],), float(getattr(fixed, k)),
                                                                     dtype=torch.float64) for k in LENS_KEYS}
        return self.op.bind({**lenses, "model": self.prior.config.model})

    def simulate(self, n: int, rng: np.random.Generator, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta (n, p), y (n, m)) drawn from the model."""
        theta = self.draw_theta(n, rng)
        y = self.bind(theta).A(self.draw_source(n, generator))
        return theta, y + self.sigma * torch.randn(y.shape, generator=generator, dtype=torch.float64)

    def log_evidence(self, theta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Exact log p(y | theta), (B,) nats (y in image units), by Woodbury on the d-dimensional source:
        with G = A L0 / sigma, C = sigma^2 (I + G G^T), log det C = m log sigma^2 + log det(I + G^T G)."""
        op = self.bind(theta)
        A = op.dense()                                                      # (B, m, d)
        G = A @ self.L0 / self.sigma
        r = (y - A @ self.m0) / self.sigma                                  # (B, m)
        d, m = G.shape[-1], G.shape[-2]
        Lc = torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) + G.transpose(1, 2) @ G)
        u = torch.cholesky_solve((G.transpose(1, 2) @ r[..., None]), Lc)[..., 0]
        quad = (r * r).sum(-1) - ((G.transpose(1, 2) @ r[..., None])[..., 0] * u).sum(-1)
        logdet = 2 * torch.log(torch.diagonal(Lc, dim1=1, dim2=2)).sum(-1) + m * math.log(self.sigma ** 2)
        return -0.5 * (quad + logdet + m * _LOG_2PI)


def train_head(model: GaussianSourceLensing, *, steps: int, groups: int, group_size: int, lr: float, seed: int,
               hidden: int = 128, components: int = 4, observations: torch.Tensor | None = None,
               head: LensThetaHead | None = None, kind: str = "product") -> tuple[LensThetaHead, list[float]]:
    """Joint RTB for theta (see the module docstring): amortized over fresh model draws, or, with
    ``observations`` (G, m), over that fixed set (``groups`` of them per step). ``head``: continue
    training it (else a new one of ``kind``, :func:`~pipeline.lensing.lens_head_mvn.make_head`). Returns (head, losses)."""
    torch.manual_seed(seed)
    head = head or make_head(kind, model.prior, model.op.m, components=components, hidden=hidden)
    optim = AdamCosine(head, lr, steps)
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        if observations is None:
            _, y = model.simulate(groups, rng, gen)
        else:
            y = observations[torch.randint(observations.shape[0], (groups,), generator=gen)]
        h = (y / model.y_scale).repeat_interleave(group_size, 0)
        theta = head.sample(h, gen)
        with torch.no_grad():
            target = model.prior.log_prob(theta) + model.log_evidence(theta, y.repeat_interleave(group_size, 0))
        losses.append(optim.step(vargrad_loss(head.log_prob(theta, h), target, groups).mean()))
        if (step + 1) % max(1, steps // 10) == 0:
            log.info("step %d/%d loss %.3f (%.1f s)", step + 1, steps, np.mean(losses[-50:]), time.perf_counter() - t0)
    return head, losses


def draw_q(model: GaussianSourceLensing, head: LensThetaHead, y: torch.Tensor, n: int, gen, raw=None,
           particles=None) -> torch.Tensor:
    """(B, n, p) draws of q(theta | y) for the rows of y, or of the refined head outputs ``raw`` (B, R), or
    drawn with replacement from equally weighted ``particles`` (B, N, p)."""
    if particles is not None:
        idx = torch.randint(particles.shape[1], (particles.shape[0], n), generator=gen)
        return torch.gather(particles, 1, idx[..., None].expand(-1, -1, particles.shape[2]))
    if raw is not None:
        return head.sample(raw=raw.repeat_interleave(n, 0), generator=gen).view(raw.shape[0], n, -1)
    return head.sample((y / model.y_scale).repeat_interleave(n, 0), gen).view(y.shape[0], n, -1)


def compare_marginals(model: GaussianSourceLensing, head: LensThetaHead, y: torch.Tensor, mh: dict, *,
                      n_q: int, seed: int, raw=None, particles=None) -> list[dict]:
    """Per observation and parameter: MH's mean, sd and ESS (``mh``: :func:`reference_chains` of y) beside
    those of n_q draws of q(theta | y); phi is compared on the circle of period pi, unwrapped around
    MH's circular mean."""
    names = model.prior.names
    q = draw_q(model, head, y, n_q, torch.Generator().manual_seed(seed), raw, particles)     # (B, n_q, p)
    chains = mh["theta"]                                                            # (n, B, p)
    rows = []
    for b in range(y.shape[0]):
        row = {"acceptance": mh["acceptance"][b], "parameters": {}}
        unwrapped = []
        for j, name in enumerate(names):
            c, s = chains[:, b, j], q[b, :, j]
            if name == "phi" and "phi" in model.prior.box:
                centre = circular_mean(c, math.pi)
                c, s = circular_unwrap(c, centre, math.pi), circular_unwrap(s, centre, math.pi)
            unwrapped.append(c)
            tau = integrated_autocorr_time(c)
            ess = c.shape[0] / tau
            mh_mean, mh_sd, q_mean, q_sd = float(c.mean()), float(c.std()), float(s.mean()), float(s.std())
            row["parameters"][name] = {
                "mh_mean": mh_mean, "mh_sd": mh_sd, "mh_ess": ess, "q_mean": q_mean, "q_sd": q_sd,
                "dmean_over_sd": (q_mean - mh_mean) / mh_sd, "sd_ratio": q_sd / mh_sd,
                # Monte-Carlo sd of the standardised mean difference: MH's ESS and q's n_q samples
                "dmean_mc_sd": math.sqrt(1 / ess + 1 / n_q)}
        row["mh_correlation"] = torch.corrcoef(torch.stack(unwrapped)).tolist()   # in the order of names
        rows.append(row)
    return rows


def evaluate(model: GaussianSourceLensing, head: LensThetaHead, ref_set, cal_set, *, mh: dict, n_samples: int,
             seed: int, raw=None, particles=None) -> dict:
    """The head against the MH reference on ``ref_set`` = (theta, y) and its lens calibration on ``cal_set``,
    with its sharpness (median over observations of q's sd over the prior's sd, per parameter). phi is
    read on its circle: unwrapped around each observation's circular sample mean. ``raw``: refined head
    outputs (:func:`~pipeline.lensing.lens_head.refine`) for the reference then calibration rows, or
    ``particles`` (B, N, p) to evaluate instead (their MH comparison's Monte-Carlo sd counts 4,000 draws)."""
    n_ref = ref_set[1].shape[0]
    ref = compare_marginals(model, head, ref_set[1], mh, n_q=4000, seed=seed, raw=None if raw is None else raw[:n_ref],
                            particles=None if particles is None else particles[:n_ref])
    truth_c, y_c = cal_set
    samples = draw_q(model, head, y_c, n_samples, torch.Generator().manual_seed(seed + 1),
                     None if raw is None else raw[n_ref:], None if particles is None else particles[n_ref:])
    truth_c = truth_c.clone()
    # did q miss the posterior's bulk? log target at the truth against the best of q's draws (nats; >> 0: missed)
    def log_target(theta, per_row):
        return model.prior.log_prob(theta) + model.log_evidence(theta, y_c.repeat_interleave(per_row, 0))
    gap = log_target(truth_c, 1) - log_target(samples.reshape(-1, samples.shape[-1]), n_samples).view(
        samples.shape[:2]).max(1).values
    if "phi" in model.prior.box:   # phi has period pi: unwrap samples and truth around the samples' circular mean
        j = model.prior.names.index("phi")
        for b in range(samples.shape[0]):
            centre = circular_mean(samples[b, :, j], math.pi)
            samples[b, :, j] = circular_unwrap(samples[b, :, j], centre, math.pi)
            truth_c[b, j] = circular_unwrap(truth_c[b, j:j + 1], centre, math.pi)[0]
    cal = lens_calibration(samples.numpy(), truth_c.numpy(), model.prior.names, rng=np.random.default_rng(seed + 3))
    prior_sd = model.draw_theta(20000, np.random.default_rng(seed + 4)).std(0)
    cal["sd_over_prior_sd"] = dict(zip(model.prior.names, (samples.std(1).median(0).values / prior_sd).tolist()))
    z = (samples.mean(1) - truth_c) / samples.std(1)
    cal["per_observation"] = [{"z": dict(zip(model.prior.names, z[b].tolist())), "truth_minus_best_draw": float(gap[b])}
                              for b in range(z.shape[0])]
    return {"reference": ref, "calibration": cal}


def run(out, *, setup: Setup, steps: int, fit_steps: int, groups: int, group_size: int, lr: float, n_ref: int,
        mh_iter: int, n_cal: int, n_samples: int, seed: int, fit_groups: int | None = None,
        fit_group_size: int | None = None, fit_set: str = "all", refine_kw: dict | None = None, png=None,
        head_kind: str = "product") -> dict:
    """Train amortized (``steps`` on fresh draws; 0: skip), evaluate; fit over the evaluated observations
    (``fit_steps``; ``fit_set`` 'all': the reference and calibration sets, 'ref': the reference set only),
    evaluate again; with ``refine_kw`` (keywords of :func:`~pipeline.lensing.lens_head.refine`, steps > 0),
    refine the head's outputs per observation on both sets and evaluate that; write ``out`` (JSON) and, with
    ``png``, the last head's marginals against MH (:func:`figure`)."""
    t0 = time.perf_counter()
    model = GaussianSourceLensing(setup, seed)
    log.info("theta = %s, sigma %.4g, image %d px, source %d px", model.prior.names, model.sigma, model.op.m, model.op.d)
    rng, gen = np.random.default_rng(seed + 1), torch.Generator().manual_seed(seed + 1)
    ref_set, cal_set = model.simulate(n_ref, rng, gen), model.simulate(n_cal, rng, gen)
    mh = reference_chains(model, ref_set[1], ref_set[0], n_iter=mh_iter, burn=mh_iter // 5, seed=seed + 6)
    t_ref = time.perf_counter() - t0
    head, losses, amortized = None, [float("nan")], None
    if steps > 0:
        head, losses = train_head(model, steps=steps, groups=groups, group_size=group_size, lr=lr, seed=seed,
                                  kind=head_kind)
        amortized = evaluate(model, head, ref_set, cal_set, mh=mh, n_samples=n_samples, seed=seed + 2)
    t_train = time.perf_counter() - t0 - t_ref
    if fit_set not in ("all", "ref"):
        raise ValueError(f"fit_set must be 'all' or 'ref', got {fit_set!r}")
    both = torch.cat([ref_set[1], cal_set[1]]) if fit_set == "all" else ref_set[1]
    fit_groups, fit_group_size = fit_groups or groups, fit_group_size or group_size
    fitted, fit_losses = None, [float("nan")]
    if fit_steps > 0 or head is None:
        head, fit_losses = train_head(model, steps=fit_steps, groups=fit_groups, group_size=fit_group_size, lr=lr,
                                      seed=seed + 5, observations=both, head=head, kind=head_kind)
        fitted = evaluate(model, head, ref_set, cal_set, mh=mh, n_samples=n_samples, seed=seed + 2)
    refined, raw = None, None
    if refine_kw and refine_kw.get("steps", 0) > 0:
        refined, raw = refine_and_evaluate(model, head, ref_set, cal_set, mh=mh, n_samples=n_samples,
                                           seed=seed, **refine_kw)
    res = {"check": "joint_lensing_gaussian", "setup": asdict(setup), "theta": model.prior.names, "head": head_kind,
           "sigma": model.sigma, "seed": seed, "n_ref": n_ref, "n_cal": n_cal, "n_samples": n_samples,
           "mh": {"n_iter": mh_iter, "burn": mh_iter // 5, "step": mh["step"], "q_samples": 4000,
                  "truth": ref_set[0].tolist(), "seconds": t_ref},
           "training": {"steps": steps, "groups": groups, "group_size": group_size, "lr": lr,
                        "final_loss": float(np.mean(losses[-50:])), "seconds": t_train},
           "fit": {"steps": fit_steps, "lr": lr, "groups": fit_groups, "group_size": fit_group_size,
                   "set": fit_set, "observations": int(both.shape[0]),
                   "final_loss": float(np.mean(fit_losses[-50:]))},
           "amortized": amortized, "fitted": fitted, "refined": refined, "torch_threads": torch.get_num_threads(),
           "seconds": time.perf_counter() - t0}
    write_json(out, res)
    if png:
        q = draw_q(model, head, ref_set[1], 4000, torch.Generator().manual_seed(seed + 7), None if raw is None else raw[:n_ref])
        marginals_figure(png, model.prior.names, ref_set[0], mh, q)
    return res


def refine_and_evaluate(model, head, ref_set, cal_set, *, mh, n_samples, seed, **kw) -> tuple[dict, torch.Tensor]:
    """Refine the head's outputs per observation (reference then calibration rows) and evaluate them; ``kw``:
    the keywords of :func:`~pipeline.lensing.lens_head.refine` other than ``seed`` and ``raw``."""
    y = torch.cat([ref_set[1], cal_set[1]])
    t0 = time.perf_counter()
    def log_likelihood(theta, rows):   # in chunks: each lens's dense operator is m x d float64 (300 kB here)
        return torch.cat([model.log_evidence(theta[i:i + 1024], y[rows[i:i + 1024]]) for i in range(0, len(theta), 1024)])

    start, raw0, began, smc = kw.pop("start", "head"), None, {}, None
    if start == "smc":   # a normal fitted to each observation's tempered-SMC particles
        raw0, out = smc_start(head, log_likelihood, y.shape[0], seed=seed + 10)
        smc = evaluate(model, head, ref_set, cal_set, mh=mh, n_samples=n_samples, seed=seed + 2, particles=out["theta"])
        smc["smc"] = {k: (v.tolist() if torch.is_tensor(v) else v) for k, v in out.items() if k != "theta"}
        began["ess_fraction_at_refine_start"] = importance_check(head, raw0, log_likelihood, seed=seed + 9)["ess_fraction"]
    raw, losses = refine(head, y / model.y_scale, log_likelihood, seed=seed + 8, raw=raw0, **kw)
    seconds = time.perf_counter() - t0
    check = importance_check(head, raw, log_likelihood, n=256, seed=seed + 9)
    out = evaluate(model, head, ref_set, cal_set, mh=mh, n_samples=n_samples, seed=seed + 2, raw=raw)
    out["smc_particles"] = smc
    out["refine"] = {**kw, "start": start, **{k: v.tolist() for k, v in began.items()},
                     "observations": int(y.shape[0]), "seconds": seconds,
                     "seconds_per_observation": seconds / y.shape[0],
                     "final_loss_per_observation": losses[-20:].mean(0).tolist(),
                     # 256 draws of q per observation: Kish ESS / n of the weights p(theta) p(y | theta) / q
                     "ess_fraction_per_observation": check["ess_fraction"].tolist(),
                     "flagged_observations": np.flatnonzero(check["flagged"]).tolist(),
                     "losses": losses.mean(1)[::max(1, len(losses) // 50)].tolist()}
    return out, raw


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench.joint_lensing_gaussian",
                                description=__doc__.split("\n")[0])
    p.add_argument("out", help="output JSON")
    p.add_argument("--steps", type=int, default=1500, help="amortized training steps of q(theta | y) on fresh draws")
    p.add_argument("--fit-steps", type=int, default=1500,
                   help="further steps over the evaluated observations (reference and calibration sets)")
    p.add_argument("--groups", type=int, default=8, help="fresh observations per step")
    p.add_argument("--group-size", type=int, default=16, help="theta draws per observation (VarGrad group)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-ref", type=int, default=4, help="observations compared with the MH reference")
    p.add_argument("--mh-iter", type=int, default=20000, help="MH iterations per reference observation")
    p.add_argument("--n-cal", type=int, default=64, help="observations of the calibration")
    p.add_argument("--n-samples", type=int, default=32, help="q samples per calibration observation")
    p.add_argument("--fit-groups", type=int, default=None, help="observations per fitting step (default --groups)")
    p.add_argument("--fit-group-size", type=int, default=None, help="theta draws per observation when fitting")
    p.add_argument("--snr", type=float, default=Setup.snr)
    p.add_argument("--no-shear", action="store_true", help="fix the external shear at 0: theta = (rein, q, phi)")
    p.add_argument("--head", default="product", choices=["product", "correlated"],
                   help="q(theta | y): a mixture of product densities, or of correlated normals mapped onto the support")
    p.add_argument("--fit-set", default="all", choices=["all", "ref"],
                   help="fit over the reference and calibration observations (all) or the reference ones only")
    p.add_argument("--refine-steps", type=int, default=0,
                   help="then refine q's outputs per observation (reference and calibration sets) for this many steps")
    p.add_argument("--refine-group-size", type=int, default=16, help="theta draws per observation when refining")
    p.add_argument("--refine-lr", type=float, default=0.05, help="Adam step size on the head's outputs")
    p.add_argument("--refine-widen", type=float, default=1.0,
                   help="exploration: draws from q widened by this factor, decaying to 1 over half the steps")
    p.add_argument("--refine-beta0", type=float, default=1.0,
                   help="tempering: the likelihood's power starts here and rises geometrically to 1 over half the steps")
    p.add_argument("--refine-start", default="head", choices=["head", "smc"], help="refine from the amortized "
                   "head's outputs, or from a normal fitted to each observation's tempered-SMC particles "
                   "(pipeline.lensing.lens_smc; --head correlated only; the particles are evaluated too)")
    p.add_argument("--png", default=None, help="figure of the fitted q(theta | y) against MH on the reference set")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 0 < a.refine_beta0 <= 1 or a.refine_widen < 1:
        p.error(f"--refine-beta0 must be in (0, 1] and --refine-widen >= 1 (got {a.refine_beta0}, {a.refine_widen})")
    if a.refine_start == "smc" and a.head != "correlated":
        p.error("--refine-start smc needs --head correlated")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_threads()
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
    lens = {"center": 0.0, **({"shear_sigma": 0.0} if a.no_shear else {})}
    res = run(a.out, setup=Setup(snr=a.snr, lens=lens), steps=a.steps, fit_steps=a.fit_steps, groups=a.groups,
              group_size=a.group_size, lr=a.lr, n_ref=a.n_ref, mh_iter=a.mh_iter, n_cal=a.n_cal,
              n_samples=a.n_samples, seed=a.seed, fit_groups=a.fit_groups, fit_group_size=a.fit_group_size,
              fit_set=a.fit_set, png=a.png, head_kind=a.head,
              refine_kw={"steps": a.refine_steps, "group_size": a.refine_group_size, "lr": a.refine_lr,
                         "widen": a.refine_widen, "beta0": a.refine_beta0, "start": a.refine_start})
    smc = (res["refined"] or {}).get("smc_particles")
    for name, block in (("amortized", res["amortized"]), (f"fitted over the {a.fit_set} set", res["fitted"]),
                        ("tempered-SMC particles", smc), ("refined per observation", res["refined"])):
        print(summary(name, block) if block is not None else "")
    print(f"wall {res['seconds']:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
