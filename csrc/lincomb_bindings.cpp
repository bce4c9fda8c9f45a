// Python bindings of the fused linear combination (csrc/include/fastdiff/lincomb.h).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings.h"
#include "fastdiff/device.h"
#include "fastdiff/lincomb.h"
#include "fastdiff/philox.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

template <typename P>
std::vector<P> as_pointers(const std::vector<uintptr_t>& addresses) {
  std::vector<P> out;
  out.reserve(addresses.size());
  for (uintptr_t a : addresses) out.push_back(reinterpret_cast<P>(a));
  return out;
}

DType to_dtype(int code) {
  if (code < 0 || code > 3) throw py::value_error("dtype code must be 0..3, got " + std::to_string(code));
  return static_cast<DType>(code);
}

void check_arity(size_t num_in, size_t num_out) {
  if (num_in < 1 || num_in > static_cast<size_t>(kLincombMaxIn))
    throw py::value_error("lincomb: 1 to 6 inputs expected, got " + std::to_string(num_in));
  if (num_out < 1 || num_out > static_cast<size_t>(kLincombMaxOut))
    throw py::value_error("lincomb: 1 to " + std::to_string(kLincombMaxOut) + " outputs expected, got " +
                          std::to_string(num_out));
}

// device < 0 runs the CPU launcher; otherwise the CUDA launcher on `stream` of `device`.
void lincomb(int dtype, int device, const std::vector<uintptr_t>& inputs,
             const std::vector<uintptr_t>& outputs, uintptr_t coef, uintptr_t row_ptr,
             int64_t row, int64_t rows, int64_t n, uintptr_t stream, uintptr_t seeds,
             int64_t sample_numel, const std::vector<uint32_t>& counters, uintptr_t clip,
             uintptr_t flag, int32_t stage) {
  check_arity(inputs.size(), outputs.size());
  if (counters.size() > static_cast<size_t>(kLincombMaxNoise))
    throw py::value_error("lincomb: at most 2 noise terms, got " + std::to_string(counters.size()));
  if (!counters.empty() && (seeds == 0 || sample_numel < 1))
    throw py::value_error("lincomb: noise terms need seeds and a positive sample_numel");
  if (clip != 0 && sample_numel < 1)
    throw py::value_error("lincomb: clipping needs a positive sample_numel");
  LincombPerSample per_sample;
  per_sample.num_noise = static_cast<int>(counters.size());
  per_sample.seeds = reinterpret_cast<const int64_t*>(seeds);
  per_sample.sample_numel = sample_numel;
  for (size_t m = 0; m < counters.size(); ++m) per_sample.counters[m] = counters[m];
  per_sample.clip = reinterpret_cast<const void*>(clip);
  per_sample.flag = reinterpret_cast<int32_t*>(flag);
  per_sample.stage = stage;
  const DType dt = to_dtype(dtype);
  const auto in = as_pointers<const void*>(inputs);
  const auto out = as_pointers<void*>(outputs);
  const auto* rp = reinterpret_cast<const int64_t*>(row_ptr);
  const auto* cp = reinterpret_cast<const void*>(coef);
  const int ni = static_cast<int>(in.size()), no = static_cast<int>(out.size());
  int status = 0;
  if (device < 0) {
    py::gil_scoped_release release;
    status = lincomb_cpu(dt, in.data(), out.data(), cp, rp, row, rows, n, ni, no, per_sample);
    if (status != 0) throw std::runtime_error("lincomb_cpu failed with code " + std::to_string(status));
    return;
  }
#if defined(FASTDIFF_WITH_CUDA)
  status = lincomb_cuda(dt, in.data(), out.data(), cp, rp, row, rows, n, ni, no, per_sample, device,
                        reinterpret_cast<void*>(stream));
  if (status != 0)
    throw std::runtime_error(std::string("lincomb_cuda: ") + cuda_error_string(status));
#else
  (void)stream;
  throw std::runtime_error("fastdiff._C was built without CUDA (nvcc was not found at build time)");
#endif
}

}  // namespace

void bind_lincomb(py::module_& m) {
  m.def("lincomb", &lincomb, py::arg("dtype"), py::arg("device"), py::arg("inputs"),
        py::arg("outputs"), py::arg("coef"), py::arg("row_ptr"), py::arg("row"),
        py::arg("rows"), py::arg("n"), py::arg("stream"), py::arg("seeds") = 0,
        py::arg("sample_numel") = 1, py::arg("counters") = std::vector<uint32_t>{},
        py::arg("clip") = 0, py::arg("flag") = 0, py::arg("stage") = 0,
        "out_j = sum_k coef[row, j, k] * in_k (+ Philox noise terms) (+ a clipped term:"
        " clip = [batch, 2] per-sample (bound, divisor)) over n elements of one dense layout;"
        " flag: an int32 [1] lowered (atomic min) to stage if an output is inf or NaN");
  m.def("philox_normal", &philox_normal, py::arg("seed"), py::arg("counter"), py::arg("element"),
        "the standard normal the kernels generate for (seed, counter, element)");
}

}  // namespace fastdiff
