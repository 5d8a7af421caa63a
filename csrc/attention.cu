// Fused scaled-dot-product attention, CUDA (FlashAttention-2 structure, tensor cores via
// mma.sync.m16n8k16 with fp16/bf16 operands and fp32 accumulators), for dense batches and for
// packed variable-length ("varlen") sequences with one set of kernels.
//
//   dense:  q [B, Hq, T, D], k/v [B, Hkv, S, D], out like q, lse [2, B, Hq, T] fp32.
//   varlen: q [Nq, Hq, D], k/v [Nk, Hkv, D], cu_seqlens_q/k int32 [n + 1]: sequence b is query
//           rows cu_q[b] .. cu_q[b+1] − 1 against key rows cu_k[b] .. cu_k[b+1] − 1 (no padding
//           anywhere); out like q, lse [2, Hq, Nq] fp32.
//   Hq % Hkv == 0: query head h reads kv head h / (Hq/Hkv) (GQA/MQA without repeating K/V).
//   Causal is bottom-right aligned per sequence: query i sees key j iff j <= i + (S − T).
//   lse holds per row the base-2 pair of the Triton kernel: with u = s·log2 e (s = scale·q·k),
//   lse[0] = m = max_j u_j and lse[1] = log2 l, l = Σ_j 2^(u_j − m). A query row that sees no
//   key outputs 0, has (m, log2 l) = (+inf, 0) and gets zero gradients.
//
// The kernels only ever address a (sequence, head) through a Layout (below): the dense and the
// varlen ops differ in the strides and in where a sequence's rows start, nothing else.
//
// Kernels (128 threads = 4 warps per block, every warp owns 16 rows of the block's tile);
// grids are (tiles of the longest sequence, heads, sequences) and a block whose tile lies past
// its own sequence's end returns at once:
//   attn_fwd_kernel     one block per (64-query tile, query head, sequence); K/V tiles of 64 keys
//                       staged through shared memory with cp.async double buffering; S = Q·Kᵀ
//                       and O += P·V on tensor cores; online softmax in fp32 registers; writes
//                       out and (m, log2 l).
//   attn_bwd_delta_kernel   delta_i = Σ_d dO_id · O_id (one warp per row).
//   attn_bwd_dq_kernel  one block per (64-query tile, query head, sequence), loops over key
//                       tiles: recomputes P, dP and accumulates dQ in registers.
//   attn_bwd_dkdv_kernel    one block per (64-key tile, kv head, sequence), loops over the query
//                       heads of the GQA group and over their query tiles; accumulates dK, dV in
//                       registers.
// dQ is computed by a separate per-query-tile pass (no atomics, no fp32 scratch buffer), so the
// whole backward is DETERMINISTIC (bitwise reproducible run to run). The price is recomputing
// S and dP once more in the dQ pass (7 instead of 5 matmuls per tile pair).
//
// Backward math (P = softmax(S), S = scale·Q·Kᵀ, O = P·V), P recomputed from (m, log2 l):
//   p_ij = 2^((u_ij − m_i) − log2 l_i): u − m is exact where p matters, so the error does not
//   grow with |lse| (a single fp32 lse·log2 e would cost ulp(lse)/2 in every exponent);
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − delta) with delta_i = Σ_j P_ij·dP_ij = Σ_d dO_id·O_id,
//   dQ = scale·dS·K,  dK = scale·dSᵀ·Q.
//
// mma.sync.m16n8k16 fragment layouts (lane = 4·g + t, g = lane / 4 in 0..7, t = lane % 4 in 0..3;
// a ".x2" register holds two 16-bit elements, the lower column / k index in the low half):
//   A (16×16, row-major, M × K): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1],
//                                a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16×8,  K × N):            b0 = B[2t, 2t+1][g],  b1 = B[2t+8, 2t+9][g]
//   C (16×8,  M × N, fp32):      c0, c1 = C[g][2t, 2t+1],  c2, c3 = C[g+8][2t, 2t+1]
// So the C fragments of two neighbouring n-tiles (columns 0..7 and 8..15) are, after rounding to
// 16 bits, exactly the A fragment of a 16×16 block whose K index is those 16 columns: this is how
// P (and dS) go from the first matmul's accumulators to the second matmul without shared memory.
//
// Shared-memory tiles are row-major [rows][D] with a row stride of LD = D + 8 elements (16 bytes
// of padding, keeps every row 16-byte aligned for cp.async and spreads the fragment loads over
// all 32 banks). Rows past the end of the sequence are zero-filled (cp.async with src-size 0), so
// stale shared memory (possibly NaN bit patterns) never reaches a matmul.
#include "common.cuh"

#include <type_traits>

