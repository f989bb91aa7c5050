// Row plumbing shared by the native CPU kernels (renio_cpu.cpp, renio_cpu_grad.cpp): addressing a
// (b, t) row of a strided (B, T, V) tensor in int64, the online log-sum-exp carry, the row
// scheduler, first-touch prefaulting and the host-side checks.
#pragma once

#include "renio_cpu_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

namespace renio {

// Element offset of row b * T + t: b * stride_b + t * stride_t, so views such as logits[:, :-1]
// are read in place.
struct RowAddr {
  int64_t seq;
  int64_t stride_b;
  int64_t stride_t;
  int64_t operator()(int64_t row) const {
    const int64_t b = row / seq;
    return b * stride_b + (row - b * seq) * stride_t;
  }
};

inline RowAddr row_addr(const at::Tensor& x) { return {x.size(1), x.stride(0), x.stride(1)}; }

inline int64_t label_at(const at::Tensor& labels, const RowAddr& addr, int64_t row) {
  const int64_t off = addr(row);
  if (labels.scalar_type() == at::kLong) return labels.const_data_ptr<int64_t>()[off];
  return labels.const_data_ptr<int32_t>()[off];
}

inline const char* row_ptr(const at::Tensor& x, int64_t offset) {
  return static_cast<const char*>(x.const_data_ptr()) + offset * x.element_size();
}

inline const char* tile_ptr(const void* row, c10::ScalarType dtype, int64_t v0) {
  return static_cast<const char*>(row) + v0 * c10::elementSize(dtype);
}

// Running (max, sum of exp(x - max)) of one row's logits, a tile at a time.
// Within a tile, sums run in 16 (or 8) fp32 lanes over at most kTile / lanes terms; across tiles
// they are carried in double, so a 262k-column row sums as accurately as a 2k-column one.
struct OnlineLse {
  float m = kNegInf;
  double z = 0.0;
  // A running max that is still -inf (an all -inf prefix) is replaced by 0, so exp(-inf - -inf)
  // never makes a NaN; a NaN logit is invisible to the max but makes its exp, hence z, NaN.
  static float safe(float m) { return m == kNegInf ? 0.0f : m; }
  // The log-sum-exp minus the row's anchor (row_anchor): the stat every kernel stores.
  float lse(float anchor) const { return (safe(m) - anchor) + static_cast<float>(std::log(z)); }
  // Folds in one tile whose max is tile_max; returns the (safe) max the tile's exps are taken
  // against. The caller adds that tile's sum of exp(x - returned max) with add().
  float advance(float tile_max) {
    if (tile_max > m) {  // else the reference stays (and NaN never becomes one)
      z *= std::exp(static_cast<double>(m) - safe(tile_max));
      m = tile_max;
    }
    return safe(m);
  }
  void add(float tile_sum) { z += tile_sum; }
};

// A row's log-probabilities are formed as (x - anchor) - lse, with anchor the largest of the row's
// first kAnchorColumns logits (divided by tau; 0 when not finite) and lse the log-sum-exp minus
// the anchor. The anchor is near the row's max, so max - anchor is exact (same sign, within a
// factor 2) and lse keeps the digits of log z: (x - max) - log z in all but name, and shift-
// invariant (x - (max + log z) would round max + log z at the scale of a constant on the logits).
// The backward recomputes the anchor from the row. renio_kernels/ops/rows.py defines the same.
constexpr int64_t kAnchorColumns = 64;

inline float row_anchor(const void* row, c10::ScalarType type, float inv_tau, int64_t vocab) {
  float a = kNegInf;
  for (int64_t j = 0; j < std::min(vocab, kAnchorColumns); ++j) {
    a = std::max(a, load_scalar(row, type, j) * inv_tau);  // a NaN is skipped (the row is NaN)
  }
  return a - a == 0.0f ? a : 0.0f;  // -inf (all -inf) and inf give 0
}

// Per-row forward results, in the order of the (6, B, T) stats output; ignored rows keep zeros.
struct RowOut {
  float lse_s = 0.0f, lse_t = 0.0f, ls_x = 0.0f, lt_x = 0.0f, d = 0.0f, c = 0.0f;
  void store(float* out, int64_t rows, int64_t row) const {
    const float values[6] = {lse_s, lse_t, ls_x, lt_x, d, c};
    for (int i = 0; i < 6; ++i) out[i * rows + row] = values[i];
  }
};

inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }

