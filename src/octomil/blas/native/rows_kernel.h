/*
 * The rows kernel for one instruction set; rows.c includes this file once per instruction set
 * after defining (this file #undefs them again at its end):
 *   ISA                      name suffix (avx512, avx2, generic)
 *   TARGET                   the function attribute that enables the instruction set
 *   VF, VL                   the vector type and its number of floats
 *   V_LOAD(p), V_STORE(p, v), V_SET1(s), V_ZERO(), V_MUL(a, b), V_ADD(a, b)
 *   V_FMA(a, b, c), S_FMA(a, b, c)   a * b + c, both fused or both not: a lane and a scalar agree
 *   V_HSUM(v)                the lanes summed in a fixed order
 *   V_KEEP(v)                keeps a loaded vector in a register: a weight used by several rows is
 *                            loaded once, not folded into each multiply-add as another load
 *   NT_BLK                   outputs per block for (out, in) weights, walked by register tiles of
 *   NT_JB4 .. NT_JB1         4, 3, 2 or 1 rows x this many outputs (each divides NT_BLK);
 *   NT1_JB, NT_MAX_JB        outputs per tile for a one-row product; the largest of them
 *   NN_BV                    vectors of outputs per block for (in, out) weights, walked by tiles of
 *   NN_V4, NN_V2, NN_V1      4, 2 or 1 rows x this many vectors (each divides NN_BV), and
 *   NN_D4                    for 4 or 3 rows read in place (fewer registers free than packed);
 *   NN1_JV, NN_MAX_JV        vectors per tile for a one-row product; the largest of them
 *   NN_PACK_ROWS, NN_KB      from this many rows, blocks of NN_KB inputs are packed (nn_packed)
 *
 * Batch invariance: each output element is computed by the same sequence of operations whatever
 * tile, chunk or thread computes it, so its bits depend on its own row of x, its weights and K
 * only, never on how many rows share the call or where the row sits:
 *   (out, in): one vector accumulator per element, fused multiply-adds over k in steps of VL,
 *              V_HSUM, then the K % VL remaining terms with S_FMA in order;
 *   (in, out): one accumulator per element (a lane or a scalar), S_FMA/V_FMA over k in order
 *              (packed blocks park the sums in memory between blocks: a store and load do not
 *              round).
 * Then alpha * sum, plus beta * c when beta is not 0 (c is not read when it is).
 */

_Static_assert(CHUNK_COLS % NT_BLK == 0 && CHUNK_COLS % NT1_JB == 0, "(out, in) tiles split chunks");
_Static_assert(CHUNK_COLS % (NN_BV * VL) == 0 && CHUNK_COLS % (NN1_JV * VL) == 0,
               "(in, out) tiles split chunks");

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, ISA)
#define INLINE static inline __attribute__((always_inline)) TARGET
#define UNROLL _Pragma("GCC unroll 16")

INLINE void FN(store)(const rows_job *job, int r, int j, float sum) {
  float *c = job->c + r * job->ldc + j;
  float out = job->alpha * sum;
  if (job->beta != 0.0f) out = out + job->beta * *c;
  *c = out;
}

INLINE void FN(nt_tile)(const rows_job *job, int r0, int rb, int j0, int jb, long ahead) {
  VF acc[4][NT_MAX_JB];
  const float *x[4], *w[NT_MAX_JB];
  UNROLL
  for (int r = 0; r < rb; ++r) x[r] = job->x + (r0 + r) * job->ldx;
  UNROLL
  for (int j = 0; j < jb; ++j) w[j] = job->w + (j0 + j) * job->ldw;
  UNROLL
  for (int r = 0; r < rb; ++r)
    UNROLL
    for (int j = 0; j < jb; ++j) acc[r][j] = V_ZERO();
  const int k = job->k, kv = k - k % VL;
  for (int kk = 0; kk < kv; kk += VL) {
    VF wv[NT_MAX_JB];
    UNROLL
    for (int j = 0; j < jb; ++j) {
      wv[j] = V_LOAD(w[j] + kk);
      if (rb > 1) V_KEEP(wv[j]);
      if (ahead) __builtin_prefetch(w[j] + ahead + kk);
    }
    UNROLL
    for (int r = 0; r < rb; ++r) {
      VF xv = V_LOAD(x[r] + kk);
      UNROLL
      for (int j = 0; j < jb; ++j) acc[r][j] = V_FMA(wv[j], xv, acc[r][j]);
    }
  }
  UNROLL
  for (int r = 0; r < rb; ++r)
    UNROLL
    for (int j = 0; j < jb; ++j) {
      float sum = V_HSUM(acc[r][j]);
      for (int kk = kv; kk < k; ++kk) sum = S_FMA(w[j][kk], x[r][kk], sum);
      FN(store)(job, r0 + r, j0 + j, sum);
    }
}

