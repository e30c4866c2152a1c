"""Test configuration shared by every test module.

Without a GPU, Triton kernels (ours and the upstream reference) run under Triton's
interpreter on CPU tensors. The variable must be set before anything imports triton.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
