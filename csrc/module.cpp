// Python entry point of attnscale._C.  The ops themselves register with the
// dispatcher (TORCH_LIBRARY_FRAGMENT in csrc/ops/*.cpp) when this library is
// loaded; the module object carries no functions of its own.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "attnscale C++/CUDA ops (see torch.ops.attnscale)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
