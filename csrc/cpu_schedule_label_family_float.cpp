// The float instances of cpu_symmetric_label_family.h's entry points (cpu_schedule_instances.h says why they have a
// translation unit of their own, and this schedule one per element type).
#include "cpu_symmetric_label_family.h"
#include "cpu_schedule_instances.h"

namespace icon {
namespace cpu {

ICON_LABEL_FAMILY_SCHEDULE(template, float)

}  // namespace cpu
}  // namespace icon
