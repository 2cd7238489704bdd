/* The per-step probes' statistics in one pass over each tracked tensor (netprobe.native.step).
 *
 * Every tensor is cut into blocks of BLOCK elements. A block is reduced in LANES independent
 * accumulators, written with the compiler's vector types (one SIMD register, or a few, on any
 * CPU), and its partial results are combined with the other blocks of its tensor in block
 * order. No sum is reassociated and no multiply-add contracted, so every result is fixed by the
 * data alone: the same bits with one thread or many, on any vector width. A lane sums SUB values
 * in the element type, then adds that to a double; counts are ints within a block, doubles beyond
 * (exact below 2^53). Threads take contiguous runs of blocks; a small job runs on the calling
 * thread alone.
 *
 * Built with NETPROBE_MODULE defined, it is also a Python extension module (step_module.h).
 */
#ifdef NETPROBE_MODULE
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* before the standard headers, as Python asks */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blocks.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define LANES 16
#define SUB 16 /* vectors summed in the element type before double: 256 elements */

typedef struct {
    int64_t tensor, start, len;
} block_t;

typedef struct job job_t;
typedef void (*block_fn)(const job_t *, const block_t *, double *);

struct job {
    block_fn fn;
    int k; /* partial results per block */
    int64_t n;
    const int64_t *sizes;
    int64_t *offsets;     /* of each tensor in the flat buffers */
    block_t *blocks;
    double *partials;     /* [blocks][k] */
    void *const *tensors; /* per tensor: its data */
    void *flat;           /* W_{t-1}, tensors end to end */
    uint8_t *codes;       /* one code byte per element, tensors end to end */
    double zero, tiny;
    int compare;
};

/* Blocks [first, last) of a job (a run_blocks range_fn). */
static void reduce_blocks(void *job, int thread, int64_t first, int64_t last) {
    const job_t *j = job;
    (void)thread;
    for (int64_t b = first; b < last; b++) j->fn(j, &j->blocks[b], j->partials + b * j->k);
}

/* The k partial results of a tensor of `size` elements, its blocks summed in block order into
 * q; returns p past them, at the next tensor's. */
static const double *tensor_sums(const double *p, int64_t size, int k, double *q) {
    for (int i = 0; i < k; i++) q[i] = 0;
    for (int64_t s = 0; s < size; s += BLOCK, p += k)
        for (int i = 0; i < k; i++) q[i] += p[i];
    return p;
}

static void release(job_t *j) {
    free(j->blocks);
    free(j->offsets);
    free(j->partials);
}

/* Cuts the tensors into blocks and reduces them all; 0, or -1 when memory ran out. */
static int run(job_t *j, int nthreads) {
    int64_t nblocks = 0, total = 0;
    for (int64_t t = 0; t < j->n; t++) {
        nblocks += (j->sizes[t] + BLOCK - 1) / BLOCK;
        total += j->sizes[t];
    }
    j->blocks = malloc(sizeof(block_t) * (size_t)(nblocks + 1));
    j->offsets = malloc(sizeof(int64_t) * (size_t)(j->n + 1));
    j->partials = calloc((size_t)(nblocks + 1) * (size_t)j->k, sizeof(double));
    if (!j->blocks || !j->offsets || !j->partials) return release(j), -1;
    int64_t b = 0, offset = 0;
    for (int64_t t = 0; t < j->n; t++) {
        j->offsets[t] = offset;
        for (int64_t s = 0; s < j->sizes[t]; s += BLOCK)
            j->blocks[b++] = (block_t){t, s, j->sizes[t] - s < BLOCK ? j->sizes[t] - s : BLOCK};
        offset += j->sizes[t];
    }
    run_blocks(reduce_blocks, j, nblocks, total, nthreads);
    return 0;
}

typedef int32_t i32xL __attribute__((vector_size(4 * LANES)));
typedef int64_t i64xL __attribute__((vector_size(8 * LANES)));
typedef uint32_t u32xL __attribute__((vector_size(4 * LANES)));
typedef uint64_t u64xL __attribute__((vector_size(8 * LANES)));
typedef uint8_t u8xL __attribute__((vector_size(LANES)));
typedef float f32xL __attribute__((vector_size(4 * LANES)));
typedef double f64xL __attribute__((vector_size(8 * LANES)));

/* Sum of the lanes of a double vector, lane 0 first. */
static inline double fold(f64xL v) {
    double s = 0;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

#define T float
#define S f32
#define VT f32xL
#define MT i32xL
#define ABS_BITS 0x7fffffff
#define T_MAX 3.40282347e+38F
#define CODE_WORDS(w) ((u32xL){W4((uint32_t)w[0]), W4((uint32_t)(w[0] >> 32)), W4((uint32_t)w[1]), W4((uint32_t)(w[1] >> 32))})
#define W4(x) x, x, x, x
#define CODE_SHIFTS ((u32xL){0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24, 0, 8, 16, 24})
#ifdef __AVX512F__ /* one instruction; compilers scalarize a generic byte-to-int conversion */
#define CODES_OF(w) ((MT)_mm512_cvtepu8_epi32(_mm_set_epi64x((long long)w[1], (long long)w[0])))
#endif
#ifdef __AVX512F__ /* vmaxps: a > b ? a : b, NaN and all */
#define VMAX(a, b) ((VT)_mm512_max_ps((__m512)(a), (__m512)(b)))
#endif
#ifdef __AVX512BW__ /* optim_dynamics' loops from step_avx512.h */
#define DYN_AVX512
#endif
#include "step_kernels.h"
#undef DYN_AVX512
#undef T
#undef S
#undef VT
#undef MT
#undef ABS_BITS
#undef T_MAX
#undef CODE_WORDS
#undef CODE_SHIFTS
#undef CODES_OF
#undef VMAX

#define T double
#define S f64
#define VT f64xL
#define MT i64xL
#define ABS_BITS 0x7fffffffffffffffLL
#define T_MAX 1.7976931348623157e+308
#define CODE_WORDS(w) ((u64xL){W8(w[0]), W8(w[1])})
#define W8(x) x, x, x, x, x, x, x, x
#define CODE_SHIFTS ((u64xL){0, 8, 16, 24, 32, 40, 48, 56, 0, 8, 16, 24, 32, 40, 48, 56})
#include "step_kernels.h"

#ifdef NETPROBE_MODULE
#include "step_module.h"
#endif
