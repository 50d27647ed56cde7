// One-pass CPU kernel of the clipped-IS-weight policy losses (DISPO Eqs. 8-9, CISPO Eq. 7) with per-sequence
// advantages and token-mean aggregation: the gradient, the loss value, the per-regime telemetry and the input probes
// from a single read of logprobs, old_logprobs and the mask. Eager torch needs ~25 passes for the same work.
//
// Plain C ABI on raw pointers (no torch headers): it compiles in about a second and is called through ctypes.
// VB is the vector width in bytes (-DVB=16/32/64). GCC vector extensions make the loop vectorised by construction.
#include <cstdint>
#include <cstring>
#include <limits>
#if VB == 64 && defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T> struct Lanes;
template <> struct Lanes<float> {
  static constexpr int n = VB / 4;
  typedef float V __attribute__((vector_size(VB)));
  typedef int32_t I __attribute__((vector_size(VB)));
  typedef int32_t Bits;
  static constexpr int mantissa = 23, bias = 127;
  static constexpr float min_exponent = -126.0f, magic = 12582912.0f;  // magic: 1.5 * 2^23
};
template <> struct Lanes<double> {
  static constexpr int n = VB / 8;
  typedef double V __attribute__((vector_size(VB)));
  typedef int64_t I __attribute__((vector_size(VB)));
  typedef int64_t Bits;
  static constexpr int mantissa = 52, bias = 1023;
  static constexpr double min_exponent = -1022.0, magic = 6755399441055744.0;  // 1.5 * 2^52
};

// Polynomials of 2^f on |f| <= 0.5, highest coefficient first. float: degree 6, fitted for minimax relative error
// (9.6e-8 in float32 arithmetic, under 1 ulp); double: the degree-13 Taylor series (< 1 ulp).
template <typename T> struct Poly;
template <> struct Poly<float> {
  static constexpr int n = 7;
  static constexpr float c[7] = {1.5345811e-04f, 1.3399931e-03f, 9.6184890e-03f, 5.5503288e-02f,
                                 2.4022646e-01f, 6.9314718e-01f, 1.0f};
};
template <> struct Poly<double> {
  static constexpr int n = 14;
  static constexpr double c[14] = {1.3691488853904124e-12, 2.5678435993488196e-11, 4.44553827187081e-10,
                                   7.054911620801121e-09,  1.0178086009239696e-07, 1.3215486790144305e-06,
                                   1.5252733804059838e-05, 0.00015403530393381606, 0.0013333558146428441,
                                   0.009618129107628477,   0.055504108664821576,   0.2402265069591007,
                                   0.6931471805599453,     1.0};
};

template <typename T, typename V>
inline V poly(V f) {
  V p = V{} + Poly<T>::c[0];
  for (int k = 1; k < Poly<T>::n; ++k) p = p * f + Poly<T>::c[k];
  return p;
}

// 2^t for t <= 128 (float) / 1024 (double); beyond that the result is inf, as torch's exp. Portable version: round
// by the magic-number trick, scale by building 2^n in the exponent bits. Below 2^min_exponent the result is
// 2^min_exponent * p instead of a subnormal or 0 (an IS weight under 1e-38 either way).
template <typename T, typename V, typename I>
inline V exp2_portable(V t) {
  typedef Lanes<T> L;
  t = t < L::min_exponent ? V{} + L::min_exponent : t;
  V n = (t + L::magic) - L::magic;
  V p = poly<T>(t - n);
  I bits = (__builtin_convertvector(n, I) + L::bias) << L::mantissa;
  V scale;
  std::memcpy(&scale, &bits, sizeof(V));
  return p * scale;
}

template <typename T, typename V, typename I>
inline V exp2_vec(V t) {
  return exp2_portable<T, V, I>(t);
}

