// Python bindings of lamelm_fast._C: checks tensors and hands raw pointers to the C interface of the .cu files.
// Needs only torch's CPU headers (the CUDA stream comes from Python as an integer), so it compiles anywhere torch
// is installed; the kernels themselves live in the .cu files.

#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "adamw.h"

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return LAMELM_FLOAT32;
    case at::kHalf: return LAMELM_FLOAT16;
    case at::kBFloat16: return LAMELM_BFLOAT16;
    default: TORCH_CHECK(false, "FusedAdamW (CUDA backend): unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_tensor(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, what, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

void check_fp32(const at::Tensor& t, const at::Device& device, int64_t numel, const char* what) {
  check_tensor(t, device, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == numel, what, " must be fp32 with ", numel, " elements");
}

void check_error(int code) { TORCH_CHECK(code == 0, "lamelm_fast CUDA kernel: ", lamelm_cuda_error_string(code)); }

void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

int64_t chunks_of(int64_t numel, int64_t chunk_size) { return (numel + chunk_size - 1) / chunk_size; }

void adamw_sum_squares(const std::vector<at::Tensor>& grads, at::Tensor partials, int64_t chunk_size,
                       int64_t stream) {
  TORCH_CHECK(chunk_size > 0 && chunk_size % 4 == 0, "chunk_size must be a positive multiple of 4");
  const at::Device device = partials.device();
  check_tensor(partials, device, "partials");
  TORCH_CHECK(partials.scalar_type() == at::kFloat, "partials must be fp32");
  const int grad_dtype = grads.empty() ? LAMELM_FLOAT32 : dtype_code(grads[0]);
  std::vector<lamelm_adamw_tensor> tensors(grads.size());
  int64_t chunks = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    check_tensor(grads[i], device, "grad");
    TORCH_CHECK(dtype_code(grads[i]) == grad_dtype, "all grads of one call must share a dtype");
    tensors[i] = lamelm_adamw_tensor{};
    tensors[i].grad = grads[i].data_ptr();
    tensors[i].numel = grads[i].numel();
    chunks += chunks_of(grads[i].numel(), chunk_size);
  }
  TORCH_CHECK(partials.numel() == chunks, "partials must have one entry per chunk (", chunks, ")");
  check_error(lamelm_adamw_sum_squares(tensors.data(), static_cast<int64_t>(tensors.size()), grad_dtype, chunk_size,
                                       partials.data_ptr<float>(), as_stream(stream)));
}

void adamw_finalize(at::Tensor partials, at::Tensor norm, at::Tensor skipped, const std::vector<at::Tensor>& steps,
                    int64_t stream) {
  const at::Device device = norm.device();
  check_tensor(partials, device, "partials");
  TORCH_CHECK(partials.scalar_type() == at::kFloat, "partials must be fp32");
  check_fp32(norm, device, 1, "norm");
  check_tensor(skipped, device, "skipped_steps");
  TORCH_CHECK(skipped.scalar_type() == at::kLong && skipped.numel() == 1, "skipped_steps must be one int64");
  std::vector<float*> step_pointers(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    check_fp32(steps[i], device, 1, "step");
    step_pointers[i] = steps[i].data_ptr<float>();
  }
  check_error(lamelm_adamw_finalize(partials.data_ptr<float>(), partials.numel(), norm.data_ptr<float>(),
                                    skipped.data_ptr<int64_t>(), step_pointers.data(),
                                    static_cast<int64_t>(step_pointers.size()), as_stream(stream)));
}

void adamw_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                  const std::vector<at::Tensor>& masters, const std::vector<at::Tensor>& steps,
                  const std::vector<int64_t>& groups, const std::vector<int64_t>& param_ids, at::Tensor hyper,
                  at::Tensor norm, bool stochastic, int64_t seed, int64_t chunk_size, int64_t stream) {
  const size_t n = params.size();
  const bool use_master = !masters.empty();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n &&
                  groups.size() == n && param_ids.size() == n && (!use_master || masters.size() == n),
              "adamw_update: lists of different lengths");
  TORCH_CHECK(chunk_size > 0 && chunk_size % 4 == 0, "chunk_size must be a positive multiple of 4");
  const at::Device device = norm.device();
  check_fp32(norm, device, 1, "norm");
  check_tensor(hyper, device, "hyper");
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 2 && hyper.size(1) == LAMELM_HYPER_WIDTH,
              "hyper must be fp64 [groups, ", LAMELM_HYPER_WIDTH, "]");
  if (n == 0) return;
  const int param_dtype = dtype_code(params[0]), grad_dtype = dtype_code(grads[0]);
  std::vector<lamelm_adamw_tensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    check_tensor(params[i], device, "param");
    check_tensor(grads[i], device, "grad");
    TORCH_CHECK(dtype_code(params[i]) == param_dtype && dtype_code(grads[i]) == grad_dtype,
                "all params (and all grads) of one call must share a dtype");
    TORCH_CHECK(grads[i].numel() == numel, "grad and param sizes differ");
    check_fp32(exp_avgs[i], device, numel, "exp_avg");
    check_fp32(exp_avg_sqs[i], device, numel, "exp_avg_sq");
    check_fp32(steps[i], device, 1, "step");
    TORCH_CHECK(groups[i] >= 0 && groups[i] < hyper.size(0), "param group index out of range");
    tensors[i].param = params[i].data_ptr();
    tensors[i].grad = grads[i].data_ptr();
    tensors[i].exp_avg = exp_avgs[i].data_ptr<float>();
    tensors[i].exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    tensors[i].master = nullptr;
    if (use_master) {
      check_fp32(masters[i], device, numel, "master_param");
      tensors[i].master = masters[i].data_ptr<float>();
    }
    tensors[i].step = steps[i].data_ptr<float>();
    tensors[i].numel = numel;
    tensors[i].group = static_cast<int32_t>(groups[i]);
    tensors[i].param_id = static_cast<uint32_t>(param_ids[i]);
  }
  check_error(lamelm_adamw_update(tensors.data(), static_cast<int64_t>(n), param_dtype, grad_dtype, use_master,
                                  stochastic, static_cast<uint32_t>(seed), hyper.data_ptr<double>(),
                                  norm.data_ptr<float>(), chunk_size, as_stream(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lamelm_fast CUDA kernels";
  m.def("adamw_sum_squares", &adamw_sum_squares, "Per-chunk fp32 sums of squares of a list of gradients");
  m.def("adamw_finalize", &adamw_finalize, "Global norm, skipped-step count and step counters");
  m.def("adamw_update", &adamw_update, "Clipped multi-tensor AdamW update reading the norm on the device");
}
