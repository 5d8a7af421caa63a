"""Small Triton helpers shared by the kernel files."""
import os

import triton
import triton.language as tl

# Triton's CPU interpreter casts fp32 → bf16 by truncation, a GPU rounds to nearest even; under
# the interpreter ``cast_out`` rounds first, so CPU results carry the same rounding as GPU ones.
_INTERPRET_BF16_RNE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_acc(x, ACC_FP64: tl.constexpr):
    """Cast to the accumulation dtype: fp64 when the inputs are fp64, else fp32.
    (One return statement: Triton's GPU front end rejects returns of different types.)"""
    if ACC_FP64:
        y = x.to(tl.float64)
    else:
        y = x.to(tl.float32)
    return y


@triton.jit
def cast_out(x, dtype: tl.constexpr):
    """x.to(dtype) with round-to-nearest-even also for bf16 under the interpreter:
    add 0x7FFF plus the lowest kept bit to the fp32 bits, clear the 16 dropped bits (NaN kept)."""
    if _INTERPRET_BF16_RNE and dtype == tl.bfloat16:
        f = x.to(tl.float32)
        b = f.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = tl.where(f != f, f, b.to(tl.float32, bitcast=True))
    return x.to(dtype)


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
