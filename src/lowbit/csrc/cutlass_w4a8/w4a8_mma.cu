// W4A8 for decode batches (1..32 tokens): int8 activations x packed int4 weights on mma.sync,
// with the weight read straight from HBM into the MMA's B fragment (no shared memory, no layout
// conversion for the weight). Plain CUDA: no CUTLASS types; built into the same extension as w4a8_gemm.cu.
//
// Fragment mapping (mma.sync.m16n8k32 s8: lane = 4 * g + q, g = lane / 4, q = lane % 4).
//   B (k32 x n8): lane holds column n = g and the k slots {4q..4q+3} (b0) and {16+4q..16+4q+3} (b1).
//   A (m16 x k32): lane holds rows g and g+8 with the same k slots (a0/a1 and a2/a3).
// The sum over k does not care which real k sits in which slot, as long as A and B agree. So per
// 128-wide K step a lane loads 16 bytes of its weight row (real k = 32q .. 32q+31) and feeds word i
// (real k = 32q+8i .. 32q+8i+7) to the i-th of four MMAs:
//   b0 = (word << 4) & 0xF0F0F0F0   low nibbles  = even k, each byte 16 * q4 (sign in bit 7)
//   b1 =  word       & 0xF0F0F0F0   high nibbles = odd k,  each byte 16 * q4
//   a0 / a2 = even / odd bytes of the activations at the same 8 k (two byte permutes).
// Every product carries the factor 16; it is removed exactly (a power of two) in the epilogue, and
// |sum| <= 16 * 8 * 128 * K stays inside int32 for K < 131072 (checked by the launcher; any int8
// activation, -128 included).
//
// Work split: a CTA owns WARPS_N * 8 weight rows; its warps walk the same K range, whose
// activation slice the CTA copies once into shared memory (cp.async). Small N splits K over the CTAs of a thread
// block cluster (<= 8), whose int32 partial tiles are summed through distributed shared memory:
// one launch, no workspace, no atomics.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "w4a8_gemm.h"

namespace cg = cooperative_groups;

namespace {

constexpr int kRound = 4;  // K steps (128 k each) whose weights are loaded together; DEPTH rounds ahead
constexpr int kMaxStagedBytes = 96 * 1024;  // activation slice per CTA in shared memory

__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* p, float v0, float v1);

template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* p, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
}

template <>
__device__ __forceinline__ void store_pair<__half>(__half* p, float v0, float v1) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
}

template <typename OutT>
__device__ __forceinline__ float to_float(OutT v) {
  return static_cast<float>(v);
}

// y[m, n] = (w[n] * sa[m]) (+ bias[n]) for a pair of columns, w already weight-scaled.
template <typename OutT>
__device__ __forceinline__ void store_scaled(float v0, float v1, int m, int n, const float* sa, const OutT* bias,
                                             OutT* out, int M, int N) {
  if (m >= M || n >= N) return;  // N % 8 == 0: n < N implies n + 1 < N
  // _rn intrinsics: no FMA contraction, so per-row results are the reference's bit for bit.
  const float a = sa[m];
  v0 = __fmul_rn(v0, a);
  v1 = __fmul_rn(v1, a);
  if (bias != nullptr) {
    v0 = __fadd_rn(v0, to_float(bias[n]));
    v1 = __fadd_rn(v1, to_float(bias[n + 1]));
  }
  store_pair(out + static_cast<size_t>(m) * N + n, v0, v1);
}

