// Decode kernels: the row-wise work of a decode step that MLX's CPU backend does slowly.
//
// MLX's Linux CPU backend evaluates exp (and so sigmoid, softmax) one element at a time at
// ~20-35 ns an element, and spends ~20 operations per sequence and layer on attention. A decode
// step of 16 sequences then spends more time in SiLU and attention than in its weight products.
// Two MLX primitives replace them for decode steps (octomil/kernels/decode.py decides when):
//
//   swiglu(gate, up)               silu(gate) * up, with a vectorised exp
//   rms_norm(x, weight, eps)       RMS norm in one operation (MLX's CPU fallback takes four)
//   decode_attention(q, K.., V..)  a decode step's query rows (one per sequence, or several: a
//                                  verification, catch-up rows) against each sequence's own
//                                  cache buffer, all sequences in one operation
//   causal_softmax, logsumexp, entropy   the softmax and vocabulary reductions, vectorised
//
// Invariant: every row (and every sequence) is computed by the same code whatever else shares
// the call — the vector exp handles the tail of a row through the same vector code on a padded
// copy — so a sequence's numbers never depend on its neighbours (batching stays exact).

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <system_error>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "strided_rows.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// ---- exp over a span: AVX2+FMA when the CPU has it, else the C library's expf ----------------

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Cephes-style expf: n = round(x log2 e), r = x - n ln 2 (two parts), degree-6 polynomial,
// times 2^n built in the exponent bits. Relative error ~1.5 ulp; exp(-inf) = 0 exactly.
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

__attribute__((target("avx2,fma"))) inline void swiglu8(const float* gp, const float* up,
                                                        float* op) {
  __m256 x = _mm256_loadu_ps(gp);
  __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  _mm256_storeu_ps(op, _mm256_mul_ps(s, _mm256_loadu_ps(up)));
}

// out[i] = silu(gate[i]) * up[i] for one row of n elements.
__attribute__((target("avx2,fma"))) void swiglu_row_avx2(const float* g, const float* u, float* out,
                                                         int n) {
  auto eight = swiglu8;
  int i = 0;
  for (; i + 8 <= n; i += 8) eight(g + i, u + i, out + i);
  if (i < n) {  // the tail through the same vector code
    float gt[8] = {0}, ut[8] = {0}, ot[8];
    std::memcpy(gt, g + i, (n - i) * sizeof(float));
    std::memcpy(ut, u + i, (n - i) * sizeof(float));
    eight(gt, ut, ot);
    std::memcpy(out + i, ot, (n - i) * sizeof(float));
  }
}

void swiglu_row_scalar(const float* g, const float* u, float* out, int n) {
  for (int i = 0; i < n; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// RMS norm of one row: (x * rsqrt(mean(x^2) + eps)) * w, the order of octomil.models.rms_norm's
// compiled expression; the squares summed on 4 x 8 lanes in a fixed order (any row length).
__attribute__((target("avx2,fma"))) void rms_norm_row_avx2(const float* x, const float* w,
                                                           float* out, int n, float eps) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int i = 0;
  for (; i + 32 <= n; i += 32)
    for (int a = 0; a < 4; ++a) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * a);
      acc[a] = _mm256_fmadd_ps(v, v, acc[a]);
    }
  float tail = 0.0f;
  for (; i < n; ++i) tail = std::fma(x[i], x[i], tail);
  const __m256 all = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, all);
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  const float r = 1.0f / std::sqrt((sum + tail) / static_cast<float>(n) + eps);
  const __m256 vr = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i,
                     _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vr), _mm256_loadu_ps(w + i)));
  for (; i < n; ++i) out[i] = (x[i] * r) * w[i];
}

void rms_norm_row_scalar(const float* x, const float* w, float* out, int n, float eps) {
  float sum = 0.0f;
  for (int i = 0; i < n; ++i) sum += x[i] * x[i];
  const float r = 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = (x[i] * r) * w[i];
}

