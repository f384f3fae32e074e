// CUDA C++ twin of the fused Triton kernels in sdpo/kernels/preference.py (the same three passes:
// pair sums, finalize, gradient), exported through the C ABI in sdpo_preference.h.
//
// pair_sums_kernel: grid (B, num_chunks), 256 threads; each thread takes groups of kVector = 8
//   consecutive elements (groups t, t + 256, ... of its chunk) and accumulates the seven sums in
//   fp32, then a fixed-shape shared-memory tree reduces them (deterministic: no atomics, as
//   exact resume needs). One read of every input.
// finalize_kernel: one block; one load of all partials into a shared (pairs, chunk slots, 8)
//   tile (<= 4096 floats for the chunk counts cuda_backend.plan_chunks gives), a halving tree
//   over the chunk slots whose shape depends on num_chunks alone (never on the GPU model),
//   then the math of sdpo_preference_math.h (the same functions the CPU tests run): the batch
//   totals and the outputs are reduced over the pairs by all 512 threads (each a strided set of
//   pairs, then a fixed shared-memory tree: the order depends on the pair count alone), and
//   each thread finalizes pairs t, t + 512, ...
// gradient_kernel: grid (blocks of 2048 elements, 2B rows); one group of 8 elements per thread.
//
// Loads: each input has its own dtype (fp32, bf16 or fp16; the kernels are templated on all
// three), so a bf16 prediction against the trainer's fp32 target is read as it is, no copies.
// A group is read with 16-byte vector loads (one uint4 for 8 16-bit values, two for 8 fp32)
// when the host found every pointer 16-byte aligned and every row a whole number of 16 bytes
// (vector_rows below); otherwise, and for a group cut short by the end of a row or chunk (the
// tail), element by element. Both paths accumulate a group's elements in the same order, so
// they give the same bits.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "sdpo_preference.h"
#include "sdpo_preference_math.h"

namespace {

constexpr int kVector = 8;  // elements per group: 16 bytes of a 16-bit input, 32 of fp32
constexpr int kSumsThreads = 256;
constexpr int kFinalizeThreads = sdpo::kFinalizeLanes;  // one thread per lane: 512
constexpr int kTileFloats = 4096;     // the finalize tile: 16 KB of shared memory
// After the partials, the tile is the scratch of the reductions over pairs ([value][lane]).
static_assert(kTileFloats >= sdpo::kPerPair * kFinalizeThreads &&
                  kTileFloats >= sdpo::kTotals * kFinalizeThreads,
              "the finalize tile holds the lanes' values");
constexpr int kMaxChunks = 512;       // chunks per pair: the finalize tile's slots at most
constexpr int kGradientThreads = 256;

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

// The two 16-bit values of a 32-bit word (the lower address in the low half) as floats.
__device__ __forceinline__ void unpack_pair(unsigned word, __nv_bfloat16*, float* out) {
  out[0] = __uint_as_float(word << 16);
  out[1] = __uint_as_float(word & 0xffff0000u);
}
__device__ __forceinline__ void unpack_pair(unsigned word, __half*, float* out) {
  out[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(word & 0xffffu)));
  out[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(word >> 16)));
}
__device__ __forceinline__ unsigned pack_pair(float low, float high, __nv_bfloat16*) {
  return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16(low))) |
         (static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16(high))) << 16);
}
__device__ __forceinline__ unsigned pack_pair(float low, float high, __half*) {
  return static_cast<unsigned>(__half_as_ushort(__float2half(low))) |
         (static_cast<unsigned>(__half_as_ushort(__float2half(high))) << 16);
}

