// The per-element and per-pair math of the fused preference loss, shared by the CUDA kernels
// (sdpo_preference.cu) and the host build used by the CPU tests (host_reference.cpp), so the
// arithmetic the GPU runs is the arithmetic the tests check. It restates sdpo/kernels/preference.py
// (the Triton kernels) and sdpo/reference.py (the definition); constants must match the latter
// (tests/test_cuda_backend.py reads them out of this file and compares).
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define SDPO_HD __host__ __device__ __forceinline__
#else
#define SDPO_HD inline
#endif

namespace sdpo {

enum Method : int { kDiffusionDpo = 0, kDspo = 1, kDspoSdxl = 2, kDmpo = 3 };

constexpr int kNumSums = 8;    // seven sums, padded to eight: 32 bytes per (pair, chunk)
constexpr int kNumStats = 9;   // reference.STAT_NAMES, then the DSPO-SDXL gap mean
constexpr int kPerPair = 8;    // per-pair outputs reduced at the end (see finalize_pair)
constexpr float kSafeguardEpsilon = 1e-9f;       // reference.SAFEGUARD_EPSILON
constexpr float kDspoSdxlGapThreshold = 0.1f;    // reference.DSPO_SDXL_GAP_THRESHOLD

// Sums indices.
enum Sum : int { kWW = 0, kLL = 1, kWL = 2, kRW = 3, kRL = 4, kWG = 5, kGG = 6 };

struct Params {
  int method;
  int safeguard;         // 0: mu off
  int64_t group_size;    // 0: one lambda for the whole call
  int64_t batch_pairs;
  float elements;        // elements per sample, as a float
  float beta;
  float mu;
  float log_q;           // DMPO
  float log_one_minus_q;
};

struct Totals {
  float ww;        // sum over pairs of S_ww (batch lambda)
  float wl;        // sum over pairs of S_wl
  float gap_mean;  // DSPO-SDXL: mean over pairs of S_gg / D
};

SDPO_HD float softplus(float x) {
  // max(x, 0) + log1p(exp(-|x|)), log1p from its series below 1e-4 (as the Triton kernel).
  const float z = expf(-fabsf(x));
  const float log1p_z = z < 1e-4f ? z * (1.0f - z * (0.5f - z / 3.0f)) : logf(1.0f + z);
  return fmaxf(x, 0.0f) + log1p_z;
}

SDPO_HD float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// One element of a pair: adds its contributions to the seven sums.
SDPO_HD void accumulate(float pred_w, float pred_l, float ref_w, float ref_l, float target_w,
                        float target_l, bool with_gap, float* acc) {
  const float error_w = pred_w - target_w;
  const float error_l = pred_l - target_l;
  const float ref_error_w = ref_w - target_w;
  const float ref_error_l = ref_l - target_l;
  acc[kWW] += error_w * error_w;
  acc[kLL] += error_l * error_l;
  acc[kWL] += error_w * error_l;
  acc[kRW] += ref_error_w * ref_error_w;
  acc[kRL] += ref_error_l * ref_error_l;
  if (with_gap) {
    const float gap = pred_w - ref_w;
    acc[kWG] += error_w * gap;
    acc[kGG] += gap * gap;
  }
}

// The safeguard's lambda from its group's sums: 1 where S_wl <= 0, clipped to [0, 1].
SDPO_HD float safeguard_scale(float group_ww, float group_wl, float group_count, float elements,
                              float mu) {
  const float group_elements = group_count * elements;
  const float epsilon = kSafeguardEpsilon * group_elements * group_elements / 4.0f;
  const float ratio = (1.0f - mu) * group_ww / fmaxf(group_wl + epsilon, 1e-30f);
  return group_wl > 0.0f ? fminf(fmaxf(ratio, 0.0f), 1.0f) : 1.0f;
}

// Reductions over pairs (the batch totals and the outputs) run in kFinalizeLanes lanes, one per
// thread of the finalize kernel: lane l first adds pairs l, l + kFinalizeLanes, l + 2 *
// kFinalizeLanes, ... in pair order; then a halving tree adds the lanes (lane l += lane
// l + width for width = kFinalizeLanes / 2, ..., 1; 9 steps). The order is a function of the
// pair count alone (the lane count is a compile-time constant, never the GPU's SM count), so
// from the same pair sums every GPU model gives the same bits, run after run; the host build
// (host_reference.cpp) runs the same lanes and tree one after another, in the same order. The
// lanes' values live in a [value][lane] scratch.
constexpr int kFinalizeLanes = 512;
constexpr int kTotals = 3;  // the Totals' values in the scratch: S_ww, S_wl, S_gg / D

// Lane `lane`'s share of the batch totals: its pairs' S_ww, S_wl and S_gg / D.
SDPO_HD void totals_lane(const float* pair_sums, const Params& p, int lane, float* scratch) {
  float ww = 0.0f, wl = 0.0f, gap = 0.0f;
  for (int64_t i = lane; i < p.batch_pairs; i += kFinalizeLanes) {
    ww += pair_sums[i * kNumSums + kWW];
    wl += pair_sums[i * kNumSums + kWL];
    gap += pair_sums[i * kNumSums + kGG] / p.elements;
  }
  scratch[0 * kFinalizeLanes + lane] = ww;
  scratch[1 * kFinalizeLanes + lane] = wl;
  scratch[2 * kFinalizeLanes + lane] = gap;
}

// Lane `lane`'s share of the outputs: its pairs' per-pair outputs (see finalize_pair).
SDPO_HD void outputs_lane(const float* per_pair, const Params& p, int lane, float* scratch) {
  float sums[kPerPair] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = lane; i < p.batch_pairs; i += kFinalizeLanes) {
    for (int k = 0; k < kPerPair; ++k) sums[k] += per_pair[i * kPerPair + k];
  }
  for (int k = 0; k < kPerPair; ++k) scratch[k * kFinalizeLanes + lane] = sums[k];
}

