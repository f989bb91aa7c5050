// The forward that also forms each row's gradient at unit scale, and the backward that scales it:
// the native CPU path of an eager renio_loss(...).backward().
//
// The gradient of the loss w.r.t. a student row is gd * u with u_j = (c_j - ps_j C) / tau (SPEC,
// "Gradient") and gd = dL/dd, a per-row scalar known only once every row's forward has run (the
// sequence weights) and grad_output arrives. u itself is row-local, so the forward writes it while
// the row is still in cache, and the backward is a streaming multiply by gd. Per row, in tiles of
// kTile columns, with a = student / tau and b = teacher[:, :Vs] / tau:
//   sweep 1 (the logits from DRAM): per tile k, es = exp(a - r_k) and et = exp(b - r'_k) into
//            per-thread fp32 scratch rows, r_k being the running max of the tiles before (see
//            exp_sweep); their sums give lse_s and lse_t, and the per-tile factor
//            f_k = exp(r_k - max) / z turns a stored exp into a probability: ps = es * f_k.
//   sweep 2 (logits and scratch from L2/L3): ls, lt, ps, pt with no new exp, the clamped terms
//            e_v and c_v; d = sum e_v, C = sum c_v; c_v overwrites et.
//   sweep 3: u = c / tau - es * (f_k C / tau), written in the student's dtype, interleaved with
//            sweep 1 of the thread's next row.
// That is 2 exps per logit (the log-sum-exps' own exps are reused as probabilities) against 5 for
// renio_fwd + renio_bwd, and 5 logits' worth of DRAM traffic (read student and teacher, write u;
// backward: read and write u), the least a gradient whose scale comes after the forward allows.
// The memory is the gradient's, allocated in the forward instead of the backward.
//
// Ignored rows get zero stats and a zero gradient. Results do not depend on the thread count.
#include "renio_cpu_pool.h"
#include "renio_cpu_rows.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