// kVector elements from a 16-byte aligned address: 16 / sizeof(T) per 16-byte load.
template <typename T>
__device__ __forceinline__ void load_vector(const T* __restrict__ source, float* out) {
  const uint4* words = reinterpret_cast<const uint4*>(source);
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int part = 0; part < kVector / 4; ++part) {
      const uint4 bits = __ldg(words + part);
      out[4 * part + 0] = __uint_as_float(bits.x);
      out[4 * part + 1] = __uint_as_float(bits.y);
      out[4 * part + 2] = __uint_as_float(bits.z);
      out[4 * part + 3] = __uint_as_float(bits.w);
    }
  } else {
    static_assert(sizeof(T) == 2 && kVector == 8, "one uint4 holds 8 16-bit values");
    const uint4 bits = __ldg(words);
    unpack_pair(bits.x, static_cast<T*>(nullptr), out + 0);
    unpack_pair(bits.y, static_cast<T*>(nullptr), out + 2);
    unpack_pair(bits.z, static_cast<T*>(nullptr), out + 4);
    unpack_pair(bits.w, static_cast<T*>(nullptr), out + 6);
  }
}

// The first `count` (< kVector at a tail, or any count on the fallback path) elements, one
// scalar load each; the rest of the group is zero and never accumulated.
template <typename T>
__device__ __forceinline__ void load_scalar(const T* __restrict__ source, int count,
                                            float* out) {
#pragma unroll
  for (int j = 0; j < kVector; ++j) out[j] = j < count ? to_float(source[j]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ source, int count,
                                           bool vectorized, float* out) {
  if (vectorized && count == kVector) {
    load_vector(source, out);
  } else {
    load_scalar(source, count, out);
  }
}

template <typename T>
__device__ __forceinline__ void store_group(T* __restrict__ destination, int count,
                                            bool vectorized, const float* values) {
  if (vectorized && count == kVector) {
    uint4* words = reinterpret_cast<uint4*>(destination);
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int part = 0; part < kVector / 4; ++part) {
        __stwb(words + part, make_uint4(__float_as_uint(values[4 * part + 0]),
                                        __float_as_uint(values[4 * part + 1]),
                                        __float_as_uint(values[4 * part + 2]),
                                        __float_as_uint(values[4 * part + 3])));
      }
    } else {
      T* tag = nullptr;
      __stwb(words, make_uint4(pack_pair(values[0], values[1], tag),
                               pack_pair(values[2], values[3], tag),
                               pack_pair(values[4], values[5], tag),
                               pack_pair(values[6], values[7], tag)));
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVector; ++j) {
      if (j < count) destination[j] = from_float<T>(values[j]);
    }
  }
}

