"""The CUDA extension rlhf_ops._C, where it is built (CI builds it on a CPU-only machine): every op
of csrc/ is registered under torch.ops.rlhf_ops_cuda with a CUDA kernel, and the cuda backend
refuses non-CUDA tensors with a clear error."""
import pytest
import torch

import rlhf_ops as ro

OPS = ["cross_entropy_fwd", "cross_entropy_bwd", "attention_fwd", "attention_bwd",
       "pairwise_reward_fwd", "kl_fwd", "kl_bwd"]


@pytest.fixture(scope="module")
def extension():
    try:
        import rlhf_ops._C  # noqa: F401
    except ImportError as e:
        pytest.skip(f"CUDA extension not built (RLHF_OPS_BUILD_CUDA=1 builds it): {e}")


@pytest.mark.parametrize("op", OPS)
def test_op_registered_with_a_cuda_kernel(extension, op):
    name = f"rlhf_ops_cuda::{op}"
    assert name in torch._C._dispatch_get_all_op_names()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
    assert hasattr(torch.ops.rlhf_ops_cuda, op)


def test_cuda_backend_rejects_cpu_tensors(extension):
    x, t = torch.randn(2, 5), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ro.cross_entropy(x, t, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ro.pairwise_reward_loss(torch.randn(2, 3), torch.tensor([[0, 1, 2], [2, 1, 0]]), backend="cuda")
