/*
 * Products of fp32 rows with MLX affine-quantized weights (4 or 8 bits; per group of group_size
 * inputs a scale s and a bias b, weight = s * q + b), computed without materialising fp32 weights.
 */
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Products of up to this many rows read the weights once for all rows (decode, verification,
 * catch-up, batches); more rows (prefill) dequantize blocks of weights for sgemm. Equal to the BLAS
 * route's MAX_ROWS, which caps the engine's batched products: every row of a batch then takes this
 * kernel, whose rows are bitwise independent of each other, so a sequence's answer does not depend
 * on the batch around it (the sgemm path sums in another order). */
enum { QMM_MAX_ROWS = 32 };

typedef struct {
  int rows, n, k, bits, group_size;
  int half_scales;      /* scales and biases are IEEE fp16 (the GGUF's own), else fp32 */
  const float *x;       /* rows x k, row-contiguous */
  const uint8_t *w;     /* n x (k * bits / 8) bytes: MLX's packed uint32 words, little-endian */
  const void *scales;   /* n x (k / group_size) */
  const void *biases;   /* n x (k / group_size) */
  float *out;           /* rows x n */
} qmm_job;

/* out = x @ dequantize(w).T; returns 0 on a shape it does not take (bits, group size, k). */
int qmm_run(const qmm_job *job);
const char *qmm_isa(void);
int qmm_select_isa(const char *name);
/* How many products took the few-row kernel / the dequantize-and-sgemm path (tests). */
unsigned long long qmm_calls(int prefill);

#ifdef __cplusplus
}
#endif
