/* Multi-tensor fused AdamW with global grad-norm clipping: the plain C interface of adamw.cu.
 *
 * Kept free of torch headers so that the CUDA sources compile with nvcc alone (CI has no CUDA build of torch);
 * bindings.cpp checks the tensors and hands their pointers over. All functions are asynchronous on `stream` (a
 * cudaStream_t) and return 0 or an error code for lamelm_cuda_error_string. Same math and the same device tables as
 * kernels/adamw.py (Triton), built by lamelm_fast/optim/_adamw_tables.py:
 *
 *   meta    int64 [tensors][LAMELM_META_WIDTH]: one row per tensor (columns below; pointers as integers);
 *   grads   int64 [tensors]: the gradient pointer of each row (apart: gradients move every step);
 *   chunks  int64 [num_chunks][2]: (meta row, chunk index within that tensor), one thread block per entry;
 *   hyper   double [param groups][LAMELM_HYPER_WIDTH].
 *
 * The kernels trust the tables: every pointer must be valid for `numel` elements of its dtype (fp32 for the
 * moments, the master copy and the 0-dim step counter), every group index a row of `hyper`. `vectorized`: every
 * pointer of the rows the chunk table names is 16-byte aligned (4-element vector accesses). Each function is one
 * kernel launch, whatever the number of tensors.
 */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { LAMELM_FLOAT32 = 0, LAMELM_FLOAT16 = 1, LAMELM_BFLOAT16 = 2 };

/* Columns of the tensor table, as META_COLUMNS in kernels/adamw.py (a CPU test compares them). The master column
 * is 0 for a tensor without an fp32 master copy. */
enum { LAMELM_META_PARAM = 0, LAMELM_META_EXP_AVG, LAMELM_META_EXP_AVG_SQ, LAMELM_META_MASTER, LAMELM_META_STEP,
       LAMELM_META_NUMEL, LAMELM_META_GROUP, LAMELM_META_PARAM_ID, LAMELM_META_WIDTH };

/* Columns of the fp64 hyperparameter table (one row per param group), as HYPER_COLUMNS in kernels/adamw.py. */
enum { LAMELM_LR = 0, LAMELM_BETA1, LAMELM_BETA2, LAMELM_EPS, LAMELM_WEIGHT_DECAY, LAMELM_MAX_NORM,
       LAMELM_HYPER_WIDTH };

#define LAMELM_INVALID_ARGUMENT (-1)

/* partials[k] = fp32 sum of squares of the gradient elements of chunk k (chunk_size elements from
 * chunks[k][1] * chunk_size of the tensor in row chunks[k][0]). */
int lamelm_adamw_sum_squares(const int64_t* meta, const int64_t* grads, const int64_t* chunks, int64_t num_chunks,
                             int grad_dtype, int vectorized, int64_t chunk_size, float* partials, void* stream);

/* norm = sqrt(sum(partials)) summed in a fixed order; if it is finite the step counter of every row += 1, else
 * *skipped += 1. One block. */
int lamelm_adamw_finalize(const float* partials, int64_t num_partials, const int64_t* meta, int64_t num_tensors,
                          float* norm, int64_t* skipped, void* stream);

/* Clip by min(1, max_norm / (norm + 1e-6)) and apply AdamW to every chunk of `chunks`; writes nothing when norm is
 * not finite. Reads the step counters already advanced by lamelm_adamw_finalize. */
int lamelm_adamw_update(const int64_t* meta, const int64_t* grads, const int64_t* chunks, int64_t num_chunks,
                        int param_dtype, int grad_dtype, int use_master, int stochastic, int vectorized, uint32_t seed,
                        const double* hyper, const float* norm, int64_t chunk_size, void* stream);

const char* lamelm_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif
