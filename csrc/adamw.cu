// Multi-tensor fused AdamW with global grad-norm clipping (CUDA backend of lamelm_fast.optim.FusedAdamW).
//
// Multi-tensor apply: each launch carries a fixed-size table of tensor pointers in its kernel arguments (no table
// upload, nothing to free) and one thread block per chunk of `chunk_size` elements. Blocks find their tensor by
// binary search over the table's chunk prefix sums. Tables are sized to stay under the 4 KB argument limit of
// every architecture; a list longer than a table is split over several launches.
//
// Same math and rounding choices as kernels/adamw.py: fp32 arithmetic, fp64 bias corrections, the global norm
// summed in a fixed order (deterministic), non-finite norm = nothing written, the same integer hash for
// stochastic rounding (so every backend draws the same bits).

#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "adamw.h"

namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;
constexpr int kSumTensors = 160;
constexpr int kUpdateTensors = 48;
constexpr int kStepPointers = 448;
constexpr int64_t kMaxLaunchChunks = int64_t(1) << 30;  // keeps chunk prefix sums in int32

struct SumTable {
  const void* grad[kSumTensors];
  int64_t numel[kSumTensors];
  int32_t chunk_begin[kSumTensors + 1];
  int32_t count;
};

struct UpdateTable {
  void* param[kUpdateTensors];
  const void* grad[kUpdateTensors];
  float* exp_avg[kUpdateTensors];
  float* exp_avg_sq[kUpdateTensors];
  float* master[kUpdateTensors];
  float* step[kUpdateTensors];
  int64_t numel[kUpdateTensors];
  int32_t chunk_begin[kUpdateTensors + 1];
  int32_t group[kUpdateTensors];
  uint32_t param_id[kUpdateTensors];
  int32_t count;
};

struct StepTable {
  float* step[kStepPointers];
  int32_t count;
};

// Leave room for the other kernel arguments under the 4 KB limit.
static_assert(sizeof(SumTable) <= 3840, "SumTable too large for kernel arguments");
static_assert(sizeof(UpdateTable) <= 3840, "UpdateTable too large for kernel arguments");
static_assert(sizeof(StepTable) <= 3840, "StepTable too large for kernel arguments");

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// fp32 -> param dtype: nearest-even, or for bf16 optionally stochastic (16 random bits added below the kept
// mantissa, then truncated: rounds up with probability equal to the discarded fraction).
template <typename P> __device__ __forceinline__ P to_param(float x, bool stochastic, uint32_t key, int64_t index);
template <> __device__ __forceinline__ float to_param<float>(float x, bool, uint32_t, int64_t) { return x; }
template <> __device__ __forceinline__ __half to_param<__half>(float x, bool, uint32_t, int64_t) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 to_param<__nv_bfloat16>(float x, bool stochastic, uint32_t key,
                                                                              int64_t index) {
  if (!stochastic) return __float2bfloat16_rn(x);
  const uint32_t noise = mix32(static_cast<uint32_t>(index) ^ key) & 0xFFFFu;
  return __float2bfloat16_rn(__uint_as_float((__float_as_uint(x) + noise) & 0xFFFF0000u));  // exact
}

template <int N>
__device__ __forceinline__ int find_tensor(const int32_t (&chunk_begin)[N], int32_t count, int32_t chunk) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_begin[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Sum over the block in a fixed order; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float x) {
  __shared__ float warp_sums[32];
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xFFFFFFFFu, x, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(0xFFFFFFFFu, x, offset);
  }
  return x;
}

// Four consecutive elements in one access when the caller checked the alignment.
template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };

template <typename T> __device__ __forceinline__ void load4(const T* p, int64_t i, float (&out)[4]) {
  const Vec4<T> x = *reinterpret_cast<const Vec4<T>*>(p + i);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] = to_float(x.v[k]);
}

