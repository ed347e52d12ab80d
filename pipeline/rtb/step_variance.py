"""Likelihood-informed step variance: each reverse step's per-pixel variance narrowed by the data.

The RTB policy's step x_k -> x_{k-1} is Gaussian with the prior chain's std ``s_k`` times the head's
learned factor. Where the data constrain a pixel, the posterior's step is narrower than the prior's;
training learns that slowly, because the gradient of a per-pixel log-variance is a noisy product of a
trajectory's residual with that pixel's squared noise. This module gives the narrowing in closed form
under a diagonal Gaussian model, so the head only learns what remains:

* each source pixel of x_0 has prior variance ``tau2`` (network units), independent of the others;
* the forward process gives ``x_{k-1} = sqrt(abar) x_0 + sqrt(1 - abar) eps`` (``abar = abar_{k-1}``),
  so with ``v = (1 - abar) / abar``

      E[x_0 | x_{k-1}] = g x_{k-1} + const,  g = tau2 / (sqrt(abar) (tau2 + v)),
      Var[x_0 | x_{k-1}] = c = tau2 v / (tau2 + v);

* the data give pixel ``i`` of x_0 a Gaussian likelihood of precision ``h_i = diag(A^T A / sigma^2)_i``
  (network units: the lens operator's own ``diag_precision``).

Integrating x_0 out, the likelihood of x_{k-1} has precision ``lambda = g^2 h / (1 + h c)`` per pixel,
and its Gaussian product with a step of std ``s`` has std ``s / sqrt(1 + s_k^2 lambda)`` (``s_k`` the
prior chain's std: the product is taken with the prior's step, then the head's factor applies). The
policy's mean is left as the network gives it. With ``mode="tweedie"`` the
prior variance is per pixel and per state, ``x0hat^2 + tau2`` (:func:`local_tau2`; ``tau2`` is then the
floor); with ``mode="galaxy"`` it is one value per sample, the mean over pixels of ``x0hat^2`` plus
``tau2`` (:func:`galaxy_tau2`): prior galaxies span three decades in mean square brightness, so one
prior-wide value over-narrows the faint ones and under-narrows the bright.

With ``mean_shift`` the step's mean moves by the same Gaussian product (:func:`mean_shift`): the data's
pull on x_{k-1}, ``g grad / (1 + h c)`` with ``grad = A^T (y - A x0hat) / sigma^2`` at the prior's
Tweedie estimate x0hat of x_k, times the narrowed variance. For a diagonal operator and a Gaussian
prior this is the exact posterior step's mean. Where the PSF and the lens couple pixels, a per-pixel
step of that size overshoots the smooth directions (their curvature exceeds the diagonal ``h``), so
the shift is damped by ``h / h_row`` with ``h_row = |A|^T diag(mask / sigma^2) |A| 1``, the row sums that
bound every eigenvalue of ``A^T A / sigma^2`` (Gershgorin): the step then never moves x0hat past the
data's optimum along any direction. With ``cg_iters = n > 0`` the shift is instead the Gaussian product
with the whole operator: ``s^2 g A^T W (I + W A diag(alpha) A^T W)^-1 W (y - A x0hat)`` with
``W = diag(mask / sigma)``, ``alpha = c + g^2 s^2`` and ``s`` the prior's step std, solved by n
conjugate-gradient iterations from zero (:func:`cg_mean_shift`); for a diagonal operator it equals the
undamped diagonal form. For a Gaussian prior whose reverse step has variance ``s^2`` it is the exact
posterior step's mean; the chain's own reverse std stands in for ``s`` otherwise.
The narrowed std is used both to draw and to score
(log q), so log q, the ELBO and log Z stay exact for what is sampled; only how close the step is to the
posterior's rests on the approximation (pixels are not independent: the PSF and the lens couple them).
"""

from __future__ import annotations

import torch


MODES = ("prior", "tweedie", "galaxy")


