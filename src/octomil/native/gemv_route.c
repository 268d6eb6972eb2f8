/*
 * One-row matrix products for MLX's Linux CPU backend.
 *
 * MLX computes every fp32 matmul with cblas_sgemm, also when one side is a single row or column
 * (decoding one token). OpenBLAS 0.3.21's sgemm packs the whole weight matrix for such a call,
 * so a 576x1536 matrix-vector product takes ~0.15 ms instead of ~0.03 ms through sgemv. This
 * object defines cblas_sgemm, is loaded globally before OpenBLAS so the dynamic linker binds
 * MLX to it, sends products of a few rows (one sgemv per row) or of one column to sgemv and
 * everything else to OpenBLAS's sgemm.
 * Built with -nostdlib: it needs nothing but the two function pointers handed to it at load.
 */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* Up to this many rows, one sgemv per row beats sgemm (576x1536, weights streamed from memory:
 * 2 rows 0.20 vs 0.35 ms, 4 rows 0.34 vs 0.42 ms; 6 rows are even). The later rows read the
 * weights from cache. Decoding has 1 row, plus up to 4 early-exit catch-up rows. */
enum { MAX_ROWS = 4 };

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;
static unsigned long long routed_calls;
static volatile int enabled = 1;

void octomil_gemv_route_init(void *sgemm, void *sgemv) {
  real_sgemm = (sgemm_fn)sgemm;
  real_sgemv = (sgemv_fn)sgemv;
}

unsigned long long octomil_gemv_routed_calls(void) { return routed_calls; }

/* Benchmarks switch the route off between runs to time stock MLX in the same process. */
void octomil_gemv_route_enable(int on) { enabled = on; }

/* BLAS leaves y unread when beta is 0; OpenBLAS's gemv scales y instead, which keeps a NaN. */
static void clear(float *y, int n, int inc) {
  for (int i = 0; i < n; ++i) y[(long)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (!enabled) {
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (order == ROW_MAJOR && m <= MAX_ROWS && n > 1 && k > 0) {
    /* Row r: c[r, 1 x n] = op(a)[r, 1 x k] . op(b)[k x n], i.e. c_r = op(b)^T a_r. */
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
    ++routed_calls;
    return;
  }
  if (order == ROW_MAJOR && n == 1 && m > 1 && k > 0) {
    /* c[m x 1] = op(a)[m x k] . b[k x 1]. */
    int inc_b = trans_b == NO_TRANS ? ldb : 1;
    if (beta == 0.0f) clear(c, m, ldc);
    if (trans_a == NO_TRANS)
      real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
    else
      real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
    ++routed_calls;
    return;
  }
  real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
