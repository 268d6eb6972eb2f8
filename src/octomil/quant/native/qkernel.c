/*
 * Quantized products for the qmm extension: MLX affine 4- and 8-bit weights times fp32 rows.
 *
 * Decode reads every weight once per token, so bytes set the speed: 8-bit weights are a quarter
 * and 4-bit ones an eighth of fp32 (plus a scale and bias per group of 32: fp16 as in the GGUF, or
 * fp32). MLX's own CPU quantized matmul is scalar; here up to QMM_MAX_ROWS rows share one read of
 * the weights (the few-row kernels, split by outputs between this thread and the pool's worker).
 * On x86 with AVX2 each block of 32 inputs of a row is rounded to int8 and meets the codes in
 * integer dot products (qkernel_int8.h: llama.cpp's trade, a quarter of the fp32 kernel's vector
 * work per weight and row); elsewhere, or when OCTOMIL_QMM_ISA picks one, the kernels of
 * qkernel_isa.h keep fp32 activations and arithmetic. (int16 activations with vpmaddwd were
 * measured first and were no faster than fp32 on Zen 2; int8 with vpmaddubsw is, at one row.)
 * Bigger products (prefill) dequantize the weights in blocks into a small fp32 buffer and hand each
 * block to cblas_sgemm (the process's: OpenBLAS behind Octomil's route), so they run at fp32 GEMM
 * speed for the cost of one extra pass over a block that stays in cache.
 *
 * Compiled for AVX-512 VNNI, AVX-VNNI, AVX2+FMA+F16C (int8), AVX-512 and AVX2 (fp32) and plain C,
 * picked at run time from what the CPU reports.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"
#include "qkernel.h"

/* The few-row kernels split a product's outputs into chunks of up to QMM_CHUNK_COLS (about an
 * eighth of the outputs each, at least MIN_CHUNK_COLS: long contiguous runs of weights for the
 * hardware prefetcher, and enough chunks for the two threads to even out), and prefetch
 * PREFETCH_BYTES ahead of each output's codes. Measured streaming 1-row products from memory
 * (AMD EPYC, 2 threads): 32-output chunks with 512 bytes ahead read 8 GB/s of q4 codes, 128 with
 * 2 KiB ahead 10-12, and the 8-bit head 12 -> 17-20 GB/s. */
enum {
  QMM_CHUNK_COLS = 128,
  MIN_CHUNK_COLS = 32,
  DEQUANT_BLOCK_FLOATS = 1 << 20,
  PREFETCH_BYTES = 2048
};

/* Outputs per chunk of a few-row product of n outputs: a multiple of 4 (every tile's width). */
static int chunk_cols(int n) {
  int cols = (n / 8 + 3) / 4 * 4;
  return cols < MIN_CHUNK_COLS ? MIN_CHUNK_COLS : cols > QMM_CHUNK_COLS ? QMM_CHUNK_COLS : cols;
}

typedef struct {
  const qmm_job *job;
  const float *x; /* job->x, or for 4 bits each block of 32 inputs as its evens then its odds */
  long row_bytes;
  int groups;
  int chunk_cols; /* outputs per chunk of the few-row kernels (chunk_cols(n)) */
  /* The int8 kernels' rows (quantize_rows_int8), in the same block order as x: */
  const int8_t *xq; /* rows x k inputs rounded to steps dx */
  const float *dx;  /* rows x (k / 32): each block's step, max |x| / 127 */
  const float *sx;  /* rows x groups: each group's sum of the exact inputs */
  const float *t;   /* rows x groups: z * (sx - dx * sum(xq)) (qkernel_int8.h) */
} qctx;

static inline float half_to_float(uint16_t h) { /* IEEE binary16, subnormals included */
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023;
  union {
    uint32_t u;
    float f;
  } v;
  if (exp == 31) {
    v.u = sign | 0x7f800000u | (man << 13);
  } else if (exp) {
    v.u = sign | ((exp + 112) << 23) | (man << 13);
  } else {
    v.f = (float)man * 0x1p-24f;
    v.u |= sign;
  }
  return v.f;
}

