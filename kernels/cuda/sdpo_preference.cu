// CUDA C++ twin of the fused Triton kernels in kernels/preference.py (the same three passes:
// pair sums, finalize, gradient), exported through the C ABI in sdpo_preference.h.
//
// pair_sums_kernel: grid (B, num_chunks), 256 threads; each thread accumulates the seven sums
//   over a strided slice of its chunk in fp32, then a fixed-shape shared-memory tree reduces
//   them (deterministic: no atomics, as exact resume needs). One read of every input.
// finalize_kernel: one block; reduces the chunks of each pair, then the math of
//   sdpo_preference_math.h (the same functions the CPU tests run).
// gradient_kernel: grid (blocks of 1024 elements, 2B rows); 4 elements per thread.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <string>

#include "sdpo_preference.h"
#include "sdpo_preference_math.h"

namespace {

constexpr int kSumsThreads = 256;
constexpr int kFinalizeThreads = 256;
constexpr int kGradientThreads = 256;
constexpr int kGradientItems = 4;

thread_local std::string last_error;

int fail(int code, const std::string& message) {
  last_error = message;
  return code;
}

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }
__device__ __forceinline__ float to_float(__half value) { return __half2float(value); }

template <typename T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16(value);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half(value);
}

template <typename T, bool kTargetShared, bool kWithGap>
__global__ void __launch_bounds__(kSumsThreads)
    pair_sums_kernel(const T* __restrict__ pred, const T* __restrict__ ref,
                     const T* __restrict__ target, float* __restrict__ partials,
                     int64_t batch_pairs, int64_t elements, int64_t chunk_elements,
                     int64_t num_chunks) {
  const int64_t pair = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t winner = pair * elements;
  const int64_t loser = (pair + batch_pairs) * elements;
  const int64_t target_loser = kTargetShared ? winner : loser;
  const int64_t start = chunk * chunk_elements;
  const int64_t stop = min(start + chunk_elements, elements);
  float acc[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = start + threadIdx.x; k < stop; k += kSumsThreads) {
    sdpo::accumulate(to_float(pred[winner + k]), to_float(pred[loser + k]),
                     to_float(ref[winner + k]), to_float(ref[loser + k]),
                     to_float(target[winner + k]), to_float(target[target_loser + k]), kWithGap,
                     acc);
  }
  __shared__ float shared[7][kSumsThreads];
  for (int s = 0; s < 7; ++s) shared[s][threadIdx.x] = acc[s];
  __syncthreads();
  for (int width = kSumsThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      for (int s = 0; s < 7; ++s) shared[s][threadIdx.x] += shared[s][threadIdx.x + width];
    }
    __syncthreads();
  }
  if (threadIdx.x < sdpo::kNumSums) {
    const float value = threadIdx.x < 7 ? shared[threadIdx.x][0] : 0.0f;
    partials[(pair * num_chunks + chunk) * sdpo::kNumSums + threadIdx.x] = value;
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const float* __restrict__ partials, int64_t num_chunks,
                    const float* __restrict__ weights, float* __restrict__ pair_sums,
                    float* __restrict__ per_pair, sdpo::Params params, float* __restrict__ loss,
                    float* __restrict__ stats, float* __restrict__ lambda_out,
                    float* __restrict__ coefficients) {
  const int64_t pairs = params.batch_pairs;
  for (int64_t index = threadIdx.x; index < pairs * sdpo::kNumSums; index += blockDim.x) {
    const int64_t pair = index / sdpo::kNumSums;
    const int sum = static_cast<int>(index % sdpo::kNumSums);
    float total = 0.0f;
    for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
      total += partials[(pair * num_chunks + chunk) * sdpo::kNumSums + sum];
    }
    pair_sums[index] = total;
  }
  __syncthreads();
  __shared__ sdpo::Totals totals;
  if (threadIdx.x == 0) totals = sdpo::batch_totals(pair_sums, params);
  __syncthreads();
  for (int64_t pair = threadIdx.x; pair < pairs; pair += blockDim.x) {
    sdpo::finalize_pair(pair, pair_sums, totals, params, weights, lambda_out, coefficients,
                        per_pair);
  }
  __syncthreads();
  if (threadIdx.x == 0) sdpo::reduce_outputs(per_pair, totals, params, loss, stats);
}

