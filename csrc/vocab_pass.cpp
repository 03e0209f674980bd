// The vocabulary pass of the OPO loss on CPU: per-row log-sum-exp, target log-prob and entropy
// (forward), and dz = (g (onehot - p) - g_ent p (s - lse + H)) / T written in place (backward),
// with s = logits / T rounded as the torch backend rounds it. With a softcap c, s = c tanh((logits
// / T) / c) and dz carries the factor 1 - (s / c)^2 before the division by T.
//
// Contract: opo_kernels/vocab_torch.py (the slow PyTorch version of the same thing).
// Registered as torch ops so that the dispatcher and torch.compile see them:
//   opo::vocab_forward(Tensor logits, Tensor targets, float temperature, float? softcap=None)
//       -> (Tensor, Tensor, Tensor)
//   opo::vocab_backward(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy,
//                       Tensor grad_logp, Tensor? grad_entropy, float temperature,
//                       Tensor(a!) out, float? softcap=None) -> ()
//
// Rows are split over threads with at::parallel_for (OpenMP, so torch.set_num_threads applies).
// Within a row the code works on one-register vectors (16 floats with AVX-512, 8 with AVX2, else
// 4) written with GCC/Clang vector extensions, plus x86 intrinsics for the bf16/fp16 conversions;
// the exp is a polynomial. All arithmetic is fp32. The forward reads each row from memory once: per 2 KB
// block a max pass, then an exp pass over the same block from L1 (an online softmax by blocks).
// Each row is computed by one thread in a fixed order, so results are bitwise reproducible and
// do not depend on the thread count or on the other rows in the batch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// fp32, bf16 and fp16 only (the contract's dtypes), which keeps the 3 x 3 backward small.
#define OPO_DISPATCH_VOCAB_TYPES(TYPE, NAME, ...)                            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                             \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

// The vector helpers must be inlined: called out of line, every 64-byte vector argument goes
// through the stack (GCC otherwise declines to inline vexp into some of the instantiations).
#define OPO_INLINE inline __attribute__((always_inline))

namespace {

// Vector width in floats: one native register. (Wider GCC vectors than the hardware has are
// split up badly: selects and int conversions end up scalar.)
#if defined(__AVX512F__)
constexpr int64_t W = 16;
#elif defined(__AVX__)
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));
typedef uint16_t vh __attribute__((vector_size(W * sizeof(uint16_t))));

OPO_INLINE vf splat(float a) { return vf{} + a; }

// ---- loads and stores of W elements (or one), converting to / from fp32 ---------------------

OPO_INLINE vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
// The conversions use the x86 instructions where the build target has them (-march=native),
// and portable vector-extension code otherwise.
OPO_INLINE vf vload(const at::BFloat16* p) {
#if defined(__AVX512F__)
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vf>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  vh h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
#endif
}

OPO_INLINE vf vload(const at::Half* p) {
#if defined(__AVX512F__)
  return reinterpret_cast<vf>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__)  // W == 8
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  float tmp[W];
  for (int64_t i = 0; i < W; ++i) tmp[i] = static_cast<float>(p[i]);
  return vload(tmp);
#endif
}

OPO_INLINE void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

OPO_INLINE void vstore(at::BFloat16* p, vf v) {
#if defined(__AVX512BF16__)
  // Round to nearest even in hardware (which, unlike the code below, flushes fp32 denormals,
  // |x| < 1.2e-38, to zero: immaterial for gradients).
  __m256bh h = _mm512_cvtneps_pbh(reinterpret_cast<__m512>(v));
  std::memcpy(p, &h, sizeof(h));
#else
  // Round to nearest even; NaN stays a (quiet) NaN instead of rounding into infinity.
  vu u = reinterpret_cast<vu>(v);
  vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  r = v != v ? vu{} + 0x7FC0u : r;
  vh h = __builtin_convertvector(r, vh);
  std::memcpy(p, &h, sizeof(h));
#endif
}