// ---- log-sum-exp and entropy of a row of logits ----------------------------------------------

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// (log-sum-exp, entropy in nats) of x[0..n): one pass of exps, the tail through the vector code.
__attribute__((target("avx2,fma"))) void row_stats_avx2(const float* x, int n, float* lse,
                                                        float* entropy) {
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int i = 0;
  for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(x + i));
  alignas(32) float tail[8];
  const int rest = n - i;
  for (int t = 0; t < 8; ++t) tail[t] = t < rest ? x[i + t] : -INFINITY;
  vmax = _mm256_max_ps(vmax, _mm256_load_ps(tail));
  alignas(32) float l[8];
  _mm256_store_ps(l, vmax);
  float m = l[0];
  for (int t = 1; t < 8; ++t) m = std::max(m, l[t]);
  if (!std::isfinite(m)) {  // all -inf (or an inf/nan): let the reference formula decide
    *lse = m;
    *entropy = NAN;
    return;
  }
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps(), dot = _mm256_setzero_ps();
  auto add = [&](__m256 v) __attribute__((target("avx2,fma"))) {
    __m256 e = exp8(_mm256_sub_ps(v, vm));
    sum = _mm256_add_ps(sum, e);
    // e * x with x = -inf gives nan; e is 0 there, and so is its share of the entropy.
    dot = _mm256_add_ps(dot, _mm256_and_ps(_mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_NEQ_OQ),
                                           _mm256_mul_ps(e, _mm256_sub_ps(v, vm))));
  };
  for (i = 0; i + 8 <= n; i += 8) add(_mm256_loadu_ps(x + i));
  add(_mm256_load_ps(tail));
  const float s = hsum8(sum), d = hsum8(dot);
  *lse = m + std::log(s);
  *entropy = std::log(s) - d / s;
}

void row_stats_scalar(const float* x, int n, float* lse, float* entropy) {
  float m = -INFINITY;
  for (int i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (!std::isfinite(m)) {
    *lse = m;
    *entropy = NAN;
    return;
  }
  float s = 0, d = 0;
  for (int i = 0; i < n; ++i) {
    float e = std::exp(x[i] - m);
    s += e;
    if (e != 0) d += e * (x[i] - m);
  }
  *lse = m + std::log(s);
  *entropy = std::log(s) - d / s;
}

// softmax of x[0..valid) into out[0..n), zeros past valid (a causal row); tail via vector code.
__attribute__((target("avx2,fma"))) void causal_softmax_row_avx2(const float* x, float* out, int n,
                                                                 int valid) {
  float m = -INFINITY;
  for (int i = 0; i < valid; ++i) m = std::max(m, x[i]);
  const __m256 vm = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= valid; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
    _mm256_storeu_ps(out + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < valid) {
    alignas(32) float t[8];
    for (int j = 0; j < 8; ++j) t[j] = i + j < valid ? x[i + j] : -INFINITY;
    __m256 e = exp8(_mm256_sub_ps(_mm256_load_ps(t), vm));
    _mm256_store_ps(t, e);
    sum = _mm256_add_ps(sum, e);
    std::memcpy(out + i, t, (valid - i) * sizeof(float));
  }
  const __m256 inv = _mm256_set1_ps(1.0f / hsum8(sum));
  for (i = 0; i + 8 <= valid; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(out + i), inv));
  const float inv1 = _mm256_cvtss_f32(inv);
  for (; i < valid; ++i) out[i] *= inv1;
  for (i = valid; i < n; ++i) out[i] = 0.0f;
}

void causal_softmax_row_scalar(const float* x, float* out, int n, int valid) {
  float m = -INFINITY;
  for (int i = 0; i < valid; ++i) m = std::max(m, x[i]);
  float s = 0;
  for (int i = 0; i < valid; ++i) s += (out[i] = std::exp(x[i] - m));
  const float inv = 1.0f / s;
  for (int i = 0; i < valid; ++i) out[i] *= inv;
  for (int i = valid; i < n; ++i) out[i] = 0.0f;
}

// ---- attention of one query head group against one sequence's cache ---------------------------

struct AttentionJob {
  const float* q;  // (rep, hd): the query heads sharing this key/value head, already scaled
  const float* k;  // (len, hd) rows of the cache buffer
  const float* v;
  float* out;  // (rep, hd)
  int rep, hd, len;
};

// The eight sums of a0..a7 (each eight lanes) as one vector: sum(a_i) in lane i.
__attribute__((target("avx2,fma"))) inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

constexpr int kMaxAvx2HeadDim = 1024;

// Query-head x key pairs from which a decode step's attention is split over two threads.
constexpr long kThreadedAttentionKeys = 1L << 15;

// Scores q . k_t for t < len into p (len rounded up to 8, -inf past len): eight keys at a time on
// eight independent accumulators (one FMA chain a key would wait on its own latency); the last
// partial block reads zero rows in place of the missing keys, so every score of a row comes from
// the same code whatever its length.
__attribute__((target("avx2,fma"))) void scores_avx2(const float* q, const float* k, int hd,
                                                    int len, float* p) {
  alignas(32) static const float zeros[kMaxAvx2HeadDim] = {};
  for (int t0 = 0; t0 < len; t0 += 8) {
    const float* rows[8];
    for (int j = 0; j < 8; ++j)
      rows[j] = t0 + j < len ? k + static_cast<size_t>(t0 + j) * hd : zeros;
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int d = 0; d < hd; d += 8) {
      const __m256 qd = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qd, _mm256_loadu_ps(rows[j] + d), acc[j]);
    }
    _mm256_storeu_ps(p + t0, hsum8x8(acc));
  }
  for (int t = len; t < ((len + 7) / 8) * 8; ++t) p[t] = -INFINITY;
}