template <typename TP, typename TR, typename TT, bool kWithGap>
__global__ void __launch_bounds__(kSumsThreads)
    pair_sums_kernel(const TP* __restrict__ pred, const TR* __restrict__ ref,
                     const TT* __restrict__ target, float* __restrict__ partials,
                     bool target_shared, bool vectorized, int64_t batch_pairs, int64_t elements,
                     int64_t chunk_elements, int64_t num_chunks) {
  const int64_t pair = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t winner = pair * elements;
  const int64_t loser = (pair + batch_pairs) * elements;
  const int64_t target_loser = target_shared ? winner : loser;
  const int64_t start = chunk * chunk_elements;
  const int64_t stop = min(start + chunk_elements, elements);
  float acc[7] = {0, 0, 0, 0, 0, 0, 0};
  for (int64_t k = start + threadIdx.x * kVector; k < stop; k += kSumsThreads * kVector) {
    const int count = static_cast<int>(min(static_cast<int64_t>(kVector), stop - k));
    float pred_w[kVector], pred_l[kVector], ref_w[kVector], ref_l[kVector];
    float target_w[kVector], target_l[kVector];
    load_group(pred + winner + k, count, vectorized, pred_w);
    load_group(pred + loser + k, count, vectorized, pred_l);
    load_group(ref + winner + k, count, vectorized, ref_w);
    load_group(ref + loser + k, count, vectorized, ref_l);
    load_group(target + winner + k, count, vectorized, target_w);
    load_group(target + target_loser + k, count, vectorized, target_l);
#pragma unroll
    for (int j = 0; j < kVector; ++j) {
      if (j < count) {
        sdpo::accumulate(pred_w[j], pred_l[j], ref_w[j], ref_l[j], target_w[j], target_l[j],
                         kWithGap, acc);
      }
    }
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

// Chunk slots of the finalize tile: the next power of two >= num_chunks (<= kMaxChunks).
__device__ __forceinline__ int chunk_slots(int64_t num_chunks) {
  int slots = 1;
  while (slots < num_chunks) slots *= 2;
  return slots;
}

// The halving tree of sdpo_preference_math.h over the lanes' `values` rows of `scratch`, one
// lane per thread: a barrier before (the lanes' own sums) and after every step.
__device__ __forceinline__ void reduce_lanes(float* scratch, int values) {
  __syncthreads();
  for (int width = kFinalizeThreads / 2; width > 0; width /= 2) {
    sdpo::tree_step(scratch, values, static_cast<int>(threadIdx.x), width);
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const float* __restrict__ partials, int64_t num_chunks,
                    const float* __restrict__ weights, float* __restrict__ pair_sums,
                    float* __restrict__ per_pair, sdpo::Params params, float* __restrict__ loss,
                    float* __restrict__ stats, float* __restrict__ lambda_out,
                    float* __restrict__ coefficients) {
  const int64_t pairs = params.batch_pairs;
  // The tile (pairs, slots, 8), laid out as the partials are, so the load and every tree step
  // walk consecutive addresses. For plan_chunks' shapes (next_power_of_2(B) * chunks <= 512)
  // all pairs fit at once; more pairs (then one chunk each) take tiles of 512.
  __shared__ float tile[kTileFloats];
  const int slots = chunk_slots(num_chunks);
  const int64_t tile_pairs = kTileFloats / (slots * sdpo::kNumSums);
  for (int64_t first = 0; first < pairs; first += tile_pairs) {
    const int64_t count = min(tile_pairs, pairs - first);
    for (int64_t index = threadIdx.x; index < count * slots * sdpo::kNumSums;
         index += blockDim.x) {
      const int sum = static_cast<int>(index % sdpo::kNumSums);
      const int64_t slot = (index / sdpo::kNumSums) % slots;
      const int64_t pair = first + index / (sdpo::kNumSums * slots);
      tile[index] =
          slot < num_chunks ? partials[(pair * num_chunks + slot) * sdpo::kNumSums + sum] : 0.0f;
    }
    __syncthreads();
    for (int width = slots / 2; width > 0; width /= 2) {
      for (int64_t index = threadIdx.x; index < count * width * sdpo::kNumSums;
           index += blockDim.x) {
        const int sum = static_cast<int>(index % sdpo::kNumSums);
        const int64_t slot = (index / sdpo::kNumSums) % width;
        const int64_t pair = index / (sdpo::kNumSums * width);
        const int64_t to = (pair * slots + slot) * sdpo::kNumSums + sum;
        tile[to] += tile[to + width * sdpo::kNumSums];
      }
      __syncthreads();
    }
    for (int64_t index = threadIdx.x; index < count * sdpo::kNumSums; index += blockDim.x) {
      const int64_t pair = index / sdpo::kNumSums;
      pair_sums[(first + pair) * sdpo::kNumSums + index % sdpo::kNumSums] =
          tile[pair * slots * sdpo::kNumSums + index % sdpo::kNumSums];
    }
    __syncthreads();  // the next tile overwrites this one
  }
  // The batch totals and then the outputs, each reduced over the pairs by all the threads in
  // the lanes of sdpo_preference_math.h (thread = lane), in the free tile as the scratch. The
  // __syncthreads above made every pair's sums visible to every thread.
  const int lane = static_cast<int>(threadIdx.x);
  sdpo::totals_lane(pair_sums, params, lane, tile);
  reduce_lanes(tile, sdpo::kTotals);
  const sdpo::Totals totals = sdpo::totals_from_lanes(tile, params);
  for (int64_t pair = lane; pair < pairs; pair += kFinalizeThreads) {
    sdpo::finalize_pair(pair, pair_sums, totals, params, weights, lambda_out, coefficients,
                        per_pair);
  }
  __syncthreads();  // every pair's outputs written, and every thread done reading the totals
  sdpo::outputs_lane(per_pair, params, lane, tile);
  reduce_lanes(tile, sdpo::kPerPair);
  if (lane == 0) sdpo::outputs_from_lanes(tile, totals, params, loss, stats);
}

template <typename TP, typename TR, typename TT, bool kWithGap>
__global__ void __launch_bounds__(kGradientThreads)
    gradient_kernel(const float* __restrict__ grad_output, const TP* __restrict__ pred,
                    const TR* __restrict__ ref, const TT* __restrict__ target,
                    const float* __restrict__ coefficients, TP* __restrict__ grad,
                    bool target_shared, bool vectorized, int64_t batch_pairs,
                    int64_t elements) {
  const int64_t row = blockIdx.y;
  const int64_t rows = 2 * batch_pairs;
  const bool winner = row < batch_pairs;
  const int64_t k =
      (static_cast<int64_t>(blockIdx.x) * kGradientThreads + threadIdx.x) * kVector;
  if (k >= elements) return;
  const int count = static_cast<int>(min(static_cast<int64_t>(kVector), elements - k));
  const float g0 = grad_output[0];
  const float coefficient_e = coefficients[row];
  const float coefficient_g = coefficients[rows + row];
  const int64_t row_offset = row * elements;
  const int64_t target_offset = (target_shared ? row % batch_pairs : row) * elements;
  float values[kVector], targets[kVector], references[kVector];
  load_group(pred + row_offset + k, count, vectorized, values);
  load_group(target + target_offset + k, count, vectorized, targets);
  if (kWithGap && winner) {
    load_group(ref + row_offset + k, count, vectorized, references);
  } else {
#pragma unroll
    for (int j = 0; j < kVector; ++j) references[j] = 0.0f;
  }
#pragma unroll
  for (int j = 0; j < kVector; ++j) {
    values[j] = sdpo::gradient_element(g0, values[j], targets[j], references[j], coefficient_e,
                                       coefficient_g, winner, kWithGap);
  }
  store_group(grad + row_offset + k, count, vectorized, values);
}

int check_launch(const char* what) {
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return fail(SDPO_CUDA_LAUNCH_ERROR, std::string(what) + ": " + cudaGetErrorString(status));
  }
  return SDPO_CUDA_OK;
}

template <typename T>
struct Type {
  using type = T;
};

// Calls visit(Type<T>{}) for the element type of a dtype code (checked by check_dtypes).
template <typename Visit>
void with_dtype(int dtype, Visit&& visit) {
  if (dtype == SDPO_CUDA_FLOAT32) {
    visit(Type<float>{});
  } else if (dtype == SDPO_CUDA_BFLOAT16) {
    visit(Type<__nv_bfloat16>{});
  } else {
    visit(Type<__half>{});
  }
}

int element_bytes(int dtype) { return dtype == SDPO_CUDA_FLOAT32 ? 4 : 2; }

// The vector path's condition, checked on the host before each launch: the pointer 16-byte
// aligned and every row a whole number of 16 bytes, so every row (and every chunk, whose
// length is a multiple of kVector) starts 16-byte aligned too.
bool vector_rows(const void* pointer, int dtype, int64_t elements) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0 &&
         (elements * element_bytes(dtype)) % 16 == 0;
}

int check_dtypes(const int* dtypes, int count) {
  for (int i = 0; i < count; ++i) {
    if (dtypes[i] < SDPO_CUDA_FLOAT32 || dtypes[i] > SDPO_CUDA_FLOAT16) {
      return fail(SDPO_CUDA_BAD_ARGUMENT, "dtype: expected 0 (fp32), 1 (bf16) or 2 (fp16)");
    }
  }
  return SDPO_CUDA_OK;
}

int check_sizes(int64_t batch_pairs, int64_t elements) {
  // Grid limits: x up to 2^31 - 1 blocks, y up to 65535 (rows of the gradient kernel).
  if (batch_pairs < 1 || 2 * batch_pairs > 65535) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "batch_pairs: expected 1 to 32767 pairs");
  }
  if (elements < 1) return fail(SDPO_CUDA_BAD_ARGUMENT, "elements: expected >= 1");
  if ((elements + kGradientThreads * kVector - 1) / (kGradientThreads * kVector) > 2147483647) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "elements: too many for the gradient grid");
  }
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