#if VB == 64 && defined(__AVX512F__)
// AVX-512: round and scale are one instruction each (vrndscale, vscalef; scalef also gives exact subnormals and 0).
template <>
inline Lanes<float>::V exp2_vec<float, Lanes<float>::V, Lanes<float>::I>(Lanes<float>::V t) {
  typedef Lanes<float>::V V;
  __m512 tv = (__m512)t;
  __m512 n = _mm512_roundscale_ps(tv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V p = poly<float>((V)_mm512_sub_ps(tv, n));
  return (V)_mm512_scalef_ps((__m512)p, n);
}
template <>
inline Lanes<double>::V exp2_vec<double, Lanes<double>::V, Lanes<double>::I>(Lanes<double>::V t) {
  typedef Lanes<double>::V V;
  __m512d tv = (__m512d)t;
  __m512d n = _mm512_roundscale_pd(tv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  V p = poly<double>((V)_mm512_sub_pd(tv, n));
  return (V)_mm512_scalef_pd((__m512d)p, n);
}
#endif

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Output slots (double): see KernelStats in fused_cpu.py.
enum Slot {
  kValue = 0,
  kRegime = 1,  // 12 values: [side (pos, neg)][n(r>1), n(r<1), clipped n(r>1), clipped n(r<1), w(r>1), w(r<1)]
  kAbsLogRatio = 13,
  kDisagree = 14,
  kAdvantageSum = 15,
  kTokens = 16,
  kNonEmptyRows = 17,
  kBadMaskRows = 18,
  kScale = 19,
  kNumSlots = 20
};

// Accumulators of one row, reduced into `out` once per row.
template <typename T>
struct RowSums {
  typedef Lanes<T> L;
  typedef typename L::V V;
  typedef typename L::I I;
  I n_up{}, n_down{}, clip_up{}, clip_down{}, bad{};
  V tokens{};
  double value = 0.0, w_up = 0.0, w_down = 0.0, abs_sum = 0.0;
};

template <typename T, typename V, typename I>
inline void token_step(V x_lp, V x_old, V m, V lo, V hi, V row_factor, T log2e, RowSums<T>& s, V& value_b,
                       V& w_up_b, V& w_down_b, V& abs_b, T* grad_out) {
  V x = (x_lp - x_old) * m;  // log r, 0 on padding
  s.tokens += m;
  s.bad = m * m != m ? s.bad + 1 : s.bad;  // 0/1 mask check (NaN fails too)
  V c = x < lo ? lo : x;  // clip in log space: maximum(x, lo) then minimum(., hi), as the eager path
  c = c > hi ? hi : c;
  I up = x > T(0), down = x < T(0);  // -1 where true
  s.n_up = up ? s.n_up + 1 : s.n_up;
  s.n_down = down ? s.n_down + 1 : s.n_down;
  s.clip_up = x > hi ? s.clip_up + 1 : s.clip_up;
  s.clip_down = x < lo ? s.clip_down + 1 : s.clip_down;
  V w = exp2_vec<T, V, I>(c * log2e);
  w_up_b = up ? w_up_b + w : w_up_b;
  w_down_b = down ? w_down_b + w : w_down_b;
  abs_b += x < T(0) ? -x : x;
  V g = (w * m) * row_factor;  // dLoss/dlogprobs
  value_b += g * x_lp;
  std::memcpy(grad_out, &g, sizeof(V));
}

template <typename T>
void run(const T* lp, const T* old, const T* mask, const T* advantages, const uint8_t* correct, int side_by_correct,
         double lo_pos, double hi_pos, double lo_neg, double hi_neg, double scale, int64_t batch, int64_t seq,
         T* grad, double* out) {
  typedef Lanes<T> L;
  typedef typename L::V V;
  typedef typename L::I I;
  typedef T S1 __attribute__((vector_size(sizeof(T))));  // one-lane vectors: the tail runs the same code
  typedef typename L::Bits B1 __attribute__((vector_size(sizeof(T))));
  const T log2e = static_cast<T>(1.4426950408889634);  // the eager path multiplies by LOG2E rounded to T
  for (int k = 0; k < kNumSlots; ++k) out[k] = 0.0;
  if (scale <= 0.0) {  // no global token count: this call's mask sum (0 -> the caller reports the empty batch)
    double total = 0.0;
    for (int64_t i = 0; i < batch * seq; ++i) total += mask[i];
    scale = total > 0.0 ? 1.0 / total : 0.0;
  }
  out[kScale] = scale;
  for (int64_t b = 0; b < batch; ++b) {
    const T* lp_row = lp + b * seq;
    const T* old_row = old + b * seq;
    const T* m_row = mask + b * seq;
    T* g_row = grad + b * seq;
    const T a = advantages[b];
    int side = a > T(0) ? 1 : (a < T(0) ? -1 : 0);
    if (side_by_correct) side = correct[b] ? 1 : -1;
    const T lo_t = static_cast<T>(side > 0 ? lo_pos : lo_neg);
    const T hi_t = static_cast<T>(side > 0 ? hi_pos : hi_neg);
    const T factor = (-a) * static_cast<T>(scale);
    RowSums<T> s;
    const V lo = V{} + lo_t, hi = V{} + hi_t, row_factor = V{} + factor;
    int64_t t = 0;
    // sums of weights, |log r| and the value run in T lanes over blocks of 32 vectors, then move to double
    while (t + L::n <= seq) {
      V value_b{}, w_up_b{}, w_down_b{}, abs_b{};
      const int64_t stop = t + 32 * L::n < seq ? t + 32 * L::n : seq;
      for (; t + L::n <= stop; t += L::n) {
        token_step<T, V, I>(load<V>(lp_row + t), load<V>(old_row + t), load<V>(m_row + t), lo, hi, row_factor, log2e,
                            s, value_b, w_up_b, w_down_b, abs_b, g_row + t);
      }
      for (int k = 0; k < L::n; ++k) {
        s.value += value_b[k];
        s.w_up += w_up_b[k];
        s.w_down += w_down_b[k];
        s.abs_sum += abs_b[k];
      }
    }
    double n_up = 0, n_down = 0, clip_up = 0, clip_down = 0, tokens = 0;
    int64_t bad = 0;
    for (int k = 0; k < L::n; ++k) {
      n_up += s.n_up[k];
      n_down += s.n_down[k];
      clip_up += s.clip_up[k];
      clip_down += s.clip_down[k];
      tokens += s.tokens[k];
      bad |= s.bad[k];
    }
    for (; t < seq; ++t) {  // tail, one lane at a time
      S1 value_1{}, w_up_1{}, w_down_1{}, abs_1{};
      S1 lp1 = {lp_row[t]}, old1 = {old_row[t]}, m1 = {m_row[t]}, lo1 = {lo_t}, hi1 = {hi_t}, f1 = {factor};
      S1 x = (lp1 - old1) * m1;
      S1 c = x < lo1 ? lo1 : x;
      c = c > hi1 ? hi1 : c;
      const bool up = x[0] > T(0), down = x[0] < T(0);
      S1 w = exp2_portable<T, S1, B1>(c * log2e);
      S1 g = (w * m1) * f1;
      g_row[t] = g[0];
      value_1 = g * lp1;
      w_up_1 = up ? w : S1{};
      w_down_1 = down ? w : S1{};
      abs_1 = x[0] < T(0) ? -x : x;
      s.value += value_1[0];
      s.w_up += w_up_1[0];
      s.w_down += w_down_1[0];
      s.abs_sum += abs_1[0];
      n_up += up;
      n_down += down;
      clip_up += x[0] > hi_t;
      clip_down += x[0] < lo_t;
      tokens += m1[0];
      bad |= (m1[0] * m1[0] != m1[0]);
    }
    out[kValue] += s.value;
    out[kAbsLogRatio] += s.abs_sum;
    out[kAdvantageSum] += a;
    out[kTokens] += tokens;
    out[kNonEmptyRows] += tokens > 0.0 ? 1.0 : 0.0;
    out[kBadMaskRows] += bad ? 1.0 : 0.0;
    if (correct != nullptr && ((a > T(0) && !correct[b]) || (a < T(0) && correct[b]))) out[kDisagree] += tokens;
    if (side != 0) {
      double* r = out + kRegime + (side > 0 ? 0 : 6);
      r[0] += n_up;
      r[1] += n_down;
      r[2] += clip_up;
      r[3] += clip_down;
      r[4] += s.w_up;
      r[5] += s.w_down;
    }
  }
}

}  // namespace

extern "C" {

int megatron_dispo_abi_version() { return 1; }

// dtype: 0 float32, 1 float64. correct: nullptr or one byte (0/1) per row. scale: 1/N, or <= 0 to use this call's
// mask sum. grad: [batch, seq] output. out: kNumSlots doubles.
void megatron_dispo_clipped_weight_loss(int dtype, const void* lp, const void* old, const void* mask,
                                        const void* advantages, const uint8_t* correct, int side_by_correct,
                                        double lo_pos, double hi_pos, double lo_neg, double hi_neg, double scale,
                                        int64_t batch, int64_t seq, void* grad, double* out) {
  if (dtype == 0) {
    run<float>(static_cast<const float*>(lp), static_cast<const float*>(old), static_cast<const float*>(mask),
               static_cast<const float*>(advantages), correct, side_by_correct, lo_pos, hi_pos, lo_neg, hi_neg, scale,
               batch, seq, static_cast<float*>(grad), out);
  } else {
    run<double>(static_cast<const double*>(lp), static_cast<const double*>(old), static_cast<const double*>(mask),
                static_cast<const double*>(advantages), correct, side_by_correct, lo_pos, hi_pos, lo_neg, hi_neg,
                scale, batch, seq, static_cast<double*>(grad), out);
  }
}

}  // extern "C"
