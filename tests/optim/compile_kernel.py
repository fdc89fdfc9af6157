"""Build SPAM's fused kernel for an H100 (sm_90) with Triton's compiler and ptxas, no GPU needed, and print as
JSON cuobjdump's resource usage and the count of each global load/store instruction and of each square root,
division, reciprocal and fused multiply-add instruction in the PTX (per thread).
Run in a process without TRITON_INTERPRET (the kernel must be a JIT function):

    python tests/optim/compile_kernel.py float32 dense aligned
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from spamopt.optim import fused

POINTERS = ("param_ptrs", "grad_ptrs", "exp_avg_ptrs", "exp_avg_sq_ptrs", "mask_ptrs", "chunk_start", "numels")
STEP_VALUES = ("keep_ptr", "decay_ptr", "reset_ptr", "threshold_ptr", "unscale_ptr")
KINDS = {**dict.fromkeys(POINTERS, "*i64"), **dict.fromkeys(STEP_VALUES, "*fp32"), "chunk_tensor": "*i32",
         "clip_counts": "*i32", "step_sizes": "*fp32", "beta1": "fp32", "beta2": "fp32", "eps": "fp32",
         "kept_per_stratum": "i32"}


def main(dtype_name: str, layout: str, alignment: str) -> None:
    element = fused._TL_DTYPES[getattr(torch, dtype_name)]
    constants = {"PARAM": element, "GRAD": element, "MOMENT": fused._TL_DTYPES[torch.float32],
                 "SPARSE": layout == "sparse", "SKIP": True, "MAXIMIZE": False, "COUNT_CLIPS": True,
                 "ALIGNED": alignment == "aligned", "BLOCK": fused.CHUNK}
    kernel = fused._spam_kernel
    names = kernel.arg_names
    source = ASTSource(kernel, {n: KINDS.get(n, "constexpr") for n in names},
                       constexprs={(names.index(k),): v for k, v in constants.items()})
    options = {"num_warps": fused.NUM_WARPS, **fused.COMPILE_OPTIONS}  # as fused_spam launches it
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    accesses = collections.Counter(re.findall(r"\b((?:ld|st)\.global[\w.]*)", compiled.asm["ptx"]))
    rounding = collections.Counter(re.findall(r"\b((?:sqrt|div|rcp|fma)\.[\w.]*)", compiled.asm["ptx"]))
    print(json.dumps({"usage": next(line.strip() for line in usage.splitlines() if "REG:" in line),
                      "accesses": accesses, "arithmetic": rounding, "threads": 32 * fused.NUM_WARPS,
                      "block": fused.CHUNK}))


if __name__ == "__main__":
    main(*sys.argv[1:])