OPO_INLINE void vstore(at::Half* p, vf v) {
  // Round to nearest even, like at::Half(float).
#if defined(__AVX512F__)
  __m256i h = _mm512_cvtps_ph(reinterpret_cast<__m512>(v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
#elif defined(__F16C__)  // W == 8
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(reinterpret_cast<__m256>(v), _MM_FROUND_TO_NEAREST_INT));
#else
  for (int64_t i = 0; i < W; ++i) p[i] = at::Half(v[i]);
#endif
}

OPO_INLINE float load1(const float* p) { return *p; }
OPO_INLINE float load1(const at::BFloat16* p) { return static_cast<float>(*p); }
OPO_INLINE float load1(const at::Half* p) { return static_cast<float>(*p); }
OPO_INLINE void store1(float* p, float v) { *p = v; }
OPO_INLINE void store1(at::BFloat16* p, float v) {
  vf x = splat(v);
  at::BFloat16 tmp[W];
  vstore(tmp, x);  // the same rounding as the vector path
  *p = tmp[0];
}
OPO_INLINE void store1(at::Half* p, float v) { *p = at::Half(v); }

// Tails (V not a multiple of W) go through a padded W-element buffer so that every element
// is computed by the same vector code. Padding loads as -inf: it adds nothing to max or sum.
template <typename T>
OPO_INLINE vf vload_tail(const T* p, int64_t count) {
  float tmp[W];
  for (int64_t i = 0; i < W; ++i) tmp[i] = i < count ? load1(p + i) : -std::numeric_limits<float>::infinity();
  return vload(tmp);
}
template <typename T>
OPO_INLINE void vstore_tail(T* p, vf v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) store1(p + i, v[i]);
}

// ---- exp --------------------------------------------------------------------------------------

// e^xc · 2^extra for xc clamped to a range where the result's exponent fits: e^xc = 2^k e^r,
// k = round(xc / ln2), |r| <= ln2 / 2, e^r by a degree-6 polynomial (Cephes coefficients,
// ~1 ulp), 2^(k + extra) put into the exponent bits.
OPO_INLINE vf vexp_core(vf xc, int extra) {
  // Round to nearest by adding and removing 1.5 * 2^23 (exact for |t| < 2^22; no fast-math).
  const float shifter = 12582912.0f;
  vf k = (xc * 1.44269504088896341f + shifter) - shifter;
  vf r = xc - k * 0.693359375f;  // ln2 in two parts so that k * ln2 loses nothing
  r = r + k * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * r * r + r + 1.0f;
  vi ki = __builtin_convertvector(k, vi) + extra;
  return y * reinterpret_cast<vf>((ki + 127) << 23);
}

// exp(x). Inputs below the smallest normal result give exactly 0, so exp(-inf) = 0 as the
// softmax of a masked logit must be.
OPO_INLINE vf vexp(vf x) {
  const float lo = -87.33654f;  // exp(lo) ~ FLT_MIN
  const float hi = 88.3f;       // keeps k <= 127
  vf xc = x < lo ? splat(lo) : x;
  xc = xc > hi ? splat(hi) : xc;
  return x < lo ? splat(0.0f) : vexp_core(xc, 0);
}

// e^x · 2^64 for x in [ln 2^-150, ln FLT_MIN), where e^x itself is an fp32 denormal; 0 elsewhere.
// The entropy of a nearly one-hot row is a sum of such terms: computed at this scale they stay
// normal numbers (no denormal arithmetic, no flush to 0), as accurate as any other fp32 term.
OPO_INLINE vf vexp_tiny_scaled(vf x) {
  const float lo = -87.33654f;
  const float lo2 = -103.97208f;  // ln 2^-150: below it e^x rounds to 0 in fp32
  vf xc = x < lo2 ? splat(lo2) : x;
  xc = xc > lo ? splat(lo) : xc;
  return (x < lo) & (x >= lo2) ? vexp_core(xc, 64) : splat(0.0f);
}

OPO_INLINE float hsum(vf v) {
  // A fixed pairwise tree (the lanes of a register hold interleaved partial sums).
  float t[W];
  for (int64_t i = 0; i < W; ++i) t[i] = v[i];
  for (int64_t h = W / 2; h > 0; h /= 2)
    for (int64_t i = 0; i < h; ++i) t[i] += t[i + h];
  return t[0];
}

OPO_INLINE float hmax(vf v) {
  float m = v[0];
  for (int64_t i = 1; i < W; ++i) m = std::max(m, v[i]);
  return m;
}