TARGET static void FN(nt_cols)(const rows_job *job, int j0, int j1) {
  const int rows = job->rows;
  int j = j0;
  if (rows == 1) {
    for (; j + NT1_JB <= j1; j += NT1_JB) FN(nt_tile)(job, 0, 1, j, NT1_JB, 0);
    for (; j + 4 <= j1; j += 4) FN(nt_tile)(job, 0, 1, j, 4, 0);
    for (; j < j1; ++j) FN(nt_tile)(job, 0, 1, j, 1, 0);
    return;
  }
  /* A block's weights stay in cache while every row passes over them, 4 rows at a time; the next
   * block's are fetched from memory during the first pass (for one row the hardware's stream
   * prefetch does as well). */
  const long next = NT_BLK * job->ldw;
  for (; j + NT_BLK <= j1; j += NT_BLK) {
    int r = 0;
    long ahead = next;
    for (; r + 4 <= rows; r += 4, ahead = 0)
      for (int t = 0; t < NT_BLK; t += NT_JB4) FN(nt_tile)(job, r, 4, j + t, NT_JB4, ahead);
    if (rows - r == 3)
      for (int t = 0; t < NT_BLK; t += NT_JB3) FN(nt_tile)(job, r, 3, j + t, NT_JB3, ahead);
    else if (rows - r == 2)
      for (int t = 0; t < NT_BLK; t += NT_JB2) FN(nt_tile)(job, r, 2, j + t, NT_JB2, ahead);
    else if (rows - r == 1)
      for (int t = 0; t < NT_BLK; t += NT_JB1) FN(nt_tile)(job, r, 1, j + t, NT_JB1, ahead);
  }
  for (; j < j1; ++j) {
    int r = 0;
    for (; r + 4 <= rows; r += 4) FN(nt_tile)(job, r, 4, j, 1, 0);
    for (; r < rows; ++r) FN(nt_tile)(job, r, 1, j, 1, 0);
  }
}

/* Rows r0.. (rb of them) x jv vectors of outputs from j0, over k in [k0, k1); w points at
 * (k0, j0) of weights with row stride ldw (the matrix itself, or a packed copy of a block). The
 * sums start from 0 at k0 = 0, else from part; they go to part when given, else to c. */
INLINE void FN(nn_tile)(const rows_job *job, int r0, int rb, int j0, int jv, const float *w,
                        long ldw, int k0, int k1, float *part, long ldp) {
  VF acc[4][NN_MAX_JV];
  const float *x[4];
  UNROLL
  for (int r = 0; r < rb; ++r) x[r] = job->x + (r0 + r) * job->ldx;
  UNROLL
  for (int r = 0; r < rb; ++r)
    UNROLL
    for (int v = 0; v < jv; ++v) acc[r][v] = k0 ? V_LOAD(part + r * ldp + v * VL) : V_ZERO();
  for (int kk = k0; kk < k1; ++kk, w += ldw) {
    VF wv[NN_MAX_JV];
    UNROLL
    for (int v = 0; v < jv; ++v) {
      wv[v] = V_LOAD(w + v * VL);
      if (rb > 1) V_KEEP(wv[v]);
    }
    UNROLL
    for (int r = 0; r < rb; ++r) {
      VF xb = V_SET1(x[r][kk]);
      UNROLL
      for (int v = 0; v < jv; ++v) acc[r][v] = V_FMA(xb, wv[v], acc[r][v]);
    }
  }
  const VF alpha = V_SET1(job->alpha), beta = V_SET1(job->beta);
  UNROLL
  for (int r = 0; r < rb; ++r)
    UNROLL
    for (int v = 0; v < jv; ++v) {
      if (part) {
        V_STORE(part + r * ldp + v * VL, acc[r][v]);
        continue;
      }
      float *c = job->c + (r0 + r) * job->ldc + j0 + v * VL;
      VF out = V_MUL(alpha, acc[r][v]);
      if (job->beta != 0.0f) out = V_ADD(out, V_MUL(beta, V_LOAD(c)));
      V_STORE(c, out);
    }
}

