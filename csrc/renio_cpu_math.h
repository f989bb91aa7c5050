// Vectorized element math of the ReNIO row kernels on the CPU (same math as
// renio_kernels/ops/triton/math.py). For one vector of a row, with ls/lt the student/teacher
// log-probabilities (already divided by the temperature and normalized) and ps = exp(ls),
// pt = exp(lt), each divergence of renio_kernels/ops/divergences.py:
//
//   forward_kl:  e = pt (lt - ls)                             de/dls = -pt
//   reverse_kl:  e = ps (ls - lt)                             de/dls = ps (ls - lt + 1)
//   jsd, m = (1 - beta) ps + beta pt:
//       e = beta pt (lt - log m) + (1 - beta) ps (ls - log m)
//       de/dls = (1 - beta) ps (ls - log m)
//   tvd:         e = |ps - pt| / 2                            de/dls = ps sign(ps - pt) / 2
//
// Guards, exactly as the Triton kernels: a term whose probability is exactly 0 is 0 (so -inf
// logits never give 0 * -inf), tested with `p == 0` so a NaN probability keeps its NaN. The token
// clip clamps e to [0, clip] and zeroes de/dls where the clamp is active (inclusive bounds, like
// torch.clamp's gradient; for the JSD only the upper bound gates), keeping NaN. log m is a guarded
// log-add-exp, finite whenever one side is. The TVD's sign is 0 at exact ties (the subgradient
// torch.abs uses) and where ps - pt is NaN (as the Triton kernel; the term itself stays NaN).
//
// Vectors are at::vec::Vectorized<float> (16 lanes under AVX-512, 8 under AVX2); exp is the inlined
// polynomial vexp below, log (JSD only) the Sleef routine libtorch exports.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace renio {

using Vec = at::vec::Vectorized<float>;

// Floats per tile: 8 KiB per operand, so a tile of each operand plus the gradient tile stays in L1
// (48 KiB on the machines we target) while the math streams through it.
constexpr int64_t kTile = 2048;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The divergences these kernels implement, indexed by the kernels' mode argument: the Python side
// looks each name of renio_kernels/ops/divergences.py up in kDivergenceNames (divergence_names()),
// and backend="auto" falls back to another backend for a name missing here. Adding one takes an
// enumerator before kNumDivergences, its name at the same index, and its branch in
// divergence_from_probs; the kernel tables (pick in renio_cpu_rows.h) follow from the enum.
enum DivergenceMode : int { kForwardKL, kReverseKL, kJSD, kTVD, kNumDivergences };
inline constexpr const char* kDivergenceNames[] = {"forward_kl", "reverse_kl", "jsd", "tvd"};
static_assert(sizeof(kDivergenceNames) / sizeof(kDivergenceNames[0]) == kNumDivergences,
              "one name per divergence mode");

// Which probabilities a divergence's terms read (divergence_terms skips the exp of the other;
// a new divergence reads both unless listed here).
constexpr bool reads_ps(int mode) { return mode != kForwardKL; }
constexpr bool reads_pt(int mode) { return mode != kReverseKL; }
// Terms that are >= 0 in exact arithmetic but may round below 0 (the JSD's, by the log-sum
// inequality): only the clip's upper bound gates their gradient (nonnegative_terms in
// divergences.py).
constexpr bool nonnegative_terms(int mode) { return mode == kJSD; }

struct DivParams {
  float inv_tau;
  float beta;
  float clip;
};

inline Vec where(const Vec& mask, const Vec& if_true, const Vec& if_false) {
  return Vec::blendv(if_false, if_true, mask);
}

// exp(x) inlined, about 1 ulp: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, the degree-7
// Cephes expf polynomial, then r's result times 2^n (vscalefps under AVX-512, two exponent-field
// products under AVX2 so that results down to the smallest subnormal stay exact). Inputs are
// clamped to [-104, 89] (exp underflows to 0 below about -103.97 and overflows above 88.73) with
// NaN-preserving min/max, so -inf gives exactly 0, +inf gives inf and NaN stays NaN. Several times
// the throughput of Vectorized::exp() (an out-of-line Sleef call), which the generic build keeps.
inline Vec vexp(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const Vec xc = at::vec::clamp(x, Vec(-104.0f), Vec(89.0f));
  const Vec n = (xc * Vec(1.44269504088896341f)).round();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), xc);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r) + Vec(1.0f);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1);
  const __m256i n2 = _mm256_sub_epi32(ni, n1);
  const __m256i bias = _mm256_set1_epi32(127);
  const Vec s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  const Vec s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return p * s1 * s2;
