// Python bindings of the schedule tables (csrc/include/fastdiff/schedule.h). Every spec value
// arrives as a number and travels to the kernel as a launch argument: no host-device copy.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "bindings.h"
#include "fastdiff/device.h"
#include "fastdiff/schedule.h"

namespace py = pybind11;

namespace fastdiff {
namespace {

void check_code(const char* name, int value, int count) {
  if (value < 0 || value >= count)
    throw py::value_error(std::string("schedule_tables: ") + name + " code must be 0.." +
                          std::to_string(count - 1) + ", got " + std::to_string(value));
}

// device < 0 runs the CPU launcher; otherwise the CUDA launcher on `stream` of `device`.
// out: float64 [5 * (n + 1) + 2 * T], contiguous (fastdiff/ops/schedule.py checks it).
void schedule_tables(int device, uintptr_t out, uintptr_t stream, int betas,
                     int64_t num_train_timesteps, double beta_start, double beta_end,
                     bool rescale_zero_snr, int spacing, int family, int64_t steps_offset,
                     int64_t num_inference_steps, int grid, double rho, int final_sigma,
                     bool round_karras) {
  check_code("beta schedule", betas, 6);
  check_code("spacing", spacing, 3);
  check_code("family", family, 3);
  check_code("grid", grid, 4);
  check_code("final sigma", final_sigma, 2);
  if (num_train_timesteps < 2 || num_inference_steps < 1 ||
      num_inference_steps > num_train_timesteps)
    throw py::value_error("schedule_tables: need 2 <= num_train_timesteps and 1 <= "
                          "num_inference_steps <= num_train_timesteps");
  ScheduleSpec s{betas, rescale_zero_snr ? 1 : 0, spacing, family, grid, final_sigma,
                 round_karras ? 1 : 0, num_train_timesteps, num_inference_steps, steps_offset,
                 beta_start, beta_end, rho};
  auto* ptr = reinterpret_cast<double*>(out);
  if (device < 0) {
    py::gil_scoped_release release;
    const int status = schedule_tables_cpu(s, ptr);
    if (status != 0)
      throw std::runtime_error("schedule_tables_cpu failed with code " + std::to_string(status));
    return;
  }
#if defined(FASTDIFF_WITH_CUDA)
  const int status = schedule_tables_cuda(s, ptr, device, reinterpret_cast<void*>(stream));
  if (status != 0)
    throw std::runtime_error(std::string("schedule_tables_cuda: ") + cuda_error_string(status));
#else
  (void)stream;
  throw std::runtime_error("fastdiff._C was built without CUDA (nvcc was not found at build time)");
#endif
}

}  // namespace

void bind_schedule(py::module_& m) {
  m.def("schedule_tables", &schedule_tables, py::arg("device"), py::arg("out"),
        py::arg("stream"), py::arg("betas"), py::arg("num_train_timesteps"),
        py::arg("beta_start"), py::arg("beta_end"), py::arg("rescale_zero_snr"),
        py::arg("spacing"), py::arg("family"), py::arg("steps_offset"),
        py::arg("num_inference_steps"), py::arg("grid"), py::arg("rho"),
        py::arg("final_sigma"), py::arg("round_karras"),
        "a sampling run's schedule tables ([5, n + 1] then the [2, T] training table) into the"
        " float64 buffer at `out`, in one launch");
}

}  // namespace fastdiff
