// pybind11 module fastdiff._C. The binding files (this one and csrc/*_bindings.cpp) are the
// only code that sees Python: they convert Python ints (raw pointers from tensor.data_ptr(),
// sizes, the dtype code, the CUDA stream handle) into calls of the torch-free launchers, and
// turn error codes into Python exceptions.
#include <pybind11/pybind11.h>

#include <string>

#include "bindings.h"
#include "fastdiff/common.h"
#include "fastdiff/device.h"

#ifndef FASTDIFF_CUDA_ARCHS
#define FASTDIFF_CUDA_ARCHS ""
#endif
#ifndef FASTDIFF_SOURCE_HASH
#define FASTDIFF_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;
using namespace fastdiff;

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff native kernels (torch-free; CPU always, CUDA when built with nvcc)";
  m.def("abi_version", [] { return kAbiVersion; });
  m.def("source_hash", [] { return std::string(FASTDIFF_SOURCE_HASH); });
#if defined(FASTDIFF_WITH_CUDA)
  m.def("has_cuda", [] { return true; });
  m.def("cuda_archs", [] { return std::string(FASTDIFF_CUDA_ARCHS); });
  m.def("cuda_runtime_version", &cuda_runtime_version);
  m.def("cuda_driver_version", &cuda_driver_version);
  m.def("cuda_device_count", &cuda_device_count);
  m.def("cuda_device_capability", &cuda_device_capability, py::arg("device"));
#else
  m.def("has_cuda", [] { return false; });
  m.def("cuda_archs", [] { return std::string(); });
#endif
#if defined(_OPENMP)
  m.def("has_openmp", [] { return true; });
#else
  m.def("has_openmp", [] { return false; });
#endif
  bind_lincomb(m);
  bind_group_norm(m);
  bind_threshold(m);
  bind_schedule(m);
}
