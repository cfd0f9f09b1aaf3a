// CPU kernels of the fused DR-family losses: arithmetic in at::vec::Vectorized, reductions
// over fixed chunks spread over threads by claim_loop (claim_loop.h).  See
// estimators/joint_loss.py for the reference each kernel equals and dr_loss.h for the calling
// convention.
//
// Notation as in the BADR paper: on the clicked batch B, x the prediction logit, xt the
// imputation logit, r the label, w = 1 / p_hat; l(x, t) = softplus(x) - t x is the binary
// cross-entropy of sigmoid(x) against t and dl/dx = sigmoid(x) - t.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../dr_loss.h"
#include "claim_loop.h"

namespace cvr::ops {
namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Sums run over fixed chunks of kChunk elements; one thread sums a chunk into double and the
// chunk sums are added in chunk order, so a loss is bitwise the same for any number of
// threads and whichever thread sums which chunk.  Chunks go to other threads only above
// kGrainChunks chunks (8192 elements): an element costs 1-2 ns here (an exp, a division and a
// log1p series per logit), 5-10 times an element of ATen's cheap elementwise kernels, whose
// grain (GRAIN_SIZE, 32768) thus holds the same ~10 us of work per task; below it, waking a
// thread costs more than it saves.  The threads claim chunks (claim_loop) instead of splitting
// them up front (at::parallel_for): with the cores taken by other processes, an OpenMP region
// waits at its end for a thread the OS has not run yet, a scheduler slice (milliseconds),
// where the claim loop's caller computes the chunks nobody has claimed.
constexpr int64_t kChunk = 1024;
constexpr int64_t kGrainChunks = 8;
// Within a chunk each lane adds kFlush vectors in the input precision before they are added
// into double accumulators, so float32 rounding compounds over 16 terms, not 1024.
constexpr int kFlush = 16;

// ---- Stable functions of a logit ----------------------------------------------------------

// exp(-|x|) in (0, 1]: everything below is built on it, so no exp overflows for any logit.
// In float32 exp_u20 (relative error < 4e-7 down to -86.5, 0 below ln(FLT_MIN) = -87.3) takes
// half the time of Sleef's expf; in float64 it is Sleef's exp.  It saturates its argument,
// which would map a NaN logit to a finite value; adding x - x (zero for finite x) keeps NaN
// propagating.
template <typename T>
C10_ALWAYS_INLINE Vec<T> exp_neg_abs(const Vec<T>& x) {
  return x.abs().neg().exp_u20() + (x - x);
}

// log1p(z) for z in [0, 1], as 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = z / (2 + z)
// in [0, 1/3].  The series is cut where the rest, below (1/9)^k / (2k + 1) relative, falls
// under half an ulp (k = 7 terms in float32, 16 in float64).  It keeps full relative accuracy
// for tiny z (softplus of a logit of -40 is 4e-18) and costs k fma, where Sleef's log1p takes
// several times longer.
template <typename T>
C10_ALWAYS_INLINE Vec<T> log1p_series(const Vec<T>& s) {
  constexpr int terms = std::is_same_v<T, float> ? 7 : 16;
  const Vec<T> s2 = s * s;
  Vec<T> poly(T(1) / T(2 * terms - 1));
  for (int k = terms - 2; k >= 0; --k) {
    poly = at::vec::fmadd(poly, s2, Vec<T>(T(1) / T(2 * k + 1)));
  }
  return Vec<T>(2) * s * poly;
}

// sigmoid(x), softplus(x) = max(x, 0) + log1p(exp(-|x|)) and sigmoid'(x), from z = exp(-|x|).
// (The per-element helpers are forced inline: in a chunk's body, which claim_loop calls through
// a function_ref, GCC's size limits left Logit's constructor out of line in the BADR imputation
// kernel, a quarter of its time at B = 4096.)
// 1 / (1 + z) and s = z / (2 + z) share one division by (1 + z)(2 + z), in [2, 6]; a kernel
// that uses no softplus drops s and its multiplications at compile time.
template <typename T>
struct Logit {
  Vec<T> z, inv, s, sigmoid;  // exp(-|x|), 1 / (1 + z), z / (2 + z), sigmoid(x)

