// Which row loops of the CPU kernel run a (kernel, target, divergence, alpha, beta) combination:
// the one choice that cpu_forward / cpu_backward switch on and that the dispatch query
// icon_kernels._C.cpu_row_path reports (tests/test_cpu_row_paths.py asks it for every
// combination of the families table). Every path is specialised at compile time; there is no
// generic per-pair loop to fall back to.
#pragma once
#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <string>

#include "cpu_f_label_rows.h"   // has_label_closed_form
#include "cpu_f_rows.h"         // LogP
#include "divergence_math.h"
#include "tile_math.h"

namespace icon {

enum RowPath : int {
  kLabelHotRows = 0,          // Labels, beta = 0, KL or cross-entropy, dot or Gaussian (cpu_label_rows.h)
  kLabelClosedFormRows = 1,   // Labels, alpha = beta = 0, tv/hellinger/js/chi2, dot or Gaussian (cpu_f_label_rows.h)
  kFamilyRows = 2,            // everything else: cpu_family_rows.h, per (kernel, divergence, log p, beta)
};

// global: joint normalisation or a symmetrised target, whose rows take statistics of every row
// (cpu_global_rows.h); the label paths compute conditional rows of a plain target only.
inline RowPath choose_row_path(int kernel, int target, int divergence, double alpha, double beta,
                               bool global = false) {
  TORCH_CHECK(divergence >= 0 && divergence < kDivergenceCount, "icon_kernels cpu: unknown divergence code ",
              divergence);
  if (global) return kFamilyRows;
  const bool dot_or_gaussian = kernel == kDot || kernel == kGaussian;
  if (target == kLabels && dot_or_gaussian && beta == 0 && !is_f_divergence(divergence)) return kLabelHotRows;
  if (target == kLabels && dot_or_gaussian && alpha == 0 && beta == 0 && has_label_closed_form(divergence))
    return kLabelClosedFormRows;
  return kFamilyRows;
}

// Rows that each path ran, per pass (0 forward, 1 backward), since the last read: the kernels add
// their counts once per chunk and thread (a label row that is not finite counts as the family
// rows it falls to), and _C.cpu_row_path_counts() reads and resets them, so a test can see which
// loops a call actually ran (tests/test_cpu_row_paths.py).
constexpr int kRowPathCount = 3;

inline std::atomic<int64_t>* row_path_counters(int pass) {
  static std::atomic<int64_t> counters[2][kRowPathCount];
  return counters[pass];
}

struct RowPathTally {
  int64_t rows[kRowPathCount] = {0, 0, 0};
  void add_to(int pass) const {
    for (int k = 0; k < kRowPathCount; ++k)
      if (rows[k] != 0) row_path_counters(pass)[k].fetch_add(rows[k], std::memory_order_relaxed);
  }
};

inline const char* row_path_label(int path) {
  switch (path) {
    case kLabelHotRows: return "label_hot_rows";
    case kLabelClosedFormRows: return "label_closed_form_rows";
    case kFamilyRows: return "family_rows";
    default: TORCH_CHECK(false, "icon_kernels cpu: unknown row path ", path);
  }
}

// How the family rows form log p~ (cpu_f_rows.h): an Affinity target with alpha = 0 takes
// t - LSE^p - log(row total), exact where p underflows; a Labels row has two levels (no log per
// pair); a Neighbors row writes its k logs into a row (family_target_row); Dense rows take the
// log of p~.
inline int log_p_mode_of(int target, double alpha) {
  switch (target) {
    case kAffinity: return alpha == 0 ? kExactLogP : kLogOfP;
    case kLabels: return kTwoLevelLogP;
    case kNeighbors: return kSparseLogP;
    case kDense: return kLogOfP;
    default: TORCH_CHECK(false, "icon_kernels cpu: unknown target code ", target);
  }
}

inline const char* kernel_name_of(int kernel) {
  switch (kernel) {
    case kDot: return "dot";
    case kGaussian: return "gaussian";
    case kStudentT: return "student_t";
    case kLogDot: return "log_dot";
    case kPower: return "power";
    default: TORCH_CHECK(false, "icon_kernels cpu: unknown kernel code ", kernel);
  }
}

inline const char* divergence_name_of(int divergence) {
  switch (divergence) {
    case kKl: return "kl";
    case kCrossEntropy: return "cross_entropy";
    case kReverseKl: return "reverse_kl";
    case kTv: return "tv";
    case kHellinger: return "hellinger";
    case kJs: return "js";
    case kChi2: return "chi2";
    default: TORCH_CHECK(false, "icon_kernels cpu: unknown divergence code ", divergence);
  }
}

inline const char* log_p_name_of(int log_p) {
  switch (log_p) {
    case kLogOfP: return "log_of_p";
    case kExactLogP: return "exact_log_p";
    case kTwoLevelLogP: return "two_level_log_p";
    case kSparseLogP: return "sparse_log_p";
    default: TORCH_CHECK(false, "icon_kernels cpu: unknown log p mode ", log_p);
  }
}

// The instantiation a combination runs, e.g. "family_rows<student_t, kl, exact_log_p, beta=0>".
inline std::string row_path_name(int kernel, int target, int divergence, double alpha, double beta,
                                 bool global = false) {
  const std::string k = kernel_name_of(kernel), d = divergence_name_of(divergence);
  switch (choose_row_path(kernel, target, divergence, alpha, beta, global)) {
    case kLabelHotRows: return "label_hot_rows<" + k + ", " + d + ">";
    case kLabelClosedFormRows: return "label_closed_form_rows<" + k + ", " + d + ">";
    case kFamilyRows:
      return "family_rows<" + k + ", " + d + ", " + log_p_name_of(log_p_mode_of(target, alpha)) +
             (beta > 0 ? ", beta>0>" : ", beta=0>");
    default: TORCH_CHECK(false, "icon_kernels cpu: unknown row path");
  }
}

}  // namespace icon