__attribute__((target("avx2,fma"))) void attend_avx2(const AttentionJob& j, std::vector<float>& p) {
  const int padded = ((j.len + 7) / 8) * 8;
  p.resize(padded);
  for (int r = 0; r < j.rep; ++r) {
    scores_avx2(j.q + r * j.hd, j.k, j.hd, j.len, p.data());
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (int t = 0; t < padded; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(&p[t]));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    vm = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < padded; t += 8) {
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(&p[t]), vm));
      _mm256_storeu_ps(&p[t], e);
      sum = _mm256_add_ps(sum, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(sum));
    float* o = j.out + r * j.hd;
    // p . V, up to 64 output lanes at a time, each on its own accumulator
    for (int d0 = 0; d0 < j.hd; d0 += 64) {
      const int blocks = std::min(8, (j.hd - d0) / 8);
      __m256 acc[8];
      for (int b = 0; b < blocks; ++b) acc[b] = _mm256_setzero_ps();
      for (int t = 0; t < j.len; ++t) {
        const __m256 pt = _mm256_set1_ps(p[t]);
        const float* v = j.v + static_cast<size_t>(t) * j.hd + d0;
        for (int b = 0; b < blocks; ++b) acc[b] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v + 8 * b), acc[b]);
      }
      for (int b = 0; b < blocks; ++b) _mm256_storeu_ps(o + d0 + 8 * b, _mm256_mul_ps(acc[b], inv));
    }
  }
}

void attend_scalar(const AttentionJob& j, std::vector<float>& p) {
  p.resize(j.len);
  for (int r = 0; r < j.rep; ++r) {
    const float* q = j.q + r * j.hd;
    float m = -INFINITY;
    for (int t = 0; t < j.len; ++t) {
      float s = 0;
      for (int d = 0; d < j.hd; ++d) s += q[d] * j.k[static_cast<size_t>(t) * j.hd + d];
      p[t] = s;
      m = std::max(m, s);
    }
    float total = 0;
    for (int t = 0; t < j.len; ++t) total += (p[t] = std::exp(p[t] - m));
    float* o = j.out + r * j.hd;
    for (int d = 0; d < j.hd; ++d) {
      float acc = 0;
      for (int t = 0; t < j.len; ++t) acc += p[t] * j.v[static_cast<size_t>(t) * j.hd + d];
      o[d] = acc / total;
    }
  }
}

// ---- primitives ------------------------------------------------------------------------------

void require_f32(const mx::array& a) {
  if (a.dtype() != mx::float32) throw std::invalid_argument("[octomil_decode] float32 only");
}

void require_row_contiguous(const std::vector<mx::array>& inputs) {
  for (const auto& a : inputs)
    if (!a.flags().row_contiguous)
      throw std::runtime_error("[octomil_decode] inputs must be row-contiguous");
}

// What the one-output primitives below share: CPU only; the output allocated and every array
// registered with the command encoder, which then runs the kernel.
class CpuUnary : public mx::UnaryPrimitive {
 public:
  using mx::UnaryPrimitive::UnaryPrimitive;
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[octomil_decode] CPU only");
  }

 protected:
  // strided: the kernel gathers strided inputs itself (octomil::row_major), so no graph node has to.
  mx::cpu::CommandEncoder& prepare(const std::vector<mx::array>& inputs, mx::array& out,
                                   bool strided = false) {
    if (!strided) require_row_contiguous(inputs);
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    return encoder;
  }
};