namespace rlhf {
namespace {

constexpr int kAttnThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;

// Tile sizes. Registers per thread are dominated by the fp32 accumulators: forward
// O (D/2 floats) + S (BN/2); dQ pass dQ (D/2) + S, dP (BN/2 each); dK/dV pass dK, dV (D/2 each)
// + Sᵀ, dPᵀ (BM/2 each). The D = 128 tiles are smaller where that keeps it under ~240.
template <int D>
struct FwdCfg {
  static constexpr int BM = 64, BN = 64, LD = D + 8;
  static constexpr int smem_bytes = (BM + 4 * BN) * LD * 2;  // Q + double-buffered K, V
};
template <int D>
struct DqCfg {
  static constexpr int BM = 64, BN = D == 128 ? 32 : 64, LD = D + 8;
  static constexpr int smem_bytes = (2 * BM + 4 * BN) * LD * 2;  // Q, dO + double-buffered K, V
};
template <int D>
struct DkvCfg {
  static constexpr int BN = 64, BM = D == 128 ? 32 : 64, LD = D + 8;
  // K, V + double-buffered Q, dO (16-bit) + double-buffered m, log2 l, delta (fp32)
  static constexpr int smem_bytes = (2 * BN + 4 * BM) * LD * 2 + 6 * BM * 4;
};

// ------------------------------------------------------------------------ element types ---

template <typename scalar_t>
struct Elem;

template <>
struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half nan() { return __float2half(NAN); }
  // C += A·B
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 nan() { return __float2bfloat16(NAN); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// ------------------------------------------------------------------------------ cp.async ---

// 16-byte global → shared copy; with pred false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Rows [r0, r0 + ROWS) of a matrix whose row r starts at g + r·stride (D contiguous elements)
// into smem ([ROWS][D + 8]); rows >= n_rows become zeros. Each 16-byte chunk (8 elements) is one
// cp.async. stride is D for dense [B, H, T, D] inputs and H·D for packed [N, H, D] ones.
template <int ROWS, int D, typename scalar_t>
__device__ __forceinline__ void load_tile_async(scalar_t* smem, const scalar_t* g, int r0,
                                                int n_rows, int stride) {
  constexpr int kChunks = D / 8;  // per row
  static_assert((ROWS * kChunks) % kAttnThreads == 0, "tile does not split evenly over threads");
#pragma unroll
  for (int rep = 0; rep < ROWS * kChunks / kAttnThreads; ++rep) {
    const int c = rep * kAttnThreads + threadIdx.x;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = r0 + r < n_rows;
    const scalar_t* src = ok ? g + (static_cast<int64_t>(r0) + r) * stride + col : g;
    cp_async16(smem + r * (D + 8) + col, src, ok);
  }
}

// ---------------------------------------------------------------- fragments from smem ---

__device__ __forceinline__ uint32_t ld32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// A fragment of the 16×16 block at p (element [0][0]) of a row-major smem matrix.
template <int LD, typename scalar_t>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const scalar_t* p, int g, int t) {
  a[0] = ld32(p + g * LD + 2 * t);
  a[1] = ld32(p + (g + 8) * LD + 2 * t);
  a[2] = ld32(p + g * LD + 2 * t + 8);
  a[3] = ld32(p + (g + 8) * LD + 2 * t + 8);
}

// B fragment (16 k × 8 n) when smem holds Bᵀ row-major, i.e. p[n][k] (K for Q·Kᵀ):
// b0 = B[2t, 2t+1][g] = p[g][2t, 2t+1], contiguous.
template <int LD, typename scalar_t>
__device__ __forceinline__ void load_b_nmajor(uint32_t (&b)[2], const scalar_t* p, int g, int t) {
  b[0] = ld32(p + g * LD + 2 * t);
  b[1] = ld32(p + g * LD + 2 * t + 8);
}

// B fragment (16 k × 8 n) when smem holds B row-major, i.e. p[k][n] (V for P·V):
// b0 = (p[2t][g], p[2t+1][g]), two 16-bit loads from neighbouring rows.
template <int LD, typename scalar_t>
__device__ __forceinline__ void load_b_kmajor(uint32_t (&b)[2], const scalar_t* p, int g, int t) {
  const uint16_t* u = reinterpret_cast<const uint16_t*>(p);
  b[0] = uint32_t(u[(2 * t) * LD + g]) | (uint32_t(u[(2 * t + 1) * LD + g]) << 16);
  b[1] = uint32_t(u[(2 * t + 8) * LD + g]) | (uint32_t(u[(2 * t + 9) * LD + g]) << 16);
}

// A fragment for k-block kk from the fp32 accumulators c[n-tile][4] of a previous matmul
// (n-tiles 2kk and 2kk+1 cover the 16 k columns; see the layout table at the top).
template <typename scalar_t, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&c)[NT][4], int kk) {
  a[0] = Elem<scalar_t>::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Elem<scalar_t>::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Elem<scalar_t>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Elem<scalar_t>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// C[16 × 8·NT] += A[16 × 16·KT] · Bᵀ where A is rows [0, 16) of row-major smem `a_s` and B's
// transpose is rows [0, 8·NT) of row-major smem `b_s` (both with K = D contiguous).
template <typename scalar_t, int LD, int KT, int NT>
__device__ __forceinline__ void mma_abt(float (&c)[NT][4], const scalar_t* a_s,
                                        const scalar_t* b_s, int g, int t) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, a_s + kk * 16, g, t);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b[2];
      load_b_nmajor<LD>(b, b_s + nt * 8 * LD + kk * 16, g, t);
      Elem<scalar_t>::mma(c[nt], a, b);
    }
  }
}

// C[16 × D] += A · B where A (16 × 16·KT) is in accumulator form p[2·KT][4] and B is rows
// [0, 16·KT) of row-major smem `b_s` ([k][D]).
template <typename scalar_t, int LD, int KT, int DT>
__device__ __forceinline__ void mma_pb(float (&c)[DT][4], const float (&p)[2 * KT][4],
                                       const scalar_t* b_s, int g, int t) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    uint32_t a[4];
    acc_to_a<scalar_t>(a, p, kk);
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      uint32_t b[2];
      load_b_kmajor<LD>(b, b_s + kk * 16 * LD + dt * 8, g, t);
      Elem<scalar_t>::mma(c[dt], a, b);
    }
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Number of key tiles of width BN that a query tile [m0, m0 + BM) needs: causal rows i < T see
// keys j <= i + shift, so the last key needed is min(m0 + BM, T) − 1 + shift.
__device__ __forceinline__ int num_key_tiles(int m0, int BM, int BN, int T, int S, int shift,
                                             bool causal) {
  const int kv_end = causal ? min(S, min(m0 + BM, T) + shift) : S;
  return kv_end > 0 ? (kv_end + BN - 1) / BN : 0;
}

// --------------------------------------------------------------------------- sequences ---

// Where the rows of one (sequence, head) live. Element offsets, D contiguous elements per row:
//   q-like (q, out, dout, dq):  row i of (sequence b, query head h) at b·q_sb + h·q_sh + (q0 + i)·q_st
//   k-like (k, v, dk, dv):      row j of (sequence b, kv head)      at b·k_sb + hkv·k_sh + (k0 + j)·k_st
//   per-row fp32 (lse planes, delta): row i at b·r_sb + h·r_sh + q0 + i (+ r_plane for log2 l)
// dense [B, H, T, D]:  q0 = k0 = 0, lengths T and S, q_st = D, q_sh = T·D, q_sb = Hq·T·D,
//                      r_sh = T, r_sb = Hq·T, r_plane = B·Hq·T.
// varlen [N, H, D]:    q0 = cu_q[b], T_b = cu_q[b+1] − q0 (same for keys), q_st = Hq·D, q_sh = D,
//                      q_sb = 0, r_sh = Nq, r_sb = 0, r_plane = Hq·Nq.
struct Layout {
  const int* cu_q;  // varlen: int32 [n + 1] (device); dense: nullptr
  const int* cu_k;
  int T, S;         // dense: the lengths; varlen: Nq, Nk (offsets are clamped into [0, N])
  int group;        // Hq / Hkv
  int q_st, k_st;   // token strides
  int64_t q_sb, q_sh, k_sb, k_sh;
  int64_t r_sb, r_sh, r_plane;
};

struct Seq {
  int T, S;            // this sequence's query and key counts
  int q0, k0;          // its first query and key tokens (varlen; 0 when dense)
  int64_t q, kv, row;  // offsets of its row 0 (query head h / kv head hkv) in q-like, k-like and
                       // per-row arrays
};

