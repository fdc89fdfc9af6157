"""Float64 oracle for SPAM written from the spec (docs/algorithm.md), independently of spamopt's implementation.

It keeps the spec's counters literally (global step ``t`` from 0, warmup counter ``c`` from ``N + 1``,
per-parameter ``k``), stores dense numpy moments, and for sparse parameters uses only the coordinates of the
mask it is given. It shares no code with ``spamopt``.
"""

from __future__ import annotations

import math

import numpy as np


class ReferenceSPAM:
    def __init__(self, params, *, lr, betas, eps, weight_decay, threshold, reset_interval, warmup_steps,
                 clip_delay, bias_correction_reset=False, maximize=False, reference_compat=False):
        self.params = [np.array(p, dtype=np.float64) for p in params]
        self.lr, (self.beta1, self.beta2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.theta, self.interval, self.warmup, self.delay = threshold, reset_interval, warmup_steps, clip_delay
        self.bias_correction_reset, self.maximize = bias_correction_reset, maximize
        self.reference_compat = reference_compat  # clip coordinates with v = 0 (to 0), as the released code
        self.m = [np.zeros_like(p) for p in self.params]
        self.v = [np.zeros_like(p) for p in self.params]
        self.k = [0 for _ in self.params]
        self.t = 0
        self.c = warmup_steps + 1
        self.clipped = 0  # coordinates clipped so far, to prove the tests exercise clipping

    def multiplier(self) -> float:
        c, n = self.c, self.warmup
        if 0 <= c < n:
            return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (n + 1))) / 2.0
        return 1.0

    def step(self, grads, masks=None):
        """``grads``: list of arrays or None (no gradient); ``masks``: list of boolean arrays or None (dense)."""
        tau = self.t + 1
        s = self.multiplier()
        masks = masks or [None] * len(self.params)
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            g = -np.array(grad, dtype=np.float64) if self.maximize else np.array(grad, dtype=np.float64)
            sel = np.ones(g.shape, dtype=bool) if masks[i] is None else masks[i]
            if self.interval > 0 and tau % self.interval == 0:
                self.m[i][...] = 0.0
                self.v[i][...] = 0.0
                if self.bias_correction_reset:
                    self.k[i] = 0
            self.k[i] += 1
            m, v, p = self.m[i], self.v[i], self.params[i]
            if self.theta > 0 and tau >= self.delay and (self.interval == 0 or tau % self.interval >= self.delay):
                spike = (g * g > self.theta * v) & sel
                if not self.reference_compat:
                    spike &= v > 0
                g[spike] = np.sign(g[spike]) * np.sqrt(self.theta * v[spike])
                self.clipped += int(spike.sum())
            m[sel] = self.beta1 * m[sel] + (1 - self.beta1) * g[sel]
            v[sel] = self.beta2 * v[sel] + (1 - self.beta2) * g[sel] ** 2
            alpha = self.lr * math.sqrt(1 - self.beta2 ** self.k[i]) / (1 - self.beta1 ** self.k[i])
            p[sel] = p[sel] - alpha * s * m[sel] / (np.sqrt(v[sel]) + self.eps)
            p[...] = p - self.lr * self.wd * p
        self.t += 1
        self.c += 1
        if self.interval > 0 and (self.t + 1) % self.interval == 0:
            self.c = 0
            for i, mask in enumerate(masks):
                if mask is not None:  # a new subset starts from zero moments
                    self.m[i][...] = 0.0
                    self.v[i][...] = 0.0
