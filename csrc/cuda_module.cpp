// The Python module icon_kernels._C_cuda. Importing it loads cuda_loss.cu's kernels, whose
// TORCH_LIBRARY_IMPL registers them for the CUDA dispatch key; the module itself has no functions.
// The CUDA kernels are an extension of their own, apart from the CPU kernels of icon_kernels._C,
// so that a GPU machine can build them alone (setup.py: ICON_KERNELS_NO_CPU_EXT=1).
#include <Python.h>

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", "fused I-Con CUDA kernels", -1, nullptr};
  return PyModule_Create(&module);
}