__device__ __forceinline__ Seq seq_of(const Layout& L, int b, int h, int hkv) {
  int q0 = 0, k0 = 0, T = L.T, S = L.S;
  if (L.cu_q != nullptr) {
    // Clamped into [0, N] and non-decreasing: malformed offsets (the Python layer checks them
    // eagerly for CPU tensors and under RLHF_OPS_DEBUG=1) can never address memory outside the
    // tensors; a decreasing pair is an empty sequence.
    q0 = min(max(L.cu_q[b], 0), L.T);
    k0 = min(max(L.cu_k[b], 0), L.S);
    T = min(max(L.cu_q[b + 1], q0), L.T) - q0;
    S = min(max(L.cu_k[b + 1], k0), L.S) - k0;
  }
  return {T, S, q0, k0, b * L.q_sb + h * L.q_sh + static_cast<int64_t>(q0) * L.q_st,
          b * L.k_sb + hkv * L.k_sh + static_cast<int64_t>(k0) * L.k_st,
          b * L.r_sb + h * L.r_sh + q0};
}

// Rows [from, to) of a q-like or k-like array (row i at x + off + i·stride) set to NaN. Used for
// the rows of a sequence that a grid sized from max_seqlen does not reach (a max_seqlen below a
// real length): they read NaN, never stale memory or a plausible number.
template <int D, typename scalar_t>
__device__ __forceinline__ void nan_rows(scalar_t* x, int64_t off, int stride, int from, int to) {
  for (int64_t e = threadIdx.x; e < static_cast<int64_t>(to - from) * D; e += kAttnThreads)
    x[off + (from + e / D) * stride + e % D] = Elem<scalar_t>::nan();
}

// ----------------------------------------------------------------------------- forward ---

// Query rows [from, to) of sequence sq (relative to its first row; may reach outside it) get NaN
// in out and in both lse planes.
template <int D, typename scalar_t>
__device__ __forceinline__ void nan_out_rows(scalar_t* out, float* lse, const Layout& L,
                                             const Seq& sq, int from, int to) {
  nan_rows<D>(out, sq.q, L.q_st, from, to);
  for (int i = from + threadIdx.x; i < to; i += kAttnThreads)
    lse[sq.row + i] = lse[sq.row + L.r_plane + i] = NAN;
}

template <typename scalar_t, int D>
__global__ void __launch_bounds__(kAttnThreads)
attn_fwd_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                float* __restrict__ lse, const Layout L, bool causal, float scale_log2) {
  using C = FwdCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* sQ = reinterpret_cast<scalar_t*>(smem_raw);  // [BM][LD]
  scalar_t* sK = sQ + BM * LD;                            // [2][BN][LD]
  scalar_t* sV = sK + 2 * BN * LD;                        // [2][BN][LD]

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_of(L, b, h, h / L.group);
  const int T = sq.T, S = sq.S;
  if (blockIdx.x == 0) {
    if (T > gridDim.x * BM) nan_out_rows<D>(out, lse, L, sq, gridDim.x * BM, T);  // beyond the grid
    if (L.cu_q != nullptr) {  // varlen tokens in no sequence (cu_seqlens_q not from 0 / not to Nq)
      if (b == 0) nan_out_rows<D>(out, lse, L, sq, -sq.q0, 0);
      if (b == gridDim.z - 1) nan_out_rows<D>(out, lse, L, sq, T, L.T - sq.q0);
    }
  }
  // Heaviest (causal: last) query tiles first.
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (m0 >= T) return;  // past this sequence's end (the grid is sized for the longest)

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const scalar_t* qg = q + sq.q;
  const scalar_t* kg = k + sq.kv;
  const scalar_t* vg = v + sq.kv;
  const int shift = S - T;  // causal: key j visible from query i iff j <= i + shift
  const int n_tiles = num_key_tiles(m0, BM, BN, T, S, shift, causal);
  const int row0 = m0 + warp * 16 + g;  // this thread's rows: row0 (rh = 0) and row0 + 8 (rh = 1)

  float o[D / 8][4];  // O accumulator, C layout over (16 rows, D columns)
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  // Online softmax per row, in the log2 domain u = scale·log2(e)·(q·k):
  //   m = running max of u, l = Σ 2^(u − m) over this thread's columns (the 4 threads of a quad
  //   share a row and its m; their l are summed at the end). A new tile with row max mx:
  //   m' = max(m, mx), α = 2^(m − m'), l' = α·l + Σ 2^(u − m'), O' = α·O + P·V.
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  if (n_tiles > 0) {
    load_tile_async<BM, D>(sQ, qg, m0, T, L.q_st);
    load_tile_async<BN, D>(sK, kg, 0, S, L.k_st);
    load_tile_async<BN, D>(sV, vg, 0, S, L.k_st);
    cp_async_commit();
  }
  for (int it = 0; it < n_tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_tiles) {  // prefetch the next K/V tile into the other buffer (free: see the
                             // __syncthreads at the end of the previous iteration)
      load_tile_async<BN, D>(sK + (buf ^ 1) * BN * LD, kg, (it + 1) * BN, S, L.k_st);
      load_tile_async<BN, D>(sV + (buf ^ 1) * BN * LD, vg, (it + 1) * BN, S, L.k_st);
      cp_async_commit();
      cp_async_wait<1>();  // this tile's group is done, the prefetch may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies of this tile are visible
    const scalar_t* Kt = sK + buf * BN * LD;
    const scalar_t* Vt = sV + buf * BN * LD;
    const int n0 = it * BN;

    // S = Q·Kᵀ for this warp's 16 rows × BN keys.
    float s[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
    mma_abt<scalar_t, LD, D / 16, BN / 8>(s, sQ + warp * 16 * LD, Kt, g, t);

    // Scale into the log2 domain; mask keys past S and (causal) keys j > i + shift. The mask is
    // needed only on a ragged last tile or where the tile crosses the causal diagonal for the
    // block's first row m0.
    const bool need_mask = n0 + BN > S || (causal && n0 + BN - 1 > m0 + shift);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        float x = s[nt][r] * scale_log2;
        if (need_mask) {
          const int i = row0 + 8 * (r >> 1), j = n0 + nt * 8 + 2 * t + (r & 1);
          if (j >= S || (causal && j > i + shift)) x = -INFINITY;
        }
        s[nt][r] = x;
      }
    }

#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * rh], s[nt][2 * rh + 1]));
      mx = quad_max(mx);
      const float m_new = fmaxf(m_run[rh], mx);
      // While the row has seen only masked keys m_new = −inf; subtract 0 instead so that
      // 2^(−inf − 0) = 0 rather than 2^(−inf + inf) = NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[rh] - m_use);
      m_run[rh] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = exp2f(s[nt][2 * rh + c] - m_use);
          s[nt][2 * rh + c] = p;
          sum += p;
        }
      }
      l_run[rh] = l_run[rh] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * rh] *= alpha;
        o[dt][2 * rh + 1] *= alpha;
      }
    }

    // O += P·V (P rounded to the input dtype, as the second tensor-core operand).
    mma_pb<scalar_t, LD, BN / 16, D / 8>(o, s, Vt, g, t);
    __syncthreads();  // all warps are done with buffer `buf` before it is refilled
  }

  // out = O / l, (m, log2 l); a row with l = 0 saw no key: out 0, (+inf, 0) so that the
  // backward's p = 2^(u − inf) is 0.
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const float l = quad_sum(l_run[rh]);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int i = row0 + 8 * rh;
    if (i < T) {
      scalar_t* orow = out + sq.q + static_cast<int64_t>(i) * L.q_st;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(orow + dt * 8 + 2 * t) =
            Elem<scalar_t>::pack(o[dt][2 * rh] * inv, o[dt][2 * rh + 1] * inv);
      if (t == 0) {
        lse[sq.row + i] = l > 0.f ? m_run[rh] : INFINITY;
        lse[sq.row + L.r_plane + i] = l > 0.f ? log2f(l) : 0.f;
      }
    }
  }
}

