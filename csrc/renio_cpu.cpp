// Native CPU row kernels of the ReNIO loss: the contract of renio_kernels/ops/triton_fwd.py and
// triton_bwd.py (and ops/torch_chunked.py), for CPU tensors, one row per task.
//
// Forward, per (b, t) row, a = student / tau and b = teacher[:, :Vs] / tau:
//   sweep 1: lse_s = logsumexp(a), lse_t = logsumexp(b)   online, per tile: max, then one exp
//            per element; ls[x] = a[x] - lse_s, lt[x] = b[x] - lse_t (two scalar loads)
//   sweep 2: d = sum_v clamp(e_v), C = sum_v c_v          (only when the divergence is asked)
// Backward, one sweep per row, writing the gradient in the student's dtype:
//   grad_j = ( gd * (c_j - ps_j * C) + gx * ([j == x] - ps_j) ) / tau
// with gd = dL/dd and gx = dL/dls[x] of the row (each term only when its scale exists).
//
// Each row is read in tiles of kTile elements converted to fp32 into an L1-resident buffer; all
// math is fp32. Sweep 2 re-reads a row that sweep 1 just left in L2 (a 152k-vocab fp32 row pair is
// 1.2 MB), so DRAM sees each logit about once per pass: forward reads student and teacher, backward
// reads both again and writes the gradient. Ignored rows skip the sweeps and write zeros; every
// output element is written here, never assumed pre-zeroed. Rows are addressed as
// b * stride_b + t * stride_t in int64, so views such as logits[:, :-1] are read in place.
// Rows are handed out to at::parallel_for's torch.get_num_threads() threads (for_each_row); a
// row's sums always run in the same order on one thread, so results do not depend on the thread
// count.
#include "renio_cpu_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <optional>
#include <vector>

namespace renio {
namespace {

struct RowAddr {
  int64_t seq;
  int64_t stride_b;
  int64_t stride_t;
  int64_t operator()(int64_t row) const {
    const int64_t b = row / seq;
    return b * stride_b + (row - b * seq) * stride_t;
  }
};

RowAddr row_addr(const at::Tensor& x) { return {x.size(1), x.stride(0), x.stride(1)}; }

int64_t label_at(const at::Tensor& labels, const RowAddr& addr, int64_t row) {
  const int64_t off = addr(row);
  if (labels.scalar_type() == at::kLong) return labels.const_data_ptr<int64_t>()[off];
  return labels.const_data_ptr<int32_t>()[off];
}

const char* row_ptr(const at::Tensor& x, int64_t offset) {
  return static_cast<const char*>(x.const_data_ptr()) + offset * x.element_size();
}

// Per-row forward results, in the order of the (6, B, T) output.
struct RowOut {
  float lse_s = 0.0f, lse_t = 0.0f, ls_x = 0.0f, lt_x = 0.0f, d = 0.0f, c = 0.0f;
};

// Running (max, sum of exp(x - max)) of one row's logits, a tile at a time.
// Within a tile, sums run in 16 (or 8) fp32 lanes over at most kTile / lanes terms; across tiles
// they are carried in double, so a 262k-column row sums as accurately as a 2k-column one.
struct OnlineLse {
  float m = kNegInf;
  double z = 0.0;
  // A running max that is still -inf (an all -inf prefix) is replaced by 0, so exp(-inf - -inf)
  // never makes a NaN; a NaN logit is invisible to the max but makes its exp, hence z, NaN.
  static float safe(float m) { return m == kNegInf ? 0.0f : m; }
  float lse() const { return safe(m) + static_cast<float>(std::log(z)); }
};

inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::clamp_min(a, b); }

const char* tile_ptr(const void* row, c10::ScalarType dtype, int64_t v0) {
  return static_cast<const char*>(row) + v0 * c10::elementSize(dtype);
}

// Sweep 1 over both rows together: per tile, convert to fp32 (padded with -inf), take the tile
// max, then add exp(x - max) into the running sums; two independent exp chains per step.
void row_logsumexps(const void* s, c10::ScalarType s_type, const void* t, c10::ScalarType t_type,
                    int64_t vocab, float inv_tau, float* a, float* b, OnlineLse& ls,
                    OnlineLse& lt) {
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int64_t n = std::min(kTile, vocab - v0);
    const int64_t np = padded(n);
    load_tile(tile_ptr(s, s_type, v0), s_type, n, inv_tau, a);
    load_tile(tile_ptr(t, t_type, v0), t_type, n, inv_tau, b);
    Vec ma(kNegInf), mb(kNegInf);
    for (int64_t i = 0; i < np; i += Vec::size()) {
      ma = vmax(ma, Vec::loadu(a + i));
      mb = vmax(mb, Vec::loadu(b + i));
    }
    const float new_ms = std::max(ls.m, reduce_max(ma));
    const float new_mt = std::max(lt.m, reduce_max(mb));
    const Vec safe_s(OnlineLse::safe(new_ms)), safe_t(OnlineLse::safe(new_mt));
    Vec za(0.0f), zb(0.0f);
    for (int64_t i = 0; i < np; i += Vec::size()) {
      za += vexp(Vec::loadu(a + i) - safe_s);
      zb += vexp(Vec::loadu(b + i) - safe_t);
    }
    ls.z = ls.z * std::exp(static_cast<double>(ls.m) - OnlineLse::safe(new_ms)) + reduce_sum(za);
    lt.z = lt.z * std::exp(static_cast<double>(lt.m) - OnlineLse::safe(new_mt)) + reduce_sum(zb);
    ls.m = new_ms;
    lt.m = new_mt;
  }
}