// silu(gate) * up per row; with one input, each row holds gate then up (a fused gate/up product).
class SwiGLU : public CpuUnary {
 public:
  using CpuUnary::CpuUnary;

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(inputs, out, /*strided=*/true);
    float* op = out.data<float>();
    const bool packed = inputs.size() == 1;
    const int n = static_cast<int>(out.shape(-1));
    const size_t rows = out.size() / n, stride = packed ? 2 * n : n;
    encoder.dispatch([=, g = inputs[0], u = inputs[packed ? 0 : 1]]() {
      std::vector<float> g_rows, u_rows;  // strided inputs gathered here, not by graph nodes
      const float* gp = octomil::row_major(g, g_rows);
      const float* up = packed ? gp + n : octomil::row_major(u, u_rows);
      bool avx2 = cpu_has_avx2();
      for (size_t r = 0; r < rows; ++r) {
        if (avx2)
          swiglu_row_avx2(gp + r * stride, up + r * stride, op + r * n, n);
        else
          swiglu_row_scalar(gp + r * stride, up + r * stride, op + r * n, n);
      }
    });
  }
  const char* name() const override { return "OctomilSwiGLU"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

class RmsNorm : public CpuUnary {
 public:
  RmsNorm(mx::Stream stream, float eps) : CpuUnary(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(inputs, out, /*strided=*/true);
    float* op = out.data<float>();
    const int n = static_cast<int>(inputs[0].shape(-1));
    const size_t rows = inputs[0].size() / n;
    encoder.dispatch([=, x = inputs[0], w = inputs[1], eps = eps_]() {
      std::vector<float> x_rows, w_row;  // strided inputs gathered here, not by graph nodes
      const float* xp = octomil::row_major(x, x_rows);
      const float* wp = octomil::row_major(w, w_row);
      const bool avx2 = cpu_has_avx2();
      for (size_t r = 0; r < rows; ++r) {
        if (avx2)
          rms_norm_row_avx2(xp + r * n, wp, op + r * n, n, eps);
        else
          rms_norm_row_scalar(xp + r * n, wp, op + r * n, n, eps);
      }
    });
  }
  const char* name() const override { return "OctomilRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const RmsNorm&>(other).eps_ == eps_;
  }

 private:
  float eps_;
};

// A (1, KV, cap, hd) cache buffer as row-contiguous floats: its own data when it is, else a copy.
void copy_rows(const mx::array& a, float* dst) {
  const float* src = a.data<float>();
  if (a.flags().row_contiguous) {
    std::memcpy(dst, src, a.nbytes());
    return;
  }
  const auto& st = a.strides();
  size_t o = 0;
  for (int h = 0; h < a.shape(1); ++h)
    for (int t = 0; t < a.shape(2); ++t)
      for (int d = 0; d < a.shape(3); ++d) dst[o++] = src[h * st[1] + t * st[2] + d * st[3]];
}

// One row's heads (heads x hd floats) rotated by RoPE and scaled: out[d] = (x[d] * cos[d] +
// x[partner[d]] * sin[d]) * scale, the operations (and roundings) of octomil.models.rope_table's
// table rotation followed by the query's scaling; without tables (cos null) out = x * scale.
void rotate_heads(const float* x, float* out, int heads, int hd, const float* cos,
                  const float* sin, const uint32_t* partner, float scale) {
  for (int h = 0; h < heads; ++h, x += hd, out += hd) {
    if (cos == nullptr) {
      for (int d = 0; d < hd; ++d) out[d] = scale == 1.0f ? x[d] : x[d] * scale;
      continue;
    }
    for (int d = 0; d < hd; ++d) {
      const float rotated = x[d] * cos[d] + x[partner[d]] * sin[d];
      out[d] = scale == 1.0f ? rotated : rotated * scale;
    }
  }
}

// Rotates a step's new query and key rows by RoPE from the step's tables (when given) and scales
// the queries, writes each segment's new key/value rows into its sequence's cache buffer (outputs
// 1..2n), then attends each query row to its own sequence's keys up to and including its own
// position (output 0). A row is computed by the same code whether its segment has one row or
// several. Taking the projections as they come (any strides) and rotating here keeps a layer's
// attention one graph node instead of ~25 (reshapes, slices, the rotation, the scaling, copies).
//
// A cache buffer is append-only: every array of one sequence's cache at one layer reads only the
// positions before that cache's offset at the time, and a step writes only at and after it. So
// output i takes its input buffer over (writes in place) whenever the buffer is row-contiguous.
// MLX's is_donatable() cannot be the test here: each of a multi-output primitive's 2n + 1 outputs
// holds the inputs, so it is never true, and the previous step's task (run ahead) still holds the
// buffer when this step is scheduled; copying instead cost the whole cache every step (~0.4 GB a
// step for 16 sequences at 256 positions). A rolled-back verification (engine.verify) moves the
// offset back only after its step is evaluated, and nothing keeps an older array of the cache.
class DecodeAttention : public mx::Primitive {
 public:
  DecodeAttention(mx::Stream stream, std::vector<int> rows, std::vector<int> lengths, int heads,
                  int kv_heads, int head_dim, float scale, bool rope, bool packed)
      : mx::Primitive(stream),
        rows_(std::move(rows)),
        lengths_(std::move(lengths)),
        heads_(heads),
        kv_heads_(kv_heads),
        hd_(head_dim),
        scale_(scale),
        rope_(rope),
        packed_(packed) {}

  // inputs: q (R H hd floats, any shape and strides), k and v (R KV hd) -- or, packed, one array
  // whose rows hold a row's q, k and v after each other (a fused q/k/v product) --, with rope cos
  // and signed sin (R, hd) and partner (hd,) uint32, then K_0..K_{n-1}, V_0..V_{n-1} (each (1,
  // KV, cap_i, hd)); outputs: attention (R, H hd; q's shape unpacked), then the updated K_i, V_i.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const int n = static_cast<int>(rows_.size()), hd = hd_, rep = heads_ / kv_heads_;
    const int first_cache = (packed_ ? 1 : 3) + (rope_ ? 3 : 0);
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    outputs[0].set_data(mx::allocator::malloc(outputs[0].nbytes()));
    std::vector<std::pair<mx::array, mx::array>> copies;  // by value: they outlive this call
    for (int c = 0; c < 2 * n; ++c) {
      const auto& in = inputs[first_cache + c];
      auto& out = outputs[1 + c];
      if (in.flags().row_contiguous) {
        out.copy_shared_buffer(in);
      } else {
        out.set_data(mx::allocator::malloc(out.nbytes()));
        copies.emplace_back(in, out);
      }
    }
    for (auto& o : outputs) encoder.set_output_array(o);
    const size_t total = outputs[0].size() / (static_cast<size_t>(heads_) * hd);
    // The query rows rotated and scaled, and the new key rows rotated, by the task below; the
    // jobs point into these buffers (moved into the task: their data stays where it is).
    std::vector<float> q_rows(total * heads_ * hd), k_rows(total * kv_heads_ * hd);
    std::vector<AttentionJob> jobs;
    std::vector<std::pair<float*, size_t>> writes;  // (cache row, new row * KV + head) per head
    size_t row = 0;
    for (int i = 0; i < n; ++i) {
      auto& k = outputs[1 + i];
      auto& v = outputs[1 + n + i];
      const size_t cap = k.shape(2);
      const int first = lengths_[i] - rows_[i];  // position of the segment's first row
      for (int j = 0; j < rows_[i]; ++j, ++row) {
        const size_t pos = first + j;
        for (int g = 0; g < kv_heads_; ++g) {
          writes.emplace_back(k.data<float>() + (g * cap + pos) * hd, row * kv_heads_ + g);
          writes.emplace_back(v.data<float>() + (g * cap + pos) * hd, row * kv_heads_ + g);
          const size_t qoff = (row * heads_ + g * rep) * hd;
          jobs.push_back({q_rows.data() + qoff, k.data<float>() + g * cap * hd,
                          v.data<float>() + g * cap * hd, outputs[0].data<float>() + qoff, rep,
                          hd, static_cast<int>(pos) + 1});
        }
      }
    }
    encoder.dispatch([copies = std::move(copies), writes = std::move(writes),
                      jobs = std::move(jobs), q_rows = std::move(q_rows),
                      k_rows = std::move(k_rows), inputs, tables = rope_ ? (packed_ ? 1 : 3) : -1,
                      packed = packed_, scale = scale_, heads = heads_, kv_heads = kv_heads_, hd,
                      total]() mutable {
      for (auto& [in, out] : copies) copy_rows(in, out.data<float>());
      std::vector<float> q_in, k_in, v_in;  // strided inputs gathered here, not by graph nodes
      const float* qp = octomil::row_major(inputs[0], q_in);
      const float* kp = packed ? qp + heads * hd : octomil::row_major(inputs[1], k_in);
      const float* vp = packed ? kp + kv_heads * hd : octomil::row_major(inputs[2], v_in);
      const size_t kv_row = static_cast<size_t>(kv_heads) * hd;
      const size_t q_stride = packed ? heads * hd + 2 * kv_row : heads * hd;
      const size_t k_stride = packed ? q_stride : kv_row;
      std::vector<float> cos_in, sin_in;
      std::vector<uint32_t> partner_in;
      const bool rope = tables >= 0;
      const float* cp = rope ? octomil::row_major(inputs[tables], cos_in) : nullptr;
      const float* sp = rope ? octomil::row_major(inputs[tables + 1], sin_in) : nullptr;
      const uint32_t* pp = rope ? octomil::row_major(inputs[tables + 2], partner_in) : nullptr;
      std::vector<uint32_t> partner_safe;  // a lazy partner is checked only here: stay in the row
      if (rope) {
        partner_safe.assign(pp, pp + hd);
        for (auto& p : partner_safe) p = p < static_cast<uint32_t>(hd) ? p : 0;
        pp = partner_safe.data();
      }
      for (size_t r = 0; r < total; ++r) {
        rotate_heads(qp + r * q_stride, q_rows.data() + r * heads * hd, heads, hd,
                     rope ? cp + r * hd : nullptr, rope ? sp + r * hd : nullptr, pp, scale);
        rotate_heads(kp + r * k_stride, k_rows.data() + r * kv_row, kv_heads, hd,
                     rope ? cp + r * hd : nullptr, rope ? sp + r * hd : nullptr, pp, 1.0f);
      }
      for (size_t w = 0; w < writes.size(); w += 2) {
        const size_t row = writes[w].second / kv_heads, g = writes[w].second % kv_heads;
        std::memcpy(writes[w].first, k_rows.data() + writes[w].second * hd, hd * sizeof(float));
        std::memcpy(writes[w + 1].first, vp + row * k_stride + g * hd, hd * sizeof(float));
      }
      const bool avx2 = cpu_has_avx2() && hd % 8 == 0 && hd <= kMaxAvx2HeadDim;
      auto run = [&jobs, avx2](size_t first, size_t step) {
        std::vector<float> scratch;
        for (size_t i = first; i < jobs.size(); i += step) {
          if (avx2)
            attend_avx2(jobs[i], scratch);
          else
            attend_scalar(jobs[i], scratch);
        }
      };
      // A second thread takes every other job when there is enough to pay for starting it; each
      // job is computed whole by one thread, so the numbers do not depend on the split.
      long keys = 0;
      for (const auto& j : jobs) keys += static_cast<long>(j.len) * j.rep;
      if (keys < kThreadedAttentionKeys || std::thread::hardware_concurrency() < 2) {
        run(0, 1);
        return;
      }
      std::thread helper;
      try {
        helper = std::thread(run, 1, 2);
      } catch (const std::system_error&) {  // no thread to be had: this one does both halves
        run(1, 2);
      }
      run(0, 2);
      if (helper.joinable()) helper.join();
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[octomil_decode] CPU only");
  }
  const char* name() const override { return "OctomilDecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const DecodeAttention&>(other);
    return o.rows_ == rows_ && o.lengths_ == lengths_ && o.heads_ == heads_ &&
           o.kv_heads_ == kv_heads_ && o.hd_ == hd_ && o.scale_ == scale_ && o.rope_ == rope_ &&
           o.packed_ == packed_;
  }

 private:
  std::vector<int> rows_;
  std::vector<int> lengths_;
  int heads_, kv_heads_, hd_;
  float scale_;
  bool rope_;
  bool packed_;
};

// Softmax over the last axis of (..., T, S) scores where row t may see columns 0..offset+t.
class CausalSoftmax : public CpuUnary {
 public:
  CausalSoftmax(mx::Stream stream, int offset) : CpuUnary(stream), offset_(offset) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(inputs, out);
    const auto& x = inputs[0];
    const float* xp = x.data<float>();
    float* op = out.data<float>();
    const int n = static_cast<int>(x.shape(-1)), rows_per_block = static_cast<int>(x.shape(-2));
    const size_t rows = x.size() / n;
    encoder.dispatch([=, offset = offset_]() {
      bool avx2 = cpu_has_avx2();
      for (size_t r = 0; r < rows; ++r) {
        int valid = std::min(n, offset + static_cast<int>(r % rows_per_block) + 1);
        if (avx2)
          causal_softmax_row_avx2(xp + r * n, op + r * n, n, valid);
        else
          causal_softmax_row_scalar(xp + r * n, op + r * n, n, valid);
      }
    });
  }
  const char* name() const override { return "OctomilCausalSoftmax"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const CausalSoftmax&>(other).offset_ == offset_;
  }

 private:
  int offset_;
};

mx::array causal_softmax(const mx::array& x, int offset) {
  auto s = mx::to_stream(std::monostate{});
  require_f32(x);
  if (x.ndim() < 2 || offset < 0 || x.shape(-1) < offset + 1)
    throw std::invalid_argument("[octomil_decode] causal_softmax: scores (..., T, S), S > offset");
  return mx::array(x.shape(), mx::float32, std::make_shared<CausalSoftmax>(s, offset),
                   {mx::contiguous(x, false, s)});
}

// Per row of logits: log-sum-exp (which = 0) or entropy in nats (which = 1).
class RowStats : public CpuUnary {
 public:
  RowStats(mx::Stream stream, int which) : CpuUnary(stream), which_(which) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(inputs, out);
    const auto& x = inputs[0];
    const float* xp = x.data<float>();
    float* op = out.data<float>();
    const int n = static_cast<int>(x.shape(-1));
    const size_t rows = x.size() / n;
    encoder.dispatch([=, which = which_]() {
      bool avx2 = cpu_has_avx2();
      for (size_t r = 0; r < rows; ++r) {
        float stats[2];
        if (avx2)
          row_stats_avx2(xp + r * n, n, &stats[0], &stats[1]);
        else
          row_stats_scalar(xp + r * n, n, &stats[0], &stats[1]);
        op[r] = stats[which];
      }
    });
  }
  const char* name() const override { return "OctomilRowStats"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return static_cast<const RowStats&>(other).which_ == which_;
  }

 private:
  int which_;
};

