#pragma once
// The symmetric schedules' entry points, instantiated for float and double once each in a
// translation unit of their own (cpu_schedule_<name>.cpp; the two largest, label_family and
// affinity_family, one unit per element type) and declared `extern template` in cpu_loss.cpp,
// which calls them. One cpu_loss.cpp that instantiated all of them compiled for 7 minutes (422 s
// with -O3 -march=native on the 2-core Zen 3 VM, 2026-12-04); split, the units build in
// parallel on a machine with the cores (the total compile time grows: each unit compiles the
// row helpers it uses).
//
// ICON_<NAME>_SCHEDULE(PREFIX, T): PREFIX is `template` (the definition's unit) or `extern template`.

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#define ICON_LABELS_SCHEDULE(PREFIX, T)                                                                    \
  PREFIX std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_label_forward<T>(const Problem<T>&);    \
  PREFIX std::vector<at::Tensor> symmetric_label_backward<T>(const Problem<T>&, const at::Tensor&,          \
                                                             const at::Tensor&, const at::Tensor&, bool, int64_t);

#define ICON_LABEL_FAMILY_SCHEDULE(PREFIX, T)                                                              \
  PREFIX std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_label_family_forward<T>(const Problem<T>&); \
  PREFIX std::vector<at::Tensor> symmetric_label_family_backward<T>(                                        \
      const Problem<T>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, int64_t,            \
      const std::vector<T>&);

#define ICON_AFFINITY_SCHEDULE(PREFIX, T)                                                                  \
  PREFIX std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_affinity_forward<T>(const Problem<T>&); \
  PREFIX std::vector<at::Tensor> symmetric_affinity_backward<T>(const Problem<T>&, const at::Tensor&,       \
                                                                const at::Tensor&, const at::Tensor&, int64_t, \
                                                                const std::vector<T>&);

#define ICON_AFFINITY_FAMILY_SCHEDULE(PREFIX, T)                                                           \
  PREFIX std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_affinity_family_forward<T>(              \
      const Problem<T>&);                                                                                  \
  PREFIX std::vector<at::Tensor> symmetric_affinity_family_backward<T>(                                     \
      const Problem<T>&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, int64_t,            \
      const std::vector<T>&);

#define ICON_JOINT_SCHEDULE(PREFIX, T)                                                                     \
  PREFIX std::tuple<at::Tensor, at::Tensor, at::Tensor> symmetric_joint_forward<T>(const Problem<T>&);    \
  PREFIX std::vector<at::Tensor> symmetric_joint_backward<T>(const Problem<T>&, const at::Tensor&,          \
                                                             const at::Tensor&, const at::Tensor&);

// every schedule, for one PREFIX and both element types
#define ICON_ALL_SCHEDULES(PREFIX)                                                                         \
  ICON_LABELS_SCHEDULE(PREFIX, float) ICON_LABELS_SCHEDULE(PREFIX, double)                                 \
  ICON_LABEL_FAMILY_SCHEDULE(PREFIX, float) ICON_LABEL_FAMILY_SCHEDULE(PREFIX, double)                     \
  ICON_AFFINITY_SCHEDULE(PREFIX, float) ICON_AFFINITY_SCHEDULE(PREFIX, double)                             \
  ICON_AFFINITY_FAMILY_SCHEDULE(PREFIX, float) ICON_AFFINITY_FAMILY_SCHEDULE(PREFIX, double)               \
  ICON_JOINT_SCHEDULE(PREFIX, float) ICON_JOINT_SCHEDULE(PREFIX, double)