// One step of the tree over the first `values` rows of the scratch: lanes below `width` add
// the lane `width` above them (which no lane writes in this step).
SDPO_HD void tree_step(float* scratch, int values, int lane, int width) {
  if (lane < width) {
    for (int v = 0; v < values; ++v) {
      scratch[v * kFinalizeLanes + lane] += scratch[v * kFinalizeLanes + lane + width];
    }
  }
}

// The batch totals from the reduced scratch (lane 0 of each value).
SDPO_HD Totals totals_from_lanes(const float* scratch, const Params& p) {
  return Totals{scratch[0 * kFinalizeLanes], scratch[1 * kFinalizeLanes],
                scratch[2 * kFinalizeLanes] / static_cast<float>(p.batch_pairs)};
}

// Pair i: lambda, the gradient coefficients (2, 2B) and its per-pair outputs (kPerPair values:
// weighted term, accuracy, margin, mse_w, mse_l, ref_mse_w, ref_mse_l, unused).
SDPO_HD void finalize_pair(int64_t i, const float* pair_sums, const Totals& totals,
                           const Params& p, const float* weights, float* lambda_out,
                           float* coefficients, float* per_pair) {
  const float* s = pair_sums + i * kNumSums;
  const float elements = p.elements;
  const float mse_w = s[kWW] / elements;
  const float mse_l = s[kLL] / elements;
  const float ref_mse_w = s[kRW] / elements;
  const float ref_mse_l = s[kRL] / elements;

  // Pair i's group: pairs [start, stop) (all pairs when group_size is 0).
  int64_t start = 0, stop = p.batch_pairs;
  if (p.group_size > 0) {
    start = (i / p.group_size) * p.group_size;
    stop = start + p.group_size < p.batch_pairs ? start + p.group_size : p.batch_pairs;
  }
  const float group_count = static_cast<float>(stop - start);

  float scale = 1.0f;
  if (p.safeguard) {
    float group_ww = totals.ww, group_wl = totals.wl;
    if (p.group_size > 0) {
      group_ww = 0.0f;
      group_wl = 0.0f;
      for (int64_t member = start; member < stop; ++member) {
        group_ww += pair_sums[member * kNumSums + kWW];
        group_wl += pair_sums[member * kNumSums + kWL];
      }
    }
    scale = safeguard_scale(group_ww, group_wl, group_count, elements, p.mu);
  }

  const float margin = -(p.beta / 2.0f) * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l));
  float term, dterm_du, direct_e = 0.0f, direct_g = 0.0f;
  if (p.method == kDiffusionDpo) {
    term = softplus(-margin);
    dterm_du = -sigmoid(-margin);
  } else if (p.method == kDmpo) {
    const float prob = sigmoid(margin);
    const float log_p = -softplus(-margin);
    const float log_one_minus_p = -softplus(margin);
    term = prob * (log_p - p.log_q) + (1.0f - prob) * (log_one_minus_p - p.log_one_minus_q);
    dterm_du = prob * (1.0f - prob) * (margin - (p.log_q - p.log_one_minus_q));
  } else if (p.method == kDspo) {
    const float sig = sigmoid(-margin);
    const float bs = p.beta * sig;
    term = (s[kWW] - 2.0f * bs * s[kWG] + bs * bs * s[kGG]) / elements;
    const float dterm_ds = (-2.0f * p.beta * s[kWG] + 2.0f * p.beta * bs * s[kGG]) / elements;
    dterm_du = dterm_ds * (-sig * (1.0f - sig));
    direct_e = 2.0f * (1.0f - bs) / elements;
    direct_g = -2.0f * (1.0f - bs) * bs / elements;
  } else {  // kDspoSdxl: the switch is decided per group (the reference's micro-batch)
    const float sig = sigmoid(-margin);
    const float gap_sq = s[kGG] / elements;
    float group_gap = totals.gap_mean;
    if (p.group_size > 0) {
      group_gap = 0.0f;
      for (int64_t member = start; member < stop; ++member) {
        group_gap += pair_sums[member * kNumSums + kGG] / elements;
      }
      group_gap /= group_count;
    }
    const bool use_gap = group_gap >= kDspoSdxlGapThreshold;
    const float factor = use_gap ? gap_sq : 1.0f;
    term = sig * sig * factor;
    dterm_du = 2.0f * sig * factor * (-sig * (1.0f - sig));
    direct_g = use_gap ? 2.0f * sig * sig / elements : 0.0f;
  }

  const float pairs = static_cast<float>(p.batch_pairs);
  const float weight = (weights != nullptr ? weights[i] : 1.0f) / pairs;
  const int64_t rows = 2 * p.batch_pairs;
  coefficients[i] = weight * (dterm_du * (-p.beta / elements) + direct_e);
  coefficients[p.batch_pairs + i] = weight * dterm_du * (p.beta / elements) * scale;
  coefficients[rows + i] = weight * direct_g;
  coefficients[rows + p.batch_pairs + i] = 0.0f;
  lambda_out[i] = scale;

  float* out = per_pair + i * kPerPair;
  out[0] = weight * term;
  // A tie (u = 0, as at step 1) counts one half, as the official Diffusion-DPO trainer counts it.
  out[1] = margin > 0.0f ? 1.0f : (margin == 0.0f ? 0.5f : 0.0f);
  out[2] = margin;
  out[3] = mse_w;
  out[4] = mse_l;
  out[5] = ref_mse_w;
  out[6] = ref_mse_l;
  out[7] = 0.0f;
}

