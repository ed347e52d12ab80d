"""Measured accuracy of the training-free samplers on problems whose answer is known.

``python -m pipeline.bench.sampler_report [--quick] [--gmm] [--out FILE.json]`` prints (and optionally writes):

1. **Exact guidance vs its own law** — single-Gaussian prior (d = 4), linear-Gaussian likelihood (d_y = 2):
   the exact-guidance chain is linear-Gaussian; its x0 law is propagated exactly (the prior chain of the
   analytic posterior up to x_1, then the frozen prior's final denoise). Samples must match it: max mean
   error / std and the generalised eigenvalues of the sample covariance.
2. **Exact guidance vs the analytic posterior** at K = 100, 300, 1000 (exact W2 and KL between Gaussians).
3. **Every training-free method** on the same problem at K = 100, scales of DPS / DPS+CLA tuned on a
   separate seed: W2 (Gaussian moment fit) to the chain posterior and to the analytic posterior, with
   the Monte-Carlo floor (N exact samples of the reference).
4. **FPS-SMC vs particles** M = 1, 5, 20, 100 on a 2-D Gaussian and on a 1-D two-mode mixture.
5. **CLA vs exact guidance for a flat prior** (max relative difference of the scores).

All figures come from seeded runs; one thread on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time

import torch

from pipeline.bench.gmm_cases import draw_observation, make_case
from pipeline.bench.gmm_reference import chain_reference
from pipeline.diffusion.gaussian_chain import (affine_gaussian_step, final_denoise_affine, gaussian_linear_posterior,
                                               gaussian_w2, propagate_gaussian_chain)
from pipeline.diffusion.prior import GaussianMixturePrior
from pipeline.diffusion.sampling import rollout
from pipeline.io.atomic import write_json
from pipeline.metrics.distances import sliced_wasserstein
from pipeline.problems import DenseLinearProblem
from pipeline.runtime import configure_threads
from pipeline.samplers import TRAINING_FREE, make_sampler
from pipeline.samplers.exact_guidance import ExactGuidance
from pipeline.samplers.guidance import cla_score
from pipeline.samplers.tuning import OBJECTIVES, tune_on_separate_seed

# the samplers of the case's own prior (inversion brings its own smoothness prior: not compared here)
PRIOR_SAMPLERS = tuple(m for m in TRAINING_FREE if m != "inversion")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# problems and exact laws
# ----------------------------------------------------------------------------------------------
def gaussian_case(d: int = 4, m: int = 2, seed: int = 0, obs_seed: int = 100) -> dict:
    """Single-Gaussian prior N(mu, S) (d-dim), y = A x + n with m rows, sigma in [0.3, 0.6]."""
    g = torch.Generator().manual_seed(seed)
    L = 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64)
    S = L @ L.T + 0.4 * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    A = torch.randn(m, d, generator=g, dtype=torch.float64)
    sigma = 0.3 + 0.3 * torch.rand(m, generator=g, dtype=torch.float64)
    prior = GaussianMixturePrior([1.0], mu[None], S[None])
    prob = DenseLinearProblem(A, sigma)
    go = torch.Generator().manual_seed(obs_seed)
    x_true = prior.sample(1, go).float()
    y = prob.simulate(x_true, generator=go)[0]
    return {"prior": prior, "problem": prob, "y": y, "mu": mu, "S": S, "A": A, "sigma": sigma}


def analytic_gaussian_posterior(case: dict):
    """(mean, cov, log Z) of the analytic-prior posterior."""
    return gaussian_linear_posterior(case["mu"], case["S"], case["A"], case["sigma"] ** 2, case["y"])


def chain_posterior(case: dict, chain):
    """(mean, cov, log Z) of the posterior under the prior *chain* (its x0 law, then Gaussian conditioning)."""
    law = propagate_gaussian_chain(chain, case["mu"], case["S"])
    return gaussian_linear_posterior(law["x0_mean"], law["x0_cov"], case["A"], case["sigma"] ** 2, case["y"])


def exact_guidance_law(case: dict, chain):
    """Exact x0 law (mean, cov) of the exact-guidance chain for a Gaussian prior.

    With exact guidance the chain's eps is the exact noised eps of the analytic posterior N(m_p, S_p), so the
    states x_K..x_1 follow the prior chain *of the posterior*; the sample is x0 = f(x_1) with the frozen
    prior's final denoise.
    """
    pm, pc, _ = analytic_gaussian_posterior(case)
    law = propagate_gaussian_chain(chain, pm, pc)
    F, f = final_denoise_affine(chain, case["mu"], case["S"])
    return affine_gaussian_step(law["mean"][1], law["cov"][1], F, f)


def gaussian_kl(m0, S0, m1, S1) -> float:
    """KL(N(m0,S0) || N(m1,S1)) in nats."""
    d = m0.shape[0]
    L1 = torch.linalg.cholesky(S1)
    A = torch.cholesky_solve(S0, L1)
    dm = (m1 - m0)[:, None]
    quad = float((dm * torch.cholesky_solve(dm, L1)).sum())
    logdet = float(2 * torch.log(torch.diagonal(L1)).sum() - torch.logdet(S0))
    return 0.5 * (float(torch.trace(A)) + quad - d + logdet)


def moment_errors(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> dict:
    """Sample moments of ``x`` (N, d) against a Gaussian law: max |mean error|/std per coordinate, the
    generalised eigenvalues of the sample covariance w.r.t. ``cov`` (1 = exact), and the Gaussian W2."""
    x = x.double().reshape(x.shape[0], -1)
    mean, cov = mean.double(), cov.double()
    m_s, c_s = x.mean(0), torch.cov(x.T).reshape(mean.shape[0], mean.shape[0])
    z = (m_s - mean).abs() / torch.diagonal(cov).sqrt()
    L = torch.linalg.cholesky(cov)
    Li = torch.linalg.inv(L)
    ev = torch.linalg.eigvalsh(Li @ c_s @ Li.T)
    return {"mean_err_std_max": float(z.max()), "eig_ratio_min": float(ev.min()), "eig_ratio_max": float(ev.max()),
            "w2": gaussian_w2(m_s, c_s, mean, cov), "n": int(x.shape[0])}


def mc_floor_w2(mean, cov, n: int, seed: int = 0) -> float:
    """W2 between the moment fit of n exact samples and the law itself (the Monte-Carlo floor)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov.double())
    x = mean.double() + torch.randn(n, mean.shape[0], generator=g, dtype=torch.float64) @ L.T
    return gaussian_w2(x.mean(0), torch.cov(x.T).reshape(cov.shape), mean, cov)


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def exact_guidance_self_check(K: int = 100, n: int = 20000, seed: int = 1, d: int = 4, m: int = 2) -> dict:
    """Exact-guidance samples against the propagated law of the guided chain."""
    case = gaussian_case(d, m)
    chain = case["prior"].schedule.chain(K)
    s = make_sampler("exact_guidance", case["prior"], chain)
    out = s.sample(case["problem"], case["y"], n, generator=torch.Generator().manual_seed(seed))
    mean, cov = exact_guidance_law(case, chain)
    return {"K": K, **moment_errors(out.x0, mean, cov)}


