/*
 * One instruction set's few-row kernel, included once per ISA by qkernel.c with these macros set:
 * ISA, TARGET, TR (rows per tile), CFOR(R) (outputs per tile of R rows: 4, 2 or 1), VF/VL, V_ZERO,
 * V_SET1, V_LOAD, V_FMA, V_HSUM, Q8_LOAD(p) (VL bytes -> VL floats), Q4_BLOCK(p, q) (16 bytes =
 * one block of 32 4-bit weights -> 32 / VL vectors in the order of the permuted x: the low
 * nibbles, then the high ones), SCALE(p, i, half) (one scale or bias as float) and PREFETCH(p).
 *
 * A tile is R rows x C outputs with one accumulator each. Per block of 32 inputs, each output's
 * codes are dequantized in registers (s * q + b, one fused multiply-add per vector) and multiplied
 * into each of the tile's rows, so one dequantization serves R rows (AVX2's 16 registers hold
 * up to 8 rows x 1 output or 4 x 2; the old 4-accumulators-per-row kernel fit only 3 rows), and
 * C outputs give one row enough independent sums to hide the multiply-add latency.
 * Invariant: a row's sum for an output runs in one fixed order (the block's vectors in order into
 * one accumulator, blocks in order, then its lanes) whatever R, C, the other rows or the thread,
 * so a row's result is bitwise the same alone or in a batch of up to QMM_MAX_ROWS.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, ISA)
#define NV (32 / VL) /* vectors per block of 32 weights */
#define UNROLL _Pragma("GCC unroll 32")

TARGET static inline __attribute__((always_inline)) void FN(tile)(const qctx *c, int o0, int r0,
                                                                   const int R, const int C,
                                                                   const int bits) {
  const qmm_job *j = c->job;
  const int k = j->k, gs = j->group_size, half = j->half_scales;
  VF acc[TR][4];
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int o = 0; o < C; ++o) acc[r][o] = V_ZERO();
  }
  const uint8_t *w0 = j->w + (size_t)o0 * c->row_bytes;
  const float *x = c->x + (size_t)r0 * k;
  for (int g = 0; g < c->groups; ++g) {
    VF vs[4], vb[4];
    UNROLL for (int o = 0; o < C; ++o) {
      const size_t at = (size_t)(o0 + o) * c->groups + g;
      vs[o] = V_SET1(SCALE(j->scales, at, half));
      vb[o] = V_SET1(SCALE(j->biases, at, half));
    }
    for (int i = g * gs; i < (g + 1) * gs; i += 32) {
      UNROLL for (int o = 0; o < C; ++o) {
        const uint8_t *p = w0 + (size_t)o * c->row_bytes + (size_t)i * bits / 8;
        PREFETCH(p + PREFETCH_BYTES);
        VF q[NV];
        if (bits == 4) {
          Q4_BLOCK(p, q);
        } else {
          UNROLL for (int v = 0; v < NV; ++v) q[v] = Q8_LOAD(p + v * VL);
        }
        UNROLL for (int v = 0; v < NV; ++v) {
          const VF wf = V_FMA(q[v], vs[o], vb[o]);
          UNROLL for (int r = 0; r < R; ++r) acc[r][o] =
              V_FMA(wf, V_LOAD(x + (size_t)r * k + i + v * VL), acc[r][o]);
        }
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int o = 0; o < C; ++o) j->out[(size_t)(r0 + r) * j->n + o0 + o] = V_HSUM(acc[r][o]);
  }
}

#define TILE FN(tile)
#define CHUNK FN(rows_chunk)
#include "qkernel_chunk.h"

#undef UNROLL
#undef NV
#undef FN
#undef CAT
#undef CAT_
#undef ISA
#undef TARGET
#undef TR
#undef CFOR
#undef VF
#undef VL
#undef V_ZERO
#undef V_SET1
#undef V_LOAD
#undef V_FMA
#undef V_HSUM
#undef Q8_LOAD
#undef Q4_BLOCK
#undef SCALE
#undef PREFETCH
