"""Benchmarks of rlhf_ops against eager PyTorch, torch.compile and installed peers.

bench imports the public ``rlhf_ops`` API; nothing imports bench. On a machine without a GPU the
Triton backend can only run under the interpreter, so TRITON_INTERPRET=1 is set here before
anything imports triton (as tests/conftest.py does); numbers from such runs are smoke, never speed.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
