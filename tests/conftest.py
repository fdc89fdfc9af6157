"""Without a GPU, Triton kernels run in Triton's CPU interpreter. The flag must be set before any kernel is
defined, hence here, before the package is imported by a test module."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
