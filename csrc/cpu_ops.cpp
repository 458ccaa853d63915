// Registers the fused CPU kernels for the icon_kernels::cpu_* ops (the loss and the ring-mode
// label blocks), and the Python module icon_kernels._C whose import runs this registration.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu_bidirectional_labels.h"
#include "cpu_label_blocks.h"
#include "cpu_loss.h"
#include "cpu_row_paths.h"
#include "cpu_symmetric_labels.h"
#include "op_codes.h"

TORCH_LIBRARY_IMPL(icon_kernels, CPU, m) {
  m.impl("cpu_forward", &icon::cpu_forward);
  m.impl("cpu_backward", &icon::cpu_backward);
  m.impl("cpu_label_block_stats", &icon::cpu_label_block_stats);
  m.impl("cpu_label_block_backward", &icon::cpu_label_block_backward);
  m.impl("cpu_bidirectional_forward", &icon::cpu_bidirectional_forward);
  m.impl("cpu_bidirectional_backward", &icon::cpu_bidirectional_backward);
}

// _C.cpu_row_path(kernel, target, divergence, alpha, beta, normalization="conditional",
// symmetrize=False) -> str: the row loops that the CPU kernel runs for that combination
// (cpu_row_paths.h), for tests and benchmarks to query.
static PyObject* cpu_row_path(PyObject*, PyObject* args) {
  const char *kernel, *target, *normalization = "conditional";
  long long divergence;
  double alpha, beta;
  int symmetrize = 0;
  if (!PyArg_ParseTuple(args, "ssLdd|sp", &kernel, &target, &divergence, &alpha, &beta, &normalization,
                        &symmetrize))
    return nullptr;
  try {
    TORCH_CHECK(divergence >= 0 && divergence < icon::kDivergenceCount, "unknown divergence code ", divergence);
    const bool global = icon::normalization_code(normalization) == icon::kJoint || symmetrize != 0;
    const std::string name = icon::row_path_name(icon::kernel_code(kernel), icon::target_code(target),
                                                 int(divergence), alpha, beta, global);
    return PyUnicode_FromString(name.c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

// _C.cpu_row_path_counts() -> {"forward": {path: rows}, "backward": {...}}: the rows each row
// path ran since the last call (which resets them).
static PyObject* cpu_row_path_counts(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  if (out == nullptr) return nullptr;
  const char* passes[2] = {"forward", "backward"};
  for (int pass = 0; pass < 2; ++pass) {
    PyObject* counts = PyDict_New();
    if (counts == nullptr) { Py_DECREF(out); return nullptr; }
    for (int k = 0; k < icon::kRowPathCount; ++k) {
      PyObject* v = PyLong_FromLongLong(icon::row_path_counters(pass)[k].exchange(0));
      if (v == nullptr || PyDict_SetItemString(counts, icon::row_path_label(k), v) != 0) {
        Py_XDECREF(v); Py_DECREF(counts); Py_DECREF(out);
        return nullptr;
      }
      Py_DECREF(v);
    }
    const int rc = PyDict_SetItemString(out, passes[pass], counts);
    Py_DECREF(counts);
    if (rc != 0) { Py_DECREF(out); return nullptr; }
  }
  return out;
}

// _C.cpu_symmetric_counts() -> {"forward": calls, "backward": calls, "bidirectional_forward": calls,
// "bidirectional_backward": calls, "affinity_forward": calls, "affinity_backward": calls,
// "joint_forward": calls, "joint_backward": calls, "label_family_forward": calls,
// "label_family_backward": calls, "affinity_family_forward": calls, "affinity_family_backward":
// calls, "target_family_forward": calls, "target_family_backward": calls,
// "affinity_family_cauchy_sweeps": sweeps,
// "joint_one_exp_sweeps": sweeps, "joint_family_forward": calls, "joint_family_backward": calls,
// "symmetrised_mass_sweeps": sweeps}: the calls that ran the
// symmetric schedule (cpu_symmetric_labels.h), the bidirectional ops
// (cpu_bidirectional_labels.cpp), the symmetric Affinity schedule (cpu_symmetric_affinity.h), joint
// t-SNE's (cpu_symmetric_joint.h), the label family schedule (cpu_symmetric_label_family.h), the
// Affinity family schedule (cpu_symmetric_affinity_family.h) and the family schedule on Dense and
// Neighbors targets (cpu_symmetric_label_family.h), and the Affinity family schedule's sweeps over
// t-SNE's Cauchy weights, joint t-SNE's sweeps that took a pair's p from one exp and the joint
// family schedule (cpu_symmetric_joint_family.h), and the Affinity family schedule's sweeps over a
// symmetrised target's row masses, since the last call (which resets them).
static PyObject* cpu_symmetric_counts(PyObject*, PyObject*) {
  static_assert(icon::cpu::kSymmetricCounters == 19, "a name per counter below");
  long long c[icon::cpu::kSymmetricCounters];
  for (int k = 0; k < icon::cpu::kSymmetricCounters; ++k) c[k] = icon::cpu::symmetric_schedule_counters()[k].exchange(0);
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "forward", c[0], "backward", c[1],
                       "bidirectional_forward", c[2], "bidirectional_backward", c[3], "affinity_forward", c[4],
                       "affinity_backward", c[5], "joint_forward", c[6], "joint_backward", c[7],
                       "label_family_forward", c[8], "label_family_backward", c[9], "affinity_family_forward", c[10],
                       "affinity_family_backward", c[11], "target_family_forward", c[12],
                       "target_family_backward", c[13], "affinity_family_cauchy_sweeps", c[14],
                       "joint_one_exp_sweeps", c[15], "joint_family_forward", c[16],
                       "joint_family_backward", c[17], "symmetrised_mass_sweeps", c[18]);
}

static PyMethodDef kMethods[] = {
    {"cpu_symmetric_counts", cpu_symmetric_counts, METH_NOARGS,
     "cpu_symmetric_counts(): calls per pass that ran the symmetric schedule and the bidirectional ops since the "
     "last call (resets them)"},
    {"cpu_row_path_counts", cpu_row_path_counts, METH_NOARGS,
     "cpu_row_path_counts(): rows run per row path and pass since the last call (resets them)"},
    {"cpu_row_path", cpu_row_path, METH_VARARGS,
     "cpu_row_path(kernel, target, divergence, alpha, beta, normalization='conditional', symmetrize=False): "
     "the CPU kernel's row loops for that combination"},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused I-Con kernels", -1, kMethods};
  return PyModule_Create(&module);
}
