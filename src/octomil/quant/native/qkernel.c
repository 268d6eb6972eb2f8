/*
 * Quantized products for the qmm extension: MLX affine 4- and 8-bit weights times fp32 rows.
 *
 * Decode reads every weight once per token, so bytes, not arithmetic, set the speed: 8-bit weights
 * are a quarter and 4-bit ones an eighth of fp32 (plus a scale and bias per group of 32: fp16 as
 * in the GGUF, or fp32). MLX's own CPU quantized matmul is scalar; here up to QMM_MAX_ROWS rows
 * share one read of the weights (the few-row kernel in qkernel_isa.h, split by outputs between
 * this thread and the pool's worker), with fp32 activations and arithmetic throughout.
 * (Integer dot products on int16-rounded activations, as llama.cpp's quantized kernels do with
 * int8, were measured too: no faster on AVX2 Zen 2 per row, and they round the activations.)
 * Bigger products (prefill) dequantize the weights in blocks into a small fp32 buffer and hand each
 * block to cblas_sgemm (the process's: OpenBLAS behind Octomil's route), so they run at fp32 GEMM
 * speed for the cost of one extra pass over a block that stays in cache.
 *
 * Compiled for AVX-512, AVX2+FMA+F16C and plain C, picked at run time from what the CPU reports.
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"
#include "qkernel.h"

/* Software prefetch distance: the weights of a tile's outputs are C streams that the hardware
 * prefetcher picks up late at each new chunk (chunks alternate between two threads). */
enum { QMM_CHUNK_COLS = 32, DEQUANT_BLOCK_FLOATS = 1 << 20, PREFETCH_BYTES = 512 };

typedef struct {
  const qmm_job *job;
  const float *x; /* job->x, or for 4 bits each block of 32 inputs as its evens then its odds */
  long row_bytes;
  int groups;
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
#endif

typedef struct {
  const char *name;
  chunk_fn rows_chunk;
} qmm_kernel;

static const qmm_kernel kernels[] = {
#if defined(__x86_64__)
    {"avx512", rows_chunk_avx512},
    {"avx2", rows_chunk_avx2},
#endif
    {"generic", rows_chunk_generic},
};
static const qmm_kernel *chosen;
static _Atomic unsigned long long calls[2];

static int supported(const qmm_kernel *kernel) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (kernel->rows_chunk == rows_chunk_avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("f16c");
  if (kernel->rows_chunk == rows_chunk_avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return kernel->rows_chunk == rows_chunk_generic;
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
  qctx c = {j, j->x, (long)j->k * j->bits / 8, j->k / j->group_size};
  sgemm_fn sgemm = process_sgemm();
  if (j->rows > QMM_MAX_ROWS && sgemm) {
    atomic_fetch_add(&calls[1], 1);
    if (run_prefill(&c, sgemm)) return 1;
  }
  atomic_fetch_add(&calls[0], 1);
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
  pool_run(best()->rows_chunk, &c, (j->n + QMM_CHUNK_COLS - 1) / QMM_CHUNK_COLS);
  free(permuted);
  return 1;
}