// Weight scales are read in their stored dtype (W4A8ScaleDtype) and widened to float32, which is exact.
struct Scales {
  const void* p;
  int dtype;
  __device__ __forceinline__ float operator[](size_t i) const {
    if (dtype == W4A8_SCALE_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    if (dtype == W4A8_SCALE_FP16) return __half2float(static_cast<const __half*>(p)[i]);
    return static_cast<const float*>(p)[i];
  }
};

// Per-row weights: y[m, n] = ((acc / 16) * sw[n]) * sa[m] (+ bias[n]), the Triton kernels' roundings.
template <typename OutT>
__device__ __forceinline__ void epilogue_pair(const int (&acc)[2], int m, int n, const Scales& sw, const float* sa,
                                              const OutT* bias, OutT* out, int M, int N) {
  if (m >= M || n >= N) return;
  store_scaled(__fmul_rn(static_cast<float>(acc[0]) * 0.0625f, sw[n]),
               __fmul_rn(static_cast<float>(acc[1]) * 0.0625f, sw[n + 1]), m, n, sa, bias, out, M, N);
}

// Shared-memory row stride of the staged activations: the slice plus 16 bytes, so the eight rows a
// quarter-warp reads (two per 128 bytes) fall in different banks.
__host__ __device__ constexpr int x_stride(int k_slice) { return k_slice + 16; }

// Only the token rows are staged (fragment rows past M are zeros that are never read).
__host__ __device__ constexpr int x_smem_bytes(int rows, int k_slice) { return rows * x_stride(k_slice); }

// One m tile, per-row scales: at depth 1 at most 64 registers (four 256-thread CTAs per SM where
// shared memory allows; the scale-dtype read spills 24 bytes there, in the epilogue), deeper at most
// 128 (two); the group-wise and two-tile variants are not capped.
// GROUPED: sw is (N, K / group) with group a multiple of 128 (group_steps = group / 128 K steps);
// each group's int32 sum is scaled into a float accumulator when the group (or the CTA's K range)
// ends. Otherwise sw is (N,) and the int32 sum over the whole K range is scaled once.
// DEPTH: weight rounds in flight ahead of the one being multiplied (1..3); the first DEPTH rounds
// are issued before the activation slice is staged.
template <int MT, int WARPS_N, bool GROUPED, int DEPTH, typename OutT>
__global__ void __launch_bounds__(WARPS_N * 32, MT == 1 && !GROUPED ? (DEPTH == 1 ? 1024 : 512) / (WARPS_N * 32) : 1)
    w4a8_mma_kernel(const uint8_t* __restrict__ w, const int8_t* __restrict__ x, const Scales sw,
                    const float* __restrict__ sa, const OutT* __restrict__ bias, OutT* __restrict__ out, int M,
                    int N, int K, int steps_per_split, int group_steps) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int q = lane & 3;
  const int n_warp = (blockIdx.x * WARPS_N + warp) * 8;
  const int kh = K >> 1;  // bytes per packed row
  const int steps = (K + 127) >> 7;
  const int s_begin = blockIdx.y * steps_per_split;
  const int s_end = min(s_begin + steps_per_split, steps);
  // Rows past N (a partial last CTA) read the last row; their outputs are not stored.
  const uint8_t* w_lane = w + static_cast<size_t>(min(n_warp + g, N - 1)) * kh + q * 16;

  auto load_round = [&](uint4 (&dst)[kRound], int s0) {
#pragma unroll
    for (int i = 0; i < kRound; ++i) {
      const int s = s0 + i;
      // K % 32 == 0: a lane's 16-byte chunk (32 k) is wholly inside the row or wholly past it.
      dst[i] = (s < s_end && s * 64 + q * 16 < kh) ? load_weights(w_lane + s * 64) : make_uint4(0, 0, 0, 0);
    }
  };
  // The first DEPTH rounds of weights are in flight while the CTA stages its activation slice in
  // shared memory. buf is a ring of DEPTH + 1 rounds, indexed with constants only (the loop below is
  // unrolled over one turn of the ring), so it stays in registers.
  constexpr int kRing = DEPTH + 1;
  uint4 buf[kRing][kRound];
#pragma unroll
  for (int r = 0; r < DEPTH; ++r) load_round(buf[r], s_begin + r * kRound);
  // Launched with programmatic dependent launch (W4A8Problem::pdl), the kernel before this one may
  // still be writing x and sa: wait for it (and its writes) here, after the weight loads that need
  // nothing from it. Without that launch attribute the wait returns at once.
  asm volatile("griddepcontrol.wait;\n" ::: "memory");

