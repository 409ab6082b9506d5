"""Closed-form optimal denoisers: with them every sampler is a chain with a known answer."""
import math
import numpy as np
import torch

from ddpm_reference import ddpm


class GaussianOracle:
    """Data x0 ~ N(mu, s^2 I). E[x0 | x_t] = mu + g (x_t - sqrt(ab) mu), g = sqrt(ab) s^2 / (ab s^2 + 1 - ab),
    returned in the diffusion's parameterisation (plus a constant variance channel for learned_range)."""

    def __init__(self, diffusion: ddpm.Diffusion, mu: float, s: float, var_out: float = 0.0):
        self.d, self.mu, self.s, self.var_out = diffusion, mu, s, var_out

    def gain(self, ab):
        return np.sqrt(ab) * self.s ** 2 / (ab * self.s ** 2 + 1 - ab)

    def x0_hat(self, x_t, t):
        ab = self.d.alphas_cumprod[t.cpu().numpy()]
        g = torch.as_tensor(self.gain(ab), dtype=x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        sab = torch.as_tensor(np.sqrt(ab), dtype=x_t.dtype).reshape(g.shape)
        return self.mu + g * (x_t - sab * self.mu)

    def __call__(self, x_t, t):
        out = self.d.from_x0(x_t, t, self.x0_hat(x_t, t), self.d.parameterization)
        if self.d.variance == "learned_range":
            out = torch.cat([out, torch.full_like(out, self.var_out)], dim=1)
        return out

    def exact_moments(self, plan: ddpm.Plan, m: float = 0.0, v: float = 1.0):
        """Mean and variance of the plan's output from x ~ N(m, v). Every row is affine in x, in the earlier
        x0 predictions and in its own z, and x0 = g x + c: so x stays an affine function of independent
        standard normals (x_init and the z's), tracked as its mean and the coefficients on them."""
        mean, coef = m, np.zeros(len(plan) + 1)
        coef[0] = np.sqrt(v)  # source 0: x_init; source k + 1: the z of row k
        earlier = [(0.0, np.zeros_like(coef))] * plan.memory
        for k in range(len(plan)):
            ab = self.d.alphas_cumprod[plan.t[k]]
            g = self.gain(ab)
            if plan.clip:
                raise ValueError("clipping is not affine: exact moments need clip=False")
            x0 = (g * mean + self.mu * (1 - g * np.sqrt(ab)), g * coef)
            mean = plan.mean_x0[k] * x0[0] + plan.mean_xt[k] * mean
            coef = plan.mean_x0[k] * x0[1] + plan.mean_xt[k] * coef
            for w, (em, ec) in zip(plan.mean_x0_prev[k], earlier):
                mean, coef = mean + w * em, coef + w * ec
            sigma = plan.sigma[k]
            if plan.learned[k]:
                frac = (self.var_out + 1) / 2
                sigma = np.exp(0.5 * (frac * plan.log_var_max[k] + (1 - frac) * plan.log_var_min[k]))
            coef = coef.copy()
            coef[k + 1] = sigma if plan.add_noise[k] else 0.0
            earlier = [x0, *earlier[:-1]] if earlier else earlier
        return mean, float((coef ** 2).sum())


class MixtureOracle:
    """Data x0 ~ p N(m, s^2) + (1 - p) N(-m, s^2) per dimension; E[x0 | x_t] by Bayes over components."""

    def __init__(self, diffusion: ddpm.Diffusion, m: float, s: float, p: float):
        self.d, self.m, self.s, self.p = diffusion, m, s, p

    def __call__(self, x_t, t):
        ab = torch.as_tensor(self.d.alphas_cumprod[t.cpu().numpy()], dtype=torch.float64)
        ab = ab.reshape(-1, *[1] * (x_t.ndim - 1))
        x = x_t.double()
        var = ab * self.s ** 2 + 1 - ab
        # posterior odds of the +m component: the Gaussian likelihood ratio of x_t under the two components
        w1 = torch.sigmoid(np.log(self.p / (1 - self.p)) + 2 * ab.sqrt() * self.m * x / var)
        g = ab.sqrt() * self.s ** 2 / var
        x0 = sum(w * (c + g * (x - ab.sqrt() * c)) for w, c in ((w1, self.m), (1 - w1, -self.m)))
        return self.d.from_x0(x, t, x0, self.d.parameterization).to(x_t.dtype)


class ClassOracle:
    """Labelled data: class y ~ priors, then x0 | y ~ N(m_y, s^2 I) (the whole image shares the class). The
    optimal conditional denoiser of class y is GaussianOracle(m_y, s); the unconditional one (the null
    label, len(means)) weighs them by the exact p(y | x_t), whose logits are logits(x_t, t)."""

    def __init__(self, diffusion: ddpm.Diffusion, means, s: float, priors):
        self.d, self.means, self.s, self.priors = diffusion, list(means), s, np.asarray(priors, dtype=np.float64)
        self.classes = [GaussianOracle(diffusion, m, s) for m in self.means]

    def logits(self, x_t, t):
        """log p(y | x_t) up to a constant per example: log prior + sum over pixels of log N(x_t; sqrt(ab) m_y, v)."""
        ab = torch.as_tensor(self.d.alphas_cumprod[t.cpu().numpy()], dtype=x_t.dtype).reshape(-1, *[1] * (x_t.ndim - 1))
        var = ab * self.s ** 2 + 1 - ab
        return torch.stack([math.log(p) - (((x_t - ab.sqrt() * m) ** 2) / (2 * var)).flatten(1).sum(1)
                            for p, m in zip(self.priors, self.means)], dim=1)

    def __call__(self, x_t, t, y=None):
        null = len(self.means)
        y = torch.full((len(x_t),), null, dtype=torch.long) if y is None else y
        outs = torch.stack([c(x_t, t) for c in self.classes])  # [K, B, ...] eps of each class's denoiser
        weights = torch.softmax(self.logits(x_t.double(), t), dim=1).to(x_t.dtype)  # [B, K]
        # eps is affine in the denoised x0 with the same x_t, so the posterior mixture of x0 is that of eps
        mixed = torch.einsum("bk,kb...->b...", weights, outs)
        pick = outs[y.clamp(max=null - 1), torch.arange(len(x_t))]
        return torch.where((y == null).reshape(-1, *[1] * (x_t.ndim - 1)), mixed, pick)