template <typename T, bool kTargetShared, bool kWithGap>
__global__ void __launch_bounds__(kGradientThreads)
    gradient_kernel(const float* __restrict__ grad_output, const T* __restrict__ pred,
                    const T* __restrict__ ref, const T* __restrict__ target,
                    const float* __restrict__ coefficients, T* __restrict__ grad,
                    int64_t batch_pairs, int64_t elements) {
  const int64_t row = blockIdx.y;
  const int64_t rows = 2 * batch_pairs;
  const bool winner = row < batch_pairs;
  const float g0 = grad_output[0];
  const float coefficient_e = coefficients[row];
  const float coefficient_g = coefficients[rows + row];
  const int64_t row_offset = row * elements;
  const int64_t target_offset = (kTargetShared ? row % batch_pairs : row) * elements;
  const int64_t base =
      static_cast<int64_t>(blockIdx.x) * kGradientThreads * kGradientItems + threadIdx.x;
#pragma unroll
  for (int item = 0; item < kGradientItems; ++item) {
    const int64_t k = base + item * kGradientThreads;
    if (k < elements) {
      const float reference = (kWithGap && winner) ? to_float(ref[row_offset + k]) : 0.0f;
      grad[row_offset + k] = from_float<T>(sdpo::gradient_element(
          g0, to_float(pred[row_offset + k]), to_float(target[target_offset + k]), reference,
          coefficient_e, coefficient_g, winner, kWithGap));
    }
  }
}

int check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return fail(SDPO_CUDA_LAUNCH_ERROR, std::string(what) + ": " + cudaGetErrorString(status));
  }
  return SDPO_CUDA_OK;
}

template <typename T, bool kTargetShared, bool kWithGap>
void launch_sums(const void* pred, const void* ref, const void* target, float* partials,
                 int64_t batch_pairs, int64_t elements, int64_t chunk_elements,
                 int64_t num_chunks, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(batch_pairs), static_cast<unsigned>(num_chunks));
  pair_sums_kernel<T, kTargetShared, kWithGap><<<grid, kSumsThreads, 0, stream>>>(
      static_cast<const T*>(pred), static_cast<const T*>(ref), static_cast<const T*>(target),
      partials, batch_pairs, elements, chunk_elements, num_chunks);
}

template <typename T>
void dispatch_sums(bool target_shared, bool with_gap, const void* pred, const void* ref,
                   const void* target, float* partials, int64_t batch_pairs, int64_t elements,
                   int64_t chunk_elements, int64_t num_chunks, cudaStream_t stream) {
  if (target_shared && with_gap) {
    launch_sums<T, true, true>(pred, ref, target, partials, batch_pairs, elements,
                               chunk_elements, num_chunks, stream);
  } else if (target_shared) {
    launch_sums<T, true, false>(pred, ref, target, partials, batch_pairs, elements,
                                chunk_elements, num_chunks, stream);
  } else if (with_gap) {
    launch_sums<T, false, true>(pred, ref, target, partials, batch_pairs, elements,
                                chunk_elements, num_chunks, stream);
  } else {
    launch_sums<T, false, false>(pred, ref, target, partials, batch_pairs, elements,
                                 chunk_elements, num_chunks, stream);
  }
}

template <typename T, bool kTargetShared, bool kWithGap>
void launch_gradient(const float* grad_output, const void* pred, const void* ref,
                     const void* target, const float* coefficients, void* grad,
                     int64_t batch_pairs, int64_t elements, cudaStream_t stream) {
  const int64_t per_block = kGradientThreads * kGradientItems;
  const dim3 grid(static_cast<unsigned>((elements + per_block - 1) / per_block),
                  static_cast<unsigned>(2 * batch_pairs));
  gradient_kernel<T, kTargetShared, kWithGap><<<grid, kGradientThreads, 0, stream>>>(
      grad_output, static_cast<const T*>(pred), static_cast<const T*>(ref),
      static_cast<const T*>(target), coefficients, static_cast<T*>(grad), batch_pairs, elements);
}

template <typename T>
void dispatch_gradient(bool target_shared, bool with_gap, const float* grad_output,
                       const void* pred, const void* ref, const void* target,
                       const float* coefficients, void* grad, int64_t batch_pairs,
                       int64_t elements, cudaStream_t stream) {
  if (target_shared && with_gap) {
    launch_gradient<T, true, true>(grad_output, pred, ref, target, coefficients, grad,
                                   batch_pairs, elements, stream);
  } else if (target_shared) {
    launch_gradient<T, true, false>(grad_output, pred, ref, target, coefficients, grad,
                                    batch_pairs, elements, stream);
  } else if (with_gap) {
    launch_gradient<T, false, true>(grad_output, pred, ref, target, coefficients, grad,
                                    batch_pairs, elements, stream);
  } else {
    launch_gradient<T, false, false>(grad_output, pred, ref, target, coefficients, grad,
                                     batch_pairs, elements, stream);
  }
}