  const int k0 = s_begin * 128;
  const int k_len = min(s_end * 128, K) - k0;  // a multiple of 32
  const int stride = x_stride(steps_per_split * 128);
  int8_t* xs = reinterpret_cast<int8_t*>(smem);
  {  // asynchronous copies: every 16-byte chunk is in flight at once
    const int chunks = k_len >> 4;  // 16-byte chunks per row
    const int rows = min(M, MT * 16);
    for (int c = threadIdx.x; c < rows * chunks; c += blockDim.x) {
      const int m = c / chunks;
      const int j = c - m * chunks;
      const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(xs + m * stride + j * 16));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst),
                   "l"(x + static_cast<size_t>(m) * K + k0 + j * 16));
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
  }
  __syncthreads();

  int acc[MT][4];
  float accf[MT][4];  // GROUPED: the weight-scaled sums of the finished groups
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      acc[mt][j] = 0;
      accf[mt][j] = 0.0f;
    }
  }
  // GROUPED: this lane's output columns (C fragment) and their scale rows; columns past N (a
  // partial last CTA) read the last pair, their outputs are not stored.
  const int n_col = min(n_warp + 2 * q, N - 2);
  const int n_groups = GROUPED ? (K / 128) / group_steps : 1;
  auto flush_group = [&](int grp) {
    const float s0 = sw[static_cast<size_t>(n_col) * n_groups + grp];
    const float s1 = sw[static_cast<size_t>(n_col + 1) * n_groups + grp];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float prod = __fmul_rn(static_cast<float>(acc[mt][j]) * 0.0625f, (j & 1) ? s1 : s0);
        accf[mt][j] = __fadd_rn(accf[mt][j], prod);
        acc[mt][j] = 0;
      }
    }
  };
  // Fragment rows that hold tokens (others are zero and never read from shared memory).
  bool row_ok[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    row_ok[mt][0] = mt * 16 + g < M;
    row_ok[mt][1] = mt * 16 + g + 8 < M;
  }

  auto step = [&](const uint4& wv, int s) {
    const int kk = (s - s_begin) * 128 + q * 32;  // this lane's 32 k inside the slice
    const bool k_ok = kk < k_len;
    const uint32_t wword[4] = {wv.x, wv.y, wv.z, wv.w};
    uint32_t b0[4], b1[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      b0[i] = (wword[i] << 4) & 0xF0F0F0F0u;
      b1[i] = wword[i] & 0xF0F0F0F0u;
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      uint32_t xa[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
        if (row_ok[mt][h] && k_ok) {
          const uint4* p = reinterpret_cast<const uint4*>(xs + (mt * 16 + g + 8 * h) * stride + kk);
          lo = p[0];
          hi = p[1];
        }
        xa[h][0] = lo.x; xa[h][1] = lo.y; xa[h][2] = lo.z; xa[h][3] = lo.w;
        xa[h][4] = hi.x; xa[h][5] = hi.y; xa[h][6] = hi.z; xa[h][7] = hi.w;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint32_t a0 = __byte_perm(xa[0][2 * i], xa[0][2 * i + 1], 0x6420);  // row g, even k
        const uint32_t a2 = __byte_perm(xa[0][2 * i], xa[0][2 * i + 1], 0x7531);  // row g, odd k
        const uint32_t a1 = __byte_perm(xa[1][2 * i], xa[1][2 * i + 1], 0x6420);  // row g+8, even k
        const uint32_t a3 = __byte_perm(xa[1][2 * i], xa[1][2 * i + 1], 0x7531);  // row g+8, odd k
        mma_s8(acc[mt], a0, a1, a2, a3, b0[i], b1[i]);
      }
    }
  };

  for (int s0 = s_begin; s0 < s_end; s0 += kRing * kRound) {
#pragma unroll
    for (int r = 0; r < kRing; ++r) {
      const int sr = s0 + r * kRound;  // the round in buf[r]
      if (sr < s_end) {
        // the round DEPTH ahead goes into the slot the previous round freed (past s_end: zeros, no load)
        load_round(buf[(r + DEPTH) % kRing], sr + DEPTH * kRound);
#pragma unroll
        for (int i = 0; i < kRound; ++i) {
          const int s = sr + i;
          if (s < s_end) {
            step(buf[r][i], s);
            if (GROUPED && ((s + 1) % group_steps == 0 || s + 1 == s_end)) flush_group(s / group_steps);
          }
        }
      }
    }
  }

  // C fragment: acc[mt][0..1] -> row mt*16+g, cols n_warp+2q, +1; acc[mt][2..3] -> row +8.
  if (gridDim.y == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (GROUPED) {
          store_scaled(accf[mt][2 * h], accf[mt][2 * h + 1], mt * 16 + g + 8 * h, n_warp + 2 * q, sa, bias, out, M,
                       N);
        } else {
          const int pair[2] = {acc[mt][2 * h], acc[mt][2 * h + 1]};
          epilogue_pair(pair, mt * 16 + g + 8 * h, n_warp + 2 * q, sw, sa, bias, out, M, N);
        }
      }
    }
    return;
  }
  // Split K: sum the cluster's partial tiles through distributed shared memory (after the staged
  // activations, which every warp may still be reading).
  int* partial = reinterpret_cast<int*>(smem + x_smem_bytes(min(M, MT * 16), steps_per_split * 128));  // [WARPS_N][MT][4][32]
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      partial[((warp * MT + mt) * 4 + j) * 32 + lane] = GROUPED ? __float_as_int(accf[mt][j]) : acc[mt][j];
    }
  }
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const int ranks = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  constexpr int kPairs = WARPS_N * MT * 2 * 32;  // output pairs per CTA tile
  const int per_rank = (kPairs + ranks - 1) / ranks;
  const int p_end = min(kPairs, (rank + 1) * per_rank);
  for (int p = rank * per_rank + threadIdx.x; p < p_end; p += blockDim.x) {
    const int l = p & 31;
    const int h = (p >> 5) & 1;
    const int mt = (p >> 6) % MT;
    const int wp = (p >> 6) / MT;
    const int e = ((wp * MT + mt) * 4 + 2 * h) * 32 + l;
    const int n = (blockIdx.x * WARPS_N + wp) * 8 + 2 * (l & 3);
    if (GROUPED) {  // float partials, summed in rank (K) order
      float sum[2] = {0.0f, 0.0f};
      for (int r = 0; r < ranks; ++r) {
        const int* remote = cluster.map_shared_rank(partial, r);
        sum[0] = __fadd_rn(sum[0], __int_as_float(remote[e]));
        sum[1] = __fadd_rn(sum[1], __int_as_float(remote[e + 32]));
      }
      store_scaled(sum[0], sum[1], mt * 16 + (l >> 2) + 8 * h, n, sa, bias, out, M, N);
    } else {
      int sum[2] = {0, 0};
      for (int r = 0; r < ranks; ++r) {
        const int* remote = cluster.map_shared_rank(partial, r);
        sum[0] += remote[e];
        sum[1] += remote[e + 32];
      }
      epilogue_pair(sum, mt * 16 + (l >> 2) + 8 * h, n, sw, sa, bias, out, M, N);
    }
  }
  cluster.sync();  // keep every CTA's shared memory alive until the others have read it
}