mx::array row_stats(const mx::array& x, int which) {
  auto s = mx::to_stream(std::monostate{});
  require_f32(x);
  if (x.ndim() < 1 || x.shape(-1) < 1) throw std::invalid_argument("[octomil_decode] empty rows");
  auto shape = x.shape();
  shape.pop_back();
  return mx::array(shape, mx::float32, std::make_shared<RowStats>(s, which),
                   {mx::contiguous(x, false, s)});
}

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps) {
  auto s = mx::to_stream(std::monostate{});
  require_f32(x);
  require_f32(weight);
  if (x.ndim() < 1 || weight.ndim() != 1 || weight.shape(0) != x.shape(-1) || x.shape(-1) < 1)
    throw std::invalid_argument("[octomil_decode] rms_norm: x (..., D) and weight (D,)");
  return mx::array(x.shape(), mx::float32, std::make_shared<RmsNorm>(s, eps), {x, weight});
}

mx::array swiglu(const mx::array& gate, const std::optional<mx::array>& up) {
  auto s = mx::to_stream(std::monostate{});
  require_f32(gate);
  if (!up) {  // gate packs gate and up: (..., 2 F)
    if (gate.ndim() < 1 || gate.shape(-1) % 2)
      throw std::invalid_argument("[octomil_decode] packed gate/up needs an even last axis");
    auto shape = gate.shape();
    shape.back() /= 2;
    return mx::array(shape, mx::float32, std::make_shared<SwiGLU>(s), {gate});
  }
  if (gate.shape() != up->shape()) throw std::invalid_argument("[octomil_decode] shapes differ");
  require_f32(*up);
  return mx::array(gate.shape(), mx::float32, std::make_shared<SwiGLU>(s), {gate, *up});
}

