// Python bindings of dynamic thresholding's per-sample quantile (csrc/include/fastdiff/threshold.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "fastdiff/device.h"
#include "fastdiff/threshold.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

// device < 0 runs the CPU launcher; otherwise the CUDA launcher on `stream` of `device`.
void dynamic_threshold(int dtype, int device, const std::vector<uintptr_t>& inputs,
                       uintptr_t coef, uintptr_t row_ptr, int64_t row, int64_t rows,
                       int64_t out_rows, int64_t width, int64_t batch, int64_t sample_numel,
                       double ratio, double max_value, uintptr_t out, uintptr_t stream) {
  if (dtype < 0 || dtype > 3)
    throw py::value_error("dtype code must be 0..3, got " + std::to_string(dtype));
  const int num_in = static_cast<int>(inputs.size());
  if (!threshold_sizes_ok(num_in, out_rows, width, batch, sample_numel))
    throw py::value_error("dynamic_threshold: invalid sizes (1 to 6 inputs, width >= inputs,"
                          " at least one element per sample)");
  if (!(ratio >= 0.0 && ratio <= 1.0))
    throw py::value_error("dynamic_threshold: ratio must be in [0, 1]");
  std::vector<const void*> in;
  for (uintptr_t p : inputs) in.push_back(reinterpret_cast<const void*>(p));
  const auto dt = static_cast<DType>(dtype);
  const auto* cp = reinterpret_cast<const void*>(coef);
  const auto* rp = reinterpret_cast<const int64_t*>(row_ptr);
  auto* op = reinterpret_cast<void*>(out);
  if (device < 0) {
    int status;
    {
      py::gil_scoped_release release;
      status = dynamic_threshold_cpu(dt, in.data(), num_in, cp, rp, row, rows, out_rows, width,
                                     batch, sample_numel, ratio, max_value, op);
    }
    if (status != 0)
      throw std::runtime_error("dynamic_threshold_cpu failed with code " + std::to_string(status));
    return;
  }
#if defined(FASTDIFF_WITH_CUDA)
  const int status = dynamic_threshold_cuda(dt, in.data(), num_in, cp, rp, row, rows, out_rows,
                                            width, batch, sample_numel, ratio, max_value, op,
                                            device, reinterpret_cast<void*>(stream));
  if (status == -1) throw py::value_error("dynamic_threshold_cuda: sizes out of range");
  if (status != 0)
    throw std::runtime_error(std::string("dynamic_threshold_cuda: ") + cuda_error_string(status));
#else
  (void)stream;
  throw std::runtime_error("fastdiff._C was built without CUDA (nvcc was not found at build time)");
#endif
}

}  // namespace

void bind_threshold(py::module_& m) {
  m.def("dynamic_threshold", &dynamic_threshold, py::arg("dtype"), py::arg("device"),
        py::arg("inputs"), py::arg("coef"), py::arg("row_ptr"), py::arg("row"), py::arg("rows"),
        py::arg("out_rows"), py::arg("width"), py::arg("batch"), py::arg("sample_numel"),
        py::arg("ratio"), py::arg("max_value"), py::arg("out"), py::arg("stream"),
        "out[n] = (s_n, s_n), s_n = clamp(quantile(|w_n|, ratio), 1, max_value), w = the"
        " combination of the inputs by coef[row, out_rows - 1, :num_in]");
}

}  // namespace fastdiff
