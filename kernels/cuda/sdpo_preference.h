/* C ABI of the CUDA C++ twin of the fused preference-loss kernels (libsdpo_cuda.so).
 *
 * Raw device pointers, sizes and a CUDA stream (cudaStream_t passed as void*). Every function
 * returns 0 on success, SDPO_CUDA_BAD_ARGUMENT or SDPO_CUDA_LAUNCH_ERROR otherwise, with a
 * message from sdpo_cuda_last_error() (per thread). Python: sdpo/cuda_backend.py (ctypes).
 *
 * Layouts (all contiguous, row-major):
 *   model_pred, ref_pred  (2B, D)   winners in rows 0..B-1, losers in rows B..2B-1
 *   target                (B, D) when target_shared (shared by a pair's two rows), else (2B, D)
 *   pair_weights          (B,) fp32 or NULL
 *   workspace             sdpo_cuda_workspace_floats(B, num_chunks) fp32 values
 *   loss (1), stats (9), lambda (B), coefficients (2, 2B): fp32 outputs
 *   grad_output (1) fp32; grad (2B, D) in the dtype of model_pred
 * pred_dtype, ref_dtype, target_dtype: SDPO_CUDA_FLOAT32, SDPO_CUDA_BFLOAT16 or
 *   SDPO_CUDA_FLOAT16, one per input (each is read in its own dtype; mixed is fine).
 * chunk_elements: a multiple of 8 (the kernels' element groups); num_chunks: 1 to 512.
 * Any alignment works: the kernels use 16-byte vector loads when every pointer is 16-byte
 * aligned and a row of every input is a multiple of 16 bytes (sdpo_cuda_vector_loads), and
 * scalar loads otherwise, with the same summation order (the same bits either way).
 * method: 0 diffusion-dpo, 1 dspo, 2 dspo-sdxl, 3 dmpo. group_size 0: one lambda per call.
 */
#ifndef SDPO_PREFERENCE_H
#define SDPO_PREFERENCE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SDPO_CUDA_ABI_VERSION 2
#define SDPO_CUDA_OK 0
#define SDPO_CUDA_BAD_ARGUMENT 1
#define SDPO_CUDA_LAUNCH_ERROR 2

#define SDPO_CUDA_FLOAT32 0
#define SDPO_CUDA_BFLOAT16 1
#define SDPO_CUDA_FLOAT16 2

/* The library is built with hidden visibility; only these symbols are exported. */
#if defined(__GNUC__)
#define SDPO_API __attribute__((visibility("default")))
#else
#define SDPO_API
#endif

SDPO_API int sdpo_cuda_abi_version(void);
SDPO_API const char* sdpo_cuda_last_error(void);
SDPO_API int64_t sdpo_cuda_workspace_floats(int64_t batch_pairs, int64_t num_chunks);

/* 1 when the forward kernels take the 16-byte vector path for these inputs, else 0. */
SDPO_API int sdpo_cuda_vector_loads(int pred_dtype, int ref_dtype, int target_dtype,
                                    const void* model_pred, const void* ref_pred,
                                    const void* target, int64_t elements);

SDPO_API int sdpo_cuda_forward(int pred_dtype, int ref_dtype, int target_dtype,
                      const void* model_pred, const void* ref_pred, const void* target,
                      int target_shared, const float* pair_weights, int64_t batch_pairs,
                      int64_t elements, int64_t chunk_elements, int64_t num_chunks, int method,
                      float beta, float mu, int safeguard, int64_t group_size, float log_q,
                      float log_one_minus_q, float* workspace, float* loss, float* stats,
                      float* lambda_out, float* coefficients, void* stream);

/* sdpo_cuda_forward's kernels one at a time (the benchmarks time each): phases
 * SDPO_CUDA_SUMS (pair_sums_kernel: workspace partials), SDPO_CUDA_FINALIZE (finalize_kernel,
 * from the partials) or both. */
#define SDPO_CUDA_SUMS 1
#define SDPO_CUDA_FINALIZE 2
SDPO_API int sdpo_cuda_forward_phases(int phases, int pred_dtype, int ref_dtype, int target_dtype,
                      const void* model_pred, const void* ref_pred, const void* target,
                      int target_shared, const float* pair_weights, int64_t batch_pairs,
                      int64_t elements, int64_t chunk_elements, int64_t num_chunks, int method,
                      float beta, float mu, int safeguard, int64_t group_size, float log_q,
                      float log_one_minus_q, float* workspace, float* loss, float* stats,
                      float* lambda_out, float* coefficients, void* stream);

SDPO_API int sdpo_cuda_gradient(int pred_dtype, int ref_dtype, int target_dtype,
                       const float* grad_output, const void* model_pred,
                       const void* ref_pred, const void* target, int target_shared, int with_gap,
                       int64_t batch_pairs, int64_t elements, const float* coefficients,
                       void* grad, void* stream);

/* The same computation on host fp32 arrays, one thread, with the same math (the CPU tests'
 * window onto the kernels' arithmetic). Built into libsdpo_cuda_host.so without CUDA. */
SDPO_API int sdpo_host_forward(const float* model_pred, const float* ref_pred, const float* target,
                      int target_shared, const float* pair_weights, int64_t batch_pairs,
                      int64_t elements, int method, float beta, float mu, int safeguard,
                      int64_t group_size, float log_q, float log_one_minus_q, float* loss,
                      float* stats, float* lambda_out, float* coefficients);

SDPO_API int sdpo_host_gradient(float grad_output, const float* model_pred, const float* ref_pred,
                       const float* target, int target_shared, int with_gap, int64_t batch_pairs,
                       int64_t elements, const float* coefficients, float* grad);

#ifdef __cplusplus
}
#endif

#endif /* SDPO_PREFERENCE_H */
