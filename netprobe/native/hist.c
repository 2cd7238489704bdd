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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"

#define LANES 8

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
    tally_t *tallies; /* one per thread */
};

/* Blocks [first, last) of a job, counted into the thread's tally (a run_blocks range_fn). */
static void reduce_blocks(void *job, int thread, int64_t first, int64_t last) {
    job_t *j = job;
    for (int64_t b = first; b < last; b++) j->fn(j, b, j->partials + 2 * b, &j->tallies[thread]);
}

/* Every block of the job, on up to `nthreads` threads, thread i counting into tallies[i]. */
static void run(job_t *j, int nthreads, tally_t *tallies) {
    j->tallies = tallies;
    run_blocks(reduce_blocks, j, (j->n + BLOCK - 1) / BLOCK, j->n, nthreads);
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