  C10_ALWAYS_INLINE explicit Logit(const Vec<T>& x) : z(exp_neg_abs(x)) {
    const Vec<T> one_z = Vec<T>(1) + z, two_z = Vec<T>(2) + z;
    const Vec<T> q = (one_z * two_z).reciprocal();
    inv = two_z * q;
    s = z * one_z * q;
    sigmoid = Vec<T>::blendv(z * inv, inv, x >= Vec<T>(0));
  }

  Vec<T> softplus(const Vec<T>& x) const { return at::vec::maximum(x, Vec<T>(0)) + log1p_series(s); }
  // sigmoid (1 - sigmoid) = z / (1 + z)^2, without the cancellation in 1 - sigmoid.
  Vec<T> dsigmoid() const { return z * inv * inv; }
};

// ---- The two forms of the cross-entropy ----------------------------------------------------

// l(x, t) = -(t log p + (1 - t) log(1 - p)) with p = sigmoid(x), of one vector of logits x, in
// one of two forms.  Both expose the same quantities, so that every kernel below is written
// once:  value(t) = l(x, t);  dinput(t) = d l / d x;  gap() = g in l(x, r) - l(x, s) = (s - r) g
// (no cancellation of two large cross-entropies), which is also -d l / d t, l being linear in t;
// sigmoid() and dsigmoid() of x, for x an imputation logit whose sigmoid is a target.
//
// ExactCE, the softplus form (cross_entropy="logits"): l = softplus(x) - t x, g = -d l / d t = x.
template <typename T>
struct ExactCE {
  Vec<T> x;
  Logit<T> lx;

  C10_ALWAYS_INLINE explicit ExactCE(const Vec<T>& x) : x(x), lx(x) {}
  Vec<T> value(const Vec<T>& t) const { return lx.softplus(x) - t * x; }
  Vec<T> dinput(const Vec<T>& t) const { return lx.sigmoid - t; }
  Vec<T> gap() const { return x; }
  Vec<T> sigmoid() const { return lx.sigmoid; }
  Vec<T> dsigmoid() const { return lx.dsigmoid(); }
};

// ClampedCE (cross_entropy="clamped"), what the published code computes and autograd
// differentiates: p = 1 / (1 + exp(-x)) as torch.sigmoid computes it; F.binary_cross_entropy's
// value (t - 1) max(log1p(-p), -100) - t max(log p, -100), its input gradient
// (p - t) / max(p (1 - p), 1e-12) times sigmoid's backward (1 - p) p (zero once p rounds to 0 or
// 1); its derivative in t is -gap(), finite (bce_clamped's target gradient; torch's own,
// -logit(p), is infinite once p rounds to 0 or 1).
template <typename T>
struct ClampedCE {
  Vec<T> p, log_p, log_q;  // sigmoid(x), max(log p, -100), max(log1p(-p), -100)

  C10_ALWAYS_INLINE explicit ClampedCE(const Vec<T>& x)
      : p((Vec<T>(1) + x.neg().exp()).reciprocal()),
        log_p(at::vec::maximum(p.log(), Vec<T>(-100))),
        log_q(at::vec::maximum(p.neg().log1p(), Vec<T>(-100))) {}
  Vec<T> value(const Vec<T>& t) const { return (t - Vec<T>(1)) * log_q - t * log_p; }
  Vec<T> dinput(const Vec<T>& t) const {
    const Vec<T> v = (Vec<T>(1) - p) * p;
    return (p - t) / at::vec::maximum(v, Vec<T>(1e-12)) * v;
  }
  Vec<T> gap() const { return log_p - log_q; }
  Vec<T> sigmoid() const { return p; }
  Vec<T> dsigmoid() const { return (Vec<T>(1) - p) * p; }
};

// ---- Deterministic parallel sums ----------------------------------------------------------

// Sums of K terms per lane: kFlush vectors are added in the input precision, then each lane
// into its own double accumulator (lane-wise, so the additions do not wait on each other);
// the lanes are added in order at the end.
template <typename T, int K>
struct LaneSums {
  static constexpr int width = Vec<T>::size();
  std::array<Vec<T>, K> lanes;
  std::array<std::array<double, width>, K> acc{};
  int pending = 0;

