// W4A8 GEMM on Hopper (sm_90a) with CUTLASS: packed int4 weights x per-token int8 activations.
//
// Computed as D^T = W . X^T so the int4 weight is CUTLASS's "A" operand, the one the sm90
// mixed-input collective (sm90_mma_tma_gmma_rs_warpspecialized_mixed_input.hpp) loads with TMA,
// moves to registers and converts (int4b_t -> int8_t, exact) before the register-sourced int8
// wgmma. The int8 activations are "B" and stay in shared memory. Accumulation is int32.
//
//   CUTLASS problem  M = N_out (weight rows), N = tokens, K
//   A  int4b_t (N_out, K) row-major: lowbit's packed uint8 (N_out, K/2), low nibble = even k
//   B  int8_t  (tokens, K) row-major (K-major "column-major B"): act_quant's output
//   D  (N_out, tokens) column-major == y (tokens, N_out) row-major
//
// Scales: per-row only. The collective can multiply group scales into the converted operand,
// but that operand is int8 here, so a float scale cannot be applied before an int8 MMA; group-wise
// scales would need per-group promotion of the int32 accumulators, which the mixed-input
// collective does not do. The epilogue (an EVT) applies
//   y = (acc * s_w[row]) * s_a[token] + bias[row]     in float32, one rounding to bf16/fp16.
//
// The launcher takes raw pointers and a cudaStream_t so that this file needs no torch headers.
#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"

#include "w4a8_gemm.h"

using namespace cute;

namespace lowbit_cutlass {

// TileM / TileN: weight rows x tokens per CTA; both configs use the cooperative schedule (two
// consumer warp groups split the 128 weight rows of a tile).
// Stream-K tile scheduler: with few tiles (decode-sized batches, or N_out / 128 below the SM
// count) it splits the K loop across SMs instead of leaving most of them idle; with many tiles
// its heuristic falls back to plain data-parallel tiles.
template <class ElementOut, int TileM, int TileN, class KernelSchedule, class EpilogueSchedule>
struct W4A8Gemm {
  using ElementA = cutlass::int4b_t;
  using ElementB = int8_t;
  using ElementAcc = int32_t;
  using ElementCompute = float;
  using LayoutA = cutlass::layout::RowMajor;     // K-major weights
  using LayoutB = cutlass::layout::ColumnMajor;  // K-major activations
  using LayoutD = cutlass::layout::ColumnMajor;  // y row-major seen transposed
  static constexpr int AlignA = 128 / cutlass::sizeof_bits<ElementA>::value;  // 32 int4 = 16 bytes
  static constexpr int AlignB = 128 / cutlass::sizeof_bits<ElementB>::value;  // 16 int8
  static constexpr int AlignD = 128 / cutlass::sizeof_bits<ElementOut>::value;

  using TileShape = Shape<Int<TileM>, Int<TileN>, _128>;  // K tile: 128 int8 = one 128B swizzle row
  using ClusterShape = Shape<_1, _1, _1>;
  using RoundStyle = cutlass::FloatRoundStyle;
  static constexpr auto kRound = RoundStyle::round_to_nearest;

  // EVT: ((acc * s_w) * s_a) + bias. Alignment 1 on the vectors: any token count / N_out works.
  using WScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float,
                                                             Stride<_1, _0, int64_t>, 1>;
  using AScale = cutlass::epilogue::fusion::Sm90RowBroadcast<0, TileShape, float, float,
                                                             Stride<_0, _1, int64_t>, 1>;
  using Bias = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, ElementOut, float,
                                                           Stride<_1, _0, int64_t>, 1>;
  using Acc = cutlass::epilogue::fusion::Sm90AccFetch;
  using Mul = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, kRound>;
  using AddOut = cutlass::epilogue::fusion::Sm90Compute<cutlass::plus, ElementOut, float, kRound>;
  using EvtW = cutlass::epilogue::fusion::Sm90EVT<Mul, Acc, WScale>;
  using EvtWA = cutlass::epilogue::fusion::Sm90EVT<Mul, EvtW, AScale>;
  using Evt = cutlass::epilogue::fusion::Sm90EVT<AddOut, EvtWA, Bias>;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementCompute,
      void, LayoutD, AlignD,  // no C operand: the bias comes through the EVT
      ElementOut, LayoutD, AlignD, EpilogueSchedule, Evt>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, AlignA, ElementB, LayoutB,
      AlignB, ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::StreamKScheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  // SM count for the stream-K scheduler, queried once per device instead of on every call.
  static cutlass::KernelHardwareInfo hw_info() {
    static int counts[64] = {0};
    int device = 0;
    cudaGetDevice(&device);
    if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo{device, 0};  // CUTLASS queries
    if (counts[device] == 0) {
      counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
    }
    return cutlass::KernelHardwareInfo{device, counts[device]};
  }