// The loss and the statistics from the reduced scratch of the per-pair outputs.
SDPO_HD void outputs_from_lanes(const float* scratch, const Totals& totals, const Params& p,
                                float* loss, float* stats) {
  float sums[kPerPair];
  for (int k = 0; k < kPerPair; ++k) sums[k] = scratch[k * kFinalizeLanes];
  const float pairs = static_cast<float>(p.batch_pairs);
  *loss = sums[0];
  stats[0] = sums[1] / pairs;                 // implicit_acc
  stats[1] = sums[2] / pairs;                 // margin
  stats[2] = sums[3] / pairs;                 // model_mse_w
  stats[3] = sums[4] / pairs;                 // model_mse_l
  stats[4] = sums[5] / pairs;                 // ref_mse_w
  stats[5] = sums[6] / pairs;                 // ref_mse_l
  stats[6] = (sums[3] - sums[5]) / pairs;     // win_gap
  stats[7] = (sums[4] - sums[6]) / pairs;     // lose_gap
  stats[8] = p.method == kDspoSdxl ? totals.gap_mean : 0.0f;
}

// One element of d loss / d model_pred for row `row` (winners: rows < B).
SDPO_HD float gradient_element(float grad_output, float pred, float target, float ref,
                               float coefficient_e, float coefficient_g, bool winner,
                               bool with_gap) {
  float grad = coefficient_e * grad_output * (pred - target);
  if (with_gap && winner) grad += coefficient_g * grad_output * (pred - ref);
  return grad;
}

}  // namespace sdpo