template <int kBetaMode, bool kClip>
void fwd_row(const void* s, c10::ScalarType s_type, const void* t, c10::ScalarType t_type,
             int64_t vocab, int64_t label, const DivParams& p, bool with_divergence, RowOut& out,
             float* a, float* b) {
  OnlineLse lse_s, lse_t;
  row_logsumexps(s, s_type, t, t_type, vocab, p.inv_tau, a, b, lse_s, lse_t);
  out.lse_s = lse_s.lse();
  out.lse_t = lse_t.lse();
  // An out-of-range label (only possible with check_labels=False) poisons the row.
  const bool ok = label >= 0 && label < vocab;
  out.ls_x = (ok ? load_scalar(s, s_type, label) : kNaN) * p.inv_tau - out.lse_s;
  out.lt_x = (ok ? load_scalar(t, t_type, label) : kNaN) * p.inv_tau - out.lse_t;
  if (!with_divergence) return;

  // Sweep 2 re-reads the row from L2. Padded lanes hold -inf, so their terms are exactly 0.
  const Vec vlse_s(out.lse_s), vlse_t(out.lse_t);
  double d = 0.0, c = 0.0;
  Vec e, de, unused_ps;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int64_t n = std::min(kTile, vocab - v0);
    load_tile(tile_ptr(s, s_type, v0), s_type, n, p.inv_tau, a);
    load_tile(tile_ptr(t, t_type, v0), t_type, n, p.inv_tau, b);
    Vec d_acc(0.0f), c_acc(0.0f);
    for (int64_t i = 0; i < padded(n); i += Vec::size()) {
      divergence_terms<kBetaMode, kClip, false>(Vec::loadu(a + i) - vlse_s,
                                                Vec::loadu(b + i) - vlse_t, p, e, de, unused_ps);
      d_acc += e;
      c_acc += de;
    }
    d += reduce_sum(d_acc);
    c += reduce_sum(c_acc);
  }
  // An out-of-range label poisons d too, so the loss turns NaN instead of dropping the token.
  out.d = ok ? static_cast<float>(d) : kNaN;
  out.c = static_cast<float>(c);
}

// Runs row_fn(row, scratch) for every row on torch.get_num_threads() threads. Rows are handed out
// a few at a time from a shared counter rather than split in fixed halves, so a thread that the
// OS deschedules (the machine is shared) or that meets many ignored rows does not hold up the
// others. Which thread takes a row never changes how that row is summed.
template <typename Scratch, typename F>
void for_each_row(int64_t rows, int64_t vocab, const F& row_fn) {
  const int64_t per_grab = std::max<int64_t>(1, 8 * kTile / std::max<int64_t>(vocab, 1));
  const int64_t grabs = (rows + per_grab - 1) / per_grab;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), grabs);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t r0; (r0 = next.fetch_add(per_grab)) < rows;) {
      for (int64_t row = r0; row < std::min(rows, r0 + per_grab); ++row) row_fn(row, scratch);
    }
  });
}

