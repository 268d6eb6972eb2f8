/*
 * One instruction set's few-row kernel on int8 activations (as llama.cpp's quantized dot products),
 * included once per ISA by qkernel.c with these macros set: ISA, TARGET (AVX2 at least), TR (rows
 * per tile), CFOR(R) (outputs per tile of R rows), DOT(u, s) (32 unsigned x 32 signed bytes -> 8
 * int32 lanes, each the sum of 4 adjacent products) and PREFETCH(p).
 *
 * Each row's block of 32 inputs arrives rounded to int8 with its step dx (quantize_rows_int8 in
 * qkernel.c), and each group's sum of the row's exact inputs sx. For an output with scale s and
 * bias b per group, sum(w * x) = s * dx * sum((q - z) * xq) + b * sx + s * z * (sx - dx * sum(xq))
 * with any centre z: the codes meet the rounded inputs in integer multiply-adds (one vpmaddubsw +
 * vpmaddwd, or one vpdpbusd, for 32 weights and a row, against eight widenings, conversions and
 * fused multiply-adds on fp32). The last two terms, per group and row, are summed once per output
 * and row over all groups at a time (group_terms: t = z * (sx - dx * sum(xq)), the inputs'
 * rounding residuals, computed with the rounding). Centring the codes (z = 8 for 4 bits, 128 for
 * 8) makes the rounding errors of the inputs meet |q - z| instead of q: about half the error of
 * llama.cpp's uncentred Q4_1 x Q8_1 product. 4-bit codes (0..15) go into the integer sum as they
 * are (z enters only through t); 8-bit codes are read as q - 128 (a byte's top bit flipped) and
 * multiplied as magnitude times the input with q's sign, so no pair of products can overflow
 * int16 (2 * 128 * 127 < 2^15), and t = 128 * sx. DOT's int32 sums are exact either way, so the
 * maddubs and VNNI variants agree bit for bit.
 *
 * Invariant (as in qkernel_isa.h): a row's result for an output is summed in one fixed order (its
 * blocks' scaled integer sums in order into one vector accumulator, then its lanes, plus its group
 * terms) whatever R, C, the other rows or the thread, so a row's result is bitwise the same alone
 * or in a batch of up to QMM_MAX_ROWS.
 */

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, ISA)
#define UNROLL _Pragma("GCC unroll 32")

TARGET static inline __attribute__((always_inline)) void FN(int8_tile)(const qctx *c, int o0,
                                                                        int r0, const int R,
                                                                        const int C,
                                                                        const int bits) {
  const qmm_job *j = c->job;
  const int k = j->k, half = j->half_scales, blocks = k / 32, per_group = j->group_size / 32;
  __m256 acc[TR][4];
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int o = 0; o < C; ++o) acc[r][o] = _mm256_setzero_ps();
  }
  const uint8_t *w0 = j->w + (size_t)o0 * c->row_bytes;
  const int8_t *xq = c->xq + (size_t)r0 * k;
  const float *dx = c->dx + (size_t)r0 * blocks;
  const __m256i nibble = _mm256_set1_epi8(15), top_bit = _mm256_set1_epi8((char)0x80);
  for (int g = 0; g < c->groups; ++g) {
    __m256 vs[4];
    UNROLL for (int o = 0; o < C; ++o) vs[o] =
        _mm256_set1_ps(scale_f16c(j->scales, (size_t)(o0 + o) * c->groups + g, half));
    for (int blk = g * per_group; blk < (g + 1) * per_group; ++blk) {
      UNROLL for (int o = 0; o < C; ++o) {
        const uint8_t *p = w0 + (size_t)o * c->row_bytes + (size_t)blk * 4 * bits;
        PREFETCH(p + PREFETCH_BYTES);
        __m256i u, signs = top_bit;
        if (bits == 4) { /* low nibbles (the even inputs) in the low lane, high ones above */
          const __m128i raw = _mm_loadu_si128((const __m128i *)p);
          u = _mm256_and_si256(
              _mm256_inserti128_si256(_mm256_castsi128_si256(raw), _mm_srli_epi16(raw, 4), 1),
              nibble);
        } else {
          signs = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), top_bit);
          u = _mm256_abs_epi8(signs);
        }
        UNROLL for (int r = 0; r < R; ++r) {
          __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)r * k + blk * 32));
          if (bits == 8) xv = _mm256_sign_epi8(xv, signs);
          const __m256 step =
              _mm256_mul_ps(vs[o], _mm256_broadcast_ss(dx + (size_t)r * blocks + blk));
          acc[r][o] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(u, xv)), step, acc[r][o]);
        }
      }
    }
  }
  UNROLL for (int r = 0; r < R; ++r) {
    UNROLL for (int o = 0; o < C; ++o) j->out[(size_t)(r0 + r) * j->n + o0 + o] =
        hsum256(acc[r][o]) + group_terms(j, (size_t)(o0 + o) * c->groups, c->groups,
                                         c->sx + (size_t)(r0 + r) * c->groups,
                                         c->t + (size_t)(r0 + r) * c->groups);
  }
}

#define TILE FN(int8_tile)
#define CHUNK FN(int8_chunk)
#include "qkernel_chunk.h"

#undef UNROLL
#undef FN
#undef CAT
#undef CAT_
#undef ISA
#undef TARGET
#undef TR
#undef CFOR
#undef DOT
#undef PREFETCH