template <typename G, bool kVec>
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(SumTable table, int64_t chunk_size, float* partials) {
  const int t = find_tensor(table.chunk_begin, table.count, blockIdx.x);
  const int64_t start = static_cast<int64_t>(blockIdx.x - table.chunk_begin[t]) * chunk_size;
  const int64_t end = min(start + chunk_size, table.numel[t]);
  const G* grad = static_cast<const G*>(table.grad[t]);
  float acc = 0.0f;
  int64_t i = start;
  if (kVec) {
    const int64_t vec_end = start + ((end - start) & ~int64_t(3));
    for (i = start + 4 * threadIdx.x; i < vec_end; i += 4 * kThreads) {
      float g[4];
      load4(grad, i, g);
#pragma unroll
      for (int k = 0; k < 4; ++k) acc += g[k] * g[k];
    }
    i = vec_end;
  }
  for (i += threadIdx.x; i < end; i += kThreads) {
    const float g = to_float(grad[i]);
    acc += g * g;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const float* partials, int64_t num_partials,
                                                                   float* norm_out, int64_t* skipped,
                                                                   StepTable steps, bool compute_norm) {
  __shared__ float norm;
  if (compute_norm) {
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < num_partials; i += kFinalizeThreads) acc += partials[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) {
      norm = sqrtf(acc);
      *norm_out = norm;
      if (!(norm <= FLT_MAX)) *skipped += 1;
    }
  } else if (threadIdx.x == 0) {
    norm = *norm_out;  // a later batch of step counters: the first launch computed the norm
  }
  __syncthreads();
  if (norm <= FLT_MAX) {
    for (int i = threadIdx.x; i < steps.count; i += kFinalizeThreads) *steps.step[i] += 1.0f;
  }
}

struct Scalars {
  float clip, lerp_weight, beta2, one_minus_beta2, eps, decay, step_size, bias_correction2_sqrt;
};

// One AdamW element in fp32, in torch.optim.AdamW's order of operations (torch.lerp's two forms included).
__device__ __forceinline__ float adamw_element(float p, float g, float& m, float& v, const Scalars& s) {
  g *= s.clip;
  m = s.lerp_weight < 0.5f ? m + s.lerp_weight * (g - m) : g - (g - m) * (1.0f - s.lerp_weight);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  return p * s.decay - s.step_size * (m / denom);
}

template <typename P, typename G>
__device__ __forceinline__ void update_one(P* param, const G* grad, float* exp_avg, float* exp_avg_sq, float* master,
                                           int64_t i, const Scalars& s, bool stochastic, uint32_t key) {
  float m = exp_avg[i], v = exp_avg_sq[i];
  const float p = adamw_element(master ? master[i] : to_float(param[i]), to_float(grad[i]), m, v, s);
  exp_avg[i] = m;
  exp_avg_sq[i] = v;
  if (master) master[i] = p;
  param[i] = to_param<P>(p, stochastic, key, i);
}

template <typename P, typename G, bool kVec>
__global__ void __launch_bounds__(kThreads) adamw_update_kernel(UpdateTable table, const double* hyper,
                                                                const float* norm_ptr, uint32_t seed,
                                                                int64_t chunk_size, bool stochastic) {
  const float norm = *norm_ptr;
  if (!(norm <= FLT_MAX)) return;  // non-finite global norm: the step is skipped
  const int t = find_tensor(table.chunk_begin, table.count, blockIdx.x);
  const int64_t start = static_cast<int64_t>(blockIdx.x - table.chunk_begin[t]) * chunk_size;
  const int64_t end = min(start + chunk_size, table.numel[t]);
  const double* h = hyper + static_cast<int64_t>(table.group[t]) * LAMELM_HYPER_WIDTH;
  const double lr = h[LAMELM_LR], beta1 = h[LAMELM_BETA1], beta2 = h[LAMELM_BETA2];
  const float step = *table.step[t];  // already advanced by finalize_kernel
  Scalars s;
  s.clip = fminf(static_cast<float>(h[LAMELM_MAX_NORM]) / (norm + 1e-6f), 1.0f);  // as clip_grad_norm_
  s.lerp_weight = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(h[LAMELM_EPS]);
  s.decay = static_cast<float>(1.0 - lr * h[LAMELM_WEIGHT_DECAY]);
  s.step_size = static_cast<float>(lr / (1.0 - pow(beta1, static_cast<double>(step))));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, static_cast<double>(step))));
  const uint32_t key = mix32(seed ^ mix32(table.param_id[t] ^ mix32(static_cast<uint32_t>(step))));

  P* param = static_cast<P*>(table.param[t]);
  const G* grad = static_cast<const G*>(table.grad[t]);
  float* exp_avg = table.exp_avg[t];
  float* exp_avg_sq = table.exp_avg_sq[t];
  float* master = table.master[t];
  int64_t i = start;
  if (kVec) {
    const int64_t vec_end = start + ((end - start) & ~int64_t(3));
    for (i = start + 4 * threadIdx.x; i < vec_end; i += 4 * kThreads) {
      float g[4], p[4];
      load4(grad, i, g);
      if (master) load4(master, i, p); else load4(param, i, p);
      Vec4<float> m = *reinterpret_cast<Vec4<float>*>(exp_avg + i);
      Vec4<float> v = *reinterpret_cast<Vec4<float>*>(exp_avg_sq + i);
      Vec4<P> out;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        p[k] = adamw_element(p[k], g[k], m.v[k], v.v[k], s);
        out.v[k] = to_param<P>(p[k], stochastic, key, i + k);
      }
      *reinterpret_cast<Vec4<float>*>(exp_avg + i) = m;
      *reinterpret_cast<Vec4<float>*>(exp_avg_sq + i) = v;
      if (master) *reinterpret_cast<Vec4<float>*>(master + i) = Vec4<float>{{p[0], p[1], p[2], p[3]}};
      *reinterpret_cast<Vec4<P>*>(param + i) = out;
    }
    i = vec_end;
  }
  for (i += threadIdx.x; i < end; i += kThreads) update_one(param, grad, exp_avg, exp_avg_sq, master, i, s,
                                                            stochastic, key);
}

bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int64_t chunks_of(int64_t numel, int64_t chunk_size) { return (numel + chunk_size - 1) / chunk_size; }

// Fills fixed-size tables from a tensor list and launches one kernel per full table. `add` stores tensor `i` at
// slot `c`; `launch(table, chunks, vectorizable)` launches. Empty tensors have no chunks and are not listed.
template <int kCapacity, typename Table, typename Add, typename Launch>
int for_each_table(const lamelm_adamw_tensor* tensors, int64_t count, int64_t chunk_size, Add add, Launch launch) {
  Table table;
  table.count = 0;
  int64_t chunks = 0;
  bool vectorizable = true;
  auto flush = [&]() -> int {
    if (table.count == 0) return 0;
    table.chunk_begin[table.count] = static_cast<int32_t>(chunks);
    launch(table, chunks, vectorizable);
    table.count = 0;
    chunks = 0;
    vectorizable = true;
    return static_cast<int>(cudaGetLastError());
  };
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = chunks_of(tensors[i].numel, chunk_size);
    if (n == 0) continue;
    if (table.count == kCapacity || chunks + n > kMaxLaunchChunks) {
      if (const int error = flush()) return error;
    }
    table.chunk_begin[table.count] = static_cast<int32_t>(chunks);
    vectorizable &= add(table, table.count, tensors[i]);
    ++table.count;
    chunks += n;
  }
  return flush();
}

template <typename G>
int sum_squares(const lamelm_adamw_tensor* tensors, int64_t count, int64_t chunk_size, float* partials,
                cudaStream_t stream) {
  auto add = [](SumTable& table, int c, const lamelm_adamw_tensor& t) {
    table.grad[c] = t.grad;
    table.numel[c] = t.numel;
    return aligned(t.grad, 4 * sizeof(G));
  };
  auto launch = [&](const SumTable& table, int64_t chunks, bool vectorizable) {
    if (vectorizable) {
      sum_squares_kernel<G, true><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(table, chunk_size,
                                                                                           partials);
    } else {
      sum_squares_kernel<G, false><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(table, chunk_size,
                                                                                            partials);
    }
    partials += chunks;
  };
  return for_each_table<kSumTensors, SumTable>(tensors, count, chunk_size, add, launch);
}

template <typename P, typename G>
int update(const lamelm_adamw_tensor* tensors, int64_t count, bool use_master, bool stochastic, uint32_t seed,
           const double* hyper, const float* norm, int64_t chunk_size, cudaStream_t stream) {
  auto add = [use_master](UpdateTable& table, int c, const lamelm_adamw_tensor& t) {
    table.param[c] = t.param;
    table.grad[c] = t.grad;
    table.exp_avg[c] = t.exp_avg;
    table.exp_avg_sq[c] = t.exp_avg_sq;
    table.master[c] = use_master ? t.master : nullptr;
    table.step[c] = t.step;
    table.numel[c] = t.numel;
    table.group[c] = t.group;
    table.param_id[c] = t.param_id;
    return aligned(t.param, 4 * sizeof(P)) && aligned(t.grad, 4 * sizeof(G)) && aligned(t.exp_avg, 16) &&
           aligned(t.exp_avg_sq, 16) && aligned(table.master[c], 16);
  };
  auto launch = [&](const UpdateTable& table, int64_t chunks, bool vectorizable) {
    const unsigned blocks = static_cast<unsigned>(chunks);
    if (vectorizable) {
      adamw_update_kernel<P, G, true><<<blocks, kThreads, 0, stream>>>(table, hyper, norm, seed, chunk_size,
                                                                       stochastic);
    } else {
      adamw_update_kernel<P, G, false><<<blocks, kThreads, 0, stream>>>(table, hyper, norm, seed, chunk_size,
                                                                        stochastic);
    }
  };
  return for_each_table<kUpdateTensors, UpdateTable>(tensors, count, chunk_size, add, launch);
}

