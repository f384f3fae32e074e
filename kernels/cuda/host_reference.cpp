// The host build of the fused loss (libsdpo_cuda_host.so): the kernels' math from
// sdpo_preference_math.h, run sequentially on fp32 arrays. No CUDA needed; the CPU tests call
// it through ctypes and compare with sdpo.preference_loss(backend="torch").
#include <vector>

#include "sdpo_preference.h"
#include "sdpo_preference_math.h"

namespace {

// The halving tree of sdpo_preference_math.h, one step after another (each step's lanes are
// independent: a lane reads only lanes that no lane of its step writes).
void reduce_lanes(float* scratch, int values) {
  for (int width = sdpo::kFinalizeLanes / 2; width > 0; width /= 2) {
    for (int lane = 0; lane < width; ++lane) sdpo::tree_step(scratch, values, lane, width);
  }
}

}  // namespace

extern "C" int sdpo_host_forward(const float* model_pred, const float* ref_pred,
                                 const float* target, int target_shared,
                                 const float* pair_weights, int64_t batch_pairs, int64_t elements,
                                 int method, float beta, float mu, int safeguard,
                                 int64_t group_size, float log_q, float log_one_minus_q,
                                 float* loss, float* stats, float* lambda_out,
                                 float* coefficients) {
  if (batch_pairs < 1 || elements < 1 || method < 0 || method > 3 || group_size < 0) {
    return SDPO_CUDA_BAD_ARGUMENT;
  }
  const bool with_gap = method == sdpo::kDspo || method == sdpo::kDspoSdxl;
  std::vector<float> pair_sums(batch_pairs * sdpo::kNumSums, 0.0f);
  for (int64_t pair = 0; pair < batch_pairs; ++pair) {
    const int64_t winner = pair * elements;
    const int64_t loser = (pair + batch_pairs) * elements;
    const int64_t target_loser = target_shared ? winner : loser;
    float* acc = pair_sums.data() + pair * sdpo::kNumSums;
    for (int64_t k = 0; k < elements; ++k) {
      sdpo::accumulate(model_pred[winner + k], model_pred[loser + k], ref_pred[winner + k],
                       ref_pred[loser + k], target[winner + k], target[target_loser + k],
                       with_gap, acc);
    }
  }
  sdpo::Params params{method, safeguard,  group_size, batch_pairs,    static_cast<float>(elements),
                      beta,   mu,         log_q,      log_one_minus_q};
  // The finalize kernel's reductions over pairs, lane after lane and tree step after tree step
  // (in the kernel, one thread per lane): the same order, so the same bits.
  std::vector<float> scratch(sdpo::kPerPair * sdpo::kFinalizeLanes, 0.0f);
  for (int lane = 0; lane < sdpo::kFinalizeLanes; ++lane) {
    sdpo::totals_lane(pair_sums.data(), params, lane, scratch.data());
  }
  reduce_lanes(scratch.data(), sdpo::kTotals);
  const sdpo::Totals totals = sdpo::totals_from_lanes(scratch.data(), params);
  std::vector<float> per_pair(batch_pairs * sdpo::kPerPair, 0.0f);
  for (int64_t pair = 0; pair < batch_pairs; ++pair) {
    sdpo::finalize_pair(pair, pair_sums.data(), totals, params, pair_weights, lambda_out,
                        coefficients, per_pair.data());
  }
  for (int lane = 0; lane < sdpo::kFinalizeLanes; ++lane) {
    sdpo::outputs_lane(per_pair.data(), params, lane, scratch.data());
  }
  reduce_lanes(scratch.data(), sdpo::kPerPair);
  sdpo::outputs_from_lanes(scratch.data(), totals, params, loss, stats);
  return SDPO_CUDA_OK;
}

extern "C" int sdpo_host_gradient(float grad_output, const float* model_pred,
                                  const float* ref_pred, const float* target, int target_shared,
                                  int with_gap, int64_t batch_pairs, int64_t elements,
                                  const float* coefficients, float* grad) {
  if (batch_pairs < 1 || elements < 1) return SDPO_CUDA_BAD_ARGUMENT;
  const int64_t rows = 2 * batch_pairs;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t target_row = target_shared ? row % batch_pairs : row;
    const bool winner = row < batch_pairs;
    for (int64_t k = 0; k < elements; ++k) {
      const int64_t index = row * elements + k;
      grad[index] = sdpo::gradient_element(grad_output, model_pred[index],
                                           target[target_row * elements + k], ref_pred[index],
                                           coefficients[row], coefficients[rows + row], winner,
                                           with_gap != 0);
    }
  }
  return SDPO_CUDA_OK;
}
