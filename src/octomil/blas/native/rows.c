/*
 * The rows kernel: fp32 products of a few rows (decode rows of several sequences, drafted tokens,
 * catch-up rows) that read the weights once for all rows, with each row's result independent of
 * the others (see rows_kernel.h for the invariant).
 *
 * OpenBLAS's sgemv reads the weights once per row, and its (and BLIS's) sgemm picks blocking and
 * summation order by the number of rows, so a row's bits change with the batch around it. Here the
 * weights are walked in blocks of a few outputs held in registers and cache while every row passes
 * over them, split by output columns between the calling thread and one pool worker.
 *
 * Compiled once for AVX-512, AVX2+FMA and plain vectors (SSE2/NEON) and chosen at run time, so an
 * object built on one machine runs on another. The choice changes rounding (lane count, fused or
 * not), never within a process.
 */

#include <stdlib.h>

#include "native.h"

#if defined(__x86_64__)
#include <immintrin.h>

/* Lanes summed in a fixed order: halves, then pairs, then the last two. */
__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

/* ---- AVX-512 ---------------------------------------------------------------------------------- */
#define ISA avx512
#define TARGET __attribute__((target("avx512f,avx2,fma")))
#define VF __m512
#define VL 16
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_SET1(s) _mm512_set1_ps(s)
#define V_ZERO() _mm512_setzero_ps()
#define V_MUL(a, b) _mm512_mul_ps(a, b)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define S_FMA(a, b, c) _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)))
#define V_HSUM(v) hsum_avx512(v)
#define V_KEEP(v) __asm__("" : "+v"(v))
#define NT_BLK 16
#define NT_JB4 4
#define NT_JB3 4
#define NT_JB2 8
#define NT_JB1 8
#define NT1_JB 8
#define NT_MAX_JB 8
#define NN_BV 6
#define NN_V4 3
#define NN_D4 3
#define NN_V2 3
#define NN_V1 6
#define NN1_JV 6
#define NN_MAX_JV 6
#define NN_PACK_ROWS 8
#define NN_KB 64