def gain_and_variance(abar_prev, tau2, like: torch.Tensor, x0_var=None):
    """(g, c) of the model: E[x_0 | x_{k-1}] = g x_{k-1} + const and Var[x_0 | x_{k-1}] = c (network
    units^2), in ``like``'s dtype and device; ``abar_prev`` = abar_{k-1} and ``tau2`` floats or tensors.
    ``x0_var``: a variance to use as c instead (e.g. :func:`chain_x0_variance`)."""
    tau2 = torch.as_tensor(tau2, dtype=like.dtype, device=like.device)
    ab = torch.as_tensor(abar_prev, dtype=like.dtype, device=like.device)
    v = (1.0 - ab) / ab
    c = tau2 * v / (tau2 + v) if x0_var is None else torch.as_tensor(x0_var, dtype=like.dtype, device=like.device)
    return tau2 / (ab.sqrt() * (tau2 + v)), c


def chain_x0_variance(chain, j, tau2, like: torch.Tensor) -> torch.Tensor:
    """The model's variance of the chain's own sample x_0 = f(x_1) (the Tweedie estimate at x_1, with no noise
    after it) given the state x_j, network units^2: ``sum_{i=2..j} g_{i-1}^2 s_i^2``, with g_{i-1} the model's
    gain at abar_{i-1} (:func:`gain_and_variance`) and s_i the chain's reverse std of step i; 0 at j = 1.
    For a Gaussian prior N(m, tau2 I) with its exact eps this is exact: each step adds its noise s_i^2 times
    the squared gain of f(x_1) on x_{i-1}. ``j``: an int or a (B,) tensor of chain indices (rows of ``like``);
    ``tau2``: a float or a tensor broadcastable to ``like``. Returns a tensor broadcastable to ``like``."""
    def term(i):
        g, _ = gain_and_variance(float(chain.abar[i - 1]), tau2, like)
        return g * g * float(chain.reverse_var[i])

    if not isinstance(j, torch.Tensor):
        out = torch.zeros((), dtype=like.dtype, device=like.device)
        for i in range(2, int(j) + 1):
            out = out + term(i)
        return out
    terms = torch.stack([torch.zeros_like(like)] + [term(i).expand_as(like) for i in range(2, chain.K + 1)])
    total = torch.cumsum(terms, 0)                      # row i - 1: the sum up to step i
    rows = torch.arange(like.shape[0], device=like.device)
    return total[(j.to(like.device) - 1).clamp_min(0), rows]


def data_precision_on_state(h: torch.Tensor, abar_prev, tau2, x0_var=None) -> torch.Tensor:
    """Per-pixel likelihood precision on x_{k-1}, ``g^2 h / (1 + h c)`` (network units^-2).

    ``h``: diag(A^T A / sigma^2) on the source grid (network units^-2), any shape; ``abar_prev``:
    abar_{k-1} in (0, 1], a float or a tensor broadcastable to ``h``; ``tau2`` > 0: the prior's per-pixel
    variance of x_0 (network units^2), a float or a tensor broadcastable to ``h``. Returns a tensor shaped
    like ``h`` (float64 where ``h`` is)."""
    tau2 = torch.as_tensor(tau2, dtype=h.dtype, device=h.device)
    if not bool((tau2 > 0).all()):
        raise ValueError(f"tau2 must be > 0, got {tau2.min().item()!r}")
    g, c = gain_and_variance(abar_prev, tau2, h, x0_var)
    return g * g * h / (1.0 + h * c)


def narrowing(h: torch.Tensor, abar_prev, step_std, tau2, x0_var=None) -> torch.Tensor:
    """Factor ``(1 + s_k^2 lambda)^(-1/2)`` in (0, 1] on a step's std (dimensionless), shaped like ``h``.

    ``step_std``: the prior chain's std ``s_k`` of the step (network units), a float or a tensor
    broadcastable to ``h``; the rest as in :func:`data_precision_on_state`."""
    s2 = torch.as_tensor(step_std, dtype=h.dtype, device=h.device) ** 2
    return (1.0 + s2 * data_precision_on_state(h, abar_prev, tau2, x0_var)).rsqrt()


