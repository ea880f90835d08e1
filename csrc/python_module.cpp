// The Python module fusedmtl._C. Ops reach Python through torch.ops.fusedmtl (TORCH_LIBRARY), not
// through this module; it reports how it was built and holds the autograd graph walks of
// weighting/task_graph.h (graph introspection, not ops), whose tensors cross by torch's own
// THPVariable wrappers (no pybind11 type of ours).
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <optional>
#include <vector>

#include "common/cpu_capability.h"
#include "common/tensor_utils.h"
#include "weighting/task_graph.h"

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

// A Python sequence of tensors as a vector (false with a TypeError set otherwise).
bool tensors_of(PyObject* sequence, const char* what, std::vector<at::Tensor>& out) {
  PyObject* fast = PySequence_Fast(sequence, what);
  if (fast == nullptr) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(fast, i);
    if (!THPVariable_Check(item)) {
      Py_DECREF(fast);
      PyErr_Format(PyExc_TypeError, "%s: expected tensors, got %s", what, Py_TYPE(item)->tp_name);
      return false;
    }
    out.push_back(THPVariable_Unpack(item));
  }
  Py_DECREF(fast);
  return true;
}

PyObject* tensor_list(const std::vector<at::Tensor>& tensors) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(tensors.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < tensors.size(); ++i) {
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), THPVariable_Wrap(tensors[i]));
  }
  return list;
}

PyObject* reachable_leaves(PyObject*, PyObject* args) {
  PyObject *root, *stops;
  if (!PyArg_ParseTuple(args, "O!O", THPVariableClass, &root, &stops)) return nullptr;
  std::vector<at::Tensor> stop_tensors;
  if (!tensors_of(stops, "reachable_leaves: stops", stop_tensors)) return nullptr;
  try {
    auto found = fusedmtl::task_graph::reachable_leaves(THPVariable_Unpack(root), stop_tensors);
    PyObject* leaves = tensor_list(found.leaves);
    if (leaves == nullptr) return nullptr;
    return Py_BuildValue("(NO)", leaves, found.stopped ? Py_True : Py_False);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// The capsule that keeps a split's hooks armed: released, it disarms them.
void disarm(PyObject* capsule) {
  auto* armed = static_cast<std::shared_ptr<bool>*>(PyCapsule_GetPointer(capsule, "armed"));
  **armed = false;
  delete armed;
}

PyObject* split_shared_edges(PyObject*, PyObject* args) {
  PyObject *losses, *coeffs, *shared, *stops;
  if (!PyArg_ParseTuple(args, "OO!OO", &losses, THPVariableClass, &coeffs, &shared, &stops)) {
    return nullptr;
  }
  std::vector<at::Tensor> loss_tensors, shared_tensors, stop_tensors;
  if (!tensors_of(losses, "split_shared_edges: losses", loss_tensors) ||
      !tensors_of(shared, "split_shared_edges: shared", shared_tensors) ||
      !tensors_of(stops, "split_shared_edges: stops", stop_tensors)) {
    return nullptr;
  }
  try {
    auto split = fusedmtl::task_graph::split_shared_edges(loss_tensors, THPVariable_Unpack(coeffs),
                                                          shared_tensors, stop_tensors);
    if (!split) Py_RETURN_NONE;
    PyObject* specific = tensor_list(split->specific);
    if (specific == nullptr) return nullptr;
    PyObject* token =
        PyCapsule_New(new std::shared_ptr<bool>(std::move(split->armed)), "armed", disarm);
    if (token == nullptr) {
      Py_DECREF(specific);
      return nullptr;
    }
    return Py_BuildValue("(NN)", specific, token);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

void unwatch(PyObject* capsule) {
  delete static_cast<fusedmtl::task_graph::FiniteWatch*>(PyCapsule_GetPointer(capsule, "watch"));
}

PyObject* watch_finite(PyObject*, PyObject* leaves) {
  std::vector<at::Tensor> leaf_tensors;
  if (!tensors_of(leaves, "watch_finite: leaves", leaf_tensors)) return nullptr;
  try {
    return PyCapsule_New(new fusedmtl::task_graph::FiniteWatch(leaf_tensors), "watch", unwatch);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* watched_finite(PyObject*, PyObject* token) {
  auto* watch =
      static_cast<fusedmtl::task_graph::FiniteWatch*>(PyCapsule_GetPointer(token, "watch"));
  if (watch == nullptr) return nullptr;
  const std::optional<bool> finite = watch->finite();
  if (!finite) Py_RETURN_NONE;
  return PyBool_FromLong(*finite);
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
    {"reachable_leaves", reachable_leaves, METH_VARARGS,
     "reachable_leaves(root, stops) -> (leaves, stopped): the leaves requiring grad that root's "
     "graph reaches before the grad_fn of a tensor in stops (depth-first order), and whether it "
     "reached one."},
    {"split_shared_edges", split_shared_edges, METH_VARARGS,
     "split_shared_edges(losses, coeffs, shared, stops) -> (specific, token) or None: arms hooks "
     "so that one backward pass of sum(losses) gives shared leaves (and stops) the gradient of "
     "sum_i coeffs[i] losses[i] and the other leaves, returned, the unweighted one; the hooks "
     "fire once, while token lives. None when the graph does not split so."},
    {"watch_finite", watch_finite, METH_O,
     "watch_finite(leaves) -> token: until token is released, every gradient a backward pass "
     "gives these leaves is read for a non-finite element as it arrives (CPU tensors)."},
    {"watched_finite", watched_finite, METH_O,
     "watched_finite(token) -> True, False, or None where a gradient could not be read."},
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