template <int MT, int WARPS_N>
int smem_bytes(int tokens, int split, int steps_per_split) {
  // the partial tiles start 16-byte aligned: x_stride is a multiple of 16
  return x_smem_bytes(std::min(tokens, MT * 16), steps_per_split * 128) +
         (split > 1 ? WARPS_N * MT * 4 * 32 * 4 : 0);
}

template <int MT, int WARPS_N, bool GROUPED, int DEPTH, typename OutT>
cudaError_t launch(const W4A8Problem& p, int group_steps, int split, int steps_per_split, cudaStream_t stream) {
  auto kernel = w4a8_mma_kernel<MT, WARPS_N, GROUPED, DEPTH, OutT>;
  const int smem = smem_bytes<MT, WARPS_N>(p.tokens, split, steps_per_split);
  if (smem > 48 * 1024) {  // a host-side attribute of the current device's function (no stream work)
    const cudaError_t rc = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (rc != cudaSuccess) return rc;
  }
  const int tiles = (p.n_out + WARPS_N * 8 - 1) / (WARPS_N * 8);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(tiles, split, 1);
  cfg.blockDim = dim3(WARPS_N * 32, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[2];
  unsigned n_attr = 0;
  if (split > 1) {
    attr[n_attr].id = cudaLaunchAttributeClusterDimension;
    attr[n_attr].val.clusterDim.x = 1;
    attr[n_attr].val.clusterDim.y = split;
    attr[n_attr].val.clusterDim.z = 1;
    ++n_attr;
  }
  if (p.pdl) {
    attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n_attr].val.programmaticStreamSerializationAllowed = 1;
    ++n_attr;
  }
  cfg.attrs = attr;
  cfg.numAttrs = n_attr;
  return cudaLaunchKernelEx(&cfg, kernel, static_cast<const uint8_t*>(p.w), static_cast<const int8_t*>(p.x),
                            Scales{p.w_scale, p.w_scale_dtype}, p.a_scale, static_cast<const OutT*>(p.bias), static_cast<OutT*>(p.out),
                            p.tokens, p.n_out, p.k, steps_per_split, group_steps);
}