// s = logits / T, rounded exactly as the torch backend rounds it (a true division; x * (1/T)
// differs in the last bit for ~20% of values, and an FMA of it with the next subtraction keeps the
// unrounded product). Every use of s — the max, the exp sums, the target's log-prob and the
// backward's p — then sees the same s: at T = 0.01 an unrounded s in one place and a rounded one
// in another shifts p by ulp(s) ~ 1e-5 relative, which is noise on a saturated row's 1 − p.
// UNIT (T == 1): s = x, no division.
template <bool UNIT>
OPO_INLINE vf scaled(vf v, float t) {
  if constexpr (UNIT) return v;
  return v / t;
}
template <bool UNIT>
OPO_INLINE float scaled1(float v, float t) {
  if constexpr (UNIT) return v;
  return v / t;
}

// Rows per parallel task: below ~64K elements of work, starting threads costs more than it saves.
inline int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// ---- forward ---------------------------------------------------------------------------------

// One pass over the row in blocks of BLOCK vectors (512 floats = 2 KB, so the block's second read
// comes from L1): the block's max, then its exp sums relative to the running max M, rescaling
// the sums when M grows (a few times per row). Per-block partial sums are also what keeps each
// fp32 accumulator to a few hundred terms (~1e-7 relative error instead of ~1e-5).
constexpr int64_t BLOCK = 512 / W;

// Running sums of one row, relative to the running max M of s:
// z = sum e^(s - M), zd = sum e^(s - M) (s - M), so that at the end lse = M + log z and
// H = lse - sum p s = log z - zd / z, with no difference of two large numbers.
struct RowSums {
  float M = -std::numeric_limits<float>::infinity();
  vf z = {}, zd = {};

  // Makes M >= block_max (the block's max of s), rescaling the sums already taken.
  OPO_INLINE void raise_max(float block_max) {
    if (!(block_max > M)) return;
    if (M > -std::numeric_limits<float>::infinity()) {
      const float delta = M - block_max;  // < 0
      const float alpha = std::exp(delta);
      zd = alpha * (zd + delta * z);
      z = alpha * z;
    }
    M = block_max;
  }

  template <bool UNIT>
  OPO_INLINE void add(vf v, float t, vf& bz, vf& bzd) const {
    vf d = scaled<UNIT>(v, t) - M;
    vf e = vexp(d);
    bz += e;
    bzd += e == 0.0f ? splat(0.0f) : e * d;  // 0 * (-inf) would be NaN for masked logits
  }
};

// The entropy of a row whose non-target probabilities are fp32 denormals (below FLT_MIN, which the
// exp of the main pass flushes to 0): H = -sum p log p in a second pass over the row, the
// denormal terms scaled by 2^64. L = lse of the row.
template <bool UNIT, typename scalar_t>
float tiny_entropy(const scalar_t* x, int64_t V, float temp, float L) {
  const int64_t Vv = V - V % W;
  vf hn = {}, hs = {};
  auto add = [&](vf v) {
    vf d = scaled<UNIT>(v, temp) - L;  // log p
    vf e = vexp(d);
    vf es = vexp_tiny_scaled(d);
    hn += e == 0.0f ? splat(0.0f) : e * d;
    hs += es == 0.0f ? splat(0.0f) : es * d;
  };
  for (int64_t j = 0; j < Vv; j += W) add(vload(x + j));
  if (V > Vv) add(vload_tail(x + Vv, V - Vv));
  return -(hsum(hn) + hsum(hs) * 5.42101086e-20f);  // 2^-64
}