static inline float scale_at(const void *p, size_t i, int half) {
  return half ? half_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* ---- plain C (any CPU) --------------------------------------------------------------------- */
#define ISA generic
#define TARGET
#define TR 4
#define CFOR(R) ((R) == 1 ? 4 : (R) <= 4 ? 2 : 1)
#define VF float
#define VL 1
#define V_ZERO() 0.0f
#define V_SET1(s) (s)
#define V_LOAD(p) (*(p))
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define V_HSUM(v) (v)
#define Q8_LOAD(p) ((float)*(p))
#define Q4_BLOCK(p, q)                  \
  for (int t = 0; t < 16; ++t) {        \
    (q)[t] = (float)((p)[t] & 15);      \
    (q)[16 + t] = (float)((p)[t] >> 4); \
  }
#define SCALE(p, i, half) scale_at(p, i, half)
#define PREFETCH(p) ((void)0)
#include "qkernel_isa.h"

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

__attribute__((target("avx2,fma,f16c"))) static inline float scale_f16c(const void *p, size_t i,
                                                                        int half) {
  return half ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* ---- AVX2 + FMA + F16C --------------------------------------------------------------------- */
#define ISA avx2
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define TR 8 /* R * C accumulators + scales, biases and a weight vector in 16 registers */
#define CFOR(R) ((R) == 1 ? 4 : (R) <= 4 ? 2 : 1)
#define VF __m256
#define VL 8
#define V_ZERO() _mm256_setzero_ps()
#define V_SET1(s) _mm256_set1_ps(s)
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_HSUM(v) hsum256(v)
#define Q8_LOAD(p) _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define Q4_BLOCK(p, q)                                                              \
  do {                                                                              \
    const __m128i nib = _mm_set1_epi8(15);                                          \
    const __m128i raw = _mm_loadu_si128((const __m128i *)(p));                      \
    const __m128i lo = _mm_and_si128(raw, nib);                                     \
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nib);                  \
    (q)[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));                          \
    (q)[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));       \
    (q)[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));                          \
    (q)[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));       \
  } while (0)
#define SCALE(p, i, half) scale_f16c(p, i, half)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#include "qkernel_isa.h"

/* ---- AVX-512 ------------------------------------------------------------------------------- */
#define ISA avx512
#define TARGET __attribute__((target("avx512f,avx2,fma,f16c")))
#define TR 8 /* 32 registers */
#define CFOR(R) ((R) <= 4 ? 4 : 2)
#define VF __m512
#define VL 16
#define V_ZERO() _mm512_setzero_ps()
#define V_SET1(s) _mm512_set1_ps(s)
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_HSUM(v) _mm512_reduce_add_ps(v)
#define Q8_LOAD(p) _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define Q4_BLOCK(p, q)                                                                  \
  do {                                                                                  \
    const __m128i nib = _mm_set1_epi8(15);                                              \
    const __m128i raw = _mm_loadu_si128((const __m128i *)(p));                          \
    (q)[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, nib)));         \
    (q)[1] = _mm512_cvtepi32_ps(                                                        \
        _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), nib)));              \
  } while (0)
#define SCALE(p, i, half) scale_f16c(p, i, half)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#include "qkernel_isa.h"

/* ---- int8 activations: AVX2, and the VNNI dot products where the CPU has them ----------------- */
#define QUANTIZE_TARGET __attribute__((target("avx2,fma,f16c")))

/* 32 floats -> 32 int8 at step d = max |x| / 127 (round half to even; d = 0 for a block of zeros),
 * stored in the kernel's order (for 4 bits: the 16 even inputs, then the 16 odd ones); returns d,
 * and adds the block's exact sum and the sum of its rounding residuals x - d * q (each over its
 * lanes in a fixed order) to *sum and *residual. */
QUANTIZE_TARGET static inline float quantize_block(const float *x, int8_t *q, int evens_first,
                                                   float *sum, float *residual) {
  const __m256 v[4] = {_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8), _mm256_loadu_ps(x + 16),
                       _mm256_loadu_ps(x + 24)};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_max_ps(
      _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
      _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float d = _mm_cvtss_f32(m4) / 127.0f;
  const __m256 id = _mm256_set1_ps(d != 0.0f ? 1.0f / d : 0.0f), vd = _mm256_set1_ps(d);
  __m256i i[4];
  __m256 res = _mm256_setzero_ps();
  for (int a = 0; a < 4; ++a) {
    i[a] = _mm256_cvtps_epi32(_mm256_mul_ps(v[a], id));
    res = _mm256_add_ps(res, _mm256_fnmadd_ps(_mm256_cvtepi32_ps(i[a]), vd, v[a]));
  }
  /* packs interleave 128-bit lanes: dwords 0 4 1 5 2 6 3 7 of the packed result hold inputs
   * 0-3, 4-7, ..., so a dword permutation restores the order */
  __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
  b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  if (evens_first) { /* per 128-bit lane: evens to the low 8 bytes; then lanes' halves regrouped */
    const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0,
                                           2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, split), 0xd8);
  }
  _mm256_storeu_si256((__m256i *)q, b);
  *sum += hsum256(_mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
  *residual += hsum256(res);
  return d;
}

