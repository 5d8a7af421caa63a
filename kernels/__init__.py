"""Triton kernels of rlhf_ops, one module per op family (installed as ``rlhf_ops.kernels``).

Kernel modules import triton and nothing from the package above them; launchers take tensors
that the op layer has validated and return or fill tensors, with no host synchronisation.
"""
from . import _compat  # noqa: F401,E402  (Triton-version fixes, before any kernel runs)
