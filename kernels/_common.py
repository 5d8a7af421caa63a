"""Small Triton helpers shared by the kernel files."""
import triton
import triton.language as tl


@triton.jit
def to_acc(x, ACC_FP64: tl.constexpr):
    """Cast to the accumulation dtype: fp64 when the inputs are fp64, else fp32.
    (One return statement: Triton's GPU front end rejects returns of different types.)"""
    if ACC_FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y
