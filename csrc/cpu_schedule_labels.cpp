// The float and double instances of cpu_symmetric_labels.h's entry points (cpu_schedule_instances.h says why
// they have a translation unit of their own).
#include "cpu_symmetric_labels.h"
#include "cpu_schedule_instances.h"

namespace icon {
namespace cpu {

ICON_LABELS_SCHEDULE(template, float)
ICON_LABELS_SCHEDULE(template, double)

}  // namespace cpu
}  // namespace icon
