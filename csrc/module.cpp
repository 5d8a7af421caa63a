// The Python module rlhf_ops._C. It exports nothing itself: importing it loads this shared
// library, whose static initialisers (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in each .cu
// file) register the ops under torch.ops.rlhf_ops_cuda.
#include <Python.h>

static struct PyModuleDef rlhf_ops_C_module = {PyModuleDef_HEAD_INIT, "_C",
                                               "CUDA kernels of rlhf_ops (torch.ops.rlhf_ops_cuda)",
                                               -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rlhf_ops_C_module); }