template <int MT, bool GROUPED, int DEPTH, typename OutT>
cudaError_t launch_warps(const W4A8Problem& p, int gs, int warps_n, int split, int sps, cudaStream_t stream) {
  switch (warps_n) {
    case 4:
      return launch<MT, 4, GROUPED, DEPTH, OutT>(p, gs, split, sps, stream);
    case 8:
      return launch<MT, 8, GROUPED, DEPTH, OutT>(p, gs, split, sps, stream);
    default:
      return launch<MT, 16, GROUPED, DEPTH, OutT>(p, gs, split, sps, stream);
  }
}

template <int MT, bool GROUPED, typename OutT>
cudaError_t launch_depth(const W4A8Problem& p, int gs, int warps_n, int split, int sps, int depth,
                         cudaStream_t stream) {
  switch (depth) {
    case 1:
      return launch_warps<MT, GROUPED, 1, OutT>(p, gs, warps_n, split, sps, stream);
    case 2:
      return launch_warps<MT, GROUPED, 2, OutT>(p, gs, warps_n, split, sps, stream);
    default:
      return launch_warps<MT, GROUPED, 3, OutT>(p, gs, warps_n, split, sps, stream);
  }
}

template <bool GROUPED, typename OutT>
cudaError_t launch_tiles(const W4A8Problem& p, int gs, int warps_n, int split, int sps, int depth,
                         cudaStream_t stream) {
  if (p.tokens <= 16) return launch_depth<1, GROUPED, OutT>(p, gs, warps_n, split, sps, depth, stream);
  return launch_depth<2, GROUPED, OutT>(p, gs, warps_n, split, sps, depth, stream);
}

template <typename OutT>
cudaError_t launch_dtype(const W4A8Problem& p, int gs, int warps_n, int split, int sps, int depth,
                         cudaStream_t stream) {
  return gs ? launch_tiles<true, OutT>(p, gs, warps_n, split, sps, depth, stream)
            : launch_tiles<false, OutT>(p, gs, warps_n, split, sps, depth, stream);
}

int m_tiles(int tokens) { return tokens <= 16 ? 1 : 2; }

// The fewest K splits whose staged activation slice fits the shared-memory budget.
int min_split(const W4A8Problem& p) {
  const int steps = (p.k + 127) / 128;
  for (int split = 1; split <= 8; ++split) {
    const int sps = (steps + split - 1) / split;
    if (x_smem_bytes(std::min(p.tokens, m_tiles(p.tokens) * 16), sps * 128) <= kMaxStagedBytes) return split;
  }
  return 9;  // too long a row for the shared-memory slice even at 8 splits
}

}  // namespace

int lowbit_w4a8_mma_default_warps(const W4A8Problem& p, int group) {
  // NOTE: H100, benchmarks/results/probe_mma_decode_depth2_h100.json (per row: 4 / 8 / 16 warps x
  // splits 1/2/3/4/8 x depth 1/2 at M = 16 / 32) and probe_mma_decode_depth_g128_h100.json (g128:
  // 8 / 16 warps at M = 1 / 16 / 32). 16-warp CTAs (128 weight rows: half the activation staging
  // per weight byte) were the best on 7 of 10 shapes at M = 16 per row (best vs best 8-warp launch:
  // 11008x4096 19.2 vs 20.9 us, 4096x11008 21.7 vs 22.7) and within 0.9 us on the rest; group-wise
  // the best on 7 of 10 at M = 16 and 9 of 10 at M = 32, but on none at M = 1 (22016x4096: 44.2 vs
  // 38.5 us with 8 warps). Per row at M = 32 (two m tiles, more registers) 8 warps were better on
  // 6 of 10 shapes (by up to 4.9 us, 28672x4096) and 16 warps on 4, by at most 1.3 us.
  if (p.tokens == 1) return 8;
  return (p.tokens <= 16 || group != 0) ? 16 : 8;
}