struct FwdScratch {
  alignas(64) float a[kTile];
  alignas(64) float b[kTile];
};

struct BwdScratch {
  alignas(64) float a[kTile];
  alignas(64) float b[kTile];
  alignas(64) float g[kTile];
};

template <int kBetaMode, bool kClip>
struct FwdRows {
  static void run(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                  const DivParams& p, int64_t ignore_index, bool with_divergence, bool store_c,
                  at::Tensor& out) {
    const int64_t rows = student.size(0) * student.size(1);
    const int64_t vocab = student.size(2);
    const RowAddr s_addr = row_addr(student), t_addr = row_addr(teacher);
    const RowAddr l_addr = row_addr(labels);
    float* o = out.mutable_data_ptr<float>();
    for_each_row<FwdScratch>(rows, vocab, [&](int64_t row, FwdScratch& sc) {
      RowOut r;
      const int64_t label = label_at(labels, l_addr, row);
      if (label != ignore_index) {
        fwd_row<kBetaMode, kClip>(row_ptr(student, s_addr(row)), student.scalar_type(),
                                  row_ptr(teacher, t_addr(row)), teacher.scalar_type(), vocab,
                                  label, p, with_divergence, r, sc.a, sc.b);
      }
      o[0 * rows + row] = r.lse_s;
      o[1 * rows + row] = r.lse_t;
      o[2 * rows + row] = r.ls_x;
      o[3 * rows + row] = r.lt_x;
      o[4 * rows + row] = r.d;
      o[5 * rows + row] = store_c ? r.c : 0.0f;
    });
  }
};
using FwdFn = decltype(&FwdRows<0, false>::run);

struct RowScales {
  float lse_s, lse_t, c, gd, gx;  // gd, gx already divided by tau
};

template <int kBetaMode, bool kClip>
void bwd_row(const void* s, c10::ScalarType s_type, const void* t, c10::ScalarType t_type,
             int64_t vocab, int64_t label, const DivParams& p, const RowScales& k, bool has_div,
             bool has_x, void* grad, BwdScratch& sc) {
  const Vec lse_s(k.lse_s), lse_t(k.lse_t), c_sum(k.c), gd(k.gd), gx(k.gx);
  const bool direct = s_type == c10::ScalarType::Float;  // fp32 gradient: no staging tile
  Vec e, de, ps;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int64_t n = std::min(kTile, vocab - v0);
    const int64_t full = n / Vec::size() * Vec::size();
    float* g = direct ? static_cast<float*>(grad) + v0 : sc.g;
    load_tile(tile_ptr(s, s_type, v0), s_type, n, p.inv_tau, sc.a);
    // Computes lanes [i, i + Vec::size()) and stores the first `count` of them.
    auto lanes = [&](int64_t i, int64_t count) {
      const Vec ls = Vec::loadu(sc.a + i) - lse_s;
      Vec gi;
      if (has_div) {
        divergence_terms<kBetaMode, kClip, true>(ls, Vec::loadu(sc.b + i) - lse_t, p, e, de, ps);
        gi = gd * at::vec::fnmadd(ps, c_sum, de);
        if (has_x) gi = at::vec::fnmadd(gx, ps, gi);
      } else {
        gi = Vec(0.0f) - gx * vexp(ls);
      }
      if (count == Vec::size()) {
        gi.store(g + i);
      } else {
        gi.store(g + i, count);
      }
    };
    if (has_div) load_tile(tile_ptr(t, t_type, v0), t_type, n, p.inv_tau, sc.b);
    for (int64_t i = 0; i < full; i += Vec::size()) lanes(i, Vec::size());
    if (full < n) lanes(full, n - full);
    if (has_x && label >= v0 && label < v0 + n) g[label - v0] += k.gx;
    if (!direct) store_tile(g, n, s_type, static_cast<char*>(grad) + v0 * c10::elementSize(s_type));
  }
}

