/* Multi-tensor fused AdamW with global grad-norm clipping: the plain C interface of adamw.cu.
 *
 * Kept free of torch headers so that the CUDA sources compile with nvcc alone (CI has no CUDA build of torch);
 * bindings.cpp turns tensors into these descriptors. All functions are asynchronous on `stream` (a cudaStream_t)
 * and return 0 or an error code for lamelm_cuda_error_string. Same math as kernels/adamw.py (Triton).
 */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { LAMELM_FLOAT32 = 0, LAMELM_FLOAT16 = 1, LAMELM_BFLOAT16 = 2 };

/* Columns of the fp64 hyperparameter table (one row per param group), as hyper_row() in kernels/adamw.py. */
enum { LAMELM_LR = 0, LAMELM_BETA1, LAMELM_BETA2, LAMELM_EPS, LAMELM_WEIGHT_DECAY, LAMELM_MAX_NORM,
       LAMELM_HYPER_WIDTH };

#define LAMELM_INVALID_ARGUMENT (-1)

typedef struct {
  void* param;          /* param dtype; written */
  const void* grad;     /* grad dtype */
  float* exp_avg;
  float* exp_avg_sq;
  float* master;        /* fp32 master copy, or NULL */
  float* step;          /* 0-dim step counter */
  int64_t numel;
  int32_t group;        /* row of the hyperparameter table */
  uint32_t param_id;    /* stochastic-rounding key */
} lamelm_adamw_tensor;

/* partials[k] = sum of squares of the k-th chunk of `chunk_size` elements, chunks in tensor order
 * (sum over tensors of ceil(numel / chunk_size) entries). Only `grad` and `numel` are read. */
int lamelm_adamw_sum_squares(const lamelm_adamw_tensor* tensors, int64_t count, int grad_dtype, int64_t chunk_size,
                             float* partials, void* stream);

/* norm = sqrt(sum(partials)); if it is finite every *steps[i] += 1, else *skipped += 1. */
int lamelm_adamw_finalize(const float* partials, int64_t num_partials, float* norm, int64_t* skipped,
                          float* const* steps, int64_t num_steps, void* stream);

/* Clip by min(1, max_norm / (norm + 1e-6)) and apply AdamW; writes nothing when norm is not finite.
 * Reads the step counters already advanced by lamelm_adamw_finalize. */
int lamelm_adamw_update(const lamelm_adamw_tensor* tensors, int64_t count, int param_dtype, int grad_dtype,
                        int use_master, int stochastic, uint32_t seed, const double* hyper, const float* norm,
                        int64_t chunk_size, void* stream);

const char* lamelm_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif
