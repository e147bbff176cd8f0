// Plain C++ interface of the CUTLASS W4A8 GEMM (no torch, no CUTLASS types).
#pragma once
#include <cstddef>

#include <cuda_runtime.h>

enum W4A8OutDtype { W4A8_OUT_BF16 = 0, W4A8_OUT_FP16 = 1 };
enum W4A8ScaleDtype { W4A8_SCALE_F32 = 0, W4A8_SCALE_BF16 = 1, W4A8_SCALE_FP16 = 2 };

struct W4A8Problem {
  const void* w;        // packed int4 weights, uint8 (n_out, k / 2), low nibble = even k
  const void* x;        // int8 activations (tokens, k), row-major
  const float* w_scale;  // (n_out,) per-row weight scale: float32 (the mma kernel: see w_scale_dtype)
  const float* a_scale;  // (tokens,) float32 per-token activation scale
  const void* bias;     // (n_out,) in the output dtype, or nullptr
  void* out;            // (tokens, n_out) row-major, bf16 or fp16
  int tokens;
  int n_out;
  int k;
  int out_dtype;        // W4A8OutDtype
  int w_scale_dtype = W4A8_SCALE_F32;  // the mma kernel also reads bf16 / fp16 scales (exact widening)
  // The mma kernel only: launch with programmatic dependent launch, so it may start while the kernel
  // before it on the stream (the activation quantization) still runs. It issues its first weight
  // loads, then waits (griddepcontrol.wait) before it reads x or a_scale.
  bool pdl = false;
};

// Bytes of device workspace lowbit_w4a8_gemm needs for this problem.
size_t lowbit_w4a8_workspace_size(const W4A8Problem& p);

// Launches on `stream`; 0 on success, else a non-zero code with a message written into err.
int lowbit_w4a8_gemm(const W4A8Problem& p, void* workspace, cudaStream_t stream, char* err, int err_len);

// Decode-batch W4A8 on mma.sync (w4a8_mma.cu, no CUTLASS): same problem, 1..32 tokens. group: 0 or
// K for per-row weight scales (w_scale (n_out,)), else a multiple of 128 dividing K (w_scale
// (n_out, K / group), row-major). warps_n (4, 8 or 16) warps per CTA, each owning 8 weight rows; split
// (1..8) K ranges summed inside a thread block cluster; depth (1..3) rounds of weight loads in
// flight ahead of the MMAs.
constexpr int W4A8_MMA_MAX_TOKENS = 32;
int lowbit_w4a8_mma_default_warps(const W4A8Problem& p, int group);
int lowbit_w4a8_mma_default_split(const W4A8Problem& p, int warps_n, int num_sms);
int lowbit_w4a8_mma_default_depth(const W4A8Problem& p, int group);
int lowbit_w4a8_mma(const W4A8Problem& p, int group, int warps_n, int split, int depth, cudaStream_t stream,
                    char* err, int err_len);