namespace renio {
namespace {

// Sweep 1 requests the logits this many tiles ahead (tuned on the reference machine: 1, 2, 4).
constexpr int64_t kPrefetchTiles = 4;

int64_t tiles(int64_t vocab) { return (vocab + kTile - 1) / kTile; }

// One row's state between its sweeps: the stored exps and per-tile factors, then (after sweep 2)
// c_v in et, C, and where sweep 3 writes u.
struct RowBuf {
  explicit RowBuf(int64_t vocab)
      : es(padded(vocab)), et(padded(vocab)), fs(tiles(vocab)), ft(tiles(vocab)) {}
  std::vector<float> es, et;  // exp(x - r_k) per column after sweep 1; et holds c_v after sweep 2
  std::vector<float> fs, ft;  // per tile: exp(r_k - max) / z
  void* grad = nullptr;       // the row's gradient while its sweep 3 is pending
  float c = 0.0f;
};

// Sweep 3 of a row runs interleaved with sweep 1 of the thread's next row, a tile of each in turn:
// sweep 3 only streams stores to DRAM and sweep 1 is mostly exps, so the two overlap instead of
// the stores stalling a sweep of their own. Hence two RowBufs per thread.
struct GradScratch {
  explicit GradScratch(int64_t vocab) : cur(vocab), prev(vocab) {}
  RowBuf cur, prev;
  alignas(64) float a[kTile];
  alignas(64) float b[kTile];
  alignas(64) float g[kTile];
};

// One tile of a row as fp32 lanes x * scale, padded with -inf to whole vectors. A tile of whole
// vectors of the row's own dtype T is read in place and converted in registers (scale = inv_tau,
// applied where the value is used); any other tile (the last one of a row, or a side whose dtype
// is not T) is converted into `stage` first (T = float, scale = 1).
template <typename T>
struct TileView {
  const T* x;
  float scale;
  Vec operator[](int64_t i) const { return load_float(x + i); }
};

template <typename T>
constexpr c10::ScalarType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return c10::ScalarType::Float;
  if constexpr (std::is_same_v<T, c10::Half>) return c10::ScalarType::Half;
  return c10::ScalarType::BFloat16;
}

// Calls f(view) with a TileView<T> in place or a TileView<float> of the staged tile.
template <typename T, typename F>
inline void with_tile(const void* row, c10::ScalarType type, int64_t v0, int64_t n, float inv_tau,
                      float* stage, const F& f) {
  if (type == dtype_of<T>() && n % Vec::size() == 0) {
    return f(TileView<T>{static_cast<const T*>(row) + v0, inv_tau});
  }
  load_tile(tile_ptr(row, type, v0), type, n, inv_tau, stage);
  f(TileView<float>{stage, 1.0f});
}

// Sweep 1 for one side: ex[v] = exp(x_v / tau - r_k), f[k] = exp(r_k - max) / z; returns the
// log-sum-exp. The reference r_k of tile k is the running max of the tiles before it (the first
// non--inf tile takes its own max), so one pass both finds the tile's max and takes its exps. A
// tile whose max exceeds r_k by more than kHeadroom (its exps could overflow) is redone against
// its own max; on a row that rises steadily that is a few tiles, on most rows none.
constexpr float kHeadroom = 64.0f;  // 2048 * e^64 is far below FLT_MAX

template <typename T, typename OnTile>
float exp_sweep(const void* x, c10::ScalarType type, int64_t vocab, float inv_tau, float anchor,
                float* ex, float* f, float* stage, const OnTile& on_tile) {
  OnlineLse lse;
  const int64_t step = Vec::size() * static_cast<int64_t>(c10::elementSize(type));
  for (int64_t v0 = 0, k = 0; v0 < vocab; v0 += kTile, ++k) {
    const int64_t n = std::min(kTile, vocab - v0);
    const int64_t np = padded(n);
    float* e = ex + v0;
    // The loads of this loop stream from DRAM: ask for the tiles ahead while the exps compute.
    const char* next = tile_ptr(x, type, v0 + kPrefetchTiles * kTile);
    with_tile<T>(x, type, v0, n, inv_tau, stage, [&](const auto& tv) {
      const Vec vscale(tv.scale);
      if (lse.m == kNegInf) {
        Vec m(kNegInf);
        for (int64_t i = 0; i < np; i += Vec::size()) m = vmax(m, tv[i]);
        lse.advance(reduce_max(m) * tv.scale);
      }
      float ref = OnlineLse::safe(lse.m);
      Vec m(kNegInf), z(0.0f), vref(ref);
      for (int64_t i = 0; i < np; i += Vec::size()) {
        __builtin_prefetch(next + i / Vec::size() * step, 0, 3);
        const Vec xi = tv[i];
        m = vmax(m, xi);
        const Vec ei = vexp(at::vec::fmsub(xi, vscale, vref));
        ei.store(e + i);
        z += ei;
      }
      const float tile_max = reduce_max(m) * tv.scale;
      if (tile_max > ref + kHeadroom) {
        ref = lse.advance(tile_max);
        vref = Vec(ref);
        z = Vec(0.0f);
        for (int64_t i = 0; i < np; i += Vec::size()) {
          const Vec ei = vexp(at::vec::fmsub(tv[i], vscale, vref));
          ei.store(e + i);
          z += ei;
        }
      }
      lse.add(reduce_sum(z));
      f[k] = ref;
      lse.advance(tile_max);  // a higher reference for the next tiles
    });
    on_tile(k);
  }
  // exp(r_k - max) / z, in double: z carries the row's whole sum.
  const double m_final = OnlineLse::safe(lse.m);
  for (int64_t k = 0; k < tiles(vocab); ++k) {
    f[k] = static_cast<float>(std::exp(static_cast<double>(f[k]) - m_final) / lse.z);
  }
  return lse.lse(anchor);
}

// Stores the first `count` lanes of v at p; whole vectors at 64-byte aligned addresses bypass the
// cache (the gradient is not read again before the backward, and a streaming store skips the
// read-for-ownership of each line).
inline void store_out(float* p, const Vec& v, int64_t count, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream && count == Vec::size()) return _mm512_stream_ps(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream && count == Vec::size()) return _mm256_stream_ps(p, v);
#endif
  if (count == Vec::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

inline void store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Sweep 3, tile k of a row whose sweeps 1 and 2 are done: u = c_v / tau - ps (C / tau).
void write_u_tile(const RowBuf& r, int64_t k, int64_t vocab, c10::ScalarType type, float inv_tau,
                  float* stage) {
  const int64_t v0 = k * kTile;
  const int64_t n = std::min(kTile, vocab - v0);
  const int64_t full = n / Vec::size() * Vec::size();
  const bool direct = type == c10::ScalarType::Float;
  const bool stream = direct && reinterpret_cast<uintptr_t>(r.grad) % 64 == 0;
  float* g = direct ? static_cast<float*>(r.grad) + v0 : stage;
  const float* es = r.es.data() + v0;
  const float* c = r.et.data() + v0;
  const Vec kps(r.fs[k] * r.c * inv_tau), vinv_tau(inv_tau);
  auto lanes = [&](int64_t i, int64_t count) {
    const Vec u = at::vec::fnmadd(Vec::loadu(es + i), kps, Vec::loadu(c + i) * vinv_tau);
    store_out(g + i, u, count, stream);
  };
  for (int64_t i = 0; i < full; i += Vec::size()) lanes(i, Vec::size());
  if (full < n) lanes(full, n - full);
  if (!direct) store_tile(g, n, type, static_cast<char*>(r.grad) + v0 * c10::elementSize(type));
}

// Finishes the pending row of this thread, if any.
void flush_pending(GradScratch& sc, int64_t vocab, c10::ScalarType type, float inv_tau) {
  if (sc.prev.grad == nullptr) return;
  for (int64_t k = 0; k < tiles(vocab); ++k) write_u_tile(sc.prev, k, vocab, type, inv_tau, sc.g);
  store_fence();
  sc.prev.grad = nullptr;
}

// Sweeps 1 and 2 of a row (sweep 1 interleaved with the pending row's sweep 3); leaves the row
// pending in sc.prev. T: the dtype read in place (the other side, if different, is staged).
template <int kMode, bool kClip, typename T>
void fwd_grad_row(const void* s, c10::ScalarType s_type, const void* t, c10::ScalarType t_type,
                  int64_t vocab, int64_t label, const DivParams& p, RowOut& out, void* grad,
                  GradScratch& sc) {
  RowBuf& r = sc.cur;
  float* es = r.es.data();
  float* et = r.et.data();
  auto pending_tile = [&](int64_t k) {
    if (sc.prev.grad != nullptr) write_u_tile(sc.prev, k, vocab, s_type, p.inv_tau, sc.g);
  };
  const float an_s = row_anchor(s, s_type, p.inv_tau, vocab);
  const float an_t = row_anchor(t, t_type, p.inv_tau, vocab);
  out.lse_s = exp_sweep<T>(s, s_type, vocab, p.inv_tau, an_s, es, r.fs.data(), sc.a, pending_tile);
  if (sc.prev.grad != nullptr) {
    store_fence();
    sc.prev.grad = nullptr;
  }
  out.lse_t =
      exp_sweep<T>(t, t_type, vocab, p.inv_tau, an_t, et, r.ft.data(), sc.b, [](int64_t) {});
  // An out-of-range label (only possible with check_labels=False) poisons the row.
  const bool ok = label >= 0 && label < vocab;
  out.ls_x = ((ok ? load_scalar(s, s_type, label) : kNaN) * p.inv_tau - an_s) - out.lse_s;
  out.lt_x = ((ok ? load_scalar(t, t_type, label) : kNaN) * p.inv_tau - an_t) - out.lse_t;

  // Sweep 2. Padded lanes hold -inf logits and 0 exps, so their terms are exactly 0.
  const Vec vlse_s(out.lse_s), vlse_t(out.lse_t), van_s(an_s), van_t(an_t);
  double d = 0.0, c = 0.0;
  Vec e, de;
  for (int64_t v0 = 0, k = 0; v0 < vocab; v0 += kTile, ++k) {
    const int64_t n = std::min(kTile, vocab - v0);
    const Vec fs(r.fs[k]), ft(r.ft[k]);
    Vec d_acc(0.0f), c_acc(0.0f);
    with_tile<T>(s, s_type, v0, n, p.inv_tau, sc.a, [&](const auto& a) {
      with_tile<T>(t, t_type, v0, n, p.inv_tau, sc.b, [&](const auto& b) {
        const Vec scale_a(a.scale), scale_b(b.scale);
        for (int64_t i = 0; i < padded(n); i += Vec::size()) {
          const Vec ps = Vec::loadu(es + v0 + i) * fs;
          const Vec pt = Vec::loadu(et + v0 + i) * ft;
          const Vec ls = at::vec::fmsub(a[i], scale_a, van_s) - vlse_s;
          const Vec lt = at::vec::fmsub(b[i], scale_b, van_t) - vlse_t;
          divergence_from_probs<kMode, kClip>(ls, lt, ps, pt, p, e, de);
          d_acc += e;
          c_acc += de;
          de.store(et + v0 + i);
        }
      });
    });
    d += reduce_sum(d_acc);
    c += reduce_sum(c_acc);
  }
  // An out-of-range label poisons d too, so the loss turns NaN instead of dropping the token.
  out.d = ok ? static_cast<float>(d) : kNaN;
  out.c = static_cast<float>(c);
  r.c = out.c;
  r.grad = grad;
  std::swap(sc.cur, sc.prev);
}

template <int kMode, bool kClip>
struct FwdGradRows {
  static void run(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& labels,
                  const DivParams& p, int64_t ignore_index, at::Tensor& out, at::Tensor& grad,
                  bool fresh) {
    const int64_t rows = student.size(0) * student.size(1);
    const int64_t vocab = student.size(2);
    const RowAddr s_addr = row_addr(student), t_addr = row_addr(teacher);
    const RowAddr l_addr = row_addr(labels);
    float* o = out.mutable_data_ptr<float>();
    char* grad_base = static_cast<char*>(grad.mutable_data_ptr());
    const int64_t row_bytes = vocab * grad.element_size();
    const c10::ScalarType s_type = student.scalar_type();
    auto finish = [&](GradScratch& sc) { flush_pending(sc, vocab, s_type, p.inv_tau); };
    for_each_row<GradScratch>(rows, vocab, [&](int64_t row, GradScratch& sc) {
      char* grad_row = grad_base + row * row_bytes;
      if (fresh) prefault_row(grad_row, row_bytes);
      RowOut r;
      const int64_t label = label_at(labels, l_addr, row);
      if (label == ignore_index) {
        std::memset(grad_row, 0, row_bytes);  // +0.0 in fp32, fp16 and bf16
      } else {
        auto row_fn = fwd_grad_row<kMode, kClip, float>;
        if (s_type == teacher.scalar_type() && s_type == c10::ScalarType::Half) {
          row_fn = fwd_grad_row<kMode, kClip, c10::Half>;
        } else if (s_type == teacher.scalar_type() && s_type == c10::ScalarType::BFloat16) {
          row_fn = fwd_grad_row<kMode, kClip, c10::BFloat16>;
        }
        row_fn(row_ptr(student, s_addr(row)), s_type, row_ptr(teacher, t_addr(row)),
               teacher.scalar_type(), vocab, label, p, r, grad_row, sc);
      }
      r.store(o, rows, row);
    }, finish);
  }
};
using FwdGradFn = decltype(&FwdGradRows<0, false>::run);

struct NoScratch {
  explicit NoScratch(int64_t) {}
};

template <typename scalar_t>
void scale_row(scalar_t* g, int64_t n, float k) {
  const Vec vk(k);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Plain stores: the line was just read, and streaming stores measured slower here.
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(g + i) * vk).store(g + i);
  } else {
    using HVec = at::vec::Vectorized<scalar_t>;
    for (; i + HVec::size() <= n; i += HVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(HVec::loadu(g + i));
      at::vec::convert_from_float<scalar_t>(lo * vk, hi * vk).store(g + i);
    }
  }
  for (; i < n; ++i) g[i] = static_cast<scalar_t>(static_cast<float>(g[i]) * k);
}

}  // namespace