def exact_guidance_vs_K(Ks=(100, 300, 1000), d: int = 4, m: int = 2) -> list[dict]:
    """Exact distances of the exact-guidance chain's x0 law to the analytic posterior, per K."""
    case = gaussian_case(d, m)
    pm, pc, _ = analytic_gaussian_posterior(case)
    rows = []
    for K in Ks:
        chain = case["prior"].schedule.chain(K)
        mean, cov = exact_guidance_law(case, chain)
        cm, cc, _ = chain_posterior(case, chain)
        rows.append({"K": K, "w2_to_analytic": gaussian_w2(mean, cov, pm, pc), "kl_to_analytic": gaussian_kl(mean, cov, pm, pc),
                     "w2_chain_posterior_to_analytic": gaussian_w2(cm, cc, pm, pc)})
    return rows


def method_errors(K: int = 100, n: int = 20000, tune_n: int = 512, tuning_seed: int = 7, seed: int = 3,
                  d: int = 4, m: int = 2, methods=None, smc_particles: int = 20, is_particles: int = 20) -> list[dict]:
    """Every training-free method on the Gaussian case: moment errors to the chain and analytic posteriors."""
    case = gaussian_case(d, m)
    prior, prob, y = case["prior"], case["problem"], case["y"]
    chain = prior.schedule.chain(K)
    cm, cc, logz_chain = chain_posterior(case, chain)
    pm, pc, logz_an = analytic_gaussian_posterior(case)
    floor = mc_floor_w2(cm, cc, n)
    rows = []
    for name in methods or PRIOR_SAMPLERS:
        opts, record = {}, None
        t0 = time.time()
        if name in ("dps", "dps_cla"):
            scale, record = tune_on_separate_seed(name, prior, chain, prob, tuning_seed, n=tune_n)
            opts = {"scale": scale, "tuning_record": record}
        elif name == "fps_smc":
            opts = {"particles": smc_particles}
        elif name == "prior_is":
            opts = {"particles": is_particles}
        out = make_sampler(name, prior, chain, **opts).sample(prob, y, n, generator=torch.Generator().manual_seed(seed))
        row = {"method": name, "K": K, "n": n, "seconds": round(time.time() - t0, 2), "nfe_per_sample": out.nfe,
               "w2_floor": floor, "logz_chain": logz_chain, "logz_analytic": logz_an}
        row.update({f"chain_{k}": v for k, v in moment_errors(out.x0, cm, cc).items() if k != "n"})
        row["w2_to_analytic"] = moment_errors(out.x0, pm, pc)["w2"]
        if out.has_trajectory_density:
            lw = (out.log_r + out.log_p_traj - out.log_q_traj).double()
            row["logz_elbo"] = float(lw.mean())
            row["logz_iw"] = float(torch.logsumexp(lw, 0) - math.log(lw.numel()))
        if record is not None:
            row["scale"] = record["scale"]
            row["tuning"] = record
        rows.append(row)
        log.info("%s done in %.1fs", name, row["seconds"])
    return rows


