/*
 * One instruction set's few-row kernel, included once per ISA by qkernel.c with these macros set:
 * ISA, TARGET, TILE (rows per pass over a weight row), VF, VL, V_ZERO, V_SET1, V_LOAD, V_FMA, V_ADD,
 * V_HSUM, Q8_LOAD(p) (VL bytes -> VL floats) and Q4_BLOCK(p, q) (16 bytes = one block of 32 4-bit
 * weights -> 32 / VL vectors in the order of the permuted x: the low nibbles, then the high ones).
 *
 * Each weight vector is dequantized (s * q + b, one fused multiply-add) and multiplied into every
 * row of a tile; the next tile finds the weight row in L1, so memory is read once for all rows.
 * Invariant: a row's sum runs in one fixed order (NV accumulators, one per vector of a block of 32,
 * added in order at the end) whatever the other rows, the tile or the thread, so a row's result is
 * bitwise the same alone or in a batch of up to QMM_MAX_ROWS.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, ISA)
#define NV (32 / VL)               /* vectors per block of 32 weights */
#define UNROLL _Pragma("GCC unroll 32")

TARGET static inline __attribute__((always_inline)) void FN(dot)(const qctx *c, int o, int r0,
                                                                  const int R, const int bits) {
  const qmm_job *j = c->job;
  const int k = j->k, gs = j->group_size;
  VF acc[TILE][NV];
  UNROLL for (int r = 0; r < R; ++r) {
    for (int a = 0; a < NV; ++a) acc[r][a] = V_ZERO();
  }
  const uint8_t *w = j->w + (size_t)o * c->row_bytes;
  const float *s = j->scales + (size_t)o * c->groups;
  const float *b = j->biases + (size_t)o * c->groups;
  const float *x = c->x + (size_t)r0 * k;
  for (int g = 0; g < c->groups; ++g) {
    const VF vs = V_SET1(s[g]), vb = V_SET1(b[g]);
    for (int i = g * gs; i < (g + 1) * gs; i += 32) {
      VF q[NV];
      if (bits == 4) {
        Q4_BLOCK(w + i / 2, q);
      } else {
        UNROLL for (int v = 0; v < NV; ++v) q[v] = Q8_LOAD(w + i + v * VL);
      }
      UNROLL for (int v = 0; v < NV; ++v) {
        const VF wf = V_FMA(q[v], vs, vb);
        UNROLL for (int r = 0; r < R; ++r) acc[r][v % NV] =
            V_FMA(wf, V_LOAD(x + (size_t)r * k + i + v * VL), acc[r][v % NV]);
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    VF sum = acc[r][0];
    for (int a = 1; a < NV; ++a) sum = V_ADD(sum, acc[r][a]);
    j->out[(size_t)(r0 + r) * j->n + o] = V_HSUM(sum);
  }
}

#define DOT_CASE(R, bits) \
  case R:                 \
    FN(dot)(c, o, r0, (R) <= TILE ? (R) : TILE, bits); /* cases past TILE never run */ \
    break;

TARGET static void FN(rows_chunk)(const void *arg, int chunk) {
  const qctx *c = (const qctx *)arg;
  const qmm_job *j = c->job;
  const int o1 = chunk * QMM_CHUNK_COLS + QMM_CHUNK_COLS < j->n ? chunk * QMM_CHUNK_COLS + QMM_CHUNK_COLS : j->n;
  for (int o = chunk * QMM_CHUNK_COLS; o < o1; ++o) {
    for (int r0 = 0; r0 < j->rows; r0 += TILE) {
      const int R = j->rows - r0 < TILE ? j->rows - r0 : TILE;
      if (j->bits == 4) {
        switch (R) {
          DOT_CASE(1, 4) DOT_CASE(2, 4) DOT_CASE(3, 4) DOT_CASE(4, 4)
          DOT_CASE(5, 4) DOT_CASE(6, 4) DOT_CASE(7, 4) DOT_CASE(8, 4)
        }
      } else {
        switch (R) {
          DOT_CASE(1, 8) DOT_CASE(2, 8) DOT_CASE(3, 8) DOT_CASE(4, 8)
          DOT_CASE(5, 8) DOT_CASE(6, 8) DOT_CASE(7, 8) DOT_CASE(8, 8)
        }
      }
    }
  }
}

#undef DOT_CASE
#undef UNROLL
#undef NV
#undef FN
#undef CAT
#undef CAT_
#undef ISA
#undef TARGET
#undef TILE
#undef VF
#undef VL
#undef V_ZERO
#undef V_SET1
#undef V_LOAD
#undef V_FMA
#undef V_ADD
#undef V_HSUM
#undef Q8_LOAD
#undef Q4_BLOCK
