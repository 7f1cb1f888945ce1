// The extension module itself: importing mvit_kernels._C runs the TORCH_LIBRARY registrations
// of the other translation units. No pybind11: the ops are reached through torch.ops.
#include <Python.h>

static struct PyModuleDef mvit_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mvit_kernels_c_module); }
