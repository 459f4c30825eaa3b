// Multi-tensor fused AdamW with global grad-norm clipping (CUDA backend of lamelm_fast.optim.FusedAdamW).
//
// Multi-tensor apply over device-resident tables, the same ones the Triton kernels read (layout in adamw.h; built
// and uploaded only when they change by lamelm_fast/optim/_adamw_tables.py): one thread block per entry of a chunk
// table finds its tensor's pointers in the tensor table and the gradient-pointer vector. So a step is three launches per bucket set (sum of
// squares, finalize, update) whatever the number of tensors, with no per-launch table in the kernel arguments.
//
// Same math and rounding choices as kernels/adamw.py: fp32 arithmetic, fp64 bias corrections, the global norm
// summed in a fixed order (deterministic, no atomics), non-finite norm = nothing written, the same integer hash for
// stochastic rounding (so every backend draws the same bits), int64 element indices.

#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "adamw.h"

namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 1024;

// A pointer stored as an integer in a table: device memory, which the compiler must be told to get global (not
// generic) loads and stores through a pointer read from memory. Never called for an unused (0) entry.
template <typename T> __device__ __forceinline__ T* table_pointer(const int64_t* entry) {
  T* p = reinterpret_cast<T*>(static_cast<uintptr_t>(*entry));
  __builtin_assume(__isGlobal(p));
  return p;
}

// The block's chunk: its tensor (table index and row) and its element range [start, end) within that tensor.
struct Chunk {
  int64_t index;
  const int64_t* row;
  int64_t start, end;
};

__device__ __forceinline__ Chunk block_chunk(const int64_t* meta, const int64_t* chunks, int64_t chunk_size) {
  const int64_t* entry = chunks + 2 * static_cast<int64_t>(blockIdx.x);
  Chunk c;
  c.index = entry[0];
  c.row = meta + c.index * LAMELM_META_WIDTH;
  c.start = entry[1] * chunk_size;
  c.end = min(c.start + chunk_size, c.row[LAMELM_META_NUMEL]);
  return c;
}

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
__global__ void __launch_bounds__(kThreads) sum_squares_kernel(const int64_t* __restrict__ meta,
                                                               const int64_t* __restrict__ grads,
                                                               const int64_t* __restrict__ chunks, int64_t chunk_size,
                                                               float* __restrict__ partials) {
  const Chunk c = block_chunk(meta, chunks, chunk_size);
  const G* grad = table_pointer<const G>(grads + c.index);
  float acc = 0.0f;
  int64_t i = c.start;
  if (kVec) {
    const int64_t vec_end = c.start + ((c.end - c.start) & ~int64_t(3));
    for (i = c.start + 4 * threadIdx.x; i < vec_end; i += 4 * kThreads) {
      float g[4];
      load4(grad, i, g);
#pragma unroll
      for (int k = 0; k < 4; ++k) acc += g[k] * g[k];
    }
    i = vec_end;
  }
  for (i += threadIdx.x; i < c.end; i += kThreads) {
    const float g = to_float(grad[i]);
    acc += g * g;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: the norm, the skip count and every tensor's step counter, whatever the number of tensors.
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const float* __restrict__ partials,
                                                                   int64_t num_partials, const int64_t* meta,
                                                                   int64_t num_tensors, float* norm_out,
                                                                   int64_t* skipped) {
  __shared__ float norm;
  float acc = 0.0f;
  for (int64_t i = threadIdx.x; i < num_partials; i += kFinalizeThreads) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    norm = sqrtf(acc);
    *norm_out = norm;
    if (!(norm <= FLT_MAX)) *skipped += 1;
  }
  __syncthreads();
  if (norm <= FLT_MAX) {
    for (int64_t i = threadIdx.x; i < num_tensors; i += kFinalizeThreads) {
      *table_pointer<float>(meta + i * LAMELM_META_WIDTH + LAMELM_META_STEP) += 1.0f;
    }
  }
}

