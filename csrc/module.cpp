// Python entry point of attnscale._C.  The ops themselves register with the
// dispatcher (TORCH_LIBRARY_FRAGMENT in csrc/ops/*.cpp) when this library is
// loaded; the module carries only the CPU GEMM backend switch (ops/cpu/gemm.h), the layout of
// dilated_conv2d_with_columns' second result (for its fake kernel) and the digest of the sources it
// was built from (setup.py generates the header).
#include <Python.h>

#include <c10/util/Exception.h>

#include <cstring>

#include "attnscale_source_hash.h"
#include "ops/cpu/gemm.h"
#include "ops/dilated_conv_gemm.h"

namespace {

namespace g = attnscale::cpu_gemm;

PyObject* cpu_gemm(PyObject*, PyObject*) {
  try {  // the first call reads ATTNSCALE_CPU_GEMM, which may be bad
    return PyUnicode_FromString(g::name(g::backend()));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* set_cpu_gemm(PyObject*, PyObject* arg) {
  const char* s = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (s == nullptr || (std::strcmp(s, "blas") != 0 && std::strcmp(s, "onednn") != 0)) {
    PyErr_SetString(PyExc_ValueError, "set_cpu_gemm: backend must be 'blas' or 'onednn'");
    return nullptr;
  }
  try {
    return PyUnicode_FromString(g::name(g::set_backend(std::strcmp(s, "onednn") == 0 ? g::Backend::kOneDnn
                                                                                    : g::Backend::kBlas)));
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
}

PyObject* dilated_conv_column_groups(PyObject*, PyObject* args) {
  long long h, w, kh, kw, d, p;
  if (!PyArg_ParseTuple(args, "LLLLLL", &h, &w, &kh, &kw, &d, &p)) return nullptr;
  std::vector<std::array<int64_t, 3>> groups;
  try {
    groups = attnscale::dilated_conv::column_groups(h, w, kh, kw, d, p);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    return nullptr;
  }
  PyObject* list = PyList_New(Py_ssize_t(groups.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < groups.size(); ++i) {
    PyObject* item = Py_BuildValue("(LLL)", (long long)groups[i][0], (long long)groups[i][1], (long long)groups[i][2]);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, Py_ssize_t(i), item);
  }
  return list;
}

PyObject* source_hash(PyObject*, PyObject*) { return PyUnicode_FromString(ATTNSCALE_SOURCE_HASH); }

PyMethodDef methods[] = {
    {"cpu_gemm", cpu_gemm, METH_NOARGS, "The CPU GEMM backend of the Winograd and fc6 kernels: 'onednn' or 'blas'."},
    {"set_cpu_gemm", set_cpu_gemm, METH_O, "Set the CPU GEMM backend ('onednn' or 'blas'); returns the previous one."},
    {"dilated_conv_column_groups", dilated_conv_column_groups, METH_VARARGS,
     "The column blocks dilated_conv2d_with_columns keeps, by group: (H, W, KH, KW, dilation, padding) -> "
     "[(members, pixels, taps), ...]."},
    {"source_hash", source_hash, METH_NOARGS, "SHA-256 of the csrc/ files this library was built from."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "attnscale C++/CUDA ops (see torch.ops.attnscale)", -1, methods,
  };
  return PyModule_Create(&module_def);
}
