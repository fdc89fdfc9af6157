"""Float64 oracle for Stable-SPAM written from its specification (the paper's equations with the released code's
accidents repaired, and ``reference_compat``: the released code's one counter, late reset and unclamped σ),
independently of spamopt's implementation: numpy only, the spec's counters kept literally."""

from __future__ import annotations

import math

import numpy as np


class ReferenceStableSPAM:
    def __init__(self, params, *, lr, betas, eps, weight_decay, gamma1, gamma2, gamma3, reset_interval,
                 total_steps=None, eta_min=0.5, adaclip="scale", adagn=True, reference_compat=False):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.g1 = betas[0] if gamma1 == -1 else gamma1  # -1: "use β1"
        self.g2, self.g3 = gamma2, gamma3
        self.interval, self.total, self.eta, self.mode = reset_interval, total_steps, eta_min, adaclip
        self.compat, self.adagn = reference_compat, adagn
        size = len(self.params)
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.k, self.n = [0] * size, [0] * size  # Adam count, statistics count (compat: k is the one counter)
        self.M, self.a, self.b = [0.0] * size, [0.0] * size, [0.0] * size
        self.t = 0
        self.clipped = 0  # coordinates AdaClip changed, to prove a test exercises it

    def sigma(self, tau):
        if self.total is None:
            return 1.0
        tau = tau if self.compat else min(tau, self.total)
        return self.eta + (1 - self.eta) * (1 + math.cos(math.pi * tau / (self.total + 1))) / 2

    def step(self, grads):
        tau = self.t + 1
        sigma = self.sigma(tau)
        reset = self.interval > 0 and tau % self.interval == 0
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = np.array(grad, dtype=np.float64)
            p = self.params[i]
            p *= 1 - self.lr * self.wd
            if self.compat:
                self.k[i] += 1
                count = self.k[i]
            else:
                self.n[i] += 1
                count = self.n[i]
            if self.mode != "off":  # AdaClip ("off": the ablations without it keep no statistics for it)
                mu = np.abs(g).max()
                self.M[i] = self.g3 * self.M[i] + (1 - self.g3) * mu
                bound = self.M[i] / (1 - self.g3 ** count)
                spiked = np.abs(g) > bound
                self.clipped += int(spiked.sum())
                if self.mode == "scale":
                    g[spiked] = g[spiked] * bound / mu
                else:
                    g[spiked] = np.sign(g[spiked]) * bound
            if self.adagn:
                r = math.sqrt(float((g * g).sum()))
                g1 = self.g1 * sigma
                self.a[i] = g1 * self.a[i] + (1 - g1) * r
                self.b[i] = self.g2 * self.b[i] + (1 - self.g2) * r * r
                if r > 0:
                    a_hat = self.a[i] / (1 - g1 ** count)
                    b_hat = self.b[i] / (1 - self.g2 ** count)
                    g = g / r * a_hat / (math.sqrt(b_hat) + self.eps)
            # MoRet and Adam
            m, v = self.m[i], self.v[i]
            if reset and self.compat:
                self.k[i] = 1  # the counter restarts; the old moments are still updated and used this step
            elif reset:
                m[...] = 0.0
                v[...] = 0.0
                self.k[i] = 0
            if not self.compat:
                self.k[i] += 1
            k = self.k[i]
            beta1 = self.beta1 * sigma
            m[...] = beta1 * m + (1 - beta1) * g
            v[...] = self.beta2 * v + (1 - self.beta2) * g * g
            p -= self.lr / (1 - beta1 ** k) * m / (np.sqrt(v) / math.sqrt(1 - self.beta2 ** k) + self.eps)
            if reset and self.compat:  # the zeros stored at the reset step are first used on the next one
                m[...] = 0.0
                v[...] = 0.0
        self.t += 1