// 1 - beta**exponent in fp64 by square-and-multiply, the same operations as _one_minus_pow in kernels/adamw.py (so
// both backends get the same bias corrections); inline, where a pow() call would spill live registers around it.
__device__ __forceinline__ double one_minus_pow(double beta, int32_t exponent) {
  double power = 1.0;
  for (; exponent > 0; exponent >>= 1) {
    if (exponent & 1) power *= beta;
    beta *= beta;
  }
  return 1.0 - power;
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
__global__ void __launch_bounds__(kThreads) adamw_update_kernel(const int64_t* __restrict__ meta,
                                                                const int64_t* __restrict__ grads,
                                                                const int64_t* __restrict__ chunks,
                                                                const double* __restrict__ hyper,
                                                                const float* __restrict__ norm_ptr, uint32_t seed,
                                                                int64_t chunk_size, bool use_master,
                                                                bool stochastic) {
  const float norm = *norm_ptr;
  if (!(norm <= FLT_MAX)) return;  // non-finite global norm: the step is skipped
  const Chunk c = block_chunk(meta, chunks, chunk_size);
  const double* h = hyper + c.row[LAMELM_META_GROUP] * LAMELM_HYPER_WIDTH;
  const double lr = h[LAMELM_LR], beta1 = h[LAMELM_BETA1], beta2 = h[LAMELM_BETA2];
  const float step = *table_pointer<const float>(c.row + LAMELM_META_STEP);  // already advanced by finalize_kernel
  Scalars s;
  s.clip = fminf(static_cast<float>(h[LAMELM_MAX_NORM]) / (norm + 1e-6f), 1.0f);  // as clip_grad_norm_
  s.lerp_weight = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(h[LAMELM_EPS]);
  s.decay = static_cast<float>(1.0 - lr * h[LAMELM_WEIGHT_DECAY]);
  s.step_size = static_cast<float>(lr / one_minus_pow(beta1, static_cast<int32_t>(step)));
  s.bias_correction2_sqrt = static_cast<float>(sqrt(one_minus_pow(beta2, static_cast<int32_t>(step))));
  const uint32_t param_id = static_cast<uint32_t>(c.row[LAMELM_META_PARAM_ID]);  // low 32 bits, as the Triton kernel
  const uint32_t key = mix32(seed ^ mix32(param_id ^ mix32(static_cast<uint32_t>(step))));

  P* param = table_pointer<P>(c.row + LAMELM_META_PARAM);
  const G* grad = table_pointer<const G>(grads + c.index);
  float* exp_avg = table_pointer<float>(c.row + LAMELM_META_EXP_AVG);
  float* exp_avg_sq = table_pointer<float>(c.row + LAMELM_META_EXP_AVG_SQ);
  float* master = use_master ? table_pointer<float>(c.row + LAMELM_META_MASTER) : nullptr;
  const int64_t start = c.start, end = c.end;
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

template <typename G>
int sum_squares(const int64_t* meta, const int64_t* grads, const int64_t* chunks, int64_t num_chunks, bool vectorized,
                int64_t chunk_size, float* partials, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  if (vectorized) {
    sum_squares_kernel<G, true><<<blocks, kThreads, 0, stream>>>(meta, grads, chunks, chunk_size, partials);
  } else {
    sum_squares_kernel<G, false><<<blocks, kThreads, 0, stream>>>(meta, grads, chunks, chunk_size, partials);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename P, typename G>
int update(const int64_t* meta, const int64_t* grads, const int64_t* chunks, int64_t num_chunks, bool use_master,
           bool stochastic, bool vectorized, uint32_t seed, const double* hyper, const float* norm, int64_t chunk_size,
           cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(num_chunks);
  if (vectorized) {
    adamw_update_kernel<P, G, true><<<blocks, kThreads, 0, stream>>>(meta, grads, chunks, hyper, norm, seed,
                                                                     chunk_size, use_master, stochastic);
  } else {
    adamw_update_kernel<P, G, false><<<blocks, kThreads, 0, stream>>>(meta, grads, chunks, hyper, norm, seed,
                                                                      chunk_size, use_master, stochastic);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename P>
int update_for_grad(int grad_dtype, const int64_t* meta, const int64_t* grads, const int64_t* chunks,
                    int64_t num_chunks, bool use_master, bool stochastic, bool vectorized, uint32_t seed,
                    const double* hyper, const float* norm, int64_t chunk_size, cudaStream_t stream) {
  switch (grad_dtype) {
    case LAMELM_FLOAT32:
      return update<P, float>(meta, grads, chunks, num_chunks, use_master, stochastic, vectorized, seed, hyper, norm,
                              chunk_size, stream);
    case LAMELM_FLOAT16:
      return update<P, __half>(meta, grads, chunks, num_chunks, use_master, stochastic, vectorized, seed, hyper, norm,
                               chunk_size, stream);
    case LAMELM_BFLOAT16:
      return update<P, __nv_bfloat16>(meta, grads, chunks, num_chunks, use_master, stochastic, vectorized, seed,
                                      hyper, norm, chunk_size, stream);
    default:
      return LAMELM_INVALID_ARGUMENT;
  }
}

// Chunks are one block each (grid x is at most 2^31 - 1) and start at multiples of 4 (vector accesses).
bool valid_chunks(int64_t num_chunks, int64_t chunk_size) {
  return num_chunks >= 0 && num_chunks <= INT32_MAX && chunk_size > 0 && chunk_size % 4 == 0;
}

}  // namespace

extern "C" int lamelm_adamw_sum_squares(const int64_t* meta, const int64_t* grads, const int64_t* chunks,
                                        int64_t num_chunks, int grad_dtype, int vectorized, int64_t chunk_size,
                                        float* partials, void* stream) {
  if (!valid_chunks(num_chunks, chunk_size)) return LAMELM_INVALID_ARGUMENT;
  if (num_chunks == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool vec = vectorized != 0;
  switch (grad_dtype) {
    case LAMELM_FLOAT32:
      return sum_squares<float>(meta, grads, chunks, num_chunks, vec, chunk_size, partials, s);
    case LAMELM_FLOAT16:
      return sum_squares<__half>(meta, grads, chunks, num_chunks, vec, chunk_size, partials, s);
    case LAMELM_BFLOAT16:
      return sum_squares<__nv_bfloat16>(meta, grads, chunks, num_chunks, vec, chunk_size, partials, s);
    default:
      return LAMELM_INVALID_ARGUMENT;
  }
}

extern "C" int lamelm_adamw_finalize(const float* partials, int64_t num_partials, const int64_t* meta,
                                     int64_t num_tensors, float* norm, int64_t* skipped, void* stream) {
  if (num_partials < 0 || num_tensors < 0) return LAMELM_INVALID_ARGUMENT;
  finalize_kernel<<<1, kFinalizeThreads, 0, static_cast<cudaStream_t>(stream)>>>(partials, num_partials, meta,
                                                                                num_tensors, norm, skipped);
  return static_cast<int>(cudaGetLastError());
}

extern "C" int lamelm_adamw_update(const int64_t* meta, const int64_t* grads, const int64_t* chunks,
                                   int64_t num_chunks, int param_dtype, int grad_dtype, int use_master, int stochastic,
                                   int vectorized, uint32_t seed, const double* hyper, const float* norm,
                                   int64_t chunk_size, void* stream) {
  if (!valid_chunks(num_chunks, chunk_size)) return LAMELM_INVALID_ARGUMENT;
  if (stochastic && param_dtype != LAMELM_BFLOAT16) return LAMELM_INVALID_ARGUMENT;
  if (use_master && param_dtype == LAMELM_FLOAT32) return LAMELM_INVALID_ARGUMENT;
  if (num_chunks == 0) return 0;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool m = use_master != 0, sr = stochastic != 0, vec = vectorized != 0;
  switch (param_dtype) {
    case LAMELM_FLOAT32:
      return update_for_grad<float>(grad_dtype, meta, grads, chunks, num_chunks, m, sr, vec, seed, hyper, norm,
                                    chunk_size, s);
    case LAMELM_FLOAT16:
      return update_for_grad<__half>(grad_dtype, meta, grads, chunks, num_chunks, m, sr, vec, seed, hyper, norm,
                                     chunk_size, s);
    case LAMELM_BFLOAT16:
      return update_for_grad<__nv_bfloat16>(grad_dtype, meta, grads, chunks, num_chunks, m, sr, vec, seed, hyper,
                                            norm, chunk_size, s);
    default:
      return LAMELM_INVALID_ARGUMENT;
  }
}

extern "C" const char* lamelm_cuda_error_string(int error) {
  if (error == LAMELM_INVALID_ARGUMENT) return "invalid argument (dtype, chunk size or option combination)";
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}