// The gradient is a fresh allocation, so each of its 4 KiB pages faults on first write. Asking the
// kernel to map a row's pages in one call (MADV_POPULATE_WRITE, Linux >= 5.14; elsewhere a no-op)
// costs the same zeroing but not a trap per page: 17% less backward CPU time at 152k columns on
// the reference machine (a VM, where first touches are dear). Huge pages (MADV_HUGEPAGE) were
// faster in steady state there but made a process's first call 2.5x slower and some later ones 2x
// slower, so they are not used.
void prefault_row(char* row, int64_t bytes) {
#if defined(__linux__)
  constexpr uintptr_t kPage = 4096;
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(row) + kPage - 1) & ~(kPage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(row) + bytes) & ~(kPage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, kPopulateWrite);
#endif
}

template <int kBetaMode, bool kClip>
struct BwdRows {
  static void run(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                  const DivParams& p, int64_t ignore_index, const at::Tensor& lse_s,
                  const at::Tensor& lse_t, const std::optional<at::Tensor>& c,
                  const std::optional<at::Tensor>& grad_d,
                  const std::optional<at::Tensor>& grad_ls_x, at::Tensor& grad) {
    const int64_t rows = student.size(0) * student.size(1);
    const int64_t vocab = student.size(2);
    const RowAddr s_addr = row_addr(student), t_addr = row_addr(teacher);
    const RowAddr l_addr = row_addr(labels);
    const bool has_div = grad_d.has_value(), has_x = grad_ls_x.has_value();
    const float* lse_s_p = lse_s.const_data_ptr<float>();
    const float* lse_t_p = lse_t.const_data_ptr<float>();
    const float* c_p = has_div ? c->const_data_ptr<float>() : nullptr;
    const float* gd_p = has_div ? grad_d->const_data_ptr<float>() : nullptr;
    const float* gx_p = has_x ? grad_ls_x->const_data_ptr<float>() : nullptr;
    char* grad_base = static_cast<char*>(grad.mutable_data_ptr());
    const int64_t row_bytes = vocab * grad.element_size();
    for_each_row<BwdScratch>(rows, vocab, [&](int64_t row, BwdScratch& sc) {
      char* grad_row = grad_base + row * row_bytes;
      prefault_row(grad_row, row_bytes);
      const int64_t label = label_at(labels, l_addr, row);
      if (label == ignore_index) {
        std::memset(grad_row, 0, row_bytes);  // +0.0 in fp32, fp16 and bf16
        return;
      }
      const RowScales k{lse_s_p[row], has_div ? lse_t_p[row] : 0.0f, has_div ? c_p[row] : 0.0f,
                        has_div ? gd_p[row] * p.inv_tau : 0.0f,
                        has_x ? gx_p[row] * p.inv_tau : 0.0f};
      bwd_row<kBetaMode, kClip>(row_ptr(student, s_addr(row)), student.scalar_type(),
                                row_ptr(teacher, t_addr(row)), teacher.scalar_type(), vocab, label,
                                p, k, has_div, has_x, grad_row, sc);
    });
  }
};
using BwdFn = decltype(&BwdRows<0, false>::run);

// Kernels are compiled per (beta mode, clip) pair so the inner loops carry no branches on them.
template <typename Fn, template <int, bool> class Table>
Fn pick(int64_t beta_mode, bool clip) {
  TORCH_CHECK(beta_mode >= 0 && beta_mode <= 2, "renio cpu: beta_mode must be 0, 1 or 2");
  static const Fn table[3][2] = {
      {Table<kForwardKL, false>::run, Table<kForwardKL, true>::run},
      {Table<kReverseKL, false>::run, Table<kReverseKL, true>::run},
      {Table<kJSD, false>::run, Table<kJSD, true>::run},
  };
  return table[beta_mode][clip ? 1 : 0];
}