  LaneSums() { lanes.fill(Vec<T>(0)); }

  void add(const std::array<Vec<T>, K>& terms) {
    for (int k = 0; k < K; ++k) lanes[k] += terms[k];
    if (++pending == kFlush) flush();
  }

  void flush() {
    for (int k = 0; k < K; ++k) {
      __at_align__ T buf[width];
      lanes[k].store(buf);
      for (int j = 0; j < width; ++j) acc[k][j] += buf[j];
      lanes[k] = Vec<T>(0);
    }
    pending = 0;
  }

  std::array<double, K> total() {
    flush();
    std::array<double, K> sums{};
    for (int k = 0; k < K; ++k) {
      for (int j = 0; j < width; ++j) sums[k] += acc[k][j];
    }
    return sums;
  }
};

// Calls body(i, n) for every vector of elements [i, i + n) of [0, size), n <= Vec::size(), and
// returns the K sums of the vectors it returns.  body reads and writes only lanes [0, n) (it
// loads with Vec::loadu(p, n), stores with v.store(p, n)); lanes past n are dropped here.
template <int K, typename T, typename Body>
std::array<double, K> reduce(int64_t size, const Body& body) {
  constexpr int64_t width = Vec<T>::size();
  const int64_t chunks = (size + kChunk - 1) / kChunk;
  std::vector<std::array<double, K>> partial(chunks);
  claim_loop(chunks, kGrainChunks, [&](int64_t c) {
    const int64_t end = std::min(size, (c + 1) * kChunk);
    LaneSums<T, K> sums;
    for (int64_t i = c * kChunk; i < end; i += width) {
      const int64_t n = std::min(width, end - i);
      std::array<Vec<T>, K> terms = body(i, n);
      if (n < width) {
        for (auto& t : terms) t = Vec<T>::set(Vec<T>(0), t, n);
      }
      sums.add(terms);
    }
    partial[c] = sums.total();
  });
  std::array<double, K> total{};
  for (const auto& p : partial) {
    for (int k = 0; k < K; ++k) total[k] += p[k];
  }
  return total;
}

// One multiplication per element: threads pay off only from the grain of ATen's own
// elementwise kernels (at::internal::GRAIN_SIZE, 32768 elements) on, a chunk here.
template <typename T>
void scale(T* data, int64_t size, T factor) {
  constexpr int64_t chunk = 32768;
  claim_loop((size + chunk - 1) / chunk, 1, [&](int64_t c) {
    const int64_t begin = c * chunk, n = std::min(chunk, size - begin);
    at::vec::map([factor](const Vec<T>& v) { return v * Vec<T>(factor); }, data + begin, data + begin, n);
  });
}

template <typename T>
Vec<T> load(const T* data, int64_t i, int64_t n) {
  return Vec<T>::loadu(data + i, n);
}

// ---- Prediction-model losses (eqs. 2, 3, 37, 7, 13) ---------------------------------------

// num / N with num = sum_B w l(x, r) [- sum_B l(x, s(xt)) + sum_U l(x, s(xt))] and N = |B|
// (naive, IPS), sum_B w (SNIPS, BADR) or |U| (DR); N does not depend on the logits, so
// d loss / dx = (d num / dx) / N.  The pass over B also computes sum_B w, so the gradient on B
// is written unnormalised and scaled once N is known; the pass over U knows N already.
template <Estimator E, template <typename> class CE, typename T>
void prediction_kernel(const PredictionInputs& in, T* grad_b, T* grad_u, T* loss) {
  const InputPointers<T> ptr(in);
  constexpr bool uses_u = E == Estimator::dr || E == Estimator::badr;
  const int64_t b = in.x_b.numel();
  const auto [num_b, sum_w] = reduce<2, T>(b, [&](int64_t i, int64_t n) {
    const Vec<T> r = load<T>(ptr.r_b, i, n);
    const CE<T> lx(load<T>(ptr.x_b, i, n));
    const Vec<T> e = lx.value(r);  // l(x, r)
    if constexpr (E == Estimator::naive) {
      lx.dinput(r).store(grad_b + i, n);
      return std::array<Vec<T>, 2>{e, Vec<T>(0)};
    } else {
      const Vec<T> w = load<T>(ptr.p_hat_b, i, n).reciprocal();
      Vec<T> term = w * e, grad = w * lx.dinput(r);
      if constexpr (uses_u) {
        // - l(x, s(xt)) = -(l(x, r) + (r - s(xt)) g), with its gradient.
        const Vec<T> st = CE<T>(load<T>(ptr.xt_b, i, n)).sigmoid();
        term = term - (e + (r - st) * lx.gap());
        grad = grad - lx.dinput(st);
      }
      grad.store(grad_b + i, n);
      return std::array<Vec<T>, 2>{term, w};
    }
  });
  double norm = static_cast<double>(b);
  if constexpr (E == Estimator::snips || E == Estimator::badr) norm = sum_w;
  if constexpr (E == Estimator::dr) norm = static_cast<double>(in.x_u.numel());
  const T inv_norm = static_cast<T>(1.0 / norm);
  double num_u = 0.0;
  if constexpr (uses_u) {
    num_u = reduce<1, T>(in.x_u.numel(), [&](int64_t i, int64_t n) {
      const CE<T> lx(load<T>(ptr.x_u, i, n));
      const Vec<T> st = CE<T>(load<T>(ptr.xt_u, i, n)).sigmoid();
      (lx.dinput(st) * Vec<T>(inv_norm)).store(grad_u + i, n);
      return std::array<Vec<T>, 1>{lx.value(st)};  // l(x, s(xt))
    })[0];
  }
  scale(grad_b, b, inv_norm);
  *loss = static_cast<T>((num_b + num_u) / norm);
}

// ---- Imputation-model losses (eqs. 6, 8, 9, 10, 32 and the published BADR loss) ----------

// sum_B c (e - e_hat)^2 with
//   c = w (DR, eq. 6), w^2 (1 - p_hat) (MRDR, eq. 8), w^3 (1 - p_hat)^2 (DR-BIAS, eq. 9),
//       alpha DR-BIAS + (1 - alpha) MRDR (DR-MSE, eq. 10),
// and the imputed error in one of two forms (F):
// - ImputedError::paper, e_hat = l(x, s(xt)): e - e_hat = g (s(xt) - r) (g = x in the exact
//   form), computed in that form (no cancellation of the two cross-entropies); d/dxt:
//   2 c (e - e_hat) g s'(xt).  With p_hat = 1e-6, w^3 = 1e18, so a DR-BIAS term is at most
//   1e18 x^2 and its gradient 0.5e18 |x|^3: finite in float32 while |x| < ~1e6.
// - ImputedError::published, e_hat = l(xt, s(x)) (input and target swapped, as badr_kernel
//   writes it): e - e_hat = l(x, r) - l(xt, s(x)), which has no such closed form; d/dxt:
//   -2 c (e - e_hat) dl/dxt(xt, s(x)).
template <ImputationKind K, ImputedError F, template <typename> class CE, typename T>
void squared_error_kernel(const ImputationInputs& in, T* grad_b, T* loss) {
  const InputPointers<T> ptr(in);
  const T alpha = static_cast<T>(in.alpha);
  const auto [sum] = reduce<1, T>(in.xt_b.numel(), [&](int64_t i, int64_t n) {
    const Vec<T> r = load<T>(ptr.r_b, i, n), p = load<T>(ptr.p_hat_b, i, n);
    const CE<T> lx(load<T>(ptr.x_b, i, n)), lt(load<T>(ptr.xt_b, i, n));
    const Vec<T> w = p.reciprocal(), q = Vec<T>(1) - p;
    Vec<T> c = w;
    if constexpr (K == ImputationKind::mrdr) c = w * w * q;
    if constexpr (K == ImputationKind::dr_bias) c = w * w * w * q * q;
    if constexpr (K == ImputationKind::dr_mse) {
      c = Vec<T>(alpha) * (w * w * w * q * q) + Vec<T>(1 - alpha) * (w * w * q);
    }
    if constexpr (F == ImputedError::paper) {
      const Vec<T> d = lx.gap() * (lt.sigmoid() - r);
      (Vec<T>(2) * c * d * lx.gap() * lt.dsigmoid()).store(grad_b + i, n);
      return std::array<Vec<T>, 1>{c * d * d};
    } else {
      const Vec<T> s = lx.sigmoid(), d = lx.value(r) - lt.value(s);
      (Vec<T>(-2) * c * d * lt.dinput(s)).store(grad_b + i, n);
      return std::array<Vec<T>, 1>{c * d * d};
    }
  });
  *loss = static_cast<T>(sum);
}

// Eq. 32 on B and U: sum_B w^2 (d - m)^2 / S^2 with d = e - e_hat = g (s(xt) - r), S = sum_B w
// and m = L - E_hat = sum_B w d / S (the U sums of L and E_hat cancel).  With
// D = sum_B w^2 (d - m), through which every d_i moves the loss via m,
//   d loss / d d_i = 2 [w_i^2 (d_i - m) - w_i D / S] / S^2,   d d_i / d xt_i = g_i s'(xt_i).
// The first pass gives the centring terms S and m and, as sum w^2 d - m sum w^2 in double, D,
// so that the second pass writes the gradient with the loss.
template <template <typename> class CE, typename T>
void badr_paper_kernel(const ImputationInputs& in, T* grad_b, T* loss) {
  const InputPointers<T> ptr(in);
  const int64_t b = in.xt_b.numel();
  struct Terms {
    Vec<T> d, w, dd;  // e - e_hat, w, d (e - e_hat) / d xt
  };
  auto terms = [&](int64_t i, int64_t n) {
    const CE<T> lx(load<T>(ptr.x_b, i, n)), lt(load<T>(ptr.xt_b, i, n));
    return Terms{lx.gap() * (lt.sigmoid() - load<T>(ptr.r_b, i, n)), load<T>(ptr.p_hat_b, i, n).reciprocal(),
                 lx.gap() * lt.dsigmoid()};
  };
  const auto [s, swd, sw2d, sw2] = reduce<4, T>(b, [&](int64_t i, int64_t n) {
    const Terms t = terms(i, n);
    const Vec<T> w2 = t.w * t.w;
    return std::array<Vec<T>, 4>{t.w, t.w * t.d, w2 * t.d, w2};
  });
  const double m = swd / s;
  const double dev_sum = sw2d - m * sw2;
  const Vec<T> mean(static_cast<T>(m)), coef_sq(static_cast<T>(2.0 / (s * s))),
      coef_w(static_cast<T>(2.0 * dev_sum / (s * s * s)));
  const auto [sum] = reduce<1, T>(b, [&](int64_t i, int64_t n) {
    const Terms t = terms(i, n);
    const Vec<T> w2 = t.w * t.w, dev = t.d - mean;
    (t.dd * (coef_sq * w2 * dev - coef_w * t.w)).store(grad_b + i, n);
    return std::array<Vec<T>, 1>{w2 * dev * dev};
  });
  *loss = static_cast<T>(sum / (s * s));
}

// The published BADR loss: sum_B w^2 (a + E_U - L)^2 / |U| with a = l(x, r) - l(xt, s(x)) on B
// (the imputed error with input and target swapped, detached), E_U = mean_U l(xt, s(x)) and L
// = [sum_B w l(x, r) - sum_B l(xt, s(x)) + sum_U l(xt, s(x))] / S, detached.  Only E_U carries
// a gradient:  d loss / d xt_u = [2 sum_B w^2 (a + c) / |U|^2] dl/dxt(xt_u, s(x_u)), c = E_U - L
// (dl/dxt = s(xt_u) - s(x_u) in the exact form).
// Pass 1 sums S, the terms of L and E_U, keeping a and s(xt_u) - s(x_u); pass 2 sums the
// centred squares and gives the factor of the gradient on U.
template <template <typename> class CE, typename T>
void badr_kernel(const ImputationInputs& in, T* grad_u, T* loss) {
  const InputPointers<T> ptr(in);
  const int64_t b = in.xt_b.numel(), u = in.xt_u.numel();
  const at::Tensor a_buf = at::empty_like(in.xt_b);
  T* a = a_buf.mutable_data_ptr<T>();
  const auto [s, swe, sum_hat_b] = reduce<3, T>(b, [&](int64_t i, int64_t n) {
    const Vec<T> r = load<T>(ptr.r_b, i, n), w = load<T>(ptr.p_hat_b, i, n).reciprocal();
    const CE<T> lx(load<T>(ptr.x_b, i, n)), lt(load<T>(ptr.xt_b, i, n));
    const Vec<T> e = lx.value(r), e_hat = lt.value(lx.sigmoid());
    (e - e_hat).store(a + i, n);
    return std::array<Vec<T>, 3>{w, w * e, e_hat};
  });
  const auto [sum_hat_u] = reduce<1, T>(u, [&](int64_t i, int64_t n) {
    const Vec<T> s = CE<T>(load<T>(ptr.x_u, i, n)).sigmoid();
    const CE<T> lt(load<T>(ptr.xt_u, i, n));
    lt.dinput(s).store(grad_u + i, n);
    return std::array<Vec<T>, 1>{lt.value(s)};
  });
  const Vec<T> centre(static_cast<T>(sum_hat_u / static_cast<double>(u) - (swe - sum_hat_b + sum_hat_u) / s));
  const auto [sq, lin] = reduce<2, T>(b, [&](int64_t i, int64_t n) {
    const Vec<T> w = load<T>(ptr.p_hat_b, i, n).reciprocal(), v = Vec<T>::loadu(a + i, n) + centre;
    return std::array<Vec<T>, 2>{w * w * v * v, w * w * v};
  });
  scale(grad_u, u, static_cast<T>(2.0 * lin / (static_cast<double>(u) * static_cast<double>(u))));
  *loss = static_cast<T>(sq / static_cast<double>(u));
}

// ---- Operators ----------------------------------------------------------------------------

template <template <typename> class CE, typename T>
void prediction_kernels(const PredictionInputs& in, T* grad_b, T* grad_u, T* loss) {
  switch (in.estimator) {
    case Estimator::naive: return prediction_kernel<Estimator::naive, CE, T>(in, grad_b, grad_u, loss);
    case Estimator::ips: return prediction_kernel<Estimator::ips, CE, T>(in, grad_b, grad_u, loss);
    case Estimator::snips: return prediction_kernel<Estimator::snips, CE, T>(in, grad_b, grad_u, loss);
    case Estimator::dr: return prediction_kernel<Estimator::dr, CE, T>(in, grad_b, grad_u, loss);
    case Estimator::badr: return prediction_kernel<Estimator::badr, CE, T>(in, grad_b, grad_u, loss);
  }
}

// The squared-error loss K in the form of the imputed error that `in` names.
template <ImputationKind K, template <typename> class CE, typename T>
void squared_error_kernels(const ImputationInputs& in, T* grad_b, T* loss) {
  if (in.imputed_error == ImputedError::published) {
    return squared_error_kernel<K, ImputedError::published, CE, T>(in, grad_b, loss);
  }
  squared_error_kernel<K, ImputedError::paper, CE, T>(in, grad_b, loss);
}

// `grad` is the gradient on U for the published BADR loss and on B for every other.  (The BADR
// losses take imputed_error="paper" only: prepare_imputation checks it.)
template <template <typename> class CE, typename T>
void imputation_kernels(const ImputationInputs& in, T* grad, T* loss) {
  switch (in.kind) {
    case ImputationKind::dr: return squared_error_kernels<ImputationKind::dr, CE, T>(in, grad, loss);
    case ImputationKind::mrdr: return squared_error_kernels<ImputationKind::mrdr, CE, T>(in, grad, loss);
    case ImputationKind::dr_bias: return squared_error_kernels<ImputationKind::dr_bias, CE, T>(in, grad, loss);
    case ImputationKind::dr_mse: return squared_error_kernels<ImputationKind::dr_mse, CE, T>(in, grad, loss);
    case ImputationKind::badr_paper: return badr_paper_kernel<CE, T>(in, grad, loss);
    case ImputationKind::badr: return badr_kernel<CE, T>(in, grad, loss);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prediction_loss_cpu(
    std::string_view estimator, const at::Tensor& x_b, const at::Tensor& r_b, const at::Tensor& p_hat_b,
    const std::optional<at::Tensor>& x_u, const std::optional<at::Tensor>& xt_b,
    const std::optional<at::Tensor>& xt_u, std::string_view cross_entropy) {
  const PredictionInputs in = prepare_prediction(estimator, x_b, r_b, p_hat_b, x_u, xt_b, xt_u, cross_entropy);
  at::Tensor loss, grad_b, grad_u;  // not a structured binding: lambdas capture these (C++17)
  std::tie(loss, grad_b, grad_u) = empty_outputs(in);
  AT_DISPATCH_FLOATING_TYPES(in.x_b.scalar_type(), "cvr::prediction_loss", [&] {
    scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
    scalar_t* gu = data_or_null<scalar_t>(grad_u);
    scalar_t* l = loss.mutable_data_ptr<scalar_t>();
    if (in.cross_entropy == CrossEntropy::clamped) return prediction_kernels<ClampedCE, scalar_t>(in, gb, gu, l);
    return prediction_kernels<ExactCE, scalar_t>(in, gb, gu, l);
  });
  return {loss, grad_b, grad_u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> imputation_loss_cpu(
    std::string_view kind, const at::Tensor& xt_b, const at::Tensor& x_b, const at::Tensor& r_b,
    const at::Tensor& p_hat_b, const std::optional<at::Tensor>& xt_u, const std::optional<at::Tensor>& x_u,
    double alpha, std::string_view cross_entropy, std::string_view imputed_error) {
  const ImputationInputs in =
      prepare_imputation(kind, xt_b, x_b, r_b, p_hat_b, xt_u, x_u, alpha, cross_entropy, imputed_error);
  at::Tensor loss, grad_b, grad_u;  // not a structured binding: lambdas capture these (C++17)
  std::tie(loss, grad_b, grad_u) = empty_outputs(in);
  AT_DISPATCH_FLOATING_TYPES(in.xt_b.scalar_type(), "cvr::imputation_loss", [&] {
    scalar_t* gb = grad_b.defined() ? grad_b.mutable_data_ptr<scalar_t>() : grad_u.mutable_data_ptr<scalar_t>();
    scalar_t* l = loss.mutable_data_ptr<scalar_t>();
    if (in.cross_entropy == CrossEntropy::clamped) return imputation_kernels<ClampedCE, scalar_t>(in, gb, l);
    return imputation_kernels<ExactCE, scalar_t>(in, gb, l);
  });
  return {loss, grad_b, grad_u};
}

}  // namespace

TORCH_LIBRARY_IMPL(cvr, CPU, m) {
  m.impl("prediction_loss_and_grads", &prediction_loss_cpu);
  m.impl("imputation_loss_and_grads", &imputation_loss_cpu);
}

}  // namespace cvr::ops