extern "C" int sdpo_cuda_vector_loads(int pred_dtype, int ref_dtype, int target_dtype,
                                      const void* model_pred, const void* ref_pred,
                                      const void* target, int64_t elements) {
  return vector_rows(model_pred, pred_dtype, elements) &&
         vector_rows(ref_pred, ref_dtype, elements) && vector_rows(target, target_dtype, elements);
}

extern "C" int sdpo_cuda_forward_phases(int phases, int pred_dtype, int ref_dtype,
                                        int target_dtype, const void* model_pred,
                                        const void* ref_pred, const void* target,
                                        int target_shared, const float* pair_weights,
                                        int64_t batch_pairs, int64_t elements,
                                        int64_t chunk_elements, int64_t num_chunks, int method,
                                        float beta, float mu, int safeguard, int64_t group_size,
                                        float log_q, float log_one_minus_q, float* workspace,
                                        float* loss, float* stats, float* lambda_out,
                                        float* coefficients, void* stream) {
  if (phases < 1 || phases > (SDPO_CUDA_SUMS | SDPO_CUDA_FINALIZE)) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "phases: expected 1 (sums), 2 (finalize) or 3 (both)");
  }
  const int dtypes[3] = {pred_dtype, ref_dtype, target_dtype};
  if (const int status = check_dtypes(dtypes, 3)) return status;
  if (const int status = check_sizes(batch_pairs, elements)) return status;
  if (method < 0 || method > 3) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "method: expected 0 to 3");
  }
  if (num_chunks < 1 || num_chunks > kMaxChunks || chunk_elements < 1 ||
      chunk_elements * num_chunks < elements) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "chunks: expected 1 to 512 chunks covering the elements");
  }
  if (chunk_elements % kVector != 0) {
    return fail(SDPO_CUDA_BAD_ARGUMENT, "chunk_elements: expected a multiple of 8");
  }
  if (group_size < 0) return fail(SDPO_CUDA_BAD_ARGUMENT, "group_size: expected >= 0");
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool with_gap = method == sdpo::kDspo || method == sdpo::kDspoSdxl;
  const bool vectorized = sdpo_cuda_vector_loads(pred_dtype, ref_dtype, target_dtype,
                                                 model_pred, ref_pred, target, elements) != 0;
  float* partials = workspace;
  float* pair_sums = partials + batch_pairs * num_chunks * sdpo::kNumSums;
  float* per_pair = pair_sums + batch_pairs * sdpo::kNumSums;
  const bool shared = target_shared != 0;
  const dim3 grid(static_cast<unsigned>(batch_pairs), static_cast<unsigned>(num_chunks));
  if (phases & SDPO_CUDA_SUMS) {
    with_dtype(pred_dtype, [&](auto pred_type) {
      with_dtype(ref_dtype, [&](auto ref_type) {
        with_dtype(target_dtype, [&](auto target_type) {
          using TP = typename decltype(pred_type)::type;
          using TR = typename decltype(ref_type)::type;
          using TT = typename decltype(target_type)::type;
          const auto kernel = with_gap ? pair_sums_kernel<TP, TR, TT, true>
                                       : pair_sums_kernel<TP, TR, TT, false>;
          kernel<<<grid, kSumsThreads, 0, cuda_stream>>>(
              static_cast<const TP*>(model_pred), static_cast<const TR*>(ref_pred),
              static_cast<const TT*>(target), partials, shared, vectorized, batch_pairs, elements,
              chunk_elements, num_chunks);
        });
      });
    });
    if (const int status = check_launch("pair_sums_kernel")) return status;
  }
  if (phases & SDPO_CUDA_FINALIZE) {
    const sdpo::Params params{method, safeguard, group_size,      batch_pairs,
                              static_cast<float>(elements), beta, mu, log_q, log_one_minus_q};
    finalize_kernel<<<1, kFinalizeThreads, 0, cuda_stream>>>(partials, num_chunks, pair_weights,
                                                              pair_sums, per_pair, params, loss,
                                                              stats, lambda_out, coefficients);
    if (const int status = check_launch("finalize_kernel")) return status;
  }
  return SDPO_CUDA_OK;
}

