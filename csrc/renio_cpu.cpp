// Native CPU row kernels of the ReNIO loss: the contract of renio_kernels/ops/triton/fwd.py and
// triton/bwd.py (and ops/torch/chunked.py), for CPU tensors, one row per task. An eager
// renio_loss(...).backward() uses renio_cpu_grad.cpp instead (the gradient formed in the forward);
// these serve no_grad forwards, sampled_reverse_kl_loss, a second backward, losses with a
// gradient through ls[x], and renio_kernels.config.cpu_grad_in_forward(False).
//
// Forward, per (b, t) row, a = student / tau and b = teacher[:, :Vs] / tau:
//   sweep 1: lse_s = logsumexp(a), lse_t = logsumexp(b)   online, per tile: max, then one exp
//            per element; ls[x] = a[x] - lse_s, lt[x] = b[x] - lse_t (two scalar loads), each
//            formed against the row's anchor (row_anchor in renio_cpu_rows.h)
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
#include "renio_cpu_pool.h"
#include "renio_cpu_rows.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>

namespace renio {
namespace {

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
    const Vec safe_s(ls.advance(reduce_max(ma))), safe_t(lt.advance(reduce_max(mb)));
    Vec za(0.0f), zb(0.0f);
    for (int64_t i = 0; i < np; i += Vec::size()) {
      za += vexp(Vec::loadu(a + i) - safe_s);
      zb += vexp(Vec::loadu(b + i) - safe_t);
    }
    ls.add(reduce_sum(za));
    lt.add(reduce_sum(zb));
  }
}

template <int kMode, bool kClip>
void fwd_row(const void* s, c10::ScalarType s_type, const void* t, c10::ScalarType t_type,
             int64_t vocab, int64_t label, const DivParams& p, bool with_divergence, RowOut& out,
             float* a, float* b) {
  OnlineLse lse_s, lse_t;
  row_logsumexps(s, s_type, t, t_type, vocab, p.inv_tau, a, b, lse_s, lse_t);
  const float an_s = row_anchor(s, s_type, p.inv_tau, vocab);
  const float an_t = row_anchor(t, t_type, p.inv_tau, vocab);
  out.lse_s = lse_s.lse(an_s);
  out.lse_t = lse_t.lse(an_t);
  // An out-of-range label (only possible with check_labels=False) poisons the row.
  const bool ok = label >= 0 && label < vocab;
  out.ls_x = ((ok ? load_scalar(s, s_type, label) : kNaN) * p.inv_tau - an_s) - out.lse_s;
  out.lt_x = ((ok ? load_scalar(t, t_type, label) : kNaN) * p.inv_tau - an_t) - out.lse_t;
  if (!with_divergence) return;

  // Sweep 2 re-reads the row from L2. Padded lanes hold -inf, so their terms are exactly 0.
  const Vec vlse_s(out.lse_s), vlse_t(out.lse_t), van_s(an_s), van_t(an_t);
  double d = 0.0, c = 0.0;
  Vec e, de, unused_ps;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int64_t n = std::min(kTile, vocab - v0);
    load_tile(tile_ptr(s, s_type, v0), s_type, n, p.inv_tau, a);
    load_tile(tile_ptr(t, t_type, v0), t_type, n, p.inv_tau, b);
    Vec d_acc(0.0f), c_acc(0.0f);
    for (int64_t i = 0; i < padded(n); i += Vec::size()) {
      const Vec ls = (Vec::loadu(a + i) - van_s) - vlse_s;
      const Vec lt = (Vec::loadu(b + i) - van_t) - vlse_t;
      divergence_terms<kMode, kClip, false>(ls, lt, p, e, de, unused_ps);
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

struct FwdScratch {
  explicit FwdScratch(int64_t) {}
  alignas(64) float a[kTile];
  alignas(64) float b[kTile];
};

struct BwdScratch {
  explicit BwdScratch(int64_t) {}
  alignas(64) float a[kTile];
  alignas(64) float b[kTile];
  alignas(64) float g[kTile];
};

template <int kMode, bool kClip>
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
        fwd_row<kMode, kClip>(row_ptr(student, s_addr(row)), student.scalar_type(),
                              row_ptr(teacher, t_addr(row)), teacher.scalar_type(), vocab, label,
                              p, with_divergence, r, sc.a, sc.b);
      }
      if (!store_c) r.c = 0.0f;
      r.store(o, rows, row);
    });
  }
};
using FwdFn = decltype(&FwdRows<0, false>::run);

struct RowScales {
  float lse_s, lse_t, c, gd, gx;  // gd, gx already divided by tau
  float an_s, an_t;               // the rows' anchors (row_anchor)
};