// ---------------------------------------------------------------------------- backward ---

// delta = Σ_d dO_d · O_d for each of the `rows` rows of D contiguous elements of dout/out (as
// laid out in memory: row r = token r / heads, head r % heads); one warp per row. delta is
// written in the per-row layout of the Layout: [heads, n_tok] (dense: heads = 1, n_tok = rows,
// which is the [B, Hq, T] order already; varlen: heads = Hq, n_tok = Nq).
template <typename scalar_t>
__global__ void __launch_bounds__(kAttnThreads)
attn_bwd_delta_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ out,
                      float* __restrict__ delta, int64_t rows, int D, int heads, int64_t n_tok) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kAttnThreads / kWarp) + threadIdx.x / kWarp;
  if (row >= rows) return;  // the whole warp leaves together
  const int lane = threadIdx.x % kWarp;
  float acc = 0.f;
  for (int d = lane; d < D; d += kWarp)
    acc += Elem<scalar_t>::to_float(dout[row * D + d]) * Elem<scalar_t>::to_float(out[row * D + d]);
  acc = warp_sum(acc);
  if (lane == 0) delta[(row % heads) * n_tok + row / heads] = acc;
}

// dQ pass: one block per (query tile, query head, sequence); loops over the key tiles the tile
// sees.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kAttnThreads)
attn_bwd_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                   const float* __restrict__ lse, const float* __restrict__ delta,
                   scalar_t* __restrict__ dq, const Layout L, bool causal, float scale_log2,
                   float scale) {
  using C = DqCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* sQ = reinterpret_cast<scalar_t*>(smem_raw);  // [BM][LD]
  scalar_t* sdO = sQ + BM * LD;                           // [BM][LD]
  scalar_t* sK = sdO + BM * LD;                           // [2][BN][LD]
  scalar_t* sV = sK + 2 * BN * LD;                        // [2][BN][LD]

  const int h = blockIdx.y, b = blockIdx.z;
  const Seq sq = seq_of(L, b, h, h / L.group);
  const int T = sq.T, S = sq.S;
  if (blockIdx.x == 0) {
    if (T > gridDim.x * BM) nan_rows<D>(dq, sq.q, L.q_st, gridDim.x * BM, T);  // beyond the grid
    if (L.cu_q != nullptr) {  // varlen tokens in no sequence: NaN, as the forward's out
      if (b == 0) nan_rows<D>(dq, sq.q, L.q_st, -sq.q0, 0);
      if (b == gridDim.z - 1) nan_rows<D>(dq, sq.q, L.q_st, T, L.T - sq.q0);
    }
  }
  const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
  if (m0 >= T) return;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const scalar_t* qg = q + sq.q;
  const scalar_t* dog = dout + sq.q;
  const scalar_t* kg = k + sq.kv;
  const scalar_t* vg = v + sq.kv;
  const int shift = S - T;
  const int n_tiles = num_key_tiles(m0, BM, BN, T, S, shift, causal);
  const int row0 = m0 + warp * 16 + g;

  // Per row half: m, log2 l and delta. Rows past T get (+inf, 0): p = 0.
  float mrow[2], l2row[2], dlt[2];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int i = row0 + 8 * rh;
    mrow[rh] = i < T ? lse[sq.row + i] : INFINITY;
    l2row[rh] = i < T ? lse[sq.row + L.r_plane + i] : 0.f;
    dlt[rh] = i < T ? delta[sq.row + i] : 0.f;
  }

  float acc[D / 8][4];  // dQ / scale
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;

  if (n_tiles > 0) {
    load_tile_async<BM, D>(sQ, qg, m0, T, L.q_st);
    load_tile_async<BM, D>(sdO, dog, m0, T, L.q_st);
    load_tile_async<BN, D>(sK, kg, 0, S, L.k_st);
    load_tile_async<BN, D>(sV, vg, 0, S, L.k_st);
    cp_async_commit();
  }
  for (int it = 0; it < n_tiles; ++it) {
    const int buf = it & 1;
    if (it + 1 < n_tiles) {
      load_tile_async<BN, D>(sK + (buf ^ 1) * BN * LD, kg, (it + 1) * BN, S, L.k_st);
      load_tile_async<BN, D>(sV + (buf ^ 1) * BN * LD, vg, (it + 1) * BN, S, L.k_st);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const scalar_t* Kt = sK + buf * BN * LD;
    const scalar_t* Vt = sV + buf * BN * LD;
    const int n0 = it * BN;

    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[nt][r] = dp[nt][r] = 0.f;
    mma_abt<scalar_t, LD, D / 16, BN / 8>(s, sQ + warp * 16 * LD, Kt, g, t);    // Q·Kᵀ
    mma_abt<scalar_t, LD, D / 16, BN / 8>(dp, sdO + warp * 16 * LD, Vt, g, t);  // dP = dO·Vᵀ

    // P = 2^((u − m) − log2 l) with u = scale·log2e·s (0 where masked), dS = P ∘ (dP − delta),
    // kept in s.
    const bool need_mask = n0 + BN > S || (causal && n0 + BN - 1 > m0 + shift);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int rh = r >> 1;
        float p = exp2f((s[nt][r] * scale_log2 - mrow[rh]) - l2row[rh]);
        if (need_mask) {
          const int i = row0 + 8 * rh, j = n0 + nt * 8 + 2 * t + (r & 1);
          if (j >= S || (causal && j > i + shift)) p = 0.f;
        }
        s[nt][r] = p * (dp[nt][r] - dlt[rh]);
      }
    }
    // dQ/scale += dS·K (K tile [BN keys][D] is the row-major B operand).
    mma_pb<scalar_t, LD, BN / 16, D / 8>(acc, s, Kt, g, t);
    __syncthreads();
  }