#endif
#else
  return x.exp();
#endif
}

// x exactly as computed, opaque to the optimizer. GCC contracts `a * b - c` into an FMA across
// inlined calls (its vector intrinsics are plain vector arithmetic and -ffp-contract=fast is its
// default), subtracting c from the exact product a * b instead of the rounded one. Where two
// values must compare as computed (ps - pt with ps == pt giving 0, when either is a product such
// as renio_fwd_grad's stored exp times its tile factor), both go through here.
inline Vec opaque(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 v = x;
  asm("" : "+v"(v));
  return v;
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 v = x;
  asm("" : "+x"(v));
  return v;
#else
  alignas(64) float lanes[Vec::size()];
  x.store(lanes);
  asm volatile("" : : "r"(lanes) : "memory");
  return Vec::loadu(lanes);
#endif
}

// p * x, but 0 where p == 0 whatever x is (so 0 * -inf is 0); a NaN p is not 0 and stays NaN.
inline Vec guarded(const Vec& p, const Vec& x) { return p * ((p != Vec(0.0f)) & x); }

// clamp(e, 0, hi) that keeps NaN (min/max with the operand order of clamp() under AVX).
inline Vec clamp_keep_nan(const Vec& e, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::clamp(e, Vec(0.0f), hi);
#else
  return where(e < Vec(0.0f), Vec(0.0f), where(e > hi, hi, e));
#endif
}

// e (clamped when kClip) and de/dls (gated when kClip) for one vector, from the log-probabilities
// and the probabilities ps = exp(ls), pt = exp(lt) (a mode reads only those reads_ps / reads_pt
// allow).
template <int kMode, bool kClip>
inline void divergence_from_probs(const Vec& ls, const Vec& lt, const Vec& ps, const Vec& pt,
                                  const DivParams& p, Vec& e, Vec& de) {
  static_assert(kMode >= 0 && kMode < kNumDivergences, "unknown divergence mode");
  if constexpr (kMode == kForwardKL) {
    e = guarded(pt, lt - ls);
    de = Vec(0.0f) - pt;
  } else if constexpr (kMode == kReverseKL) {
    const Vec diff = (ps != Vec(0.0f)) & (ls - lt);
    e = ps * diff;
    de = ps * (diff + Vec(1.0f));
  } else if constexpr (kMode == kJSD) {
    // log m = mx + log(w_big + w_small * exp(-|ls - lt|)), mx = max(ls, lt): one rounding at the
    // scale of |log m|. A log-add-exp of ls + log(1 - beta) and lt + log(beta) would also round
    // those sums (about 3x the error); log((1 - beta) ps + beta pt) would underflow to -inf where
    // both probabilities are subnormal and make a finite term infinite.
    const Vec w_big = where(ls >= lt, Vec(1.0f - p.beta), Vec(p.beta));
    const Vec r = vexp(Vec(0.0f) - (ls - lt).abs());
    const Vec log_m = at::vec::maximum(ls, lt) + at::vec::fmadd(Vec(1.0f) - w_big, r, w_big).log();
    const Vec s_term = guarded(ps, ls - log_m);
    e = at::vec::fmadd(Vec(p.beta), guarded(pt, lt - log_m), Vec(1.0f - p.beta) * s_term);
    de = Vec(1.0f - p.beta) * s_term;
  } else if constexpr (kMode == kTVD) {
    const Vec diff = opaque(ps) - opaque(pt);  // exactly 0 where ps == pt (see opaque)
    const Vec half_ps = Vec(0.5f) * ps;
    e = Vec(0.5f) * diff.abs();
    // +ps/2 where ps > pt, -ps/2 where ps < pt, 0 at a tie or a NaN difference.
    de = ((diff > Vec(0.0f)) & half_ps) - ((diff < Vec(0.0f)) & half_ps);
  }
  if constexpr (kClip) {
    // The gradient flows where the clamp is inactive, bounds included (torch.clamp); a NaN e
    // fails every comparison, so its gradient is 0 as in the Triton kernel. A term that is >= 0
    // in exact arithmetic (nonnegative_terms) gates on the upper bound only: below 0 is rounding
    // noise (for the JSD where ps ~ pt), and exact arithmetic keeps that gradient.
    const Vec clamped = clamp_keep_nan(e, Vec(p.clip));
    if constexpr (nonnegative_terms(kMode)) {
      de = de & (e <= Vec(p.clip));
    } else {
      de = de & (clamped == e);
    }
    e = clamped;
  }
}