// Runs row_fn(row, scratch) for every row on torch.get_num_threads() threads, each thread with
// one Scratch(vocab), then finish(scratch) once per thread. Rows are handed out a few at a time
// from a shared counter rather than split in fixed halves, so a thread that the OS deschedules
// (the machine is shared) or that meets many ignored rows does not hold up the others. Which
// thread takes a row never changes how that row is summed.
template <typename Scratch, typename F, typename Finish>
void for_each_row(int64_t rows, int64_t vocab, const F& row_fn, const Finish& finish) {
  const int64_t per_grab = std::max<int64_t>(1, 8 * kTile / std::max<int64_t>(vocab, 1));
  const int64_t grabs = (rows + per_grab - 1) / per_grab;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), grabs);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    Scratch scratch(vocab);
    for (int64_t r0; (r0 = next.fetch_add(per_grab)) < rows;) {
      for (int64_t row = r0; row < std::min(rows, r0 + per_grab); ++row) row_fn(row, scratch);
    }
    finish(scratch);
  });
}

template <typename Scratch, typename F>
void for_each_row(int64_t rows, int64_t vocab, const F& row_fn) {
  for_each_row<Scratch>(rows, vocab, row_fn, [](Scratch&) {});
}

// A fresh gradient's 4 KiB pages each fault on first write. Asking the kernel to map a row's
// pages in one call (MADV_POPULATE_WRITE, Linux >= 5.14; elsewhere a no-op) costs the same
// zeroing but not a trap per page: 17% less backward CPU time at 152k columns on the reference
// machine (a VM, where first touches are dear). Huge pages (MADV_HUGEPAGE) were faster in steady
// state there but made a process's first call 2.5x slower and some later ones 2x slower, so they
// are not used; a reused buffer (renio_cpu_pool.h) needs neither.
inline void prefault_row(char* row, int64_t bytes) {
#if defined(__linux__)
  constexpr uintptr_t kPage = 4096;
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(row) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(row) + bytes) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateWrite);
#endif
}

// kDivergenceNames (renio_cpu_math.h), exported as op divergence_names.
inline std::vector<std::string> divergence_names() {
  return {std::begin(kDivergenceNames), std::end(kDivergenceNames)};
}

// Kernels are compiled per (divergence, clip) pair so the inner loops carry no branches on them:
// Table<kMode, kClip>::run for every mode of DivergenceMode, picked by the mode argument.
template <typename Fn, template <int, bool> class Table, int... kModes>
Fn pick_from(int64_t mode, bool clip, std::integer_sequence<int, kModes...>) {
  static const Fn table[][2] = {{Table<kModes, false>::run, Table<kModes, true>::run}...};
  TORCH_CHECK(mode >= 0 && mode < kNumDivergences, "renio cpu: divergence mode ", mode,
              " not implemented");
  return table[mode][clip ? 1 : 0];
}

template <typename Fn, template <int, bool> class Table>
Fn pick(int64_t mode, bool clip) {
  return pick_from<Fn, Table>(mode, clip, std::make_integer_sequence<int, kNumDivergences>{});
}

inline bool float_input(const at::Tensor& x) {
  const auto st = x.scalar_type();
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& labels) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3 && labels.dim() == 2,
              "renio cpu: expected (B, T, V) logits and (B, T) labels");
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu() && labels.device().is_cpu(),
              "renio cpu: tensors must be on the CPU");
  TORCH_CHECK(teacher.size(0) == student.size(0) && teacher.size(1) == student.size(1) &&
                  teacher.size(2) >= student.size(2),
              "renio cpu: teacher must be (B, T, Vt >= Vs)");
  TORCH_CHECK(labels.size(0) == student.size(0) && labels.size(1) == student.size(1),
              "renio cpu: labels must be (B, T)");
  TORCH_CHECK(student.stride(2) == 1 && teacher.stride(2) == 1,
              "renio cpu: logits need a contiguous last dimension");
  TORCH_CHECK(float_input(student) && float_input(teacher),
              "renio cpu: logits must be float32, float16 or bfloat16");
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "renio cpu: labels must be int64 or int32");
}

inline DivParams div_params(double inv_tau, double beta,
                            double clip) {
  return {static_cast<float>(inv_tau), static_cast<float>(beta), static_cast<float>(clip)};
}

}  // namespace renio