template <typename P>
int update_for_grad(int grad_dtype, const lamelm_adamw_tensor* tensors, int64_t count, bool use_master,
                    bool stochastic, uint32_t seed, const double* hyper, const float* norm, int64_t chunk_size,
                    cudaStream_t stream) {
  switch (grad_dtype) {
    case LAMELM_FLOAT32:
      return update<P, float>(tensors, count, use_master, stochastic, seed, hyper, norm, chunk_size, stream);
    case LAMELM_FLOAT16:
      return update<P, __half>(tensors, count, use_master, stochastic, seed, hyper, norm, chunk_size, stream);
    case LAMELM_BFLOAT16:
      return update<P, __nv_bfloat16>(tensors, count, use_master, stochastic, seed, hyper, norm, chunk_size,
                                      stream);
    default:
      return LAMELM_INVALID_ARGUMENT;
  }
}

}  // namespace

extern "C" int lamelm_adamw_sum_squares(const lamelm_adamw_tensor* tensors, int64_t count, int grad_dtype,
                                        int64_t chunk_size, float* partials, void* stream) {
  if (chunk_size <= 0 || chunk_size % 4 != 0) return LAMELM_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (grad_dtype) {
    case LAMELM_FLOAT32: return sum_squares<float>(tensors, count, chunk_size, partials, s);
    case LAMELM_FLOAT16: return sum_squares<__half>(tensors, count, chunk_size, partials, s);
    case LAMELM_BFLOAT16: return sum_squares<__nv_bfloat16>(tensors, count, chunk_size, partials, s);
    default: return LAMELM_INVALID_ARGUMENT;
  }
}

extern "C" int lamelm_adamw_finalize(const float* partials, int64_t num_partials, float* norm, int64_t* skipped,
                                     float* const* steps, int64_t num_steps, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t done = 0;
  do {  // at least one launch: the norm is computed even when there are no step counters
    StepTable table;
    table.count = static_cast<int32_t>(num_steps - done < kStepPointers ? num_steps - done : kStepPointers);
    for (int32_t i = 0; i < table.count; ++i) table.step[i] = steps[done + i];
    finalize_kernel<<<1, kFinalizeThreads, 0, s>>>(partials, num_partials, norm, skipped, table, done == 0);
    if (const cudaError_t error = cudaGetLastError()) return static_cast<int>(error);
    done += table.count;
  } while (done < num_steps);
  return 0;
}

extern "C" int lamelm_adamw_update(const lamelm_adamw_tensor* tensors, int64_t count, int param_dtype,
                                   int grad_dtype, int use_master, int stochastic, uint32_t seed, const double* hyper,
                                   const float* norm, int64_t chunk_size, void* stream) {
  if (chunk_size <= 0 || chunk_size % 4 != 0) return LAMELM_INVALID_ARGUMENT;
  if (stochastic && param_dtype != LAMELM_BFLOAT16) return LAMELM_INVALID_ARGUMENT;
  if (use_master && param_dtype == LAMELM_FLOAT32) return LAMELM_INVALID_ARGUMENT;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool m = use_master != 0, sr = stochastic != 0;
  switch (param_dtype) {
    case LAMELM_FLOAT32:
      return update_for_grad<float>(grad_dtype, tensors, count, m, sr, seed, hyper, norm, chunk_size, s);
    case LAMELM_FLOAT16:
      return update_for_grad<__half>(grad_dtype, tensors, count, m, sr, seed, hyper, norm, chunk_size, s);
    case LAMELM_BFLOAT16:
      return update_for_grad<__nv_bfloat16>(grad_dtype, tensors, count, m, sr, seed, hyper, norm, chunk_size, s);
    default:
      return LAMELM_INVALID_ARGUMENT;
  }
}

extern "C" const char* lamelm_cuda_error_string(int error) {
  if (error == LAMELM_INVALID_ARGUMENT) return "invalid argument (dtype, chunk size or option combination)";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
