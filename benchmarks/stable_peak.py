"""Stable-SPAM's compiled step taking each tensor's max|g| from the non-finite check (the default) against the
same kernel finding max|g| in a pass of its own, beside torch's fused AdamW, in one process.

With ``skip_nonfinite=True`` the step already reads every gradient once to decide whether to skip (``aminmax``
per tensor); the largest magnitude falls out of that read, and AdaClip and AdaGN need exactly it. The kernel
that finds it itself makes three passes over the gradient (max, norm, update) after the check's; the default
makes two. The variant withholds the check's peaks (the kernel's fallback, used when nothing measured them:
``skip_nonfinite=False`` or a GradScaler's ``found_inf``). Bit-identical results (tested). LLaMA-60M shapes,
interleaved steps, medians; writes JSON.

    python benchmarks/stable_peak.py --threads 2
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from spamopt import StableSPAM

from side_by_side import arguments, interleaved_medians, llama_parameters, report


class OwnMaxStableSPAM(StableSPAM):
    """StableSPAM whose compiled kernel finds max|g| itself: the non-finite check's peaks are withheld."""

    def _keep_and_peaks(self, batches, found_inf, with_peaks=True):
        return super()._keep_and_peaks(batches, found_inf, with_peaks=False)[0], {}


def main() -> None:
    args = arguments(__doc__, "results/stable_peak.json", repeats=9)
    params = [p for _, p in llama_parameters(args.model)]
    optimizers = {
        "adamw_fused": torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0, fused=True),
        "stable_spam_compiled": StableSPAM(params, lr=1e-3, compiled=True),
        "stable_spam_compiled_own_max": OwnMaxStableSPAM(params, lr=1e-3, compiled=True),
    }
    median = interleaved_medians(optimizers, lambda name: nullcontext(), args.repeats)
    report(median, "adamw_fused", {"stable_spam_compiled": "stable_spam_compiled_own_max"},
           "check's max vs own pass", args.out, {"model": args.model, "threads": args.threads,
                                                  "repeats": args.repeats})


if __name__ == "__main__":
    main()
