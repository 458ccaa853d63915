// The float and double instances of cpu_symmetric_joint.h's entry points (cpu_schedule_instances.h says why
// they have a translation unit of their own).
#include "cpu_symmetric_joint.h"
#include "cpu_schedule_instances.h"

namespace icon {
namespace cpu {

ICON_JOINT_SCHEDULE(template, float)
ICON_JOINT_SCHEDULE(template, double)

}  // namespace cpu
}  // namespace icon
