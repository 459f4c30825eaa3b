// Python bindings of lamelm_fast._C: checks tensors and hands raw pointers to the C interface of the .cu files.
// Needs only torch's CPU headers (the CUDA stream comes from Python as an integer), so it compiles anywhere torch
// is installed; the kernels themselves live in the .cu files.

// Not <torch/extension.h>: that pulls in the whole C++ frontend (nn, optim, data), ~6x the parse time. These are
// what the bindings use: at::Tensor, TORCH_CHECK, and pybind11 with torch's Tensor type caster.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/core/DeviceGuard.h>

#include <cstdint>

#include "adamw.h"

namespace {

void check_tensor(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, what, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

void check_table(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, int64_t width,
                 const char* what) {
  check_tensor(t, device, what);
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 2 && t.size(1) == width, what, " must be ", dtype, " [n, ",
              width, "], got ", t.scalar_type(), " ", t.sizes());
}

void check_scalar(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, const char* what) {
  check_tensor(t, device, what);
  TORCH_CHECK(t.scalar_type() == dtype && t.numel() == 1, what, " must be one ", dtype);
}

// The gradient-pointer vector: one int64 per row of `meta`.
void check_grads(const at::Tensor& grads, const at::Tensor& meta) {
  check_tensor(grads, meta.device(), "grads");
  TORCH_CHECK(grads.scalar_type() == at::kLong && grads.dim() == 1 && grads.size(0) == meta.size(0),
              "grads must be int64 [", meta.size(0), "], got ", grads.scalar_type(), " ", grads.sizes());
}

void check_dtype_code(int64_t code) {
  TORCH_CHECK(code == LAMELM_FLOAT32 || code == LAMELM_FLOAT16 || code == LAMELM_BFLOAT16,
              "FusedAdamW (CUDA backend): unsupported dtype code ", code);
}

void check_error(int code) { TORCH_CHECK(code == 0, "lamelm_fast CUDA kernel: ", lamelm_cuda_error_string(code)); }

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// The tables (meta, grads, chunks) come from lamelm_fast/optim/_adamw_tables.py, which checked every tensor they
// point to when it built them; here only their own shape, dtype and device can be checked (contents are on the GPU).

void adamw_sum_squares(const at::Tensor& meta, const at::Tensor& grads, const at::Tensor& chunks,
                       const at::Tensor& partials, int64_t grad_dtype, bool vectorized, int64_t chunk_size,
                       int64_t stream) {
  const at::Device device = meta.device();
  check_table(meta, device, at::kLong, LAMELM_META_WIDTH, "meta");
  check_grads(grads, meta);
  check_table(chunks, device, at::kLong, 2, "chunks");
  check_tensor(partials, device, "partials");
  TORCH_CHECK(partials.scalar_type() == at::kFloat && partials.numel() == chunks.size(0),
              "partials must be fp32 with one entry per chunk (", chunks.size(0), ")");
  check_dtype_code(grad_dtype);
  const c10::DeviceGuard guard(device);
  check_error(lamelm_adamw_sum_squares(meta.data_ptr<int64_t>(), grads.data_ptr<int64_t>(), chunks.data_ptr<int64_t>(),
                                       chunks.size(0), static_cast<int>(grad_dtype), vectorized, chunk_size,
                                       partials.data_ptr<float>(), as_stream(stream)));
}

void adamw_finalize(const at::Tensor& partials, const at::Tensor& meta, const at::Tensor& norm,
                    const at::Tensor& skipped, int64_t stream) {
  const at::Device device = meta.device();
  check_table(meta, device, at::kLong, LAMELM_META_WIDTH, "meta");
  check_tensor(partials, device, "partials");
  TORCH_CHECK(partials.scalar_type() == at::kFloat, "partials must be fp32");
  check_scalar(norm, device, at::kFloat, "norm");
  check_scalar(skipped, device, at::kLong, "skipped_steps");
  const c10::DeviceGuard guard(device);
  check_error(lamelm_adamw_finalize(partials.data_ptr<float>(), partials.numel(), meta.data_ptr<int64_t>(),
                                    meta.size(0), norm.data_ptr<float>(), skipped.data_ptr<int64_t>(),
                                    as_stream(stream)));
}

void adamw_update(const at::Tensor& meta, const at::Tensor& grads, const at::Tensor& chunks, const at::Tensor& hyper,
                  const at::Tensor& norm, int64_t param_dtype, int64_t grad_dtype, bool use_master, bool stochastic,
                  bool vectorized, int64_t seed, int64_t chunk_size, int64_t stream) {
  const at::Device device = meta.device();
  check_table(meta, device, at::kLong, LAMELM_META_WIDTH, "meta");
  check_grads(grads, meta);
  check_table(chunks, device, at::kLong, 2, "chunks");
  check_table(hyper, device, at::kDouble, LAMELM_HYPER_WIDTH, "hyper");
  check_scalar(norm, device, at::kFloat, "norm");
  check_dtype_code(param_dtype);
  check_dtype_code(grad_dtype);
  const c10::DeviceGuard guard(device);
  check_error(lamelm_adamw_update(meta.data_ptr<int64_t>(), grads.data_ptr<int64_t>(), chunks.data_ptr<int64_t>(),
                                  chunks.size(0), static_cast<int>(param_dtype), static_cast<int>(grad_dtype),
                                  use_master, stochastic, vectorized, static_cast<uint32_t>(seed),
                                  hyper.data_ptr<double>(), norm.data_ptr<float>(), chunk_size, as_stream(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lamelm_fast CUDA kernels";
  m.def("adamw_sum_squares", &adamw_sum_squares,
        "Per-chunk fp32 sums of squares of the gradients named by a chunk table (one launch)");
  m.def("adamw_finalize", &adamw_finalize, "Global norm, skipped-step count and every step counter (one launch)");
  m.def("adamw_update", &adamw_update,
        "Clipped multi-tensor AdamW update over a chunk table, reading the norm on the device (one launch)");
}