#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int i = row0 + 8 * rh;
    if (i < T) {
      scalar_t* drow = dq + sq.q + static_cast<int64_t>(i) * L.q_st;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(drow + dt * 8 + 2 * t) =
            Elem<scalar_t>::pack(acc[dt][2 * rh] * scale, acc[dt][2 * rh + 1] * scale);
    }
  }
}

// dK/dV pass: one block per (key tile, kv head, sequence). It loops over the `group` query heads
// that read this kv head and, for each, over the query tiles that see any key of the tile, so
// every dK/dV element is owned by one block (no atomics). Each warp owns 16 keys and computes
// the transposed products Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ (keys × queries), so that Pᵀ and dSᵀ are
// already in A-fragment form for dV += Pᵀ·dO and dK += dSᵀ·Q.
template <typename scalar_t, int D>
__global__ void __launch_bounds__(kAttnThreads)
attn_bwd_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                     const scalar_t* __restrict__ v, const scalar_t* __restrict__ dout,
                     const float* __restrict__ lse, const float* __restrict__ delta,
                     scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, const Layout L,
                     bool causal, float scale_log2, float scale) {
  using C = DkvCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, LD = C::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  scalar_t* sK = reinterpret_cast<scalar_t*>(smem_raw);  // [BN][LD]
  scalar_t* sV = sK + BN * LD;                            // [BN][LD]
  scalar_t* sQ = sV + BN * LD;                            // [2][BM][LD]
  scalar_t* sdO = sQ + 2 * BM * LD;                       // [2][BM][LD]
  float* sM = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // [2][BM] m
  float* sL = sM + 2 * BM;                                  // [2][BM] log2 l
  float* sD = sL + 2 * BM;                                  // [2][BM] delta

  const int hkv = blockIdx.y, b = blockIdx.z, group = L.group;
  // Offsets for the group's first query head; head hkv·group + hh is hh·q_sh (r_sh) further.
  const Seq sq = seq_of(L, b, hkv * group, hkv);
  const int T = sq.T, S = sq.S;
  if (blockIdx.x == 0) {
    if (S > gridDim.x * BN) {  // keys the grid does not reach
      nan_rows<D>(dk, sq.kv, L.k_st, gridDim.x * BN, S);
      nan_rows<D>(dv, sq.kv, L.k_st, gridDim.x * BN, S);
    }
    if (L.cu_k != nullptr) {  // varlen keys in no sequence (cu_seqlens_k not from 0 / not to Nk)
      if (b == 0) {
        nan_rows<D>(dk, sq.kv, L.k_st, -sq.k0, 0);
        nan_rows<D>(dv, sq.kv, L.k_st, -sq.k0, 0);
      }
      if (b == gridDim.z - 1) {
        nan_rows<D>(dk, sq.kv, L.k_st, S, L.S - sq.k0);
        nan_rows<D>(dv, sq.kv, L.k_st, S, L.S - sq.k0);
      }
    }
  }
  const int n0 = blockIdx.x * BN;
  if (n0 >= S) return;

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int g = lane / 4, t = lane % 4;
  const scalar_t* kg = k + sq.kv;
  const scalar_t* vg = v + sq.kv;
  const int shift = S - T;
  // The first query that sees key n0 is i = n0 − shift (causal); query tiles before the one that
  // holds it see no key of this tile.
  const int m_first = causal ? max(0, n0 - shift) : 0;
  const int mt_start = m_first / BM;
  const int n_mt = m_first < T ? (T + BM - 1) / BM - mt_start : 0;
  const int total = group * n_mt;  // (query head, query tile) steps, head-major
  const int key0 = n0 + warp * 16 + g;  // this thread's keys: key0 (rh = 0) and key0 + 8 (rh = 1)

  // Stage step `idx` (query head hkv·group + idx / n_mt, tile mt_start + idx % n_mt) into buffer
  // `buf`: Q and dO tiles by cp.async, m, log2 l and delta by plain stores (made visible by the
  // __syncthreads at the top of the step that reads them). Rows past T: (+inf, 0, 0), p = 0.
  auto stage = [&](int idx, int buf) {
    const int hh = idx / n_mt;
    const int m0 = (mt_start + idx % n_mt) * BM;
    const int64_t qoff = sq.q + hh * L.q_sh, roff = sq.row + hh * L.r_sh;
    load_tile_async<BM, D>(sQ + buf * BM * LD, q + qoff, m0, T, L.q_st);
    load_tile_async<BM, D>(sdO + buf * BM * LD, dout + qoff, m0, T, L.q_st);
    for (int r = threadIdx.x; r < BM; r += kAttnThreads) {
      const int i = m0 + r;
      sM[buf * BM + r] = i < T ? lse[roff + i] : INFINITY;
      sL[buf * BM + r] = i < T ? lse[roff + L.r_plane + i] : 0.f;
      sD[buf * BM + r] = i < T ? delta[roff + i] : 0.f;
    }
  };

  float dk_acc[D / 8][4], dv_acc[D / 8][4];  // rows = this warp's 16 keys, columns = D
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int r = 0; r < 4; ++r) dk_acc[dt][r] = dv_acc[dt][r] = 0.f;

  if (total > 0) {
    load_tile_async<BN, D>(sK, kg, n0, S, L.k_st);
    load_tile_async<BN, D>(sV, vg, n0, S, L.k_st);
    stage(0, 0);
    cp_async_commit();
  }
  for (int it = 0; it < total; ++it) {
    const int buf = it & 1;
    if (it + 1 < total) {
      stage(it + 1, buf ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const scalar_t* Qt = sQ + buf * BM * LD;
    const scalar_t* dOt = sdO + buf * BM * LD;
    const float* Mt = sM + buf * BM;
    const float* Lt = sL + buf * BM;
    const float* Dt = sD + buf * BM;
    const int m0 = (mt_start + it % n_mt) * BM;

    float st[BM / 8][4], dpt[BM / 8][4];  // Sᵀ, dPᵀ: rows = keys, columns = queries
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) st[nt][r] = dpt[nt][r] = 0.f;
    mma_abt<scalar_t, LD, D / 16, BM / 8>(st, sK + warp * 16 * LD, Qt, g, t);    // K·Qᵀ
    mma_abt<scalar_t, LD, D / 16, BM / 8>(dpt, sV + warp * 16 * LD, dOt, g, t);  // V·dOᵀ

    // Pᵀ = 2^((u − m) − log2 l) (0 where masked; queries past T have m = +inf → 0),
    // dSᵀ = Pᵀ ∘ (dPᵀ − delta[query]).
    const bool need_mask = n0 + BN > S || m0 + BM > T || (causal && n0 + BN - 1 > m0 + shift);
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int il = nt * 8 + 2 * t + (r & 1);  // query within the tile (column)
        float p = exp2f((st[nt][r] * scale_log2 - Mt[il]) - Lt[il]);
        if (need_mask) {
          const int i = m0 + il, j = key0 + 8 * (r >> 1);
          if (j >= S || i >= T || (causal && j > i + shift)) p = 0.f;
        }
        st[nt][r] = p;
        dpt[nt][r] = p * (dpt[nt][r] - Dt[il]);
      }
    }
    mma_pb<scalar_t, LD, BM / 16, D / 8>(dv_acc, st, dOt, g, t);   // dV += Pᵀ·dO
    mma_pb<scalar_t, LD, BM / 16, D / 8>(dk_acc, dpt, Qt, g, t);   // dK/scale += dSᵀ·Q
    __syncthreads();
  }

