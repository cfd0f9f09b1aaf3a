// The Python module estimators._C.  Importing it loads this library, whose static initialisers
// register the cvr:: operators with the dispatcher (dr_loss.cpp and the kernels); the module
// itself only records how the library was built.
#include <Python.h>

#include "cpu/claim_loop.h"
#include "kernel_names.h"

#ifndef CVR_CPU_CAPABILITY
#define CVR_CPU_CAPABILITY "DEFAULT"
#endif

namespace {

// A tuple of the names in one of kernel_names.h's lists (a new reference, or null on error).
template <size_t N>
PyObject* names_tuple(const std::array<std::string_view, N>& names) {
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(N));
  if (tuple == nullptr) return nullptr;
  for (size_t k = 0; k < N; ++k) {
    PyObject* name = PyUnicode_FromStringAndSize(names[k].data(), static_cast<Py_ssize_t>(names[k].size()));
    if (name == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(k), name);
  }
  return tuple;
}

// claim_loop_stats() -> dict of the counters of cpu/claim_loop.h: lets the tests check that a
// loop took the parallel path.
PyObject* claim_loop_stats(PyObject*, PyObject*) {
  const cvr::ops::ClaimLoopStats s = cvr::ops::claim_loop_stats();
  return Py_BuildValue("{sLsLsLsLsLsLsL}", "pooled_loops", static_cast<long long>(s.pooled_loops), "serial_loops",
                       static_cast<long long>(s.serial_loops), "helper_chunks", static_cast<long long>(s.helper_chunks),
                       "helper_parks", static_cast<long long>(s.helper_parks), "helper_backoffs",
                       static_cast<long long>(s.helper_backoffs), "late_helpers", static_cast<long long>(s.late_helpers),
                       "caller_blocks", static_cast<long long>(s.caller_blocks));
}

PyMethodDef methods[] = {
    {"claim_loop_stats", claim_loop_stats, METH_NOARGS,
     "Counters of the CPU kernels' claim loop since import (csrc/cpu/claim_loop.h)"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "estimators._C",
                               "Fused DR-family losses, registered as torch.ops.cvr.*", -1, methods};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // with_cuda: whether the CUDA kernels were compiled; cpu_capability: the at::vec instruction
  // set of the CPU kernels (setup.py picks the build machine's); prediction_kernels /
  // imputation_kernels: the registry names the fused loss kernels implement.
  if (PyModule_AddObject(m, "with_cuda", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(m, "cpu_capability", CVR_CPU_CAPABILITY) < 0 ||
      PyModule_AddObject(m, "prediction_kernels", names_tuple(cvr::ops::kPredictionKernels)) < 0 ||
      PyModule_AddObject(m, "imputation_kernels", names_tuple(cvr::ops::kImputationKernels)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