bool float_input(const at::Tensor& x) {
  const auto st = x.scalar_type();
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels) {
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

DivParams div_params(double inv_tau, double beta, double log_beta, double log_1m_beta,
                     double clip) {
  return {static_cast<float>(inv_tau), static_cast<float>(beta), static_cast<float>(log_beta),
          static_cast<float>(log_1m_beta), static_cast<float>(clip)};
}

}  // namespace

// (6, B, T) fp32: lse_s, lse_t, ls_x, lt_x, d (0 without the divergence), c (0 unless store_c).
at::Tensor renio_fwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                     double inv_tau, double beta, double log_beta, double log_1m_beta,
                     double token_clip, int64_t beta_mode, bool clip, int64_t ignore_index,
                     bool with_divergence, bool store_c) {
  check_inputs(student, teacher, labels);
  at::Tensor out = at::empty({6, student.size(0), student.size(1)}, student.options().dtype(at::kFloat));
  const DivParams p = div_params(inv_tau, beta, log_beta, log_1m_beta, token_clip);
  pick<FwdFn, FwdRows>(beta_mode, clip)(student, teacher, labels, p, ignore_index,
                                         with_divergence, store_c && with_divergence, out);
  return out;
}

// (B, T, Vs) gradient in the student's dtype, contiguous.
at::Tensor renio_bwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                     const at::Tensor& lse_s, const at::Tensor& lse_t,
                     const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& grad_d,
                     const std::optional<at::Tensor>& grad_ls_x, double inv_tau, double beta,
                     double log_beta, double log_1m_beta, double token_clip, int64_t beta_mode,
                     bool clip, int64_t ignore_index) {
  check_inputs(student, teacher, labels);
  TORCH_CHECK(grad_d.has_value() || grad_ls_x.has_value(), "renio cpu: no gradient to propagate");
  TORCH_CHECK(!grad_d.has_value() || c.has_value(), "renio cpu: forward ran without store_c");
  const int64_t rows = student.size(0) * student.size(1);
  auto row_vector = [rows](const std::optional<at::Tensor>& x) {
    return !x.has_value() || (x->scalar_type() == at::kFloat && x->is_contiguous() &&
                              x->numel() == rows);
  };
  TORCH_CHECK(row_vector(lse_s) && row_vector(lse_t) && row_vector(c) && row_vector(grad_d) &&
                  row_vector(grad_ls_x),
              "renio cpu: per-row tensors must be contiguous float32 (B, T)");
  at::Tensor grad = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  const DivParams p = div_params(inv_tau, beta, log_beta, log_1m_beta, token_clip);
  pick<BwdFn, BwdRows>(beta_mode, clip)(student, teacher, labels, p, ignore_index, lse_s, lse_t,
                                         c, grad_d, grad_ls_x, grad);
  return grad;
}

// exp evaluations per second of the kernels' vector exp (vexp) over an L1-resident buffer, all
// threads (the compute side of the benchmark's floor; not used by the loss).
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
        for (int i = 0; i < 1024; i += Vec::size()) acc += vexp(Vec::loadu(x + i));
      }
      sinks[tid] = reduce_sum(acc);
    }
  });
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  volatile float keep = 0.0f;
  for (float v : sinks) keep = keep + v;
  return static_cast<double>(threads) * iters * 1024 / secs;
}

}  // namespace renio

TORCH_LIBRARY(renio_kernels_cpu, m) {
  m.def(
      "renio_fwd(Tensor student, Tensor teacher, Tensor labels, float inv_tau, float beta, "
      "float log_beta, float log_1m_beta, float token_clip, int beta_mode, bool clip, "
      "int ignore_index, bool with_divergence, bool store_c) -> Tensor");
  m.def(
      "renio_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor lse_s, Tensor lse_t, "
      "Tensor? c, Tensor? grad_d, Tensor? grad_ls_x, float inv_tau, float beta, float log_beta, "
      "float log_1m_beta, float token_clip, int beta_mode, bool clip, int ignore_index) -> Tensor");
  m.def("exp_throughput(int iters) -> float", &renio::exp_throughput);
}

TORCH_LIBRARY_IMPL(renio_kernels_cpu, CPU, m) {
  m.impl("renio_fwd", &renio::renio_fwd);
  m.impl("renio_bwd", &renio::renio_bwd);
}