def tuning_objective_comparison(K: int = 100, n: int = 4000, tuning_seed: int = 7, seed: int = 3,
                                tune_n: int = 512) -> list[dict]:
    """DPS and DPS+CLA tuned with each objective (chi2, elbo, log_r) on the tuning seed, then evaluated on
    the Gaussian case: which scale each objective freezes and its W2 to the chain posterior."""
    case = gaussian_case()
    chain = case["prior"].schedule.chain(K)
    cm, cc, _ = chain_posterior(case, chain)
    rows = []
    for name in ("dps", "dps_cla"):
        for obj in OBJECTIVES:
            scale, rec = tune_on_separate_seed(name, case["prior"], chain, case["problem"], tuning_seed,
                                               n=tune_n, objective=obj)
            out = make_sampler(name, case["prior"], chain, scale=scale).sample(
                case["problem"], case["y"], n, generator=torch.Generator().manual_seed(seed))
            rows.append({"method": name, "objective": obj, "scale": scale,
                         "w2_chain": moment_errors(out.x0, cm, cc)["w2"]})
    return rows


def gmm2d_comparison(K: int = 30, n: int = 2000, n_prop: int = 200_000, seed: int = 0, tuning_seed: int = 999,
                     particles: int = 20) -> dict:
    """``bench gmm``'s 2-D case (:mod:`pipeline.bench.gmm_cases`): sliced W2 of every training-free method to the chain
    reference of one observation, with DPS / DPS+CLA tuned by each objective on the tuning seed."""
    case = make_case("2d")
    chain = case.prior.schedule.chain(K)
    y = draw_observation(case, chain, seed)[0]
    ref = chain_reference(case, chain, y, n, n_prop, seed)
    sw = lambda x: sliced_wasserstein(x.double(), ref["ref1"], 256, seed=1)  # noqa: E731
    out = {"K": K, "n": n, "floor": sliced_wasserstein(ref["ref2"], ref["ref1"], 256, seed=1), "rows": []}
    for name in PRIOR_SAMPLERS:
        objs = OBJECTIVES if name in ("dps", "dps_cla") else (None,)
        for obj in objs:
            opts = {"particles": particles} if name in ("prior_is", "fps_smc") else {}
            t0 = time.time()
            if obj is not None:
                opts["scale"], _ = tune_on_separate_seed(name, case.prior, chain, case.problem, tuning_seed, n=256,
                                                         objective=obj)
            smp = make_sampler(name, case.prior, chain, **opts).sample(case.problem, y, n,
                                                                      generator=torch.Generator().manual_seed(1))
            out["rows"].append({"method": name, "objective": obj, "scale": opts.get("scale"), "sw": sw(smp.x0),
                                "seconds": round(time.time() - t0, 1), "nfe": smp.nfe})
            log.info("gmm2d %s %s sw=%.3f", name, obj, out["rows"][-1]["sw"])
    return out