template <bool UNIT, typename scalar_t>
void forward_row(const scalar_t* x, int64_t V, int64_t t, float temp, float* logp, float* lse,
                 float* entropy) {
  const int64_t Vv = V - V % W;
  const int64_t tail = V - Vv;
  const float ninf = -std::numeric_limits<float>::infinity();
  // bf16 / fp16 blocks are converted once, into an fp32 copy the exp pass reads.
  constexpr bool convert = !std::is_same_v<scalar_t, float>;
  alignas(64) float buf[convert ? BLOCK * W : 1];
  RowSums acc;
  for (int64_t j0 = 0; j0 < Vv; j0 += BLOCK * W) {
    const int64_t j1 = std::min(Vv, j0 + BLOCK * W);
    vf mv = splat(ninf);
    for (int64_t j = j0; j < j1; j += W) {
      vf v = vload(x + j);
      if constexpr (convert) vstore(buf + (j - j0), v);
      mv = v > mv ? v : mv;
    }
    // The temperature is positive (validated above), so max(x) / T is the max of s.
    acc.raise_max(scaled1<UNIT>(hmax(mv), temp));
    if (acc.M == ninf) continue;  // all -inf so far: nothing to add, and no inf - inf
    vf bz = {}, bzd = {};
    for (int64_t j = j0; j < j1; j += W) {
      if constexpr (convert)
        acc.template add<UNIT>(vload(buf + (j - j0)), temp, bz, bzd);
      else
        acc.template add<UNIT>(vload(x + j), temp, bz, bzd);
    }
    acc.z += bz;
    acc.zd += bzd;
  }
  if (tail) {
    vf v = vload_tail(x + Vv, tail);
    acc.raise_max(scaled1<UNIT>(hmax(v), temp));
    if (acc.M != ninf) acc.template add<UNIT>(v, temp, acc.z, acc.zd);
  }
  const float Z = hsum(acc.z);
  const float log_z = std::log(Z);
  const float row_lse = acc.M + log_z;  // -inf for an all -inf row, like torch.logsumexp
  *lse = row_lse;
  float H = log_z - hsum(acc.zd) / Z;
  // Below V · 2^-95 the terms the main pass flushed (each < 104 · FLT_MIN) may exceed H's
  // rounding: such a (nearly one-hot) row gets the exact second pass.
  if (!(H > static_cast<float>(V) * 2.524355e-29f) && acc.M != ninf) H = tiny_entropy<UNIT>(x, V, temp, row_lse);
  *entropy = H;
  // (s_t - M) - log z, as the torch backend rounds it: V = 1 gives exactly 0.
  *logp = (t >= 0 && t < V) ? (scaled1<UNIT>(load1(x + t), temp) - acc.M) - log_z : 0.0f;
}

// The soft-capped row s_j = cap tanh((x_j / T) / cap) into buf (fp32); the softcap path runs the
// plain pass (T = 1) on this copy of the row. tanh(a) = (1 - e) / (1 + e), e = exp(-2|a|) (as the
// Triton kernels compute it: no overflow, -inf gives -cap; absolute error a few ulps of cap).
template <typename scalar_t>
void capped_row(const scalar_t* x, int64_t V, float temp, float cap, float* buf) {
  const int64_t Vv = V - V % W;
  auto f = [&](vf v) {
    vf u = temp == 1.0f ? v : v / temp;
    vf e = vexp(-2.0f * ((u < 0.0f ? -u : u) / cap));
    vf r = cap * ((1.0f - e) / (1.0f + e));
    return u < 0.0f ? -r : r;
  };
  for (int64_t j = 0; j < Vv; j += W) vstore(buf + j, f(vload(x + j)));
  if (V > Vv) vstore_tail(buf + Vv, f(vload_tail(x + Vv, V - Vv)), V - Vv);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> vocab_forward_cpu(const at::Tensor& logits_in,
                                                                  const at::Tensor& targets_in,
                                                                  double temperature,
                                                                  std::optional<double> softcap) {
  TORCH_CHECK(logits_in.dim() == 2, "vocab_forward: logits must be (n, V), got ", logits_in.sizes());
  at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t n = logits.size(0), V = logits.size(1);
  at::Tensor targets = targets_in.to(at::kLong).contiguous();
  TORCH_CHECK(targets.numel() == n, "vocab_forward: targets must be (", n, "), got ", targets_in.sizes());
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, opts), lse = at::empty({n}, opts), entropy = at::empty({n}, opts);
  if (n == 0) return {logp, lse, entropy};
  const float temp = static_cast<float>(temperature);
  const bool unit = temp == 1.0f;
  OPO_DISPATCH_VOCAB_TYPES(logits.scalar_type(), "vocab_forward", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const int64_t* tg = targets.data_ptr<int64_t>();
    float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>(), *en = entropy.data_ptr<float>();
    if (softcap.has_value()) {
      const float cap = static_cast<float>(*softcap);
      at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(V);
        for (int64_t r = r0; r < r1; ++r) {
          capped_row(base + r * stride, V, temp, cap, buf.data());
          forward_row<true>(buf.data(), V, tg[r], 1.0f, lp + r, ls + r, en + r);
        }
      });
      return;
    }
    at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // int64 offsets: n * V may exceed 2^31
        if (unit)
          forward_row<true>(base + r * stride, V, tg[r], temp, lp + r, ls + r, en + r);
        else
          forward_row<false>(base + r * stride, V, tg[r], temp, lp + r, ls + r, en + r);
      }
    });
  });
  return {logp, lse, entropy};
}