def mean_shift(grad: torch.Tensor, h: torch.Tensor, h_row: torch.Tensor, abar_prev, step_std, tau2,
               x0_var=None) -> torch.Tensor:
    """The data's pull on the step's mean, ``step_std^2 g grad h / ((1 + h c) h_row)`` (network units).

    ``grad``: grad_x0 log p(y | x0) at the prior's Tweedie estimate of x_k (network units^-1);
    ``h``, ``h_row``: diag(A^T A / sigma^2) and the row sums of |A|^T diag(mask / sigma^2) |A| (network
    units^-2, ``h_row >= h``; equal for a diagonal operator); ``step_std``: the step's std after the
    narrowing (network units); ``abar_prev``, ``tau2`` as in :func:`data_precision_on_state`. Without
    the damping ``h / h_row`` this is the mean of the Gaussian product of N(mean, step_std^2) with the
    likelihood of x_{k-1} under the diagonal model, linearised at the prior's mean."""
    g, c = gain_and_variance(abar_prev, tau2, h, x0_var)
    damp = torch.where(h_row > 0, h / h_row.clamp_min(torch.finfo(h.dtype).tiny), torch.zeros_like(h))
    return torch.as_tensor(step_std, dtype=h.dtype, device=h.device) ** 2 * g * grad * damp / (1.0 + h * c)


def cg_solve(problem, x0hat: torch.Tensor, y, alpha: torch.Tensor, iters: int):
    """``(v, r)``: ``r = W (y - forward(x0hat))`` and ``v``, ``iters`` conjugate-gradient iterations from zero
    on ``(I + W A diag(alpha) A^T W) v = r``, one system per row (both image-shaped, units of sigma).
    ``problem``: ``whitened_residual``, ``whitened_A``, ``whitened_AT`` (W = diag(mask / sigma)); ``x0hat``
    (B, *x_shape): the prior's Tweedie estimate; ``alpha``: a variance of x_0 under the model (network
    units^2), broadcastable to x0hat. The system's matrix is the identity plus a positive semi-definite
    term, so every iterate is defined, the error falls monotonically in that matrix's norm and
    ``r . v`` grows towards ``r^T (I + W A diag(alpha) A^T W)^-1 r``."""
    def op(w):
        return w + problem.whitened_A(alpha * problem.whitened_AT(w).reshape(x0hat.shape))

    def dot(a, b):
        return (a * b).flatten(1).sum(1).reshape(-1, *[1] * (a.ndim - 1))

    r = problem.whitened_residual(x0hat, y)
    v, res, p = torch.zeros_like(r), r, r
    rs = dot(res, res)
    for _ in range(int(iters)):
        ap = op(p)
        step = rs / dot(p, ap).clamp_min(torch.finfo(r.dtype).tiny)
        v, res = v + step * p, res - step * ap
        rs_new = dot(res, res)
        p, rs = res + rs_new / rs.clamp_min(torch.finfo(r.dtype).tiny) * p, rs_new
    return v, r