  static typename Gemm::Arguments arguments(const W4A8Problem& p) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    const int m = p.n_out, n = p.tokens, k = p.k;
    StrideA sa = cutlass::make_cute_packed_stride(StrideA{}, cute::make_shape(m, k, 1));
    StrideB sb = cutlass::make_cute_packed_stride(StrideB{}, cute::make_shape(n, k, 1));
    StrideD sd = cutlass::make_cute_packed_stride(StrideD{}, cute::make_shape(m, n, 1));
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const ElementA*>(p.w), sa, static_cast<const ElementB*>(p.x), sb},
        {{}, nullptr, sd, static_cast<ElementOut*>(p.out), sd}};
    args.hw_info = hw_info();
    // Tree order: {child args..., op args}; the nested leaves are {WScale, Acc} -> AScale -> Bias.
    args.epilogue.thread = {
        {
            {{}, {p.w_scale, 0.f, {_1{}, _0{}, int64_t(0)}}, {}},  // acc * s_w
            {p.a_scale, 0.f, {_0{}, _1{}, int64_t(0)}},           // * s_a
            {},
        },
        {static_cast<const ElementOut*>(p.bias), ElementOut(0.f), {_1{}, _0{}, int64_t(0)}},  // + bias
        {},
    };
    return args;
  }

  static size_t workspace_size(const W4A8Problem& p) { return Gemm::get_workspace_size(arguments(p)); }

  static int run(const W4A8Problem& p, void* workspace, cudaStream_t stream, char* err, int err_len) {
    Gemm gemm;
    auto args = arguments(p);
    cutlass::Status st = gemm.can_implement(args);
    if (st != cutlass::Status::kSuccess) {
      std::snprintf(err, err_len, "CUTLASS can_implement failed: %s", cutlassGetStatusString(st));
      return 1;
    }
    st = gemm.initialize(args, workspace, stream);
    if (st != cutlass::Status::kSuccess) {
      std::snprintf(err, err_len, "CUTLASS initialize failed: %s", cutlassGetStatusString(st));
      return 2;
    }
    st = gemm.run(stream);
    if (st != cutlass::Status::kSuccess) {
      std::snprintf(err, err_len, "CUTLASS run failed: %s (%s)", cutlassGetStatusString(st),
                    cudaGetErrorString(cudaGetLastError()));
      return 3;
    }
    return 0;
  }
};

using Sched = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiSched = cutlass::epilogue::TmaWarpSpecializedCooperative;

// Token tiles: 32 for decode-sized batches (a 128-token tile would be mostly padding), 128 above.
constexpr int kSmallMaxTokens = 32;
template <class T>
using Small = W4A8Gemm<T, 128, 32, Sched, EpiSched>;
template <class T>
using Large = W4A8Gemm<T, 128, 128, Sched, EpiSched>;

}  // namespace lowbit_cutlass

namespace {
template <template <class> class Cfg>
int dispatch(const W4A8Problem& p, void* ws, cudaStream_t s, char* err, int len) {
  if (p.out_dtype == W4A8_OUT_BF16) return Cfg<cutlass::bfloat16_t>::run(p, ws, s, err, len);
  if (p.out_dtype == W4A8_OUT_FP16) return Cfg<cutlass::half_t>::run(p, ws, s, err, len);
  std::snprintf(err, len, "unknown out_dtype %d", p.out_dtype);
  return 4;
}

template <template <class> class Cfg>
size_t workspace(const W4A8Problem& p) {
  return p.out_dtype == W4A8_OUT_FP16 ? Cfg<cutlass::half_t>::workspace_size(p)
                                      : Cfg<cutlass::bfloat16_t>::workspace_size(p);
}
}  // namespace

size_t lowbit_w4a8_workspace_size(const W4A8Problem& p) {
  using namespace lowbit_cutlass;
  return p.tokens <= kSmallMaxTokens ? workspace<Small>(p) : workspace<Large>(p);
}

int lowbit_w4a8_gemm(const W4A8Problem& p, void* workspace, cudaStream_t stream, char* err, int err_len) {
  using namespace lowbit_cutlass;
  return p.tokens <= kSmallMaxTokens ? dispatch<Small>(p, workspace, stream, err, err_len)
                                     : dispatch<Large>(p, workspace, stream, err, err_len);
}
