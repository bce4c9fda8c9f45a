// CPU launcher of the schedule tables (element math in schedule.h). A few thousand scalar
// operations: one thread, the cumulative products sequential, in the reference's order.
#include "fastdiff/schedule.h"

namespace fastdiff {

int schedule_tables_cpu(const ScheduleSpec& s, double* out) {
  if (s.T < 2 || s.n < 1 || s.n > s.T) return 1;
  const int64_t T = s.T, cols = s.n + 1;
  double* abar = out + kScheduleRows * cols;  // train row 0
  double* sigmas = abar + T;                  // train row 1
  double prod = 1;
  for (int64_t i = 0; i < T; ++i) abar[i] = prod *= 1 - schedule_beta(s, i);
  if (s.rescale_zero_snr) {
    const double first = sqrt(abar[0]), last = sqrt(abar[T - 1]);
    const double scale = first / (first - last);
    // Factors first (each needs the unrescaled entry before it), then their product in place.
    for (int64_t i = T - 1; i >= 0; --i)
      sigmas[i] = zero_snr_factor(i > 0 ? abar[i - 1] : abar[0], abar[i], i, last, scale);
    prod = 1;
    for (int64_t i = 0; i < T; ++i) abar[i] = prod *= sigmas[i];
  }
  for (int64_t i = 0; i < T; ++i) sigmas[i] = train_sigma(abar[i]);
  for (int64_t j = 0; j < cols; ++j) schedule_column(s, sigmas, j, out + j, cols);
  return 0;
}

}  // namespace fastdiff