int check_sizes(int dtype, int64_t batch_pairs, int64_t elements) {
  if (dtype < SDPO_CUDA_FLOAT32 || dtype > SDPO_CUDA_FLOAT16) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "dtype: expected 0 (fp32), 1 (bf16) or 2 (fp16)");
  }
  // Grid limits: x up to 2^31 - 1 blocks, y up to 65535 (rows of the gradient kernel).
  if (batch_pairs < 1 || 2 * batch_pairs > 65535) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "batch_pairs: expected 1 to 32767 pairs");
  }
  if (elements < 1) return fail(SDPO_CUDA_BAD_ARGUMENT, "elements: expected >= 1");
  return SDPO_CUDA_OK;
}

}  // namespace

extern "C" int sdpo_cuda_abi_version(void) { return SDPO_CUDA_ABI_VERSION; }

extern "C" const char* sdpo_cuda_last_error(void) { return last_error.c_str(); }

extern "C" int64_t sdpo_cuda_workspace_floats(int64_t batch_pairs, int64_t num_chunks) {
  // partials (B, chunks, 8), pair sums (B, 8), per-pair outputs (B, 8)
  return batch_pairs * num_chunks * sdpo::kNumSums + batch_pairs * sdpo::kNumSums +
         batch_pairs * sdpo::kPerPair;
}

extern "C" int sdpo_cuda_forward(int dtype, const void* model_pred, const void* ref_pred,
                                 const void* target, int target_shared,
                                 const float* pair_weights, int64_t batch_pairs,
                                 int64_t elements, int64_t chunk_elements, int64_t num_chunks,
                                 int method, float beta, float mu, int safeguard,
                                 int64_t group_size, float log_q, float log_one_minus_q,
                                 float* workspace, float* loss, float* stats, float* lambda_out,
                                 float* coefficients, void* stream) {
  if (const int status = check_sizes(dtype, batch_pairs, elements)) return status;
  if (method < 0 || method > 3) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "method: expected 0 to 3");
  }
  if (num_chunks < 1 || num_chunks > 65535 || chunk_elements < 1 ||
      chunk_elements * num_chunks < elements) {
    return fail(SDPO_CUDA_BAD_ARGUMENT,
                "chunks: expected 1 to 65535 chunks covering the elements");
  }
  if (group_size < 0) return fail(SDPO_CUDA_BAD_ARGUMENT, "group_size: expected >= 0");
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool with_gap = method == sdpo::kDspo || method == sdpo::kDspoSdxl;
  float* partials = workspace;
  float* pair_sums = partials + batch_pairs * num_chunks * sdpo::kNumSums;
  float* per_pair = pair_sums + batch_pairs * sdpo::kNumSums;
  const bool shared = target_shared != 0;
  if (dtype == SDPO_CUDA_FLOAT32) {
    dispatch_sums<float>(shared, with_gap, model_pred, ref_pred, target, partials, batch_pairs,
                         elements, chunk_elements, num_chunks, cuda_stream);
  } else if (dtype == SDPO_CUDA_BFLOAT16) {
    dispatch_sums<__nv_bfloat16>(shared, with_gap, model_pred, ref_pred, target, partials,
                                 batch_pairs, elements, chunk_elements, num_chunks, cuda_stream);
  } else {
    dispatch_sums<__half>(shared, with_gap, model_pred, ref_pred, target, partials, batch_pairs,
                          elements, chunk_elements, num_chunks, cuda_stream);
  }
  if (const int status = check_launch("pair_sums_kernel")) return status;
  const sdpo::Params params{method, safeguard, group_size,      batch_pairs,
                            static_cast<float>(elements), beta, mu, log_q, log_one_minus_q};
  finalize_kernel<<<1, kFinalizeThreads, 0, cuda_stream>>>(partials, num_chunks, pair_weights,
                                                            pair_sums, per_pair, params, loss,
                                                            stats, lambda_out, coefficients);
  return check_launch("finalize_kernel");
}

extern "C" int sdpo_cuda_gradient(int dtype, const float* grad_output, const void* model_pred,
                                  const void* ref_pred, const void* target, int target_shared,
                                  int with_gap, int64_t batch_pairs, int64_t elements,
                                  const float* coefficients, void* grad, void* stream) {
  if (const int status = check_sizes(dtype, batch_pairs, elements)) return status;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool shared = target_shared != 0;
  const bool gap = with_gap != 0;
  if (dtype == SDPO_CUDA_FLOAT32) {
    dispatch_gradient<float>(shared, gap, grad_output, model_pred, ref_pred, target,
                             coefficients, grad, batch_pairs, elements, cuda_stream);
  } else if (dtype == SDPO_CUDA_BFLOAT16) {
    dispatch_gradient<__nv_bfloat16>(shared, gap, grad_output, model_pred, ref_pred, target,
                                     coefficients, grad, batch_pairs, elements, cuda_stream);
  } else {
    dispatch_gradient<__half>(shared, gap, grad_output, model_pred, ref_pred, target,
                              coefficients, grad, batch_pairs, elements, cuda_stream);
  }
  return check_launch("gradient_kernel");
}
