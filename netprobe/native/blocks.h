/* How the fused kernels share work: fixed blocks of elements, contiguous runs of blocks per
 * thread. Included by each kernel family's .c file. */
#ifndef NETPROBE_BLOCKS_H
#define NETPROBE_BLOCKS_H

#include <pthread.h>
#include <stdint.h>

#define BLOCK 16384          /* elements per block: its partial results are kept apart */
/* Fewer elements than this: the calling thread alone. Below it a second thread costs more than it
 * gains while PyTorch's own worker threads still spin after their last parallel region: on two
 * cores a 1 M-element MLP's per-step probes took twice as long with it, a 15.8 M one half. */
#ifndef THREAD_MIN /* a test builds with a smaller one, to run the threads on small data */
#define THREAD_MIN (1 << 22)
#endif
#define MAX_THREADS 256

/* Reduces blocks [first, last) on thread number `thread` (0 is the caller). */
typedef void (*range_fn)(void *job, int thread, int64_t first, int64_t last);

typedef struct {
    range_fn fn;
    void *job;
    int thread;
    int64_t first, last;
} range_t;

static void *run_range(void *arg) {
    const range_t *r = arg;
    r->fn(r->job, r->thread, r->first, r->last);
    return NULL;
}

/* Blocks [0, nblocks) on up to `nthreads` threads, each a contiguous run of them; on the calling
 * thread alone when `elements` is small. A thread the system refuses runs on the caller. */
static void run_blocks(range_fn fn, void *job, int64_t nblocks, int64_t elements, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads > nblocks) nthreads = (int)nblocks;
    if (elements < THREAD_MIN || nthreads < 2) {
        fn(job, 0, 0, nblocks);
        return;
    }
    pthread_t threads[MAX_THREADS];
    range_t ranges[MAX_THREADS];
    int started = 1;
    for (int i = 0; i < nthreads; i++)
        ranges[i] = (range_t){fn, job, i, nblocks * i / nthreads, nblocks * (i + 1) / nthreads};
    for (; started < nthreads; started++)
        if (pthread_create(&threads[started], NULL, run_range, &ranges[started]) != 0) break;
    for (int i = started; i < nthreads; i++) run_range(&ranges[i]);
    run_range(&ranges[0]);
    for (int i = 1; i < started; i++) pthread_join(threads[i], NULL);
}

#endif
