// torch binding of the CUTLASS W4A8 GEMM: tensor checks, stream, workspace; the kernel itself
// lives in w4a8_gemm.cu behind a plain C++ launcher (raw pointers + cudaStream_t).
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>

#include "w4a8_gemm.h"

namespace {

void check(bool ok, const std::string& what) { TORCH_CHECK(ok, "lowbit CUTLASS W4A8: ", what); }

// The checks both entry points share: devices, dtypes, contiguity and sizes.
void check_operands(const torch::Tensor& qa, const torch::Tensor& sa, const torch::Tensor& packed,
                    const torch::Tensor& sw, at::ScalarType out_dtype, bool half_scales = false) {
  check(qa.is_cuda() && sa.is_cuda() && packed.is_cuda() && sw.is_cuda(), "all inputs must be CUDA tensors");
  check(qa.scalar_type() == at::kChar && qa.dim() == 2 && qa.is_contiguous(),
        "activations must be contiguous int8 (M, K)");
  check(packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.is_contiguous(),
        "weights must be contiguous uint8 (N, K/2)");
  check(sa.scalar_type() == at::kFloat && sa.is_contiguous(), "activation scale must be contiguous float32");
  if (half_scales) {
    check((sw.scalar_type() == at::kFloat || sw.scalar_type() == at::kBFloat16 || sw.scalar_type() == at::kHalf) &&
              sw.is_contiguous(),
          "weight scale must be contiguous float32, bfloat16 or float16");
  } else {
    check(sw.scalar_type() == at::kFloat && sw.is_contiguous(), "weight scale must be contiguous float32");
  }
  check(out_dtype == at::kBFloat16 || out_dtype == at::kHalf, "output dtype must be bfloat16 or float16");
  const int64_t m = qa.size(0), k = qa.size(1), n = packed.size(0);
  check(packed.size(1) * 2 == k, "weight K/2 does not match activation K");
  check(sa.numel() == m, "activation scale size must be (M,)");
}

// qa int8 (M, K), sa float32 (M,) or (M, 1), packed uint8 (N, K/2), sw float32 (N,) or (N, 1),
// bias (N,) in out_dtype or None -> (M, N) in out_dtype.
torch::Tensor w4a8_gemm(const torch::Tensor& qa, const torch::Tensor& sa, const torch::Tensor& packed,
                        const torch::Tensor& sw, const c10::optional<torch::Tensor>& bias,
                        at::ScalarType out_dtype) {
  check_operands(qa, sa, packed, sw, out_dtype);
  const int64_t m = qa.size(0), k = qa.size(1), n = packed.size(0);
  check(sw.numel() == n, "weight scale size must be (N,)");
  check(k % 32 == 0 && n % 8 == 0, "needs K % 32 == 0 and N % 8 == 0 (16-byte TMA rows)");
  if (bias) {
    check(bias->is_cuda() && bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == out_dtype,
          "bias must be a contiguous (N,) CUDA tensor in the output dtype");
  }
  c10::cuda::CUDAGuard guard(qa.device());
  auto out = torch::empty({m, n}, qa.options().dtype(out_dtype));
  if (m == 0) return out;
  W4A8Problem p{packed.data_ptr(), qa.data_ptr(), sw.data_ptr<float>(), sa.data_ptr<float>(),
                bias ? bias->data_ptr() : nullptr, out.data_ptr(), static_cast<int>(m),
                static_cast<int>(n), static_cast<int>(k),
                out_dtype == at::kHalf ? W4A8_OUT_FP16 : W4A8_OUT_BF16};
  const size_t ws_bytes = lowbit_w4a8_workspace_size(p);
  torch::Tensor ws;
  if (ws_bytes > 0) ws = torch::empty({static_cast<int64_t>(ws_bytes)}, qa.options().dtype(at::kByte));
  char err[512] = {0};
  const int rc = lowbit_w4a8_gemm(p, ws_bytes ? ws.data_ptr() : nullptr,
                                  c10::cuda::getCurrentCUDAStream().stream(), err, sizeof(err));
  check(rc == 0, err);
  return out;
}

// Same arguments as w4a8_gemm, 1..32 tokens, sw float32, bfloat16 or float16 (read as stored), plus
// group_size (0 or K: per-row sw (N,); else a multiple of 128 dividing K, sw (N, K / group_size));
// warps_n / split / depth = 0 take the launcher's defaults. pdl: launch with programmatic dependent
// launch (W4A8Problem::pdl), for a call that directly follows the kernel quantizing qa.
torch::Tensor w4a8_mma(const torch::Tensor& qa, const torch::Tensor& sa, const torch::Tensor& packed,
                       const torch::Tensor& sw, const c10::optional<torch::Tensor>& bias, at::ScalarType out_dtype,
                       int64_t group_size, int64_t warps_n, int64_t split, int64_t depth, bool pdl) {
  check_operands(qa, sa, packed, sw, out_dtype, /*half_scales=*/true);
  const int64_t m = qa.size(0), k = qa.size(1), n = packed.size(0);
  const bool per_row = group_size == 0 || group_size == k;
  check(per_row || (group_size > 0 && k % group_size == 0), "group_size must divide K");
  check(sw.numel() == (per_row ? n : n * (k / group_size)),
        "weight scale size must be (N,) or (N, K / group_size)");
  check(qa.get_device() == packed.get_device() && sa.get_device() == qa.get_device() &&
            sw.get_device() == qa.get_device(),
        "all inputs must be on one device");
  check(reinterpret_cast<uintptr_t>(qa.data_ptr()) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(packed.data_ptr()) % 16 == 0,
        "activations and weights must be 16-byte aligned");
  if (bias) {
    check(bias->is_cuda() && bias->is_contiguous() && bias->numel() == n && bias->scalar_type() == out_dtype &&
              bias->get_device() == qa.get_device(),
          "bias must be a contiguous (N,) CUDA tensor in the output dtype");
  }
  c10::cuda::CUDAGuard guard(qa.device());
  auto out = torch::empty({m, n}, qa.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  if (k == 0) {  // an empty sum: the bias alone
    out.zero_();
    if (bias) out.add_(*bias);
    return out;
  }
  W4A8Problem p{packed.data_ptr(), qa.data_ptr(), static_cast<const float*>(sw.data_ptr()), sa.data_ptr<float>(),
                bias ? bias->data_ptr() : nullptr, out.data_ptr(), static_cast<int>(m),
                static_cast<int>(n), static_cast<int>(k),
                out_dtype == at::kHalf ? W4A8_OUT_FP16 : W4A8_OUT_BF16};
  p.pdl = pdl;
  p.w_scale_dtype = sw.scalar_type() == at::kBFloat16 ? W4A8_SCALE_BF16
                    : sw.scalar_type() == at::kHalf   ? W4A8_SCALE_FP16
                                                      : W4A8_SCALE_F32;
  // checked before the default rules use them (the launcher checks the full set again)
  check(warps_n == 0 || warps_n == 4 || warps_n == 8 || warps_n == 16, "warps_n must be 4, 8 or 16 (0: default)");
  check(depth >= 0 && depth <= 3, "depth must be 1, 2 or 3 (0: default)");
  check(split >= 0, "split must be in 1..8 (0: default)");
  const int group = per_row ? 0 : static_cast<int>(group_size);
  const int wn = warps_n ? static_cast<int>(warps_n) : lowbit_w4a8_mma_default_warps(p, group);
  int sp = static_cast<int>(split);
  if (sp == 0) {
    const int sms = at::cuda::getDeviceProperties(qa.get_device())->multiProcessorCount;
    sp = lowbit_w4a8_mma_default_split(p, wn, sms);
  }
  const int dp = depth ? static_cast<int>(depth) : lowbit_w4a8_mma_default_depth(p, group);
  char err[512] = {0};
  const int rc = lowbit_w4a8_mma(p, group, wn, sp, dp, c10::cuda::getCurrentCUDAStream().stream(), err,
                                 sizeof(err));
  check(rc == 0, err);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Python checks it when it imports a library built ahead of time (LOWBIT_CUTLASS_LIB): bump it
  // whenever an entry point's arguments change (2: w4a8_mma's pdl).
  m.attr("api_version") = 2;
  m.def("w4a8_gemm", &w4a8_gemm, "CUTLASS sm90 W4A8 GEMM: int8 (M,K) x packed int4 (N,K) -> (M,N)",
        py::arg("qa"), py::arg("sa"), py::arg("packed"), py::arg("sw"), py::arg("bias"), py::arg("out_dtype"));
  m.def("w4a8_mma", &w4a8_mma, "mma.sync W4A8 for 1..32 tokens: int8 (M,K) x packed int4 (N,K) -> (M,N)",
        py::arg("qa"), py::arg("sa"), py::arg("packed"), py::arg("sw"), py::arg("bias"), py::arg("out_dtype"),
        py::arg("group_size") = 0, py::arg("warps_n") = 0, py::arg("split") = 0, py::arg("depth") = 0, py::arg("pdl") = false);
}