def bimodal_case():
    """1-D two-mode prior 0.5 N(-2, 0.5^2) + 0.5 N(2, 0.5^2), y = x + n, sigma = 1, y = 0.6."""
    prior = GaussianMixturePrior([0.5, 0.5], torch.tensor([[-2.0], [2.0]]), torch.tensor([[[0.25]], [[0.25]]]))
    return {"prior": prior, "problem": DenseLinearProblem(torch.tensor([[1.0]]), torch.tensor([1.0])),
            "y": torch.tensor([0.6])}


def chain_reference_1d(case, chain, n: int = 1_000_000, seed: int = 0, batch: int = 200_000):
    """Weighted chain-prior samples (x (n,), normalised weights) of the 1-D posterior under the chain."""
    g = torch.Generator().manual_seed(seed)
    xs, lws = [], []
    for start in range(0, n, batch):
        tr = rollout(case["prior"], chain, min(batch, n - start), generator=g, keep_states=False)
        xs.append(tr.x0[:, 0].double())
        lws.append(case["problem"].log_likelihood(tr.x0, case["y"]))
    return torch.cat(xs), torch.softmax(torch.cat(lws), 0)


def weighted_w1_1d(x: torch.Tensor, ref_x: torch.Tensor, ref_w: torch.Tensor) -> float:
    """W1 between an equally weighted 1-D sample and a weighted reference (integral of |F - G|)."""
    x = torch.sort(x.double()).values
    order = torch.argsort(ref_x)
    rx, rw = ref_x[order], ref_w[order]
    grid = torch.cat([x, rx]).sort().values
    Fx = torch.searchsorted(x, grid, right=True).double() / x.numel()
    cw = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(rw, 0)])
    Fr = cw[torch.searchsorted(rx, grid, right=True)]
    return float(((Fx - Fr).abs()[:-1] * torch.diff(grid)).sum())


def fps_smc_sweep(Ms=(1, 5, 20, 100), n: int = 2000, K: int = 50, seed: int = 11) -> dict:
    """FPS-SMC distance to the chain posterior as particles grow, on a 2-D Gaussian and a 1-D two-mode case."""
    out = {"gaussian_2d": [], "bimodal_1d": []}
    case = gaussian_case(2, 1)
    chain = case["prior"].schedule.chain(K)
    cm, cc, _ = chain_posterior(case, chain)
    out["gaussian_2d_floor_w2"] = mc_floor_w2(cm, cc, n)
    for M in Ms:
        s = make_sampler("fps_smc", case["prior"], chain, particles=M)
        x = s.sample(case["problem"], case["y"], n, generator=torch.Generator().manual_seed(seed + M)).x0
        out["gaussian_2d"].append({"M": M, **moment_errors(x, cm, cc)})
    bc = bimodal_case()
    chain = bc["prior"].schedule.chain(K)
    rx, rw = chain_reference_1d(bc, chain)
    out["bimodal_ref_pos_weight"] = float((rw * (rx > 0)).sum())
    g = torch.Generator().manual_seed(5)
    idx = torch.multinomial(rw.float(), n, replacement=True, generator=g)
    out["bimodal_floor_w1"] = weighted_w1_1d(rx[idx], rx, rw)
    for M in Ms:
        s = make_sampler("fps_smc", bc["prior"], chain, particles=M)
        x = s.sample(bc["problem"], bc["y"], n, generator=torch.Generator().manual_seed(seed + M)).x0[:, 0]
        out["bimodal_1d"].append({"M": M, "w1": weighted_w1_1d(x, rx, rw), "pos_weight": float((x > 0).double().mean()),
                                  "var": float(x.double().var())})
    out["bimodal_ref_var"] = float((rw * (rx - (rw * rx).sum()) ** 2).sum())
    return out