#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int j = key0 + 8 * rh;
    if (j < S) {
      const int64_t off = sq.kv + static_cast<int64_t>(j) * L.k_st;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<uint32_t*>(dk + off + dt * 8 + 2 * t) =
            Elem<scalar_t>::pack(dk_acc[dt][2 * rh] * scale, dk_acc[dt][2 * rh + 1] * scale);
        *reinterpret_cast<uint32_t*>(dv + off + dt * 8 + 2 * t) =
            Elem<scalar_t>::pack(dv_acc[dt][2 * rh], dv_acc[dt][2 * rh + 1]);
      }
    }
  }
}

// -------------------------------------------------------------------------------- host ---

#define ATTN_CHECK(cond, ...) TORCH_CHECK(cond, "rlhf_ops_cuda.", op, ": ", __VA_ARGS__)

// Shared checks of q, k, v (dense: 4-D [B, H, T, D]; varlen: 3-D [N, H, D]); returns the head dim.
struct Heads {
  int64_t Hq, Hkv, D;
  int group;
};

Heads check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                int64_t dim) {
  RLHF_CHECK_CUDA(op, "q", q);
  RLHF_CHECK_CUDA(op, "k", k);
  RLHF_CHECK_CUDA(op, "v", v);
  RLHF_CHECK_DIM(op, "q", q, dim);
  RLHF_CHECK_DIM(op, "k", k, dim);
  RLHF_CHECK_DIM(op, "v", v, dim);
  ATTN_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
             "q must be float16 or bfloat16 (the dtypes the cuda attention backend supports), "
             "got ", q.scalar_type());
  ATTN_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
             "k and v must have q's dtype ", q.scalar_type(), ", got k ", k.scalar_type(),
             " and v ", v.scalar_type());
  RLHF_CHECK_SAME_DEVICE(op, "k", k, "q", q);
  RLHF_CHECK_SAME_DEVICE(op, "v", v, "q", q);
  const int64_t hd = dim - 2;  // index of the head dimension
  Heads d{q.size(hd), k.size(hd), q.size(dim - 1), 1};
  ATTN_CHECK(d.D == 64 || d.D == 128, "head dim q.size(", dim - 1,
             ") must be 64 or 128 (the head dims the cuda attention backend supports), got ", d.D);
  ATTN_CHECK(k.size(dim - 1) == d.D, "k must have q's head dim ", d.D, " in its last dimension, got ",
             k.sizes());
  ATTN_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), ", got ", v.sizes());
  ATTN_CHECK(d.Hkv > 0 ? d.Hq % d.Hkv == 0 : d.Hq == 0, "the number of query heads q.size(", hd,
             ") = ", d.Hq, " must be a multiple of the number of kv heads k.size(", hd, ") = ",
             d.Hkv);
  d.group = d.Hkv > 0 ? static_cast<int>(d.Hq / d.Hkv) : 1;
  ATTN_CHECK(d.Hq <= 65535, "query heads q.size(", hd, ") = ", d.Hq,
             " must be at most 65535 (CUDA grid y limit)");
  return d;
}

