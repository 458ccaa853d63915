// Registers the fused CPU kernels for the icon_kernels::cpu_* ops (the loss and the ring-mode
// label blocks), and the Python module icon_kernels._C whose import runs this registration.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu_label_blocks.h"
#include "cpu_loss.h"
#include "cpu_row_paths.h"
#include "op_codes.h"

TORCH_LIBRARY_IMPL(icon_kernels, CPU, m) {
  m.impl("cpu_forward", &icon::cpu_forward);
  m.impl("cpu_backward", &icon::cpu_backward);
  m.impl("cpu_label_block_stats", &icon::cpu_label_block_stats);
  m.impl("cpu_label_block_backward", &icon::cpu_label_block_backward);
}

// _C.cpu_row_path(kernel, target, divergence, alpha, beta) -> str: the row loops that the CPU
// kernel runs for that combination (cpu_row_paths.h), for tests and benchmarks to query.
static PyObject* cpu_row_path(PyObject*, PyObject* args) {
  const char *kernel, *target;
  long long divergence;
  double alpha, beta;
  if (!PyArg_ParseTuple(args, "ssLdd", &kernel, &target, &divergence, &alpha, &beta)) return nullptr;
  try {
    const std::string name = icon::row_path_name(icon::kernel_code(kernel), icon::target_code(target),
                                                 int(divergence), alpha, beta);
    return PyUnicode_FromString(name.c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

static PyMethodDef kMethods[] = {
    {"cpu_row_path", cpu_row_path, METH_VARARGS,
     "cpu_row_path(kernel, target, divergence, alpha, beta): the CPU kernel's row loops for that combination"},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused I-Con kernels", -1, kMethods};
  return PyModule_Create(&module);
}