def cla_flat_check(d: int = 3) -> float:
    """max over k of max|CLA - exact| / max|exact| for a flat prior N(0, 1e8 I)."""
    flat = GaussianMixturePrior([1.0], torch.zeros(1, d), 1e8 * torch.eye(d)[None])
    case = gaussian_case(d, 3)
    chain = flat.schedule.chain(100)
    eg = ExactGuidance(flat, chain, case["problem"])
    x = 3 * torch.randn(64, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for k in range(1, chain.K + 1):
        c, e = cla_score(chain, case["problem"], case["y"], x, k), eg.score(x, case["y"], k)
        worst = max(worst, float((c - e).abs().max() / e.abs().max()))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller N (noisier numbers)")
    parser.add_argument("--out", help="write the numbers as JSON here")
    parser.add_argument("--gmm", action="store_true", help="also the 2-D case of bench gmm (slower)")
    args = parser.parse_args(argv)
    configure_threads()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n = 4000 if args.quick else 20000
    res = {"exact_self": exact_guidance_self_check(n=n), "exact_vs_K": exact_guidance_vs_K(),
           "cla_flat_max_rel_diff": cla_flat_check()}
    print("exact guidance vs its propagated law:", json.dumps(res["exact_self"]))
    for r in res["exact_vs_K"]:
        print(f"exact guidance K={r['K']}: W2 to analytic {r['w2_to_analytic']:.4g}, KL {r['kl_to_analytic']:.4g}"
              f" (chain posterior to analytic: W2 {r['w2_chain_posterior_to_analytic']:.4g})")
    print(f"CLA vs exact guidance, flat prior: max relative difference {res['cla_flat_max_rel_diff']:.3g}")
    res["methods"] = method_errors(n=n, tune_n=256 if args.quick else 512)
    print(f"{'method':16s} {'W2 chain':>9s} {'W2 anal.':>9s} {'floor':>7s} {'mean/std':>9s} {'eig min':>8s}"
          f" {'eig max':>8s} {'ELBO':>9s} {'IW':>9s} {'nfe':>5s} {'s':>6s}")
    for r in res["methods"]:
        print(f"{r['method']:16s} {r['chain_w2']:9.4f} {r['w2_to_analytic']:9.4f} {r['w2_floor']:7.4f} "
              f"{r['chain_mean_err_std_max']:9.3f} {r['chain_eig_ratio_min']:8.3f} {r['chain_eig_ratio_max']:8.3f} "
              f"{r.get('logz_elbo', float('nan')):9.3f} {r.get('logz_iw', float('nan')):9.3f} {r['nfe_per_sample']:5d} "
              f"{r['seconds']:6.1f}" + (f"  scale={r['scale']:.4g}" if "scale" in r else ""))
    print(f"log Z under the chain {res['methods'][0]['logz_chain']:.4f}, analytic {res['methods'][0]['logz_analytic']:.4f}")
    res["tuning_objectives"] = tuning_objective_comparison(n=n // 5, tune_n=256 if args.quick else 512)
    print("tuning objective -> frozen scale, W2 to the chain posterior:",
          "; ".join(f"{r['method']}/{r['objective']}: {r['scale']:.4g}, {r['w2_chain']:.3f}" for r in res["tuning_objectives"]))
    res["fps_smc"] = fps_smc_sweep(n=1000 if args.quick else 2000)
    f = res["fps_smc"]
    print(f"FPS-SMC 2-D Gaussian (MC floor W2 {f['gaussian_2d_floor_w2']:.4f}):",
          ", ".join(f"M={r['M']}: W2 {r['w2']:.4f} eig [{r['eig_ratio_min']:.3f}, {r['eig_ratio_max']:.3f}]"
                    for r in f["gaussian_2d"]))
    print(f"FPS-SMC 1-D two modes (reference P(x>0) {f['bimodal_ref_pos_weight']:.4f}, var {f['bimodal_ref_var']:.4f},"
          f" MC floor W1 {f['bimodal_floor_w1']:.4f}):",
          ", ".join(f"M={r['M']}: W1 {r['w1']:.4f} P(x>0) {r['pos_weight']:.4f} var {r['var']:.4f}" for r in f["bimodal_1d"]))
    if args.gmm:
        res["gmm2d"] = g = gmm2d_comparison()
        print(f"bench gmm 2-D case, K={g['K']}, n={g['n']}: sliced W2 to the chain reference (floor {g['floor']:.3f}):",
              "; ".join(f"{r['method']}" + (f"/{r['objective']} (scale {r['scale']:.3g})" if r["objective"] else "")
                        + f" {r['sw']:.3f}" for r in g["rows"]))
    if args.out:
        write_json(args.out, res, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
