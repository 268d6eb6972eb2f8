/*
 * Declarations shared by the route's three translation units: route.c (which product goes where),
 * rows.c (the few-row kernel) and pool.c (its second thread).
 */
#pragma once

#define EXPORT __attribute__((visibility("default")))

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

/* Products of up to this many rows go to the rows kernel. Measured (benchmarks/rows_bench.py, AMD
 * EPYC, weights streamed): with mlx's (out, in) weights it is 1.3-1.5x faster than OpenBLAS's
 * sgemm at 32 rows on every shape of the embedded model and about even at 48-64; with (in, out)
 * weights within 0.8-1.3x of it at 16-32. A batching scheduler caps its products here: past it,
 * rows go to sgemm and lose their batch invariance. */
enum { MAX_ROWS = 32 };

/*
 * One product for the rows kernel: c[r, j] = alpha * sum_k x[r, k] * op(b)[k, j] (+ beta * c[r, j]).
 * Row r of x is contiguous (x + r * ldx). When weights_by_output, output j's weights are contiguous
 * (w + j * ldw: mlx's (out, in) storage used transposed); otherwise input k's weights are
 * (w + k * ldw: (in, out) storage).
 */
typedef struct {
  int rows, n, k;
  float alpha, beta;
  const float *x;
  long ldx;
  const float *w;
  long ldw;
  float *c;
  long ldc;
  int weights_by_output;
  int cols_per_chunk; /* the columns [i * cols_per_chunk, (i + 1) * cols_per_chunk) form chunk i */
} rows_job;

/* Chunks split the outputs at multiples of this: every kernel's blocks and one-row tiles divide it,
 * so only the last chunk has a ragged end. A one-row product with (in, out) weights sums at most
 * NN_STREAM_COLS outputs per pass down the weights. */
enum { CHUNK_COLS = 96, NN_STREAM_COLS = 384 };

typedef void (*chunk_fn)(const void *job, int chunk);

/* Returns 0 when it cannot run (no memory to repack a transposed x): the caller falls back. */
int rows_sgemm(int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
               const float *b, int ldb, float beta, float *c, int ldc);
const char *rows_isa(void);
int rows_select_isa(const char *name);

/* Runs fn(job, 0 .. chunks - 1), each chunk once, on the calling thread and the pool's worker. */
void pool_run(chunk_fn fn, const void *job, int chunks);