template <int kMode, bool kClip>
void bwd_row(const void* s, c10::ScalarType s_type, const void* t, c10::ScalarType t_type,
             int64_t vocab, int64_t label, const DivParams& p, const RowScales& k, bool has_div,
             bool has_x, void* grad, BwdScratch& sc) {
  const Vec lse_s(k.lse_s), lse_t(k.lse_t), c_sum(k.c), gd(k.gd), gx(k.gx);
  const Vec an_s(k.an_s), an_t(k.an_t);
  const bool direct = s_type == c10::ScalarType::Float;  // fp32 gradient: no staging tile
  Vec e, de, ps;
  for (int64_t v0 = 0; v0 < vocab; v0 += kTile) {
    const int64_t n = std::min(kTile, vocab - v0);
    const int64_t full = n / Vec::size() * Vec::size();
    float* g = direct ? static_cast<float*>(grad) + v0 : sc.g;
    load_tile(tile_ptr(s, s_type, v0), s_type, n, p.inv_tau, sc.a);
    // Computes lanes [i, i + Vec::size()) and stores the first `count` of them.
    auto lanes = [&](int64_t i, int64_t count) {
      const Vec ls = (Vec::loadu(sc.a + i) - an_s) - lse_s;
      Vec gi;
      if (has_div) {
        const Vec lt = (Vec::loadu(sc.b + i) - an_t) - lse_t;
        divergence_terms<kMode, kClip, true>(ls, lt, p, e, de, ps);
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

template <int kMode, bool kClip>
struct BwdRows {
  static void run(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                  const DivParams& p, int64_t ignore_index, const at::Tensor& lse_s,
                  const at::Tensor& lse_t, const std::optional<at::Tensor>& c,
                  const std::optional<at::Tensor>& grad_d,
                  const std::optional<at::Tensor>& grad_ls_x, at::Tensor& grad, bool fresh) {
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
      if (fresh) prefault_row(grad_row, row_bytes);
      const int64_t label = label_at(labels, l_addr, row);
      if (label == ignore_index) {
        std::memset(grad_row, 0, row_bytes);  // +0.0 in fp32, fp16 and bf16
        return;
      }
      const void* s_row = row_ptr(student, s_addr(row));
      const void* t_row = row_ptr(teacher, t_addr(row));
      const RowScales k{lse_s_p[row],
                        has_div ? lse_t_p[row] : 0.0f,
                        has_div ? c_p[row] : 0.0f,
                        has_div ? gd_p[row] * p.inv_tau : 0.0f,
                        has_x ? gx_p[row] * p.inv_tau : 0.0f,
                        row_anchor(s_row, student.scalar_type(), p.inv_tau, vocab),
                        has_div ? row_anchor(t_row, teacher.scalar_type(), p.inv_tau, vocab) : 0.0f};
      bwd_row<kMode, kClip>(s_row, student.scalar_type(), t_row, teacher.scalar_type(), vocab,
                            label, p, k, has_div, has_x, grad_row, sc);
    });
  }
};
using BwdFn = decltype(&BwdRows<0, false>::run);

}  // namespace

// (6, B, T) fp32: lse_s, lse_t, ls_x, lt_x, d (0 without the divergence), c (0 unless store_c).
at::Tensor renio_fwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                     double inv_tau, double beta,
                     double token_clip, int64_t mode, bool clip, int64_t ignore_index,
                     bool with_divergence, bool store_c) {
  check_inputs(student, teacher, labels);
  at::Tensor out =
      at::empty({6, student.size(0), student.size(1)}, student.options().dtype(at::kFloat));
  const DivParams p = div_params(inv_tau, beta, token_clip);
  pick<FwdFn, FwdRows>(mode, clip)(student, teacher, labels, p, ignore_index, with_divergence,
                                   store_c && with_divergence, out);
  return out;
}

// (B, T, Vs) gradient in the student's dtype, contiguous.
at::Tensor renio_bwd(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                     const at::Tensor& lse_s, const at::Tensor& lse_t,
                     const std::optional<at::Tensor>& c, const std::optional<at::Tensor>& grad_d,
                     const std::optional<at::Tensor>& grad_ls_x, double inv_tau, double beta,
                     double token_clip, int64_t mode,
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
  bool fresh = false;
  at::Tensor grad = empty_grad(student.sizes(), student.scalar_type(), &fresh);
  const DivParams p = div_params(inv_tau, beta, token_clip);
  pick<BwdFn, BwdRows>(mode, clip)(student, teacher, labels, p, ignore_index, lse_s, lse_t, c,
                                   grad_d, grad_ls_x, grad, fresh);
  return grad;
}

}  // namespace renio

TORCH_LIBRARY(renio_kernels_cpu, m) {
  m.def(
      "renio_fwd(Tensor student, Tensor teacher, Tensor labels, float inv_tau, float beta, "
      "float token_clip, int mode, bool clip, "
      "int ignore_index, bool with_divergence, bool store_c) -> Tensor");
  m.def(
      "renio_bwd(Tensor student, Tensor teacher, Tensor labels, Tensor lse_s, Tensor lse_t, "
      "Tensor? c, Tensor? grad_d, Tensor? grad_ls_x, float inv_tau, float beta, "
      "float token_clip, int mode, bool clip, int ignore_index) -> Tensor");
  m.def("divergence_names() -> str[]", &renio::divergence_names);
}

TORCH_LIBRARY_IMPL(renio_kernels_cpu, CPU, m) {
  m.impl("renio_fwd", &renio::renio_fwd);
  m.impl("renio_bwd", &renio::renio_bwd);
}