// q: R query rows of H heads of hd (any shape holding R H hd floats; (R, H, hd) or (1, R, H hd));
// k, v: their new key/value rows (R KV hd floats), or None with q packing each row's q, k and v
// along its last axis (a fused q/k/v product: (..., (H + 2 KV) hd)); segment i owns rows[i]
// consecutive rows and its cache buffers keys[i]/values[i] (1, KV, cap_i, hd) hold
// lengths[i] - rows[i] rows, the new ones going after them. With rope = (cos, signed sin (R, hd),
// partner (hd,) uint32) the kernel rotates q and k (octomil.models.rope_table's tables); without,
// they come rotated. q is scaled here.
// Returns [attention (q's shape; packed: its last axis H hd), K_0', .., V_{n-1}'].
std::vector<mx::array> decode_attention(const mx::array& q, const std::optional<mx::array>& k,
                                        const std::optional<mx::array>& v,
                                        const std::vector<mx::array>& keys,
                                        const std::vector<mx::array>& values,
                                        const std::vector<int>& rows,
                                        const std::vector<int>& lengths, float scale,
                                        const std::vector<mx::array>& rope) {
  auto s = mx::to_stream(std::monostate{});
  const size_t n = keys.size();
  int total = 0;
  for (int r : rows) total += r;
  if (values.size() != n || lengths.size() != n || rows.size() != n || n == 0 ||
      keys[0].ndim() != 4)
    throw std::invalid_argument(
        "[octomil_decode] one keys/values/rows/length each, keys (1, KV, cap, hd)");
  if (k.has_value() != v.has_value())
    throw std::invalid_argument("[octomil_decode] k and v: both, or neither (q packs all three)");
  const bool packed = !k.has_value();
  const int kv = static_cast<int>(keys[0].shape(1)), hd = static_cast<int>(keys[0].shape(3));
  const size_t per_row = static_cast<size_t>(total) * hd;
  const size_t q_heads = per_row == 0 || q.size() % per_row ? 0 : q.size() / per_row;
  const size_t heads = packed ? (q_heads > 2u * kv ? q_heads - 2 * kv : 0) : q_heads;
  if (heads == 0 || heads % kv || q.ndim() < 1 ||
      (packed && static_cast<size_t>(q.shape(-1)) != (heads + 2 * kv) * hd))
    throw std::invalid_argument(
        "[octomil_decode] q must hold sum(rows) x heads x head_dim floats, heads % kv_heads == 0 "
        "(packed: each row's q, k and v along the last axis)");
  if (!packed && (k->size() != per_row * kv || v->size() != per_row * kv))
    throw std::invalid_argument("[octomil_decode] k and v must be (sum(rows), kv_heads, head_dim)");
  std::vector<mx::array> inputs{q};
  if (!packed) {
    inputs.push_back(*k);
    inputs.push_back(*v);
  }
  const size_t first_table = inputs.size();
  if (!rope.empty()) {
    const mx::Shape table{total, hd};
    if (rope.size() != 3 || rope[0].shape() != table || rope[1].shape() != table ||
        rope[2].shape() != mx::Shape{hd} || rope[2].dtype() != mx::uint32)
      throw std::invalid_argument(
          "[octomil_decode] rope must be cos, sin (sum(rows), head_dim) and partner (head_dim,)");
    if (rope[2].is_available()) {  // RopeTables' partners are; a lazy one is clamped in the task
      const uint32_t* partner = rope[2].data<uint32_t>();
      for (int d = 0; d < hd; ++d)
        if (partner[d] >= static_cast<uint32_t>(hd))
          throw std::invalid_argument("[octomil_decode] rope partner indices must be < head_dim");
    }
    // The step's tables are computed once and shared by every layer: no node per layer.
    inputs.insert(inputs.end(), rope.begin(), rope.end());
  }
  auto out_shape = q.shape();
  if (packed) out_shape.back() = static_cast<int>(heads) * hd;
  std::vector<mx::Shape> shapes{out_shape};
  for (size_t i = 0; i < n; ++i) {
    const auto& buf = keys[i];
    if (buf.ndim() != 4 || buf.shape(0) != 1 || buf.shape(1) != kv || buf.shape(3) != hd ||
        values[i].shape() != buf.shape() || rows[i] < 1 || lengths[i] < rows[i] ||
        lengths[i] > buf.shape(2))
      throw std::invalid_argument("[octomil_decode] a cache buffer does not fit its query");
    inputs.push_back(buf);
    shapes.push_back(buf.shape());
  }
  for (size_t i = 0; i < n; ++i) {
    inputs.push_back(values[i]);
    shapes.push_back(values[i].shape());
  }
  for (size_t i = 0; i < inputs.size(); ++i)
    if (rope.empty() || i != first_table + 2) require_f32(inputs[i]);
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), std::move(dtypes),
                                std::make_shared<DecodeAttention>(s, rows, lengths,
                                                                  static_cast<int>(heads), kv, hd,
                                                                  scale, !rope.empty(), packed),
                                std::move(inputs));
}

}  // namespace

