// Registers the fused CPU kernels for the icon_kernels::cpu_* ops (the loss and the ring-mode
// label blocks), and the Python module icon_kernels._C whose import runs this registration.
#include <Python.h>
#include <torch/library.h>

#include "cpu_label_blocks.h"
#include "cpu_loss.h"

TORCH_LIBRARY_IMPL(icon_kernels, CPU, m) {
  m.impl("cpu_forward", &icon::cpu_forward);
  m.impl("cpu_backward", &icon::cpu_backward);
  m.impl("cpu_label_block_stats", &icon::cpu_label_block_stats);
  m.impl("cpu_label_block_backward", &icon::cpu_label_block_backward);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused I-Con kernels", -1, nullptr};
  return PyModule_Create(&module);
}