// ---- backward --------------------------------------------------------------------------------

// dz_j = (-g p_j - g_ent p_j ((s_j - lse) + H) (+ g at the target)) / T, in the torch backend's
// order. `x` and `o` may be the same memory (in place): every vector is loaded before the store
// to the same place, and the target logit is read before the row is overwritten.
template <bool UNIT, typename in_t, typename out_t>
void backward_row(const in_t* x, out_t* o, int64_t V, int64_t t, float L, float H, float g, float ge,
                  bool with_entropy, float temp, float inv_t) {
  const int64_t Vv = V - V % W;
  const int64_t tail = V - Vv;
  const bool has_t = t >= 0 && t < V;
  if (g == 0.0f && ge == 0.0f) {  // padding rows: nothing flows back
    for (int64_t j = 0; j < Vv; j += W) vstore(o + j, splat(0.0f));
    if (tail) vstore_tail(o + Vv, splat(0.0f), tail);
    return;
  }
  const float ng = -g;
  const float nge = with_entropy ? -ge : 0.0f;
  const float x_t = has_t ? load1(x + t) : 0.0f;
  auto grad = [&](vf v) {  // before the division by T
    vf d = scaled<UNIT>(v, temp) - L;
    vf p = vexp(d);
    if (nge == 0.0f) return p * ng;
    return p == 0.0f ? splat(0.0f) : p * ng + nge * (p * (d + H));  // p = 0 with s = -inf: no NaN
  };
  auto out = [&](vf v) {
    if constexpr (UNIT) return v;
    return v * inv_t;
  };
  for (int64_t j = 0; j < Vv; j += W) vstore(o + j, out(grad(vload(x + j))));
  if (tail) vstore_tail(o + Vv, out(grad(vload_tail(x + Vv, tail))), tail);
  if (has_t) {
    vf d = grad(splat(x_t));
    store1(o + t, out(splat(d[0] + g))[0]);
  }
}

at::Tensor small_f32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.numel() == n, "vocab_backward: ", name, " must have ", n, " elements, got ", t.sizes());
  return t.to(at::kFloat).contiguous();
}

