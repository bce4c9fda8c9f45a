// Python bindings of the fused GroupNorm (csrc/include/fastdiff/group_norm.h).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "fastdiff/device.h"
#include "fastdiff/group_norm.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

DType to_dtype(int code) {
  if (code < 0 || code > 3)
    throw py::value_error("dtype code must be 0..3, got " + std::to_string(code));
  return static_cast<DType>(code);
}

const void* ptr(uintptr_t address) { return reinterpret_cast<const void*>(address); }

#if defined(FASTDIFF_WITH_CUDA)
std::string cuda_message(int status) {
  switch (status) {
    case -1: return "invalid sizes (C must be a positive multiple of G) or mode";
    case -2: return "unsupported dtype";
    case -3: return "fused mode requested but a unit's tiles exceed the co-resident grid";
    case -4: return "workspace too small (ask group_norm_workspace for its size)";
    case -5: return "channels-last layout unsupported for this channel count";
    default: break;
  }
  return cuda_error_string(status);
}
#endif

// Bytes of zero-filled workspace the CUDA launcher needs, -1 if channels-last is unsupported.
int64_t group_norm_workspace(int dtype, int device, uintptr_t x, uintptr_t y, int64_t N,
                             int64_t C, int64_t HW, int64_t G, bool channels_last) {
  const DType dt = to_dtype(dtype);
  if (device < 0) return 0;
#if defined(FASTDIFF_WITH_CUDA)
  const int64_t bytes =
      group_norm_cuda_workspace(dt, ptr(x), ptr(y), N, C, HW, G, channels_last, device);
  if (bytes == -5) return -1;
  if (bytes < 0) throw py::value_error("group_norm_workspace: " + cuda_message(int(bytes)));
  return bytes;
#else
  (void)dt, (void)x, (void)y, (void)N, (void)C, (void)HW, (void)G, (void)channels_last;
  throw std::runtime_error("fastdiff._C was built without CUDA (nvcc was not found at build time)");
#endif
}

// device < 0 runs the CPU launcher; otherwise the CUDA launcher on `stream` of `device`.
void group_norm(int dtype, int device, uintptr_t x, uintptr_t y, uintptr_t weight,
                uintptr_t bias, uintptr_t scale, uintptr_t shift, int64_t N, int64_t C,
                int64_t HW, int64_t G, double eps, bool silu, bool channels_last,
                uintptr_t workspace, int64_t workspace_bytes, int mode, uintptr_t stream) {
  const DType dt = to_dtype(dtype);
  void* out = reinterpret_cast<void*>(y);
  if (device < 0) {
    int status;
    {
      py::gil_scoped_release release;
      status = group_norm_cpu(dt, ptr(x), out, ptr(weight), ptr(bias), ptr(scale), ptr(shift), N,
                              C, HW, G, eps, silu, channels_last);
    }
    if (status != 0)
      throw std::runtime_error("group_norm_cpu failed with code " + std::to_string(status));
    return;
  }
#if defined(FASTDIFF_WITH_CUDA)
  const int status = group_norm_cuda(
      dt, ptr(x), out, ptr(weight), ptr(bias), ptr(scale), ptr(shift), N, C, HW, G, eps, silu,
      channels_last, reinterpret_cast<void*>(workspace), workspace_bytes, mode, device,
      reinterpret_cast<void*>(stream));
  if (status != 0) throw std::runtime_error("group_norm_cuda: " + cuda_message(status));
#else
  (void)workspace, (void)workspace_bytes, (void)mode, (void)stream;
  throw std::runtime_error("fastdiff._C was built without CUDA (nvcc was not found at build time)");
#endif
}

}  // namespace

void bind_group_norm(py::module_& m) {
  m.def("group_norm_workspace", &group_norm_workspace, py::arg("dtype"), py::arg("device"),
        py::arg("x"), py::arg("y"), py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"),
        py::arg("channels_last"),
        "zero-filled workspace bytes group_norm needs on a CUDA device (-1: channels-last "
        "unsupported for this channel count, run NCHW)");
  m.def("group_norm", &group_norm, py::arg("dtype"), py::arg("device"), py::arg("x"),
        py::arg("y"), py::arg("weight"), py::arg("bias"), py::arg("scale"), py::arg("shift"),
        py::arg("N"), py::arg("C"), py::arg("HW"), py::arg("G"), py::arg("eps"), py::arg("silu"),
        py::arg("channels_last"), py::arg("workspace"), py::arg("workspace_bytes"),
        py::arg("mode"), py::arg("stream"),
        "y = [silu]((GN(x) * weight + bias) * (1 + scale) + shift); mode 0 auto, 1 two-pass, "
        "2 fused (CUDA)");
}

}  // namespace fastdiff
