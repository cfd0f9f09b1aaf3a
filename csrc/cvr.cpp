// The Python module estimators._C.  Importing it loads this library, whose static initialisers
// register the cvr:: operators with the dispatcher (dr_loss.cpp and the kernels); the module
// itself only records how the library was built.
#include <Python.h>

#ifndef CVR_CPU_CAPABILITY
#define CVR_CPU_CAPABILITY "DEFAULT"
#endif

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "estimators._C",
                               "Fused DR-family losses, registered as torch.ops.cvr.*", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  // with_cuda: whether the CUDA kernels were compiled; cpu_capability: the at::vec instruction
  // set of the CPU kernels (setup.py picks the build machine's).
  if (PyModule_AddObject(m, "with_cuda", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(m, "cpu_capability", CVR_CPU_CAPABILITY) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