QUANTIZE_TARGET static void quantize_rows_int8(const qmm_job *j, int8_t *xq, float *dx, float *sx,
                                               float *t) {
  const int blocks = j->k / 32, per_group = j->group_size / 32, groups = j->k / j->group_size;
  const float centre = j->bits == 4 ? 8.0f : 128.0f;
  for (long r = 0; r < j->rows; ++r)
    for (int g = 0; g < groups; ++g) {
      float sum = 0.0f, residual = 0.0f;
      for (int b = g * per_group; b < (g + 1) * per_group; ++b)
        dx[r * blocks + b] = quantize_block(j->x + r * j->k + b * 32, xq + r * j->k + b * 32,
                                            j->bits == 4, &sum, &residual);
      sx[r * groups + g] = sum;
      /* 8-bit codes enter the integer sums centred: only the exact inputs meet the centre */
      t[r * groups + g] = centre * (j->bits == 4 ? residual : sum);
    }
}

/* sum over an output's groups of b * sx + s * t (its scales and biases from index at; one row's
 * sx and t), eight groups at a time, then the rest, in a fixed order. */
QUANTIZE_TARGET static inline float group_terms(const qmm_job *j, size_t at, int groups,
                                                const float *sx, const float *t) {
  __m256 acc = _mm256_setzero_ps();
  int g = 0;
  for (; g + 8 <= groups; g += 8) {
    __m256 s, b;
    if (j->half_scales) {
      s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)j->scales + at + g)));
      b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)j->biases + at + g)));
    } else {
      s = _mm256_loadu_ps((const float *)j->scales + at + g);
      b = _mm256_loadu_ps((const float *)j->biases + at + g);
    }
    acc = _mm256_fmadd_ps(s, _mm256_loadu_ps(t + g), _mm256_fmadd_ps(b, _mm256_loadu_ps(sx + g), acc));
  }
  float rest = 0.0f;
  for (; g < groups; ++g)
    rest = __builtin_fmaf(scale_f16c(j->scales, at + g, j->half_scales), t[g],
                          __builtin_fmaf(scale_f16c(j->biases, at + g, j->half_scales), sx[g], rest));
  return hsum256(acc) + rest;
}

__attribute__((target("avx2"))) static inline __m256i dot_maddubs(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

#define ISA avx2_int8
#define TARGET __attribute__((target("avx2,fma,f16c")))
#define TR 8
#define CFOR(R) ((R) == 1 ? 4 : (R) <= 4 ? 2 : 1)
#define DOT(u, s) dot_maddubs(u, s)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#include "qkernel_int8.h"

#define ISA avxvnni_int8
#define TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define TR 8
#define CFOR(R) ((R) == 1 ? 4 : (R) <= 4 ? 2 : 1)
#define DOT(u, s) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#include "qkernel_int8.h"

#define ISA avx512vnni_int8
#define TARGET __attribute__((target("avx2,fma,f16c,avx512vl,avx512vnni")))
#define TR 8
#define CFOR(R) ((R) == 1 ? 4 : (R) <= 4 ? 2 : 1)
#define DOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#include "qkernel_int8.h"
#endif

typedef struct {
  const char *name;
  chunk_fn rows_chunk;
  int int8; /* takes its rows rounded to int8 (qkernel_int8.h), else fp32 (qkernel_isa.h) */
  const char *features[4]; /* what the CPU must report */
} qmm_kernel;

/* In order of preference: the int8 kernels do a quarter of the fp32 kernels' vector work per
 * weight and row (llama.cpp's trade: each block of 32 inputs rounded to int8); the VNNI ones are
 * their bit-for-bit equals with one dot-product instruction. */
static const qmm_kernel kernels[] = {
#if defined(__x86_64__)
    {"avx512vnni-int8", int8_chunk_avx512vnni_int8, 1, {"avx2", "fma", "f16c", "avx512vnni"}},
    {"avxvnni-int8", int8_chunk_avxvnni_int8, 1, {"avx2", "fma", "f16c", "avxvnni"}},
    {"avx2-int8", int8_chunk_avx2_int8, 1, {"avx2", "fma", "f16c"}},
    {"avx512", rows_chunk_avx512, 0, {"avx512f", "f16c"}},
    {"avx2", rows_chunk_avx2, 0, {"avx2", "fma", "f16c"}},
#endif
    {"generic", rows_chunk_generic, 0, {0}},
};
static const qmm_kernel *chosen;
static _Atomic unsigned long long calls[2];

static int supported(const qmm_kernel *kernel) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  for (int i = 0; i < 4 && kernel->features[i]; ++i) {
    const char *f = kernel->features[i];
    /* __builtin_cpu_supports takes only literals */
    if (!strcmp(f, "avx2") ? !__builtin_cpu_supports("avx2")
        : !strcmp(f, "fma") ? !__builtin_cpu_supports("fma")
        : !strcmp(f, "f16c") ? !__builtin_cpu_supports("f16c")
        : !strcmp(f, "avx512f") ? !__builtin_cpu_supports("avx512f")
        : !strcmp(f, "avx512vnni") ? !(__builtin_cpu_supports("avx512vnni") &&
                                       __builtin_cpu_supports("avx512vl"))
        : !strcmp(f, "avxvnni") ? !__builtin_cpu_supports("avxvnni")
                                : 1)
      return 0;
  }
#endif
  return 1;
}

