// The Python module ccam_kernels._C (setup.py build): importing it loads the shared library,
// whose static initializers register the ops of ccam_attention.cpp. No Python bindings: the ops
// are reached through torch.ops.ccam_kernels.*.
#include <Python.h>

static struct PyModuleDef ccam_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&ccam_module); }