def cg_mean_shift(problem, x0hat: torch.Tensor, y, alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """``A^T W (I + W A diag(alpha) A^T W)^-1 W (y - forward(x0hat))`` by :func:`cg_solve` (network
    units^-1; times ``s^2 g`` it is the step's mean shift); ``alpha = c + g^2 s^2`` here, the variance
    of x_0 given x_{k-1} under the model; the iterate's norm grows towards the solution's."""
    return problem.whitened_AT(cg_solve(problem, x0hat, y, alpha, iters)[0]).reshape(x0hat.shape)


def tweedie_x0(x: torch.Tensor, eps: torch.Tensor, abar) -> torch.Tensor:
    """The prior's Tweedie estimate ``(x - sqrt(1 - abar) eps) / sqrt(abar)`` of x_0 at x_k (``abar`` =
    abar_k, broadcastable to x; ``eps``: the prior's eps there), detached."""
    ab = torch.as_tensor(abar, dtype=x.dtype, device=x.device)
    return ((x - (1.0 - ab).sqrt() * eps) / ab.sqrt()).detach()


def prior_variance(mode: str, tau2: float, x: torch.Tensor, eps: torch.Tensor, abar):
    """The prior variance the model uses at x_k: ``tau2`` (``prior``), :func:`local_tau2` (``tweedie``) or
    :func:`galaxy_tau2` (``galaxy``), network units^2."""
    if mode == "tweedie":
        return local_tau2(x, eps, abar, tau2)
    if mode == "galaxy":
        return galaxy_tau2(x, eps, abar, tau2)
    if mode != "prior":
        raise ValueError(f"step variance mode must be one of {MODES}, got {mode!r}")
    return tau2


def local_tau2(x: torch.Tensor, eps: torch.Tensor, abar, floor: float) -> torch.Tensor:
    """Per-pixel prior variance from the state itself: ``x0hat^2 + floor`` (network units^2), with
    ``x0hat = (x - sqrt(1 - abar) eps) / sqrt(abar)`` the prior's Tweedie estimate at x_k (``abar`` =
    abar_k, broadcastable to x; ``eps``: the prior's eps there). A function of x_k only, so a step whose
    std uses it stays a Gaussian in x_{k-1} with exact log q. Where the estimate is bright the prior's
    variance there is large, where it is faint (a faint galaxy, the background) small, which a single
    prior-wide ``tau2`` cannot follow."""
    return tweedie_x0(x, eps, abar) ** 2 + floor


def galaxy_tau2(x: torch.Tensor, eps: torch.Tensor, abar, floor: float) -> torch.Tensor:
    """One prior variance per sample: the mean over its pixels of ``x0hat^2`` plus ``floor`` (network
    units^2), shaped (B, 1, ..., 1) to broadcast against ``x`` (B, ...); ``x0hat`` as in
    :func:`local_tau2`. For x_0 itself this is the galaxy's mean square brightness, which is what the
    per-pixel variance of prior draws of that brightness scales with; a function of x_k only, so log q
    stays exact."""
    x0sq = local_tau2(x, eps, abar, 0.0)
    return x0sq.mean(dim=tuple(range(1, x.ndim)), keepdim=True) + floor


def likelihood_step(problem, x, y, eps, abar_k, abar_prev, step_std, tau2: float, mode: str = "prior", *,
                    shift: bool = False, cg_iters: int = 0, chain_x0=None):
    """(narrowing factor on the prior's step std, mean offset or None) at the states x (B, ...) of step k.

    ``problem``: the observation's inverse problem (``diag_precision``; with ``shift`` also
    ``row_precision`` and ``grad_log_likelihood``) and ``y`` its data; ``eps``: the prior's eps at x;
    ``abar_k``, ``abar_prev``: abar_k and abar_{k-1} broadcastable to x; ``step_std``: the prior
    chain's std s_k; ``tau2`` and ``mode`` as in :func:`prior_variance`. Both outputs are functions of
    x_k and y only (detached), so a step that uses them is Gaussian with exact log q. ``cg_iters`` > 0: the
    shift by :func:`cg_mean_shift` (whitened operator) instead of the damped diagonal form. ``chain_x0``:
    ``(chain, k)``, the model's x_0 is the chain's own f(x_1), whose variance given x_{k-1} is
    :func:`chain_x0_variance` (None: the forward process's x_0, variance c)."""
    if problem is None or not hasattr(problem, "diag_precision"):
        raise ValueError("the likelihood-informed step needs the observation's problem (with diag_precision)")
    h = problem.diag_precision(y).to(x.dtype).reshape(x.shape)
    t2 = prior_variance(mode, tau2, x, eps, abar_k)
    x0_var = None if chain_x0 is None else chain_x0_variance(chain_x0[0], chain_x0[1] - 1, t2, x)
    narrow = narrowing(h, abar_prev, step_std, t2, x0_var)
    if not shift:
        return narrow, None
    if cg_iters > 0:
        with torch.no_grad():
            g, c = gain_and_variance(abar_prev, t2, x, x0_var)
            s2 = torch.as_tensor(step_std, dtype=x.dtype, device=x.device) ** 2
            pull = cg_mean_shift(problem, tweedie_x0(x, eps, abar_k), y, c + g * g * s2, cg_iters)
            return narrow, (s2 * g * pull).to(x.dtype)
    if not hasattr(problem, "row_precision"):
        raise ValueError(f"the step mean shift needs the problem's row_precision ({type(problem).__name__} has none)")
    with torch.no_grad():
        grad = problem.grad_log_likelihood(tweedie_x0(x, eps, abar_k), y).to(x.dtype).reshape(x.shape)
        h_row = problem.row_precision(y).to(x.dtype).reshape(x.shape)
        return narrow, mean_shift(grad, h, h_row, abar_prev, step_std * narrow, t2, x0_var)
