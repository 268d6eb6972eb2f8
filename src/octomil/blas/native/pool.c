/*
 * One worker thread that shares a product's chunks with the calling thread (2-core machines: each
 * thread reads about half the weights).
 *
 * Chunks are claimed from one atomic ticket, so a worker that wakes late (or not at all: a busy
 * machine) only means the caller claims more of them; results never depend on who ran a chunk.
 * The worker polls (yielding its core to any other runnable thread) for a while after each
 * product, since a decode step issues its products tens of microseconds apart, then sleeps on a
 * futex so an idle server costs no CPU. A second caller while a product is in flight, a failed
 * thread start, or a process limited to one CPU runs its chunks alone. The worker is restarted
 * lazily after fork().
 */

#define _GNU_SOURCE
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "native.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* How long the idle worker keeps spinning for the next product before it sleeps. */
enum { SPIN_NS = 100 * 1000 };

/* ticket = generation (24 bits) | chunk count (20 bits) | next chunk to claim (20 bits). */
#define TICKET(gen, count, next) (((gen) << 40) | ((unsigned long long)(count) << 20) | (next))
#define TICKET_GEN(t) ((t) >> 40)
#define TICKET_COUNT(t) ((int)(((t) >> 20) & 0xfffff))
#define TICKET_NEXT(t) ((int)((t)&0xfffff))

static _Atomic unsigned long long ticket;
static _Atomic int chunks_done;       /* by the worker, in the current product */
static _Atomic unsigned wake_word;    /* futex: bumped at every product */
static _Atomic int worker_sleeping;
static atomic_flag busy = ATOMIC_FLAG_INIT;
static chunk_fn job_fn; /* read by the worker only after it claimed a chunk of this product */
static const void *job_arg;
#if defined(__x86_64__)
static unsigned job_csr; /* the caller's rounding and denormal modes, for the worker to match */
#endif
static unsigned long long generation;
static int worker_state; /* 0: not started, 1: running, -1: could not start */

static long futex(_Atomic unsigned *word, int op, unsigned value) {
  return syscall(SYS_futex, (unsigned *)word, op | FUTEX_PRIVATE_FLAG, value, 0, 0, 0);
}

static long long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* The next unclaimed chunk of the product *gen (any product when *gen is ~0), or -1. */
static int claim(unsigned long long *gen) {
  unsigned long long t = atomic_load_explicit(&ticket, memory_order_acquire);
  for (;;) {
    if ((*gen != ~0ULL && TICKET_GEN(t) != *gen) || TICKET_NEXT(t) >= TICKET_COUNT(t)) return -1;
    if (atomic_compare_exchange_weak_explicit(&ticket, &t, t + 1, memory_order_acq_rel,
                                              memory_order_acquire)) {
      *gen = TICKET_GEN(t);
      return TICKET_NEXT(t);
    }
  }
}

static void *worker(void *unused) {
  (void)unused;
  long long idle_since = now_ns();
  for (;;) {
    unsigned seen = atomic_load(&wake_word);
    unsigned long long gen = ~0ULL;
    int chunk = claim(&gen);
    if (chunk >= 0) {
#if defined(__x86_64__)
      if (_mm_getcsr() != job_csr) _mm_setcsr(job_csr);
#endif
      do {
        job_fn(job_arg, chunk);
        atomic_fetch_add_explicit(&chunks_done, 1, memory_order_release);
      } while ((chunk = claim(&gen)) >= 0);
      idle_since = now_ns();
      continue;
    }
    /* Yield rather than pause: the engine's Python thread builds the next layer's graph on
     * these two cores while the products run, and must not wait for an idle spinner. */
    sched_yield();
    if (now_ns() - idle_since < SPIN_NS) continue;
    atomic_store(&worker_sleeping, 1);
    if (atomic_load(&wake_word) == seen) futex(&wake_word, FUTEX_WAIT, seen);
    atomic_store(&worker_sleeping, 0);
    idle_since = now_ns();
  }
  return 0;
}

static void forget_worker(void) { /* in a fork()ed child: the worker thread was not copied */
  worker_state = 0;
  atomic_flag_clear(&busy);
  atomic_store(&worker_sleeping, 0);
}

/* CPUs this process may run on (taskset, container cpusets): with one, a worker only competes. */
static int usable_cpus(void) {
  cpu_set_t set;
  return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 2;
}

static int start_worker(void) {
  static int registered;
  if (worker_state == 0 && usable_cpus() < 2) worker_state = -1;
  if (worker_state == 0) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    worker_state = pthread_create(&thread, &attr, worker, 0) == 0 ? 1 : -1;
    pthread_attr_destroy(&attr);
    if (!registered) registered = pthread_atfork(0, 0, forget_worker) == 0;
  }
  return worker_state == 1;
}

void pool_run(chunk_fn fn, const void *arg, int chunks) {
  if (chunks <= 1 || atomic_flag_test_and_set_explicit(&busy, memory_order_acquire)) {
    for (int i = 0; i < chunks; ++i) fn(arg, i);
    return;
  }
  if (!start_worker()) {
    for (int i = 0; i < chunks; ++i) fn(arg, i);
    atomic_flag_clear_explicit(&busy, memory_order_release);
    return;
  }
  job_fn = fn;
  job_arg = arg;
#if defined(__x86_64__)
  job_csr = _mm_getcsr();
#endif
  atomic_store_explicit(&chunks_done, 0, memory_order_relaxed);
  unsigned long long gen = ++generation & 0xffffff;
  atomic_store_explicit(&ticket, TICKET(gen, chunks, 0), memory_order_release);
  atomic_fetch_add(&wake_word, 1);
  if (atomic_load(&worker_sleeping)) futex(&wake_word, FUTEX_WAKE, 1);
  int mine = 0;
  for (int chunk; (chunk = claim(&gen)) >= 0; ++mine) fn(arg, chunk);
  /* The worker holds at most one chunk now; yield if it was preempted in the middle of it. */
  for (unsigned spins = 0;
       atomic_load_explicit(&chunks_done, memory_order_acquire) != chunks - mine; ++spins) {
    CPU_RELAX();
    if (spins > 4096) sched_yield();
  }
  atomic_flag_clear_explicit(&busy, memory_order_release);
}