NB_MODULE(_octomil_decode, m) {
  m.doc() = "Octomil's decode kernels for MLX's CPU backend (see decode_kernels.cpp)";
  m.def("swiglu", &swiglu, nb::arg("gate"), nb::arg("up").none() = nb::none(),
        "silu(gate) * up (up None: gate's last axis holds gate, then up)");
  m.def("rms_norm", &rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"),
        "(x * rsqrt(mean(x^2) + eps)) * weight over the last axis, one row at a time.");
  m.def("decode_attention", &decode_attention, nb::arg("q"), nb::arg("k").none(), nb::arg("v").none(),
        nb::arg("keys"), nb::arg("values"), nb::arg("rows"), nb::arg("lengths"),
        nb::arg("scale"), nb::arg("rope") = std::vector<mx::array>{},
        "Rotate (rope = [cos, sin, partner]) and scale the new rows, write each segment's new "
        "key/value rows, then attend each query row causally to its own sequence's cache: "
        "[attention, updated keys..., updated values...].");
  m.def("logsumexp", [](const mx::array& x) { return row_stats(x, 0); }, nb::arg("x"),
        "log-sum-exp over the last axis (the axis removed).");
  m.def("entropy", [](const mx::array& x) { return row_stats(x, 1); }, nb::arg("x"),
        "Shannon entropy (nats) of softmax(x) over the last axis (the axis removed).");
  m.def("causal_softmax", &causal_softmax, nb::arg("x"), nb::arg("offset"),
        "softmax over the last axis of (..., T, S); row t sees columns 0..offset+t (zeros after).");
  m.def("isa", []() { return std::string(cpu_has_avx2() ? "avx2" : "scalar"); });
}
