/* A batch of module outputs reduced to the activations probe's statistics: histogram counts,
 * moments and the zero and dead shares, in two reads of the values (netprobe.native.hist).
 *
 * The values, x [rows, cols] row-major, are cut into blocks of BLOCK elements. Sums run in double
 * in LANES independent accumulators (the compiler's vector types) per block, and the blocks'
 * partial sums are added in block order, with no reassociation and no multiply-add contraction:
 * the result is fixed by the data alone, whatever the thread count or vector width. Counts are
 * integers, exact in any order. Threads take contiguous runs of blocks; a small batch runs on the
 * calling thread alone.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 16384
#define LANES 8
#define THREAD_MIN (1 << 18) /* fewer elements than this: one thread */
#define MAX_THREADS 256

typedef double f64x8 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef int64_t i64x8 __attribute__((vector_size(64)));

typedef struct job job_t;

/* One thread's counts: the histogram [bins + 3] (below, bins…, above, NaN), the values ≤ 0, and
 * per column whether some value was not ≤ 0. */
typedef struct {
    int64_t *hist, zeros;
    uint8_t *active;
} tally_t;

typedef void (*block_fn)(const job_t *, int64_t, double *, tally_t *);

struct job {
    block_fn fn;
    const void *x;
    int64_t n, cols, bins;
    const double *edges, *bounds; /* bounds: see np_activation_stats */
    double inv, mean;
    double *partials; /* [blocks][2], then the bounds */
};

typedef struct {
    const job_t *job;
    int64_t first, last;
    tally_t *tally;
} range_t;

static void *run_range(void *arg) {
    const range_t *r = arg;
    for (int64_t b = r->first; b < r->last; b++)
        r->job->fn(r->job, b, r->job->partials + 2 * b, r->tally);
    return NULL;
}

/* Every block of the job, on up to `nthreads` threads, thread i counting into tallies[i]. */
static void run(const job_t *j, int nthreads, tally_t *tallies) {
    const int64_t nblocks = (j->n + BLOCK - 1) / BLOCK;
    if (nthreads > nblocks) nthreads = (int)nblocks;
    if (j->n < THREAD_MIN || nthreads < 2) {
        range_t all = {j, 0, nblocks, &tallies[0]};
        run_range(&all);
        return;
    }
    pthread_t threads[MAX_THREADS];
    range_t ranges[MAX_THREADS];
    int started = 1;
    for (int i = 0; i < nthreads; i++)
        ranges[i] = (range_t){j, nblocks * i / nthreads, nblocks * (i + 1) / nthreads, &tallies[i]};
    for (; started < nthreads; started++)
        if (pthread_create(&threads[started], NULL, run_range, &ranges[started]) != 0) break;
    for (int i = started; i < nthreads; i++) run_range(&ranges[i]); /* a thread refused */
    run_range(&ranges[0]);
    for (int i = 1; i < started; i++) pthread_join(threads[i], NULL);
}

/* Sum of the lanes of a double vector, lane 0 first. */
static inline double fold(f64x8 v) {
    double s = 0;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

/* Lane masks of −1 for the first m lanes: `count -= mask` counts the true ones. */
static inline i64x8 first_lanes(int64_t m) {
    const i64x8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return lane < (i64x8){0} + m;
}

#define T float
#define S f32
#define VT f32x8
#include "hist_kernels.h"
#undef T
#undef S
#undef VT

#define T double
#define S f64
#define VT f64x8
#include "hist_kernels.h"
#undef T
#undef S
#undef VT