static const qmm_kernel *best(void) {
  if (!chosen) {
    const char *forced = getenv("OCTOMIL_QMM_ISA"); /* tests and benchmarks: a slower one */
    for (size_t i = 0; i < sizeof kernels / sizeof *kernels && !chosen; ++i)
      if (supported(&kernels[i]) && (!forced || !strcmp(forced, kernels[i].name)))
        chosen = &kernels[i];
    if (!chosen) chosen = &kernels[sizeof kernels / sizeof *kernels - 1];
  }
  return chosen;
}

const char *qmm_isa(void) { return best()->name; }

int qmm_select_isa(const char *name) {
  for (size_t i = 0; i < sizeof kernels / sizeof *kernels; ++i)
    if (!strcmp(name, kernels[i].name) && supported(&kernels[i])) {
      chosen = &kernels[i];
      return 1;
    }
  return 0;
}

unsigned long long qmm_calls(int prefill) { return atomic_load(&calls[prefill ? 1 : 0]); }

#include "qkernel_prefill.h"

int qmm_run(const qmm_job *j) {
  if ((j->bits != 4 && j->bits != 8) || j->group_size <= 0 || j->group_size % 32 ||
      j->k % j->group_size || j->rows < 0)
    return 0;
  if (j->rows == 0 || j->n == 0) return 1;
  qctx c = {j, j->x, (long)j->k * j->bits / 8, j->k / j->group_size, chunk_cols(j->n)};
  sgemm_fn sgemm = process_sgemm();
  if (j->rows > QMM_MAX_ROWS && sgemm) {
    atomic_fetch_add(&calls[1], 1);
    if (run_prefill(&c, sgemm)) return 1;
  }
  atomic_fetch_add(&calls[0], 1);
  const qmm_kernel *kernel = best();
#if defined(__x86_64__)
  if (kernel->int8) {
    const size_t blocks = (size_t)j->rows * (j->k / 32);
    const size_t per_group = (size_t)j->rows * c.groups;
    void *scratch = malloc((size_t)j->rows * j->k + (blocks + 2 * per_group) * sizeof(float));
    if (!scratch) return 0;
    c.dx = (const float *)scratch;
    c.sx = c.dx + blocks;
    c.t = c.sx + per_group;
    c.xq = (const int8_t *)(c.t + per_group);
    quantize_rows_int8(j, (int8_t *)c.xq, (float *)c.dx, (float *)c.sx, (float *)c.t);
    pool_run(kernel->rows_chunk, &c, (j->n + c.chunk_cols - 1) / c.chunk_cols);
    free(scratch);
    return 1;
  }
#endif
  float *permuted = 0;
  if (j->bits == 4) { /* low nibbles hold the even inputs of a block, high nibbles the odd ones */
    permuted = (float *)malloc((size_t)j->rows * j->k * sizeof(float));
    if (!permuted) return 0;
    for (long r = 0; r < j->rows; ++r)
      for (int i = 0; i < j->k; i += 32)
        for (int t = 0; t < 16; ++t) {
          permuted[r * j->k + i + t] = j->x[r * j->k + i + 2 * t];
          permuted[r * j->k + i + 16 + t] = j->x[r * j->k + i + 2 * t + 1];
        }
    c.x = permuted;
  }
  pool_run(kernel->rows_chunk, &c, (j->n + c.chunk_cols - 1) / c.chunk_cols);
  free(permuted);
  return 1;
}