TARGET static inline float hsum_avx512(__m512 v) {
  __m256 half = _mm256_add_ps(_mm512_castps512_ps256(v),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  return hsum_avx2(half);
}

#include "rows_kernel.h"


/* ---- AVX2 + FMA ------------------------------------------------------------------------------- */
#define ISA avx2
#define TARGET __attribute__((target("avx2,fma")))
#define VF __m256
#define VL 8
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_SET1(s) _mm256_set1_ps(s)
#define V_ZERO() _mm256_setzero_ps()
#define V_MUL(a, b) _mm256_mul_ps(a, b)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define S_FMA(a, b, c) _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)))
#define V_HSUM(v) hsum_avx2(v)
#define V_KEEP(v) __asm__("" : "+x"(v))
#define NT_BLK 12
#define NT_JB4 3
#define NT_JB3 3
#define NT_JB2 4
#define NT_JB1 6
#define NT1_JB 8
#define NT_MAX_JB 8
#define NN_BV 6
#define NN_V4 3
#define NN_D4 2
#define NN_V2 3
#define NN_V1 6
#define NN1_JV 12
#define NN_MAX_JV 12
#define NN_PACK_ROWS 8
#define NN_KB 64

#include "rows_kernel.h"

#endif /* __x86_64__ */

/* ---- Plain 4-float vectors (SSE2, NEON), not fused: the file is built with -ffp-contract=off -- */
typedef float v4f __attribute__((vector_size(16)));

static inline v4f load_v4f(const float *p) {
  v4f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

static inline void store_v4f(float *p, v4f v) { __builtin_memcpy(p, &v, sizeof v); }

#define ISA generic
#define TARGET
#define VF v4f
#define VL 4
#define V_LOAD(p) load_v4f(p)
#define V_STORE(p, v) store_v4f(p, v)
#define V_SET1(s) ((v4f){(s), (s), (s), (s)})
#define V_ZERO() ((v4f){0.0f, 0.0f, 0.0f, 0.0f})
#define V_MUL(a, b) ((a) * (b))
#define V_ADD(a, b) ((a) + (b))
#define V_FMA(a, b, c) ((a) * (b) + (c))
#define S_FMA(a, b, c) ((a) * (b) + (c))
#define V_HSUM(v) (((v)[0] + (v)[2]) + ((v)[1] + (v)[3]))
#define V_KEEP(v) ((void)0)
#define NT_BLK 12
#define NT_JB4 2
#define NT_JB3 2
#define NT_JB2 4
#define NT_JB1 4
#define NT1_JB 4
#define NT_MAX_JB 4
#define NN_BV 4
#define NN_V4 2
#define NN_D4 2
#define NN_V2 2
#define NN_V1 4
#define NN1_JV 4
#define NN_MAX_JV 4
#define NN_PACK_ROWS 8
#define NN_KB 64

#include "rows_kernel.h"

/* ---- Choosing the instruction set and splitting the work ----------------------------------- */

typedef struct {
  const char *name;
  chunk_fn run;
} isa_kernel;

static const isa_kernel kernels[] = {
#if defined(__x86_64__)
    {"avx512", run_chunk_avx512},
    {"avx2", run_chunk_avx2},
#endif
    {"generic", run_chunk_generic},
};

static const isa_kernel *chosen;

static int supported(const isa_kernel *kernel) {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (kernel->run == run_chunk_avx512) return __builtin_cpu_supports("avx512f");
  if (kernel->run == run_chunk_avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return kernel->run == run_chunk_generic;
}

static const isa_kernel *best(void) {
  if (!chosen)
    for (unsigned i = 0; i < sizeof kernels / sizeof kernels[0]; ++i)
      if (supported(&kernels[i])) {
        chosen = &kernels[i];
        break;
      }
  return chosen;
}

const char *rows_isa(void) { return best()->name; }

/* Tests run every instruction set this CPU has; returns 0 for one it lacks. */
int rows_select_isa(const char *name) {
  for (unsigned i = 0; i < sizeof kernels / sizeof kernels[0]; ++i) {
    const char *a = kernels[i].name, *b = name;
    while (*a && *a == *b) ++a, ++b;
    if (*a == *b && supported(&kernels[i])) {
      chosen = &kernels[i];
      return 1;
    }
  }
  return 0;
}

/* Below this many multiply-adds (attention's per-head products) the product stays on the calling
 * thread: waking the worker would cost more than it saves. Splitting never changes a result. */
enum { PARALLEL_MIN_WORK = 1 << 16, CHUNKS = 16, CHUNK_ALIGN = CHUNK_COLS };

int rows_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
               const float *b, int ldb, float beta, float *c, int ldc) {
  rows_job job = {m, n, k, alpha, beta, a, lda, b, ldb, c, ldc, trans_b != NO_TRANS, n};
  float *packed = 0;
  if (trans_a != NO_TRANS) { /* x is stored (k, m): copy its rows out once, contiguous */
    packed = malloc(sizeof(float) * m * k);
    if (!packed) return 0;
    for (int r = 0; r < m; ++r)
      for (int kk = 0; kk < k; ++kk) packed[(long)r * k + kk] = a[(long)kk * lda + r];
    job.x = packed;
    job.ldx = k;
  }
  int chunks = 1;
  if ((long)m * n * k >= PARALLEL_MIN_WORK) {
    /* (in, out) weights and one row: fewer, wider chunks, so each pass reads longer runs. */
    const int split = m == 1 && trans_b == NO_TRANS ? 4 : CHUNKS;
    int cols = (n + split - 1) / split;
    job.cols_per_chunk = (cols + CHUNK_ALIGN - 1) / CHUNK_ALIGN * CHUNK_ALIGN;
    chunks = (n + job.cols_per_chunk - 1) / job.cols_per_chunk;
  }
  pool_run(best()->run, &job, chunks);
  free(packed);
  return 1;
}