// dout/out like q (shape, dtype, device).
void check_like_q(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  RLHF_CHECK_CUDA(op, name, t);
  RLHF_CHECK_SAME_DEVICE(op, name, t, "q", q);
  ATTN_CHECK(t.sizes() == q.sizes(), name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  ATTN_CHECK(t.scalar_type() == q.scalar_type(), name, " must have q's dtype ", q.scalar_type(),
             ", got ", t.scalar_type());
}

void check_lse(const char* op, const at::Tensor& lse, const at::Tensor& q,
               at::IntArrayRef expected, const char* expected_str) {
  RLHF_CHECK_CUDA(op, "lse", lse);
  RLHF_CHECK_SAME_DEVICE(op, "lse", lse, "q", q);
  RLHF_CHECK_DTYPE(op, "lse", lse, at::kFloat);
  ATTN_CHECK(lse.sizes() == expected, "lse must have shape ", expected_str, " = ", expected,
             " (the (max, log2 sum) pair of the forward), got ", lse.sizes());
}

// Contiguous and 16-byte aligned (cp.async and the 32-bit fragment stores need it).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

template <typename Kernel>
void prepare_smem(Kernel kernel, int bytes, const char* op) {
  const int optin = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  ATTN_CHECK(bytes <= optin, "needs ", bytes, " bytes of shared memory per block, the device allows ",
             optin);
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// f(scalar_t* tag, std::integral_constant<int, D>) for the 4 supported (dtype, head dim) pairs.
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  auto by_dim = [&](auto tag) {
    if (D == 64) f(tag, std::integral_constant<int, 64>{});
    else f(tag, std::integral_constant<int, 128>{});
  };
  if (dtype == at::kHalf) by_dim(static_cast<__half*>(nullptr));
  else by_dim(static_cast<__nv_bfloat16*>(nullptr));
}

template <typename scalar_t>
const scalar_t* cptr(const at::Tensor& t) {
  return reinterpret_cast<const scalar_t*>(t.data_ptr());
}
template <typename scalar_t>
scalar_t* mptr(at::Tensor& t) {
  return reinterpret_cast<scalar_t*>(t.data_ptr());
}

unsigned tiles(int64_t len, int block) {  // ≥ 1 so that rows past a too small max_seqlen get NaN
  return static_cast<unsigned>(std::max<int64_t>(1, (len + block - 1) / block));
}

// One launch description for both ops: the Layout, the number of sequences (grid z) and the
// longest query / key length (grid x).
struct Problem {
  Layout L;
  int64_t n_seq, max_q, max_k, Hq, Hkv, D;
  int64_t q_rows;                      // rows of D elements in q (B·Hq·T or Nq·Hq)
  int delta_heads;                     // see attn_bwd_delta_kernel
  int64_t delta_tok;
};

Layout dense_layout(int64_t B, int64_t Hq, int64_t Hkv, int64_t T, int64_t S, int64_t D, int group) {
  Layout L{};
  L.cu_q = L.cu_k = nullptr;
  L.T = static_cast<int>(T);
  L.S = static_cast<int>(S);
  L.group = group;
  L.q_st = L.k_st = static_cast<int>(D);
  L.q_sh = T * D;
  L.q_sb = Hq * T * D;
  L.k_sh = S * D;
  L.k_sb = Hkv * S * D;
  L.r_sh = T;
  L.r_sb = Hq * T;
  L.r_plane = B * Hq * T;
  return L;
}

// The offsets pointers are set by the op once cu_seqlens are contiguous.
Layout varlen_layout(int64_t Nq, int64_t Nk, int64_t Hq, int64_t Hkv, int64_t D, int group) {
  Layout L{};
  L.T = static_cast<int>(Nq);
  L.S = static_cast<int>(Nk);
  L.group = group;
  L.q_st = static_cast<int>(Hq * D);
  L.k_st = static_cast<int>(Hkv * D);
  L.q_sh = D;
  L.k_sh = D;
  L.q_sb = L.k_sb = 0;
  L.r_sh = Nq;
  L.r_sb = 0;
  L.r_plane = Hq * Nq;
  return L;
}

void launch_fwd(const char* op, const Problem& P, const at::Tensor& q, const at::Tensor& k,
                const at::Tensor& v, at::Tensor& out, at::Tensor& lse, bool causal, double scale) {
  if (P.q_rows == 0) return;
  if (P.n_seq == 0) {  // varlen tokens but no sequence (cu_seqlens_q = [0]): malformed input
    out.fill_(NAN);
    lse.fill_(NAN);
    return;
  }
  auto stream = at::cuda::getCurrentCUDAStream();
  const float scale_log2 = static_cast<float>(scale) * kLog2e;
  dispatch(q.scalar_type(), P.D, [&](auto tag, auto dim) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    constexpr int D = decltype(dim)::value;
    using C = FwdCfg<D>;
    auto kernel = attn_fwd_kernel<scalar_t, D>;
    prepare_smem(kernel, C::smem_bytes, op);
    const dim3 grid(tiles(P.max_q, C::BM), static_cast<unsigned>(P.Hq),
                    static_cast<unsigned>(P.n_seq));
    kernel<<<grid, kAttnThreads, C::smem_bytes, stream>>>(
        cptr<scalar_t>(q), cptr<scalar_t>(k), cptr<scalar_t>(v), mptr<scalar_t>(out),
        lse.data_ptr<float>(), P.L, causal, scale_log2);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_bwd(const char* op, const Problem& P, const at::Tensor& dout, const at::Tensor& q,
                const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, bool causal,
                double scale) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const float scale_f = static_cast<float>(scale), scale_log2 = scale_f * kLog2e;
  at::Tensor delta = at::empty({std::max<int64_t>(P.q_rows, 1)}, q.options().dtype(at::kFloat));
  dispatch(q.scalar_type(), P.D, [&](auto tag, auto dim) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    constexpr int D = decltype(dim)::value;
    if (P.q_rows > 0 && P.n_seq > 0) {
      constexpr int kRowsPerBlock = kAttnThreads / kWarp;
      attn_bwd_delta_kernel<scalar_t>
          <<<static_cast<unsigned>((P.q_rows + kRowsPerBlock - 1) / kRowsPerBlock), kAttnThreads,
             0, stream>>>(cptr<scalar_t>(dout), cptr<scalar_t>(out), delta.data_ptr<float>(),
                          P.q_rows, D, P.delta_heads, P.delta_tok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();

      using Cq = DqCfg<D>;
      auto kq = attn_bwd_dq_kernel<scalar_t, D>;
      prepare_smem(kq, Cq::smem_bytes, op);
      const dim3 grid_q(tiles(P.max_q, Cq::BM), static_cast<unsigned>(P.Hq),
                        static_cast<unsigned>(P.n_seq));
      kq<<<grid_q, kAttnThreads, Cq::smem_bytes, stream>>>(
          cptr<scalar_t>(q), cptr<scalar_t>(k), cptr<scalar_t>(v), cptr<scalar_t>(dout),
          lse.data_ptr<float>(), delta.data_ptr<float>(), mptr<scalar_t>(dq), P.L, causal,
          scale_log2, scale_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (P.n_seq == 0) {  // varlen tokens but no sequence: every token lies outside, NaN
      dq.fill_(NAN);
      dk.fill_(NAN);
      dv.fill_(NAN);
    } else if (P.Hq == 0) {  // no query head reads k/v
      dk.zero_();
      dv.zero_();
    } else if (dk.numel() > 0) {  // with no query this writes dK = dV = 0
      using Ck = DkvCfg<D>;
      auto kkv = attn_bwd_dkdv_kernel<scalar_t, D>;
      prepare_smem(kkv, Ck::smem_bytes, op);
      const dim3 grid_k(tiles(P.max_k, Ck::BN), static_cast<unsigned>(P.Hkv),
                        static_cast<unsigned>(P.n_seq));
      kkv<<<grid_k, kAttnThreads, Ck::smem_bytes, stream>>>(
          cptr<scalar_t>(q), cptr<scalar_t>(k), cptr<scalar_t>(v), cptr<scalar_t>(dout),
          lse.data_ptr<float>(), delta.data_ptr<float>(), mptr<scalar_t>(dk), mptr<scalar_t>(dv),
          P.L, causal, scale_log2, scale_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

// ---------------------------------------------------------------------- dense ops ---

Problem dense_problem(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v) {
  const Heads h = check_qkv(op, q, k, v, 4);
  const int64_t B = q.size(0), T = q.size(2), S = k.size(2);
  ATTN_CHECK(k.size(0) == B, "k must have shape [B, Hkv, S, D] with B = ", B, " from q, got ",
             k.sizes());
  ATTN_CHECK(T < (int64_t(1) << 30) && S < (int64_t(1) << 30),
             "sequence lengths must be below 2^30, got T = q.size(2) = ", T, ", S = k.size(2) = ", S);
  ATTN_CHECK(B <= 65535, "batch q.size(0) = ", B, " must be at most 65535 (CUDA grid z limit)");
  Problem P;
  P.L = dense_layout(B, h.Hq, h.Hkv, T, S, h.D, h.group);
  P.n_seq = B;
  P.max_q = T;
  P.max_k = S;
  P.Hq = h.Hq;
  P.Hkv = h.Hkv;
  P.D = h.D;
  P.q_rows = B * h.Hq * T;
  P.delta_heads = 1;
  P.delta_tok = P.q_rows;
  return P;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                 const at::Tensor& v_, bool causal, double scale) {
  const char* op = "attention_fwd";
  const Problem P = dense_problem(op, q_, k_, v_);
  const at::cuda::OptionalCUDAGuard guard(q_.device());
  const at::Tensor q = dense(q_), k = dense(k_), v = dense(v_);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({2, P.n_seq, P.Hq, P.max_q}, q.options().dtype(at::kFloat));
  launch_fwd(op, P, q, k, v, out, lse, causal, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, bool causal, double scale) {
  const char* op = "attention_bwd";
  const Problem P = dense_problem(op, q_, k_, v_);
  check_like_q(op, "dout", dout_, q_);
  check_like_q(op, "out", out_, q_);
  check_lse(op, lse_, q_, {2, P.n_seq, P.Hq, P.max_q}, "[2, B, Hq, T]");
  const at::cuda::OptionalCUDAGuard guard(q_.device());
  const at::Tensor q = dense(q_), k = dense(k_), v = dense(v_), dout = dense(dout_),
                   out = dense(out_), lse = lse_.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  launch_bwd(op, P, dout, q, k, v, out, lse, dq, dk, dv, causal, scale);
  return {dq, dk, dv};
}

// --------------------------------------------------------------------- varlen ops ---

Problem varlen_problem(const char* op, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                       int64_t max_q, int64_t max_k) {
  const Heads h = check_qkv(op, q, k, v, 3);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &cu_q},
                                std::pair<const char*, const at::Tensor*>{"cu_seqlens_k", &cu_k}}) {
    RLHF_CHECK_CUDA(op, name, *t);
    RLHF_CHECK_SAME_DEVICE(op, name, *t, "q", q);
    RLHF_CHECK_DTYPE(op, name, *t, at::kInt);
    ATTN_CHECK(t->dim() == 1 && t->size(0) >= 1, name,
               " must be 1-D [n + 1] (cumulative sequence lengths from 0), got shape ", t->sizes());
  }
  ATTN_CHECK(cu_k.size(0) == cu_q.size(0), "cu_seqlens_k must have cu_seqlens_q's length ",
             cu_q.size(0), " (one entry per sequence + 1), got ", cu_k.size(0));
  ATTN_CHECK(max_q >= 0 && max_q < (int64_t(1) << 30), "max_seqlen_q must be in [0, 2^30), got ",
             max_q);
  ATTN_CHECK(max_k >= 0 && max_k < (int64_t(1) << 30), "max_seqlen_k must be in [0, 2^30), got ",
             max_k);
  const int64_t Nq = q.size(0), Nk = k.size(0), n = cu_q.size(0) - 1;
  ATTN_CHECK(Nq < (int64_t(1) << 31) && Nk < (int64_t(1) << 31),
             "total tokens q.size(0) = ", Nq, " and k.size(0) = ", Nk, " must be below 2^31");
  ATTN_CHECK(n <= 65535, "the number of sequences cu_seqlens_q.size(0) − 1 = ", n,
             " must be at most 65535 (CUDA grid z limit)");
  Problem P;
  P.L = varlen_layout(Nq, Nk, h.Hq, h.Hkv, h.D, h.group);
  P.n_seq = n;
  P.max_q = max_q;
  P.max_k = max_k;
  P.Hq = h.Hq;
  P.Hkv = h.Hkv;
  P.D = h.D;
  P.q_rows = Nq * h.Hq;
  P.delta_heads = static_cast<int>(std::max<int64_t>(h.Hq, 1));
  P.delta_tok = Nq;
  return P;
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& cu_q_,
    const at::Tensor& cu_k_, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale) {
  const char* op = "attention_varlen_fwd";
  Problem P = varlen_problem(op, q_, k_, v_, cu_q_, cu_k_, max_seqlen_q, max_seqlen_k);
  const at::cuda::OptionalCUDAGuard guard(q_.device());
  const at::Tensor q = dense(q_), k = dense(k_), v = dense(v_), cu_q = cu_q_.contiguous(),
                   cu_k = cu_k_.contiguous();
  P.L.cu_q = cu_q.data_ptr<int>();
  P.L.cu_k = cu_k.data_ptr<int>();
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({2, P.Hq, q.size(0)}, q.options().dtype(at::kFloat));
  launch_fwd(op, P, q, k, v, out, lse, causal, scale);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_bwd(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& cu_q_,
    const at::Tensor& cu_k_, int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal,
    double scale) {
  const char* op = "attention_varlen_bwd";
  Problem P = varlen_problem(op, q_, k_, v_, cu_q_, cu_k_, max_seqlen_q, max_seqlen_k);
  check_like_q(op, "dout", dout_, q_);
  check_like_q(op, "out", out_, q_);
  check_lse(op, lse_, q_, {2, P.Hq, q_.size(0)}, "[2, Hq, Nq]");
  const at::cuda::OptionalCUDAGuard guard(q_.device());
  const at::Tensor q = dense(q_), k = dense(k_), v = dense(v_), dout = dense(dout_),
                   out = dense(out_), cu_q = cu_q_.contiguous(), cu_k = cu_k_.contiguous();
  P.L.cu_q = cu_q.data_ptr<int>();
  P.L.cu_k = cu_k.data_ptr<int>();
  const at::Tensor lse = lse_.contiguous();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  launch_bwd(op, P, dout, q, k, v, out, lse, dq, dk, dv, causal, scale);
  return {dq, dk, dv};
}

#undef ATTN_CHECK

}  // namespace

TORCH_LIBRARY_FRAGMENT(rlhf_ops_cuda, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, bool causal, float scale) -> (Tensor out, Tensor lse)");
  m.def("attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
        "float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(rlhf_ops_cuda, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("attention_varlen_fwd", &attention_varlen_fwd);
  m.impl("attention_varlen_bwd", &attention_varlen_bwd);
}

}  // namespace rlhf
