// The Python module fusedmtl._C. Ops reach Python through torch.ops.fusedmtl (TORCH_LIBRARY), not
// through this module, so no tensor crosses pybind11; the module only has to exist and reports how
// it was built.
#include <Python.h>

#include "common/cpu_capability.h"
#include "common/tensor_utils.h"

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(fusedmtl::cpu_capability_name(fusedmtl::cpu_capability()));
}

PyObject* set_cpu_capability(PyObject*, PyObject* name) {
  const char* requested = PyUnicode_AsUTF8(name);
  if (requested == nullptr) return nullptr;
  return PyUnicode_FromString(
      fusedmtl::cpu_capability_name(fusedmtl::set_cpu_capability(requested)));
}

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  fusedmtl::empty_cpu_cache();
  Py_RETURN_NONE;
}

PyObject* cpu_cache_bytes(PyObject*, PyObject*) {
  return PyLong_FromSize_t(fusedmtl::cpu_cache_bytes());
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The instruction set the CPU kernels run with: 'default', 'avx2' or 'avx512'."},
    {"set_cpu_capability", set_cpu_capability, METH_O,
     "Run the CPU kernels compiled for at most this instruction set; returns the one in force."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS,
     "Free the large CPU output buffers kept for reuse."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS,
     "Bytes of large CPU output buffers kept for reuse."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
#ifdef FUSEDMTL_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
