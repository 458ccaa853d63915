// The float and double instances of cpu_symmetric_affinity.h's entry points (cpu_schedule_instances.h says why
// they have a translation unit of their own).
#include "cpu_symmetric_affinity.h"
#include "cpu_schedule_instances.h"

namespace icon {
namespace cpu {

ICON_AFFINITY_SCHEDULE(template, float)
ICON_AFFINITY_SCHEDULE(template, double)

}  // namespace cpu
}  // namespace icon
