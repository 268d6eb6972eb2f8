/*
 * Many rows (prefill), included by qkernel.c: dequantize a block of outputs' weights into an fp32
 * buffer, then one cblas_sgemm per block (fp32 activations: no rounding of the rows).
 */

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

typedef struct {
  const qctx *c;
  int n0, nb;
  float *buf; /* nb x k */
} dequant_job;

static void dequant_chunk(const void *arg, int chunk) {
  const dequant_job *d = (const dequant_job *)arg;
  const qmm_job *j = d->c->job;
  const int o1 = (chunk + 1) * QMM_CHUNK_COLS < d->nb ? (chunk + 1) * QMM_CHUNK_COLS : d->nb;
  for (int o = chunk * QMM_CHUNK_COLS; o < o1; ++o) {
    const uint8_t *w = j->w + (size_t)(d->n0 + o) * d->c->row_bytes;
    const size_t at = (size_t)(d->n0 + o) * d->c->groups;
    float *dst = d->buf + (size_t)o * j->k;
    const int gs = j->group_size;
    for (int g = 0; g < d->c->groups; ++g) { /* per group, so the compiler vectorizes the loops */
      const float sg = scale_at(j->scales, at + g, j->half_scales);
      const float bg = scale_at(j->biases, at + g, j->half_scales);
      float *out = dst + g * gs;
      if (j->bits == 8) {
        const uint8_t *q = w + g * gs;
        for (int i = 0; i < gs; ++i) out[i] = (float)q[i] * sg + bg;
      } else {
        const uint8_t *q = w + g * gs / 2;
        for (int i = 0; i < gs / 2; ++i) {
          out[2 * i] = (float)(q[i] & 15) * sg + bg;
          out[2 * i + 1] = (float)(q[i] >> 4) * sg + bg;
        }
      }
    }
  }
}

static sgemm_fn process_sgemm(void) {
  static sgemm_fn found;
  static int looked;
  if (!looked) {
    found = (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
    looked = 1;
  }
  return found;
}

static int run_prefill(const qctx *c, sgemm_fn sgemm) {
  const qmm_job *j = c->job;
  int block = DEQUANT_BLOCK_FLOATS / j->k;
  block = block < QMM_CHUNK_COLS ? QMM_CHUNK_COLS : block / QMM_CHUNK_COLS * QMM_CHUNK_COLS;
  if (block > j->n) block = j->n;
  float *buf = (float *)malloc((size_t)block * j->k * sizeof(float));
  if (!buf) return 0;
  for (int n0 = 0; n0 < j->n; n0 += block) {
    dequant_job d = {c, n0, j->n - n0 < block ? j->n - n0 : block, buf};
    pool_run(dequant_chunk, &d, (d.nb + QMM_CHUNK_COLS - 1) / QMM_CHUNK_COLS);
    sgemm(ROW_MAJOR, NO_TRANS, TRANS, j->rows, d.nb, j->k, 1.0f, j->x, j->k, buf, j->k, 0.0f,
          j->out + n0, j->n);
  }
  free(buf);
  return 1;
}
