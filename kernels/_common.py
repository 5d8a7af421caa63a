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


MAX_CHUNK = 65536  # widest row slice one program sweeps


def row_blocks(n_rows: int, V: int):
    """(CHUNK, BLOCK) for kernels that sweep rows of V values: one program per row up to 64k
    columns; wider rows, or few rows, are split over several programs of CHUNK columns, each
    streaming BLOCK-wide tiles."""
    BLOCK = min(4096, triton.next_power_of_2(max(V, 16)))
    chunk = min(MAX_CHUNK, triton.next_power_of_2(max(V, 16)))
    while chunk > BLOCK and n_rows * triton.cdiv(V, chunk) < 1024:
        chunk //= 2
    return chunk, BLOCK