// e, de/dls and, when kNeedPs, ps for one vector, evaluating only the exps the mode needs.
template <int kMode, bool kClip, bool kNeedPs>
inline void divergence_terms(const Vec& ls, const Vec& lt, const DivParams& p, Vec& e, Vec& de,
                             Vec& ps) {
  constexpr bool kPs = kNeedPs || reads_ps(kMode);
  if constexpr (kPs) ps = vexp(ls);
  const Vec pt = reads_pt(kMode) ? vexp(lt) : Vec(0.0f);
  divergence_from_probs<kMode, kClip>(ls, lt, kPs ? ps : Vec(0.0f), pt, p, e, de);
}

// Lane max and sum (a fixed reduction tree per ISA, so a row's result never depends on the
// thread that computes it). The callers keep NaN out of the running max (a NaN logit shows up in
// its exp instead).
inline float reduce_max(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_max_ps(v);
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float m = lanes[0];
  for (int i = 1; i < Vec::size(); ++i) m = std::max(m, lanes[i]);
  return m;
#endif
}

inline float reduce_sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_reduce_add_ps(v);
#else
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  float s = 0.0f;
  for (int i = 0; i < Vec::size(); ++i) s += lanes[i];
  return s;
#endif
}

inline int64_t padded(int64_t n) {
  return (n + Vec::size() - 1) / Vec::size() * Vec::size();
}

// dst[0:n] = float(src[0:n]) * scale, then -inf up to the next whole vector, so padded lanes
// never enter a log-sum-exp and make every divergence term exactly 0.
template <typename scalar_t>
inline void load_tile_as(const scalar_t* src, int64_t n, float scale, float* dst) {
  const Vec vscale(scale);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= n; i += Vec::size()) (Vec::loadu(src + i) * vscale).store(dst + i);
  } else {
    using HVec = at::vec::Vectorized<scalar_t>;
    for (; i + HVec::size() <= n; i += HVec::size()) {
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(HVec::loadu(src + i));
      (lo * vscale).store(dst + i);
      (hi * vscale).store(dst + i + Vec::size());
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * scale;
  for (; i < padded(n); ++i) dst[i] = kNegInf;
}

inline void load_tile(const void* src, c10::ScalarType dtype, int64_t n, float scale, float* dst) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return load_tile_as(static_cast<const float*>(src), n, scale, dst);
    case c10::ScalarType::Half:
      return load_tile_as(static_cast<const c10::Half*>(src), n, scale, dst);
    default:
      return load_tile_as(static_cast<const c10::BFloat16*>(src), n, scale, dst);
  }
}

// dst[0:n] = src[0:n] rounded to scalar_t (round-to-nearest-even, as Tensor.to()).
template <typename scalar_t>
inline void store_tile_as(const float* src, int64_t n, scalar_t* dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= n; i += Vec::size()) Vec::loadu(src + i).store(dst + i);
  } else {
    using HVec = at::vec::Vectorized<scalar_t>;
    for (; i + HVec::size() <= n; i += HVec::size()) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + i), Vec::loadu(src + i + Vec::size()))
          .store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

inline void store_tile(const float* src, int64_t n, c10::ScalarType dtype, void* dst) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return store_tile_as(src, n, static_cast<float*>(dst));
    case c10::ScalarType::Half:
      return store_tile_as(src, n, static_cast<c10::Half*>(dst));
    default:
      return store_tile_as(src, n, static_cast<c10::BFloat16*>(dst));
  }
}

// Vec::size() consecutive values as fp32 lanes, converted in registers (bf16: the 16 bits
// become the high half of an fp32; fp16: vcvtph2ps).
inline Vec load_float(const float* p) { return Vec::loadu(p); }

inline Vec load_float(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
#else
  alignas(64) float lanes[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<float>(p[i]);
  return Vec::loadu(lanes);
#endif
}

inline Vec load_float(const c10::Half* p) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  alignas(64) float lanes[Vec::size()];
  for (int i = 0; i < Vec::size(); ++i) lanes[i] = static_cast<float>(p[i]);
  return Vec::loadu(lanes);
#endif
}

inline float load_scalar(const void* row, c10::ScalarType dtype, int64_t j) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return static_cast<const float*>(row)[j];
    case c10::ScalarType::Half:
      return static_cast<float>(static_cast<const c10::Half*>(row)[j]);
    default:
      return static_cast<float>(static_cast<const c10::BFloat16*>(row)[j]);
  }
}

}  // namespace renio