/* One tile straight from the weights, over all of k, into c. */
INLINE void FN(nn_direct)(const rows_job *job, int r0, int rb, int j0, int jv) {
  FN(nn_tile)(job, r0, rb, j0, jv, job->w + j0, job->ldw, 0, job->k, 0, 0);
}

/* Many rows: each block of weights (NN_KB inputs x NN_BV vectors of outputs) is copied into a
 * contiguous buffer that stays in L1 while every row passes over it (read in place, the rows of
 * a block sit a power-of-two-ish stride apart and evict each other); the sums wait in part[]
 * between blocks, so each output is still summed over k in order, exactly as by nn_direct. */
TARGET static void FN(nn_packed)(const rows_job *job, int j, int r0, int r1) {
  enum { BW = NN_BV * VL };
  float packed[NN_KB * BW] __attribute__((aligned(64)));
  float part[MAX_ROWS * BW] __attribute__((aligned(64)));
  for (int k0 = 0; k0 < job->k; k0 += NN_KB) {
    const int k1 = k0 + NN_KB < job->k ? k0 + NN_KB : job->k;
    for (int kk = k0; kk < k1; ++kk)
      __builtin_memcpy(packed + (kk - k0) * BW, job->w + kk * job->ldw + j, sizeof(float) * BW);
    int r = r0;
    for (; r + 4 <= r1; r += 4)
      for (int t = 0; t < NN_BV; t += NN_V4)
        FN(nn_tile)(job, r, 4, j + t * VL, NN_V4, packed + t * VL, BW, k0, k1,
                    part + (r - r0) * BW + t * VL, BW);
    for (; r < r1; ++r)
      for (int t = 0; t < NN_BV; t += NN_V1)
        FN(nn_tile)(job, r, 1, j + t * VL, NN_V1, packed + t * VL, BW, k0, k1,
                    part + (r - r0) * BW + t * VL, BW);
  }
  const VF alpha = V_SET1(job->alpha), beta = V_SET1(job->beta);
  for (int r = r0; r < r1; ++r)
    for (int v = 0; v < NN_BV; ++v) {
      float *c = job->c + r * job->ldc + j + v * VL;
      VF out = V_MUL(alpha, V_LOAD(part + (r - r0) * BW + v * VL));
      if (job->beta != 0.0f) out = V_ADD(out, V_MUL(beta, V_LOAD(c)));
      V_STORE(c, out);
    }
}

INLINE void FN(nn_col)(const rows_job *job, int r, int j) {
  const float *x = job->x + r * job->ldx, *w = job->w + j;
  float sum = 0.0f;
  for (int kk = 0; kk < job->k; ++kk) sum = S_FMA(x[kk], w[kk * job->ldw], sum);
  FN(store)(job, r, j, sum);
}

/* One row, width <= NN_STREAM_COLS outputs: the weights read row by row, long contiguous runs as
 * they lie in memory (register tiles would walk down narrow columns), the sums in L1. */
TARGET static void FN(nn_stream)(const rows_job *job, int j0, int width) {
  VF part[NN_STREAM_COLS / VL];
  const int nv = width / VL;
  const float *x = job->x;
  const float *w = job->w + j0;
  for (int v = 0; v < nv; ++v) part[v] = V_ZERO();
  const long ldw = job->ldw;
  int kk = 0;
  for (; kk + 4 <= job->k; kk += 4, w += 4 * ldw) { /* four rows per pass over the sums */
    const VF x0 = V_SET1(x[kk]), x1 = V_SET1(x[kk + 1]);
    const VF x2 = V_SET1(x[kk + 2]), x3 = V_SET1(x[kk + 3]);
    for (int v = 0; v < nv; ++v) {
      VF sum = V_FMA(x0, V_LOAD(w + v * VL), part[v]);
      sum = V_FMA(x1, V_LOAD(w + ldw + v * VL), sum);
      sum = V_FMA(x2, V_LOAD(w + 2 * ldw + v * VL), sum);
      part[v] = V_FMA(x3, V_LOAD(w + 3 * ldw + v * VL), sum);
    }
  }
  for (; kk < job->k; ++kk, w += ldw) {
    const VF xb = V_SET1(x[kk]);
    for (int v = 0; v < nv; ++v) part[v] = V_FMA(xb, V_LOAD(w + v * VL), part[v]);
  }
  const VF alpha = V_SET1(job->alpha), beta = V_SET1(job->beta);
  for (int v = 0; v < nv; ++v) {
    float *c = job->c + j0 + v * VL;
    VF out = V_MUL(alpha, part[v]);
    if (job->beta != 0.0f) out = V_ADD(out, V_MUL(beta, V_LOAD(c)));
    V_STORE(c, out);
  }
}