int lowbit_w4a8_mma_default_split(const W4A8Problem& p, int warps_n, int num_sms) {
  // NOTE: H100 sweeps (benchmarks/results/probe_mma_decode_depth_h100.json and _depth2_h100.json).
  // With two weight rounds in flight (depth 2) the best split gave at most one wave of CTAs:
  //   8 warps (two CTAs per SM): about one CTA per SM: split 1 at 96..448 CTA tiles of 64 rows, 2 at
  //   64 (4096x4096, 4096x11008), 8 at 16; the older rule (about 2 * SMs CTAs at depth 1) was 5-18%
  //   slower at M = 16 on 8 of 10 shapes.
  //   16 warps (one CTA per SM): about 3/4 of the SMs; a full wave of clusters did not fit (4096x4096
  //   at 32 tiles of 128 rows: split 3 14.6 us, split 4 19.3; 6144x4096 at 48 tiles: split 2 16.9,
  //   split 3 22.1); split 1 at 86..224 tiles, 8 at 8.
  // Rows too long for the shared-memory slice take the fewest splits that fit.
  const int tiles = (p.n_out + warps_n * 8 - 1) / (warps_n * 8);
  const int steps = (p.k + 127) / 128;
  const int want = warps_n == 16 ? (3 * num_sms) / (4 * tiles) : (num_sms + tiles / 2) / tiles;
  const int split = std::max(1, std::min({want, 8, steps}));
  return std::max(min_split(p), split);
}

int lowbit_w4a8_mma_default_depth(const W4A8Problem& p, int group) {
  // Per row, depth 2 was the best or within 3% of it on 26 of 30 (shape, M) cases of the first
  // sweep; group-wise past 16 tokens (two m tiles and the float group sums: the most registers)
  // depth 1 was the best on 10 of 10 (e.g. 22016x4096 M = 32: 56.8 vs 61.6 us).
  return (group != 0 && p.tokens > 16) ? 1 : 2;
}

int lowbit_w4a8_mma(const W4A8Problem& p, int group, int warps_n, int split, int depth, cudaStream_t stream,
                    char* err, int err_len) {
  if (p.tokens < 1 || p.tokens > W4A8_MMA_MAX_TOKENS) {
    snprintf(err, err_len, "the mma kernel takes 1..%d tokens, got %d", W4A8_MMA_MAX_TOKENS, p.tokens);
    return 1;
  }
  if (p.k % 32 || p.n_out % 8 || p.k >= 131072 || p.k == 0) {
    snprintf(err, err_len, "the mma kernel needs K %% 32 == 0, 0 < K < 131072 and N %% 8 == 0, got N=%d, K=%d",
             p.n_out, p.k);
    return 1;
  }
  if (group != 0 && group != p.k && (group % 128 || p.k % group)) {
    snprintf(err, err_len, "the mma kernel takes per-row scales or groups of a multiple of 128 dividing K, "
             "got group_size=%d for K=%d", group, p.k);
    return 1;
  }
  const int gs = (group == 0 || group == p.k) ? 0 : group / 128;
  if (warps_n != 4 && warps_n != 8 && warps_n != 16) {
    snprintf(err, err_len, "warps_n must be 4, 8 or 16, got %d", warps_n);
    return 1;
  }
  if (depth < 1 || depth > 3) {
    snprintf(err, err_len, "depth must be 1, 2 or 3, got %d", depth);
    return 1;
  }
  const int steps = (p.k + 127) / 128;
  const int lo = min_split(p);
  if (lo > 8) {
    snprintf(err, err_len,
             "K=%d is too long for %d tokens: the activation slice of 8 K splits exceeds %d bytes of shared "
             "memory",
             p.k, p.tokens, kMaxStagedBytes);
    return 1;
  }
  if (split < lo || split > 8 || split > steps) {
    snprintf(err, err_len, "split must be in %d..min(8, K/128 rounded up)=%d for K=%d and %d tokens, got %d", lo,
             std::min(8, steps), p.k, p.tokens, split);
    return 1;
  }
  const int sps = (steps + split - 1) / split;
  split = (steps + sps - 1) / sps;  // no empty split
  const cudaError_t rc = p.out_dtype == W4A8_OUT_FP16
                             ? launch_dtype<__half>(p, gs, warps_n, split, sps, depth, stream)
                             : launch_dtype<__nv_bfloat16>(p, gs, warps_n, split, sps, depth, stream);
  if (rc != cudaSuccess) {
    snprintf(err, err_len, "mma kernel launch failed: %s", cudaGetErrorString(rc));
    return 2;
  }
  return 0;
}
