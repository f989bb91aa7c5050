// Benchmark-only probe of the native CPU kernel's vector exp (vexp in csrc/renio_cpu_math.h),
// built by benchmarks/exp_probe.py with the kernel's ISA flags; not part of the loss's extension.
#include "renio_cpu_math.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <vector>

namespace renio_bench {

using renio::Vec;

// exp evaluations per second of vexp over an L1-resident buffer, on all torch threads (the
// compute side of the benchmarks' floor).
double exp_throughput(int64_t iters) {
  const int64_t threads = at::get_num_threads();
  std::vector<float> sinks(threads, 0.0f);
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float x[1024];
    for (int i = 0; i < 1024; ++i) x[i] = -8.0f + 16.0f * static_cast<float>(i) / 1024.0f;
    for (int64_t tid = begin; tid < end; ++tid) {
      Vec acc(0.0f);
      for (int64_t it = 0; it < iters; ++it) {
        for (int i = 0; i < 1024; i += Vec::size()) acc += renio::vexp(Vec::loadu(x + i));
      }
      sinks[tid] = renio::reduce_sum(acc);
    }
  });
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = 0.0f;
  for (float v : sinks) keep = keep + v;
  return static_cast<double>(threads) * iters * 1024 / secs;
}

}  // namespace renio_bench

TORCH_LIBRARY(renio_bench_probe, m) {
  m.def("exp_throughput(int iters) -> float", &renio_bench::exp_throughput);
}
