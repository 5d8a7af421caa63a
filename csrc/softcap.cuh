// The logit softcap of the LM-head kernels (Gemma-2's final_logit_softcapping): x → c·tanh(x/c)
// and its derivative 1 − tanh²(x/c), accurate in float under --use_fast_math (which turns tanhf,
// expf and "/" into approximate instructions): the float tanh uses only +, ×, fma, exponent-bit
// arithmetic and a reciprocal refined by one Newton step (the formula of kernels/_math.py's tanh,
// ≤ 2 ulp). Double is not affected by fast math and uses the library's expm1 / exp.
#pragma once

#include <cmath>

namespace rlhf {

// (tanh x, 1 − tanh² x) of a float, a = min(|x|, 40):
//   2a = k·ln 2 + r, |r| ≤ ln2/2 (Cody–Waite, k·kLn2Hi exact), expm1 r = r + r²·q (Taylor to r⁷),
//   u = (e^{2a} − 1)/2 = ((2^k − 1) + 2^k·expm1 r)/2,  w = 1/(1 + u) = 1 − tanh a,
//   tanh a = u − u²·w for u < 1 (no cancellation), else 1 − w;  1 − tanh² a = w·(2 − w).
// The clamp keeps u finite (past a ≈ 44, 2^k·e^r overflows and the Newton step would meet ∞·0);
// beyond it tanh is ±1 and the derivative (< 1e-34) is 0. NaN stays NaN.
__device__ __forceinline__ void tanh_pair(float x, float& th, float& dth) {
  constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187e-06f;
  constexpr float kClamp = 40.0f;
  const float a = fabsf(x);
  const float z = 2.0f * (a < kClamp ? a : kClamp);
  const float k = floorf(fmaf(z, 1.4426950408889634f, 0.5f));
  const float r = fmaf(-k, kLn2Lo, fmaf(-k, kLn2Hi, z));
  float q = 1.984126984126984e-04f;  // 1/7!, then 1/6! … 1/2!
  q = fmaf(q, r, 1.388888888888889e-03f);
  q = fmaf(q, r, 8.333333333333333e-03f);
  q = fmaf(q, r, 4.166666666666666e-02f);
  q = fmaf(q, r, 1.666666666666667e-01f);
  q = fmaf(q, r, 0.5f);
  const float two_k = __int_as_float((static_cast<int>(k) + 127) << 23);
  const float u = 0.5f * ((two_k - 1.0f) + two_k * fmaf(r * r, q, r));
  const float d = 1.0f + u;
  float w = __fdividef(1.0f, d);           // approximate (d ≤ 2^116 here) ...
  w = fmaf(w, fmaf(-d, w, 1.0f), w);       // ... refined by one Newton step: ≤ ½ ulp
  const float t = u < 1.0f ? fmaf(-u * u, w, u) : 1.0f - w;
  th = x != x ? x : copysignf(t, x);
  dth = x != x ? x : (a < kClamp ? w * (2.0f - w) : 0.0f);
}

// Double: e = expm1(−2a), tanh a = −e/(2 + e); 1 − tanh² a = 4t/(1 + t)² with t = e^{−2a}.
__device__ __forceinline__ void tanh_pair(double x, double& th, double& dth) {
  const double y = -2.0 * fabs(x);
  const double e = expm1(y);
  const double t = exp(y);
  th = copysign(-e / (2.0 + e), x);
  const double one_t = 1.0 + t;
  dth = 4.0 * t / (one_t * one_t);
}

// c·tanh(x/c) for a softcap c > 0 (inv_c = 1/c), its derivative in ``dy``; −inf stays −inf with
// derivative 1 (a masked logit stays masked, as in rlhf_ops.reference.softcap_logits), +inf
// becomes c. Float: x/c = x·(1/c) corrected by one fma residual (fast math's "/" is approximate);
// the plain product where the residual is not finite (±inf).
template <typename T>
__device__ __forceinline__ T softcap(T x, T c, T inv_c, T& dy) {
  T q;
  if constexpr (sizeof(T) == sizeof(float)) {
    const T q0 = x * inv_c;
    q = fmaf(fmaf(-q0, c, x), inv_c, q0);
    if (q != q) q = q0;
  } else {
    q = x / c;
  }
  T th, dth;
  tanh_pair(q, th, dth);
  if (x == -INFINITY) {
    dy = T(1);
    return x;
  }
  dy = dth;
  return c * th;
}

}  // namespace rlhf
