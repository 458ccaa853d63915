// The double instances of cpu_symmetric_affinity_family.h's entry points (cpu_schedule_instances.h says why they have a
// translation unit of their own, and this schedule one per element type).
#include "cpu_symmetric_affinity_family.h"
#include "cpu_schedule_instances.h"

namespace icon {
namespace cpu {

ICON_AFFINITY_FAMILY_SCHEDULE(template, double)

}  // namespace cpu
}  // namespace icon
