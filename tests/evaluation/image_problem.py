"""A small linear image problem for calibration tests: y (ni, ni) = M vec(x) + noise for sources x (ns, ns)."""

import torch

from pipeline.problems import LinearInverseProblem


class ImageProblem(LinearInverseProblem):
    """y (ni, ni) = M vec(x) + noise, M of shape (ni * ni, ns * ns); ``sigma`` a scalar or an (ni, ni) map."""

    def __init__(self, M, sigma, ns: int, ni: int):
        super().__init__(torch.as_tensor(sigma, dtype=torch.float32).expand(ni, ni).clone())
        self.M = torch.as_tensor(M, dtype=torch.float64)
        self.ns, self.ni = ns, ni
        self.x_shape, self.y_shape = (ns, ns), (ni, ni)

    def A(self, x):
        return (x.reshape(x.shape[0], -1) @ self.M.to(x.dtype).T).reshape(x.shape[0], self.ni, self.ni)

    def AT(self, r):
        return (r.reshape(r.shape[0], -1) @ self.M.to(r.dtype)).reshape(r.shape[0], self.ns, self.ns)
