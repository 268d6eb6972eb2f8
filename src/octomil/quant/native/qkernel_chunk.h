/*
 * The chunk function of one few-row kernel, included at the end of qkernel_isa.h and
 * qkernel_int8.h with TILE (the kernel's tile function: tile(c, o0, r0, R, C, bits)), CHUNK (the
 * chunk function's name), TARGET, TR and CFOR(R) set: outputs [chunk * c->chunk_cols, ...) for each
 * tile of up to TR rows, the chunk's outputs CFOR(R) at a time (the chunk's codes stay in cache
 * for the next tile of rows), with every tile shape a constant for the compiler.
 */

#define TILE_CASE(R, C, bits)                                     \
  case R:                                                         \
    if ((R) <= TR) TILE(c, o, r0, (R) <= TR ? (R) : 1, C, bits); \
    break;
#define TILE_SWITCH(C, bits)                                                                \
  switch (R) {                                                                              \
    TILE_CASE(1, C, bits) TILE_CASE(2, C, bits) TILE_CASE(3, C, bits) TILE_CASE(4, C, bits) \
    TILE_CASE(5, C, bits) TILE_CASE(6, C, bits) TILE_CASE(7, C, bits) TILE_CASE(8, C, bits) \
  }
#define CHUNK_BODY(bits)                         \
  do {                                           \
    for (; o + CFOR(R) <= o_end; o += CFOR(R)) { \
      if (CFOR(R) == 4) {                        \
        TILE_SWITCH(4, bits)                     \
      } else if (CFOR(R) == 2) {                 \
        TILE_SWITCH(2, bits)                     \
      } else {                                   \
        TILE_SWITCH(1, bits)                     \
      }                                          \
    }                                            \
    for (; o < o_end; ++o) TILE_SWITCH(1, bits)  \
  } while (0)

TARGET static void CHUNK(const void *arg, int chunk) {
  const qctx *c = (const qctx *)arg;
  const qmm_job *j = c->job;
  const int o_end = (chunk + 1) * c->chunk_cols < j->n ? (chunk + 1) * c->chunk_cols : j->n;
  for (int r0 = 0; r0 < j->rows; r0 += TR) {
    const int R = j->rows - r0 < TR ? j->rows - r0 : TR;
    int o = chunk * c->chunk_cols;
    if (j->bits == 4) {
      CHUNK_BODY(4);
    } else {
      CHUNK_BODY(8);
    }
  }
}

#undef CHUNK_BODY
#undef TILE_SWITCH
#undef TILE_CASE
#undef TILE
#undef CHUNK