extern "C" int sdpo_cuda_forward(int pred_dtype, int ref_dtype, int target_dtype,
                                 const void* model_pred, const void* ref_pred,
                                 const void* target, int target_shared,
                                 const float* pair_weights, int64_t batch_pairs,
                                 int64_t elements, int64_t chunk_elements, int64_t num_chunks,
                                 int method, float beta, float mu, int safeguard,
                                 int64_t group_size, float log_q, float log_one_minus_q,
                                 float* workspace, float* loss, float* stats, float* lambda_out,
                                 float* coefficients, void* stream) {
  return sdpo_cuda_forward_phases(SDPO_CUDA_SUMS | SDPO_CUDA_FINALIZE, pred_dtype, ref_dtype,
                                  target_dtype, model_pred, ref_pred, target, target_shared,
                                  pair_weights, batch_pairs, elements, chunk_elements,
                                  num_chunks, method, beta, mu, safeguard, group_size, log_q,
                                  log_one_minus_q, workspace, loss, stats, lambda_out,
                                  coefficients, stream);
}

extern "C" int sdpo_cuda_gradient(int pred_dtype, int ref_dtype, int target_dtype,
                                  const float* grad_output, const void* model_pred,
                                  const void* ref_pred, const void* target, int target_shared,
                                  int with_gap, int64_t batch_pairs, int64_t elements,
                                  const float* coefficients, void* grad, void* stream) {
  const int dtypes[3] = {pred_dtype, ref_dtype, target_dtype};
  if (const int status = check_dtypes(dtypes, 3)) return status;
  if (const int status = check_sizes(batch_pairs, elements)) return status;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const bool shared = target_shared != 0;
  // ref_pred is read only with the gap term; grad has model_pred's dtype.
  const bool vectorized =
      vector_rows(model_pred, pred_dtype, elements) && vector_rows(grad, pred_dtype, elements) &&
      vector_rows(target, target_dtype, elements) &&
      (with_gap == 0 || vector_rows(ref_pred, ref_dtype, elements));
  const int64_t per_block = kGradientThreads * kVector;
  const dim3 grid(static_cast<unsigned>((elements + per_block - 1) / per_block),
                  static_cast<unsigned>(2 * batch_pairs));
  with_dtype(pred_dtype, [&](auto pred_type) {
    with_dtype(ref_dtype, [&](auto ref_type) {
      with_dtype(target_dtype, [&](auto target_type) {
        using TP = typename decltype(pred_type)::type;
        using TR = typename decltype(ref_type)::type;
        using TT = typename decltype(target_type)::type;
        const auto kernel = with_gap != 0 ? gradient_kernel<TP, TR, TT, true>
                                          : gradient_kernel<TP, TR, TT, false>;
        kernel<<<grid, kGradientThreads, 0, cuda_stream>>>(
            grad_output, static_cast<const TP*>(model_pred), static_cast<const TR*>(ref_pred),
            static_cast<const TT*>(target), coefficients, static_cast<TP*>(grad), shared,
            vectorized, batch_pairs, elements);
      });
    });
  });
  return check_launch("gradient_kernel");
}