void vocab_backward_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in, const at::Tensor& lse_in,
                        const std::optional<at::Tensor>& entropy_in, const at::Tensor& grad_logp_in,
                        const std::optional<at::Tensor>& grad_entropy_in, double temperature,
                        at::Tensor& out, std::optional<double> softcap) {
  TORCH_CHECK(logits_in.dim() == 2, "vocab_backward: logits must be (n, V), got ", logits_in.sizes());
  TORCH_CHECK(out.sizes() == logits_in.sizes(), "vocab_backward: out must be ", logits_in.sizes(),
              ", got ", out.sizes());
  const int64_t n = logits_in.size(0), V = logits_in.size(1);
  if (n == 0 || V == 0) return;
  const bool with_entropy = grad_entropy_in.has_value() && grad_entropy_in->defined();
  TORCH_CHECK(!with_entropy || (entropy_in.has_value() && entropy_in->defined()),
              "vocab_backward: grad_entropy needs entropy");
  at::Tensor targets = targets_in.to(at::kLong).contiguous();
  TORCH_CHECK(targets.numel() == n, "vocab_backward: targets must be (", n, "), got ", targets_in.sizes());
  at::Tensor lse = small_f32(lse_in, n, "lse");
  at::Tensor grad_logp = small_f32(grad_logp_in, n, "grad_logp");
  at::Tensor entropy, grad_entropy;
  if (with_entropy) {
    entropy = small_f32(*entropy_in, n, "entropy");
    grad_entropy = small_f32(*grad_entropy_in, n, "grad_entropy");
  }
  // The kernel needs unit stride along V. A column-strided `out` is rare enough that a
  // temporary plus copy is fine; a column-strided `logits` (which may alias out) is copied first.
  at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  at::Tensor dst = out.stride(1) == 1 ? out : at::empty(out.sizes(), out.options());
  const float temp = static_cast<float>(temperature);
  const bool unit = temp == 1.0f;
  const float inv_t = 1.0f / temp;
  const int64_t* tg = targets.data_ptr<int64_t>();
  const float* ls = lse.data_ptr<float>();
  const float* gl = grad_logp.data_ptr<float>();
  const float* en = with_entropy ? entropy.data_ptr<float>() : nullptr;
  const float* ge = with_entropy ? grad_entropy.data_ptr<float>() : nullptr;
  OPO_DISPATCH_VOCAB_TYPES(logits.scalar_type(), "vocab_backward", [&] {
    using in_t = scalar_t;
    const in_t* xb = logits.data_ptr<in_t>();
    const int64_t xs = logits.stride(0);
    OPO_DISPATCH_VOCAB_TYPES(dst.scalar_type(), "vocab_backward_out", [&] {
      scalar_t* ob = dst.data_ptr<scalar_t>();
      const int64_t os = dst.stride(0);
      if (softcap.has_value()) {
        // dz of the capped row (T = 1) into d, then times ds/du = 1 - (s / cap)^2, / T.
        const float cap = static_cast<float>(*softcap);
        at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
          std::vector<float> s(V), d(V);
          for (int64_t r = r0; r < r1; ++r) {
            capped_row(xb + r * xs, V, temp, cap, s.data());
            backward_row<true>(s.data(), d.data(), V, tg[r], ls[r], en ? en[r] : 0.0f, gl[r],
                               ge ? ge[r] : 0.0f, with_entropy, 1.0f, 1.0f);
            scalar_t* o = ob + r * os;
            auto f = [&](vf sv, vf dv) {
              vf th = sv / cap;
              vf v = dv * (1.0f - th * th);
              return unit ? v : v / temp;
            };
            const int64_t Vv = V - V % W;
            for (int64_t j = 0; j < Vv; j += W) vstore(o + j, f(vload(s.data() + j), vload(d.data() + j)));
            if (V > Vv)
              vstore_tail(o + Vv, f(vload_tail(s.data() + Vv, V - Vv), vload_tail(d.data() + Vv, V - Vv)),
                          V - Vv);
          }
        });
        return;
      }
      at::parallel_for(0, n, grain_rows(V), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (unit)
            backward_row<true>(xb + r * xs, ob + r * os, V, tg[r], ls[r], en ? en[r] : 0.0f, gl[r],
                               ge ? ge[r] : 0.0f, with_entropy, temp, inv_t);
          else
            backward_row<false>(xb + r * xs, ob + r * os, V, tg[r], ls[r], en ? en[r] : 0.0f, gl[r],
                                ge ? ge[r] : 0.0f, with_entropy, temp, inv_t);
        }
      });
    });
  });
  if (!dst.is_same(out)) out.copy_(dst);
}

}  // namespace

// FRAGMENT rather than TORCH_LIBRARY: other parts of opo_kernels may register ops in the same
// `opo` namespace (e.g. torch.library.custom_op from Python), and only one TORCH_LIBRARY block
// per namespace is allowed.
TORCH_LIBRARY_FRAGMENT(opo, m) {
  m.def(
      "vocab_forward(Tensor logits, Tensor targets, float temperature, float? softcap=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "vocab_backward(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy, Tensor grad_logp, "
      "Tensor? grad_entropy, float temperature, Tensor(a!) out, float? softcap=None) -> ()");
}

TORCH_LIBRARY_IMPL(opo, CPU, m) {
  m.impl("vocab_forward", &vocab_forward_cpu);
  m.impl("vocab_backward", &vocab_backward_cpu);
}
