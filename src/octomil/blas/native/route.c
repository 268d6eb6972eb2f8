/*
 * Which fp32 products MLX's Linux CPU backend computes where.
 *
 * MLX computes every fp32 matmul with cblas_sgemm, also when one side is a few rows (decoding one
 * token, or one per sequence in a batch). OpenBLAS 0.3.21's sgemm packs the whole weight matrix for
 * such a call (a 576x1536 one-row product: ~0.15 ms vs ~0.03 ms through sgemv), and neither its sgemv
 * (once per row) nor any sgemm (summation order chosen by the row count) serves a batch of rows
 * cheaply *and* gives each row the bits it gets alone. This object defines cblas_sgemm and is
 * loaded globally before OpenBLAS, so the dynamic linker binds MLX to it:
 *   up to MAX_ROWS rows  -> the rows kernel (rows.c): weights read once, each row batch-invariant;
 *   one column           -> OpenBLAS's sgemv;
 *   anything else        -> OpenBLAS's sgemm (prefill).
 * Benchmarks switch to "off" (everything through sgemm, stock MLX) or "sgemv" (the previous route:
 * one sgemv per row up to 4 rows) to compare in one process.
 */

#include <stdatomic.h>

#include "native.h"

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

enum { MODE_OFF = 0, MODE_ROWS = 1, MODE_SGEMV = 2, SGEMV_MAX_ROWS = 4 };

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static _Atomic unsigned long long routed_calls;
static _Atomic int mode = MODE_ROWS;

EXPORT void octomil_route_init(void *sgemm, void *sgemv) {
  real_sgemm = (sgemm_fn)sgemm;
  real_sgemv = (sgemv_fn)sgemv;
}

EXPORT unsigned long long octomil_route_calls(void) { return routed_calls; }
EXPORT void octomil_route_set_mode(int new_mode) { mode = new_mode; }
EXPORT int octomil_route_mode(void) { return mode; }
EXPORT int octomil_route_max_rows(void) { return MAX_ROWS; }
EXPORT const char *octomil_rows_isa(void) { return rows_isa(); }
EXPORT int octomil_rows_select_isa(const char *name) { return rows_select_isa(name); }

/* BLAS leaves y unread when beta is 0; OpenBLAS's gemv scales y instead, which keeps a NaN. */
static void clear(float *y, int n, int inc) {
  for (int i = 0; i < n; ++i) y[(long)i * inc] = 0.0f;
}

/* The previous route: c_r = op(b)^T a_r, one sgemv per row. */
static void sgemv_rows(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a,
                       int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  for (int r = 0; r < m; ++r) {
    const float *a_r = trans_a == NO_TRANS ? a + (long)r * lda : a + r;
    int inc_a = trans_a == NO_TRANS ? 1 : lda;
    float *c_r = c + (long)r * ldc;
    if (beta == 0.0f) clear(c_r, n, 1);
    if (trans_b == NO_TRANS)
      real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a_r, inc_a, beta, c_r, 1);
    else
      real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a_r, inc_a, beta, c_r, 1);
  }
}

/* Direct entries for benchmarks and tests, whatever the mode and row count (row-major only). */
EXPORT void octomil_sgemv_rows(int trans_a, int trans_b, int m, int n, int k, float alpha,
                               const float *a, int lda, const float *b, int ldb, float beta,
                               float *c, int ldc) {
  sgemv_rows(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

EXPORT int octomil_rows_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha,
                              const float *a, int lda, const float *b, int ldb, float beta,
                              float *c, int ldc) {
  return rows_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

EXPORT void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const float *a, int lda, const float *b, int ldb, float beta, float *c,
                        int ldc) {
  const int how = mode;
  if (how != MODE_OFF && order == ROW_MAJOR && m > 0 && n > 0 && k > 0) {
    if (how == MODE_ROWS && m <= MAX_ROWS &&
        rows_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)) {
      atomic_fetch_add_explicit(&routed_calls, 1, memory_order_relaxed);
      return;
    }
    if (how == MODE_SGEMV && m <= SGEMV_MAX_ROWS && n > 1) {
      sgemv_rows(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      atomic_fetch_add_explicit(&routed_calls, 1, memory_order_relaxed);
      return;
    }
    if (n == 1 && m > 1) { /* c[m x 1] = op(a)[m x k] . b[k x 1] */
      int inc_b = trans_b == NO_TRANS ? ldb : 1;
      if (beta == 0.0f) clear(c, m, ldc);
      if (trans_a == NO_TRANS)
        real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
      else
        real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
      atomic_fetch_add_explicit(&routed_calls, 1, memory_order_relaxed);
      return;
    }
  }
  real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
