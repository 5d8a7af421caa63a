"""Accurate elementary functions for the Triton kernels, built from correctly rounded operations.

On a GPU ``tl.exp``, ``tl.log`` and fp32 "/" lower to approximate instructions (ex2.approx,
lg2.approx, div.full: up to 2 ulp each, more through cancellation); the functions here use only
+, ×, fma, exponent-bit arithmetic and a reciprocal refined by one Newton step, so their error does
not depend on those instructions.

  ``tanh(x)``           → (tanh x, 1 − tanh² x), fp32 to ≤ 2 ulp, the derivative without cancellation
  ``softcap(x, c, 1/c)`` → (c·tanh(x/c), 1 − tanh²(x/c)): Gemma-2's logit softcap and its derivative,
                          −inf kept as −inf (a masked logit stays masked) with derivative 1
  ``split`` / ``joined``  a float kernel argument as two fp32 numbers hi + lo (Triton passes Python
                          floats as fp32; fp64 runs rebuild ~48 bits from the pair)
"""
import os
import struct

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# The interpreter's division is exact and its fma is not fused: it takes the plain quotient.
REFINE_RCP = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
LN2_HI = tl.constexpr(0.693145751953125)      # 15 significant bits: k·LN2_HI is exact for k < 2⁹
LN2_LO = tl.constexpr(1.428606765330187e-06)  # ln 2 − LN2_HI
TANH_CLAMP = tl.constexpr(40.0)               # fp32, |x| ≥ 40: tanh = ±1, 1 − tanh² < 1e-34 → 0
TANH_CLAMP64 = tl.constexpr(300.0)            # fp64, |x| ≥ 300: tanh = ±1, 1 − tanh² < 1e-260 → 0


def split(x: float) -> tuple[float, float]:
    """x as two fp32 kernel arguments hi + lo (see ``joined``)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, float(x) - hi


@triton.jit
def joined(hi, lo, FP64: tl.constexpr):
    """The float of ``split``: hi in fp32, hi + lo in fp64."""
    if FP64:
        x = tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)
    else:
        x = hi
    return x


@triton.jit
def tanh(x):
    """(tanh x, 1 − tanh² x) of fp32 or fp64 x. fp32: ≤ 2 ulp, with a = min(|x|, 40):
      M = e^{2a} − 1 = (2^k − 1) + 2^k·expm1 r with 2a = k·ln 2 + r, |r| ≤ ln2/2 (Cody–Waite),
          expm1 r by its Taylor series to r⁷ (truncation < 0.05 ulp), 2^k from its exponent bits;
      u = M/2, w = 1/(1 + u) = 1 − tanh a;  tanh a = u − u²·w when u < 1 (tanh < ½: no
      cancellation), else 1 − w;  1 − tanh² a = w·(2 − w), without cancellation.
    The clamp keeps u finite (past |x| ≈ 44, 2^k·e^r overflows, and the Newton step of the
    reciprocal would meet ∞·0); beyond it tanh is ±1 and the derivative (< 1e-34) is 0.
    fp64: e = expm1(−2a) = (t − 1)·(−2a)/log t with t = e^{−2a} (Kahan), tanh a = −e/(2 + e),
    1 − tanh² a = 4t/(1 + t)², to a few fp64 ulps, with a = min(|x|, 300): past |x| ≈ 354, t is
    subnormal and log t loses the digits the formula divides by (tanh came out 1 + 1e-5).
    NaN stays NaN."""
    a = tl.abs(x)
    if x.dtype == tl.float64:
        y = -2.0 * tl.where(a < TANH_CLAMP64, a, TANH_CLAMP64)
        t = tl.exp(y)
        inside = (t > 0.0) & (t < 1.0)       # else t = 1 (tiny |x|: e = y)
        em1 = tl.where(inside, (t - 1.0) * y / tl.log(tl.where(inside, t, 0.5)), y)
        th = -em1 / (2.0 + em1)
        one_t = 1.0 + t
        dth = tl.where(a < TANH_CLAMP64, 4.0 * t / (one_t * one_t), 0.0)
    else:
        z = 2.0 * tl.where(a < TANH_CLAMP, a, TANH_CLAMP)
        k = tl.floor(z * LOG2E + 0.5)
        r = (z - k * LN2_HI) - k * LN2_LO    # z − k·LN2_HI is exact (Sterbenz)
        q = 1.984126984126984e-04           # 1/7!, then 1/6! … 1/2!: e^r − 1 = r + r²·q
        q = q * r + 1.388888888888889e-03
        q = q * r + 8.333333333333333e-03
        q = q * r + 4.166666666666666e-02
        q = q * r + 1.666666666666667e-01
        q = q * r + 0.5
        two_k = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
        u = 0.5 * ((two_k - 1.0) + two_k * (r + r * r * q))
        d = 1.0 + u
        w = 1.0 / d                          # GPU: div.full (≤ 2 ulp); the interpreter: exact
        if REFINE_RCP:                       # one Newton step with fused multiply-adds: ≤ ½ ulp
            w = tl.fma(w, tl.fma(-d, w, 1.0), w)
        th = tl.where(u < 1.0, u - u * u * w, 1.0 - w)
        dth = tl.where(a < TANH_CLAMP, w * (2.0 - w), 0.0)
    th = tl.where(x == x, th, x)             # NaN: the clamps above dropped it
    dth = tl.where(x == x, dth, x)
    th = tl.where(x < 0, -th, th)
    return th, dth


@triton.jit
def softcap(x, cap, inv_cap):
    """(c·tanh(x/c), d/dx = 1 − tanh²(x/c)) for c = ``cap`` > 0 (``inv_cap`` = 1/c in x's dtype),
    except that −inf stays −inf with derivative 1: a masked logit stays masked, and the −inf
    padding of a partial tile too. fp32 on a GPU: x/c = x·(1/c) corrected by one fma residual
    (≤ 1 ulp; "/" would be div.full), where the residual is finite (±inf: the plain product).
    +inf becomes c; NaN stays NaN."""
    if x.dtype == tl.float64 or not REFINE_RCP:
        q = x / cap
    else:
        q0 = x * inv_cap
        q = tl.fma(tl.fma(-q0, cap, x), inv_cap, q0)
        q = tl.where(q == q, q, q0)
    th, dth = tanh(q)
    ninf = x == float("-inf")
    return tl.where(ninf, x, cap * th), tl.where(ninf, 1.0, dth)