// ((6, B, T) fp32 stats as renio_fwd with the divergence and C, (B, T, Vs) unit-scale gradient u
// in the student's dtype).
std::tuple<at::Tensor, at::Tensor> renio_fwd_grad(const at::Tensor& student,
                                                  const at::Tensor& teacher,
                                                  const at::Tensor& labels, double inv_tau,
                                                  double beta, double token_clip,
                                                  int64_t mode, bool clip,
                                                  int64_t ignore_index) {
  check_inputs(student, teacher, labels);
  at::Tensor out =
      at::empty({6, student.size(0), student.size(1)}, student.options().dtype(at::kFloat));
  bool fresh = false;
  at::Tensor grad = empty_grad(student.sizes(), student.scalar_type(), &fresh);
  const DivParams p = div_params(inv_tau, beta, token_clip);
  pick<FwdGradFn, FwdGradRows>(mode, clip)(student, teacher, labels, p, ignore_index, out, grad,
                                           fresh);
  return {out, grad};
}

// grad[b, t, :] *= scale[b, t] in place, rows with labels == ignore_index left as they are (zero).
void renio_scale_grad(const at::Tensor& grad, const at::Tensor& scale, const at::Tensor& labels,
                      int64_t ignore_index) {
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous() && grad.device().is_cpu() &&
                  float_input(grad),
              "renio cpu: the gradient must be a contiguous (B, T, V) float CPU tensor");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.numel() == grad.size(0) * grad.size(1),
              "renio cpu: the row scales must be contiguous float32 (B, T)");
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == grad.size(0) &&
                  labels.size(1) == grad.size(1) &&
                  (labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt),
              "renio cpu: labels must be int64 or int32 (B, T)");
  const int64_t rows = grad.size(0) * grad.size(1);
  const int64_t vocab = grad.size(2);
  const RowAddr l_addr = row_addr(labels);
  const float* k = scale.const_data_ptr<float>();
  char* base = static_cast<char*>(grad.mutable_data_ptr());
  const int64_t row_bytes = vocab * grad.element_size();
  const c10::ScalarType dtype = grad.scalar_type();
  for_each_row<NoScratch>(rows, vocab, [&](int64_t row, NoScratch&) {
    if (label_at(labels, l_addr, row) == ignore_index) return;
    void* g = base + row * row_bytes;
    switch (dtype) {
      case c10::ScalarType::Float:
        return scale_row(static_cast<float*>(g), vocab, k[row]);
      case c10::ScalarType::Half:
        return scale_row(static_cast<c10::Half*>(g), vocab, k[row]);
      default:
        return scale_row(static_cast<c10::BFloat16*>(g), vocab, k[row]);
    }
  });
}

}  // namespace renio

TORCH_LIBRARY_FRAGMENT(renio_kernels_cpu, m) {
  m.def(
      "renio_fwd_grad(Tensor student, Tensor teacher, Tensor labels, float inv_tau, float beta, "
      "float token_clip, int mode, bool clip, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def("renio_scale_grad(Tensor(a!) grad, Tensor scale, Tensor labels, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(renio_kernels_cpu, CPU, m) {
  m.impl("renio_fwd_grad", &renio::renio_fwd_grad);
  m.impl("renio_scale_grad", &renio::renio_scale_grad);
}
