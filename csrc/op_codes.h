// The op's string arguments (kernel, target, normalization) as the integer codes of tile_math.h. Host only.
#pragma once
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "tile_math.h"

namespace icon {

inline int kernel_code(c10::string_view k) {
  if (k == "dot") return kDot;
  if (k == "gaussian") return kGaussian;
  if (k == "student_t") return kStudentT;
  if (k == "log_dot") return kLogDot;
  if (k == "power") return kPower;
  TORCH_CHECK(false, "unknown kernel ", k);
}

inline int target_code(c10::string_view t) {
  if (t == "labels") return kLabels;
  if (t == "neighbors") return kNeighbors;
  if (t == "affinity") return kAffinity;
  if (t == "dense") return kDense;
  TORCH_CHECK(false, "unknown target ", t);
}

// normalization: "conditional" (one distribution per row) or "joint" (one over all valid pairs,
// DESIGN.md §1.2).
enum Normalization : int { kConditional = 0, kJoint = 1 };

inline int normalization_code(c10::string_view n) {
  if (n == "conditional") return kConditional;
  if (n == "joint") return kJoint;
  TORCH_CHECK(false, "normalization must be conditional or joint, got ", n);
}

}  // namespace icon