TARGET static void FN(nn_cols)(const rows_job *job, int j0, int j1) {
  const int rows = job->rows;
  int j = j0;
  if (rows == 1) { /* register tiles for narrow products (attention's are 64-128 wide) */
    if (j1 - j >= 2 * NN1_JV * VL)
      for (int width; (width = (j1 - j < NN_STREAM_COLS ? j1 - j : NN_STREAM_COLS) / VL * VL) > 0;
           j += width)
        FN(nn_stream)(job, j, width);
    for (; j + NN1_JV * VL <= j1; j += NN1_JV * VL) FN(nn_direct)(job, 0, 1, j, NN1_JV);
    for (; j + 4 * VL <= j1; j += 4 * VL) FN(nn_direct)(job, 0, 1, j, 4);
  } else if (rows >= NN_PACK_ROWS) {
    for (; j + NN_BV * VL <= j1; j += NN_BV * VL)
      for (int r = 0; r < rows; r += MAX_ROWS)
        FN(nn_packed)(job, j, r, r + MAX_ROWS < rows ? r + MAX_ROWS : rows);
  } else {
    for (; j + NN_BV * VL <= j1; j += NN_BV * VL) {
      int r = 0;
      for (; r + 4 <= rows; r += 4)
        for (int t = 0; t < NN_BV; t += NN_D4) FN(nn_direct)(job, r, 4, j + t * VL, NN_D4);
      if (rows - r == 3)
        for (int t = 0; t < NN_BV; t += NN_D4) FN(nn_direct)(job, r, 3, j + t * VL, NN_D4);
      else if (rows - r == 2)
        for (int t = 0; t < NN_BV; t += NN_V2) FN(nn_direct)(job, r, 2, j + t * VL, NN_V2);
      else if (rows - r == 1)
        for (int t = 0; t < NN_BV; t += NN_V1) FN(nn_direct)(job, r, 1, j + t * VL, NN_V1);
    }
  }
  for (; j + VL <= j1; j += VL)
    for (int r = 0; r < rows; ++r) FN(nn_direct)(job, r, 1, j, 1);
  for (; j < j1; ++j)
    for (int r = 0; r < rows; ++r) FN(nn_col)(job, r, j);
}

static void FN(run_chunk)(const void *arg, int chunk) {
  const rows_job *job = arg;
  const int j0 = chunk * job->cols_per_chunk;
  const int j1 = j0 + job->cols_per_chunk < job->n ? j0 + job->cols_per_chunk : job->n;
  if (job->weights_by_output)
    FN(nt_cols)(job, j0, j1);
  else
    FN(nn_cols)(job, j0, j1);
}

#undef INLINE
#undef UNROLL
#undef FN
#undef CAT
#undef CAT_

/* The parameters above are consumed: the next instruction set defines its own. */
#undef ISA
#undef TARGET
#undef VF
#undef VL
#undef V_LOAD
#undef V_STORE
#undef V_SET1
#undef V_ZERO
#undef V_MUL
#undef V_ADD
#undef V_FMA
#undef S_FMA
#undef V_HSUM
#undef V_KEEP
#undef NT_BLK
#undef NT_JB4
#undef NT_JB3
#undef NT_JB2
#undef NT_JB1
#undef NT1_JB
#undef NT_MAX_JB
#undef NN_BV
#undef NN_V4
#undef NN_D4
#undef NN_V2
#undef NN_V1
#undef NN1_JV
#undef NN_MAX_JV
#undef NN_PACK_ROWS
#undef NN_KB
