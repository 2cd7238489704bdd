/* The kernels of step.c for one element type, included once per type with T (the element
 * type), S (its name suffix), VT and MT (vectors of LANES elements and of same-width ints),
 * ABS_BITS (every bit but the sign) and T_MAX (the largest finite T) defined. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, S)

static inline VT FN(load_)(const T *p, int64_t m) {
    VT v = {0};
    memcpy(&v, p, (size_t)m * sizeof(T));
    return v;
}

/* The code bytes of LANES elements (or the first m), one per lane: one instruction where the
 * type defines CODES_OF, else shifted out of two words (a generic vector conversion of bytes is
 * scalar code on some compilers). */
static inline MT FN(load_codes_)(const uint8_t *p, int64_t m) {
    uint64_t word[2] = {0, 0};
    memcpy(word, p, (size_t)m);
#ifdef CODES_OF
    return CODES_OF(word);
#else
    return (MT)((CODE_WORDS(word) >> CODE_SHIFTS) & 0xff);
#endif
}

/* LANES elements from p, or the first m of them (then zeros: neutral in every sum below) */
#define LOAD(p, m) ((m) >= LANES ? FN(load_)((p), LANES) : FN(load_)((p), (m)))
#define LOAD_CODES(p, m) ((m) >= LANES ? FN(load_codes_)((p), LANES) : FN(load_codes_)((p), (m)))
/* LANES elements of `size` bytes from v to p, or the first m of them */
#define STORE(p, v, size, m)                                                                    \
    ((m) >= LANES ? memcpy((p), (v), LANES * (size)) : memcpy((p), (v), (size_t)(m) * (size)))
#define SPLAT(x) ((VT){0} + (T)(x))
#define ABS(v) ((VT)((MT)(v) & ABS_BITS))
#define SELECT(mask, a, b) ((VT)(((MT)(a) & (mask)) | ((MT)(b) & ~(mask))))
/* a > b ? a : b per lane (b where either is NaN): one instruction where the type defines VMAX */
#ifdef VMAX
#define MAX(a, b) VMAX(a, b)
#else
#define MAX(a, b) SELECT((a) > (b), (a), (b))
#endif
#define FOLD_COUNT(c) fold(__builtin_convertvector((c), f64xL))
/* Comparisons give lane masks of −1 (true) and 0: `count -= mask` counts the true lanes. */

/* gradients: partials [Σ|g|, Σg², max|g| (NaN where Σ|g| is, as torch.amax), #(|g| not ≤ T_MAX)].
 * Sums run in T over SUB consecutive vectors per lane, then in double. Σ|g| is finite only where
 * every |g| is, so the loop leaves the count of the others to a block whose sums are not: a second
 * pass counts them and sums the block again in double, which keeps an inf or NaN among the
 * values and makes finite the sums of finite values that leave T's range (a diverging run's). */
static void FN(grad_block_)(const job_t *j, const block_t *b, double *p) {
    const T *x = (const T *)j->tensors[b->tensor] + b->start;
    const int64_t n = b->len;
    f64xL l1 = {0}, sq = {0};
    VT top = {0};
    for (int64_t i = 0; i < n; i += SUB * LANES) {
        int64_t end = n - i < SUB * LANES ? n - i : SUB * LANES;
        VT s = {0}, q = {0};
        for (int64_t k = i; k < i + end; k += LANES) {
            VT a = ABS(LOAD(x + k, n - k));
            s += a;
            q += a * a;
            top = MAX(a, top);
        }
        l1 += __builtin_convertvector(s, f64xL);
        sq += __builtin_convertvector(q, f64xL);
    }
    T most = top[0];
    for (int l = 1; l < LANES; l++) most = top[l] > most ? top[l] : most;
    p[0] = fold(l1), p[1] = fold(sq), p[3] = 0;
    p[2] = p[0] != p[0] ? p[0] : (double)most; /* a NaN among the |g| makes Σ|g| NaN */
    if (!isfinite(p[0]) || !isfinite(p[1])) {
        double s = 0, q = 0, nonfinite = 0;
        for (int64_t k = 0; k < n; k++) {
            double a = fabs((double)x[k]);
            nonfinite += !(a <= T_MAX);
            s += a, q += a * a;
        }
        p[0] = s, p[1] = q, p[3] = nonfinite;
    }
}

/* ‖x‖₂: partial [Σx²], as in grad_block. */
static void FN(norm_block_)(const job_t *j, const block_t *b, double *p) {
    const T *x = (const T *)j->tensors[b->tensor] + b->start;
    const int64_t n = b->len;
    f64xL sq = {0};
    for (int64_t i = 0; i < n; i += SUB * LANES) {
        int64_t end = n - i < SUB * LANES ? n - i : SUB * LANES;
        VT q = {0};
        for (int64_t k = i; k < i + end; k += LANES) {
            VT v = LOAD(x + k, n - k);
            q += v * v;
        }
        sq += __builtin_convertvector(q, f64xL);
    }
    p[0] = fold(sq);
    if (isinf(p[0])) { /* as in grad_block: squares past T's range, again in double */
        double q = 0;
        for (int64_t k = 0; k < n; k++) q += (double)x[k] * (double)x[k];
        p[0] = q;
    }
}

#ifdef DYN_AVX512
#include "step_avx512.h"
#else
/* optim_dynamics, gradient side: reads g_t and the code bytes of step t−1 (ignored without
 * `compare`), writes step t's. A code byte: bit 0 g > 0, bit 1 g < 0 (neither for 0 and NaN,
 * as torch.sign), bit 2 z = |g| ≤ zero, bit 3 retained = z_{t−1} ∧ z_t, bit 4 a retained sign
 * flip. Partials [#(|g| ≤ tiny), #z_t, #z_{t−1}, #retained, #retained flips, #flips]. */
typedef struct {
    MT tiny, zero, prev, ret, rflip, flip;
} FN(dyn_counts_);

/* One vector of dyn_grad_block: the code bytes of `v` from `old` (its lanes in `valid`). */
static inline __attribute__((always_inline)) MT FN(dyn_grad_lanes_)(
    VT v, MT old, MT valid, VT zero, VT tiny, FN(dyn_counts_) *n) {
    VT a = ABS(v);
    MT pos = v > 0, neg = v < 0, z = (a <= zero) & valid;
    MT z_prev = -((old >> 2) & 1), ret = z_prev & z;
    MT flip = (-(old & 1) & neg) | (-((old >> 1) & 1) & pos), rflip = flip & ret;
    n->tiny -= (a <= tiny) & valid;
    n->zero -= z;
    n->prev -= z_prev;
    n->ret -= ret;
    n->rflip -= rflip;
    n->flip -= flip;
    return (pos & 1) | (neg & 2) | (z & 4) | (ret & 8) | (rflip & 16);
}

static void FN(dyn_grad_block_)(const job_t *j, const block_t *b, double *p) {
    const T *g = (const T *)j->tensors[b->tensor] + b->start;
    uint8_t *c = j->codes + j->offsets[b->tensor] + b->start;
    const int64_t n = b->len, full = n - n % LANES;
    const VT zero = SPLAT(j->zero), tiny = SPLAT(j->tiny);
    const MT keep = (MT){0} + (j->compare ? -1 : 0), all = (MT){0} - 1;
    FN(dyn_counts_) k = {{0}};
    for (int64_t i = 0; i < full; i += LANES) {
        MT code = FN(dyn_grad_lanes_)(FN(load_)(g + i, LANES),
                                      FN(load_codes_)(c + i, LANES) & keep, all, zero, tiny, &k);
        u8xL bytes = __builtin_convertvector(code, u8xL);
        memcpy(c + i, &bytes, LANES);
    }
    if (full < n) {
        const MT lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
        MT code = FN(dyn_grad_lanes_)(FN(load_)(g + full, n - full),
                                      FN(load_codes_)(c + full, n - full) & keep,
                                      lane < (MT){0} + (int)(n - full), zero, tiny, &k);
        u8xL bytes = __builtin_convertvector(code, u8xL);
        memcpy(c + full, &bytes, (size_t)(n - full));
    }
    p[0] = FOLD_COUNT(k.tiny), p[1] = FOLD_COUNT(k.zero), p[2] = FOLD_COUNT(k.prev);
    p[3] = FOLD_COUNT(k.ret), p[4] = FOLD_COUNT(k.rflip), p[5] = FOLD_COUNT(k.flip);
}

/* optim_dynamics, update side: dw = W_t − W_{t−1} with step t's code bytes. Partials [Σdw²,
 * Σ|dw| over retained, #retained, #local minima, #local maxima]: on a retained sign flip, dw
 * with the sign of g_t (a minimum crossed) or against it. W_t then replaces W_{t−1}: the
 * starting point of the step after. Sums as in grad_block. */
static void FN(dyn_update_block_)(const job_t *j, const block_t *b, double *p) {
    const T *w = (const T *)j->tensors[b->tensor] + b->start;
    T *wp = (T *)j->flat + j->offsets[b->tensor] + b->start;
    const uint8_t *c = j->codes + j->offsets[b->tensor] + b->start;
    const int64_t n = b->len;
    f64xL sq = {0}, moved = {0};
    MT n_ret = {0}, n_min = {0}, n_max = {0};
    for (int64_t i = 0; i < n; i += SUB * LANES) {
        int64_t end = n - i < SUB * LANES ? n - i : SUB * LANES;
        VT q = {0}, mv = {0};
        for (int64_t k = i; k < i + end; k += LANES) {
            VT now = LOAD(w + k, n - k), d = now - LOAD(wp + k, n - k);
            MT code = LOAD_CODES(c + k, n - k);
            MT ret = -((code >> 3) & 1), rflip = -((code >> 4) & 1);
            MT g_pos = -(code & 1), g_neg = -((code >> 1) & 1), d_pos = d > 0, d_neg = d < 0;
            q += d * d;
            mv += (VT)((MT)ABS(d) & ret);
            n_ret -= ret;
            n_min -= rflip & ((d_pos & g_pos) | (d_neg & g_neg));
            n_max -= rflip & ((d_pos & g_neg) | (d_neg & g_pos));
            STORE(wp + k, &now, sizeof(T), n - k);
        }
        sq += __builtin_convertvector(q, f64xL);
        moved += __builtin_convertvector(mv, f64xL);
    }
    p[0] = fold(sq), p[1] = fold(moved), p[2] = FOLD_COUNT(n_ret);
    p[3] = FOLD_COUNT(n_min), p[4] = FOLD_COUNT(n_max);
}
#endif

/* Per tensor [l1, l2, mean_abs, max_abs, nonfinite] into out[n][5], ‖g‖₂ of them all into
 * *total (when given). 0, or -1 when memory ran out. */
int FN(np_grad_stats_)(int64_t n, void *const *g, const int64_t *sizes, double *out,
                       double *total, int nthreads) {
    job_t j = {.fn = FN(grad_block_), .k = 4, .n = n, .sizes = sizes, .tensors = g};
    if (run(&j, nthreads)) return -1;
    double all = 0;
    const double *p = j.partials;
    for (int64_t t = 0; t < n; t++) {
        double l1 = 0, sq = 0, nonfinite = 0, top = 0;
        for (int64_t s = 0; s < sizes[t]; s += BLOCK, p += 4) {
            l1 += p[0], sq += p[1], nonfinite += p[3];
            top = (p[2] > top || p[2] != p[2]) ? p[2] : top; /* NaN once seen */
        }
        double *o = out + 5 * t;
        o[0] = l1, o[1] = sqrt(sq), o[2] = l1 / (double)sizes[t], o[3] = top, o[4] = nonfinite;
        all += sq;
    }
    if (total) *total = sqrt(all);
    release(&j);
    return 0;
}

/* ‖x‖₂ over every element of every tensor into *out. 0, or -1 when memory ran out. */
int FN(np_norm_)(int64_t n, void *const *x, const int64_t *sizes, double *out, int nthreads) {
    job_t j = {.fn = FN(norm_block_), .k = 1, .n = n, .sizes = sizes, .tensors = x};
    if (run(&j, nthreads)) return -1;
    double all = 0, sq;
    const double *p = j.partials;
    for (int64_t t = 0; t < n; t++) {
        p = tensor_sums(p, sizes[t], 1, &sq);
        all += sq;
    }
    *out = sqrt(all);
    release(&j);
    return 0;
}

/* optim_dynamics' gradient metrics into columns 0–5 of out (row stride ld): zero_frac_1e7,
 * zero_frac and, with `compare`, released_frac, retained_frac, flip_frac, flip_frac_all; and
 * the k sampled gradients g[tensor[i]][offset[i]] into sample (the sign map's). 0; -1 when
 * memory ran out; -2, with nothing written, for a sampled entry outside the tensors. */
int FN(np_dyn_grad_)(int64_t n, void *const *g, const int64_t *sizes, uint8_t *codes, int compare,
                     double zero, double tiny, double *out, int64_t ld, int64_t k,
                     const int64_t *tensor, const int64_t *offset, T *sample, int nthreads) {
    for (int64_t i = 0; i < k; i++)
        if (tensor[i] < 0 || tensor[i] >= n || offset[i] < 0 || offset[i] >= sizes[tensor[i]])
            return -2;
    for (int64_t i = 0; i < k; i++) sample[i] = ((const T *)g[tensor[i]])[offset[i]];
    job_t j = {.fn = FN(dyn_grad_block_), .k = 6, .n = n, .sizes = sizes, .tensors = g,
               .codes = codes, .zero = zero, .tiny = tiny, .compare = compare};
    if (run(&j, nthreads)) return -1;
    const double *p = j.partials;
    for (int64_t t = 0; t < n; t++) {
        double q[6];
        p = tensor_sums(p, sizes[t], 6, q);
        double numel = (double)sizes[t], *o = out + ld * t;
        o[0] = q[0] / numel, o[1] = q[1] / numel;
        if (!compare) continue;
        double some_prev = q[2] > 1 ? q[2] : 1, some_retained = q[3] > 1 ? q[3] : 1;
        o[2] = (q[2] - q[3]) / some_prev, o[3] = q[3] / some_prev;
        o[4] = q[4] / some_retained, o[5] = q[5] / numel;
    }
    release(&j);
    return 0;
}

/* optim_dynamics' update metrics into out from column `col` (row stride ld): wdiff_l2 and, with
 * `compare`, wdiff_retained, local_min, local_max; W_t into w_prev. */
int FN(np_dyn_update_)(int64_t n, void *const *w, const int64_t *sizes, void *w_prev,
                       uint8_t *codes, int compare, double *out, int64_t ld, int nthreads) {
    job_t j = {.fn = FN(dyn_update_block_), .k = 5, .n = n, .sizes = sizes, .tensors = w,
               .flat = w_prev, .codes = codes};
    if (run(&j, nthreads)) return -1;
    const double *p = j.partials;
    for (int64_t t = 0; t < n; t++) {
        double q[5];
        p = tensor_sums(p, sizes[t], 5, q);
        double *o = out + ld * t;
        o[0] = sqrt(q[0]);
        if (!compare) continue;
        o[1] = q[1] / (q[2] > 1 ? q[2] : 1), o[2] = q[3], o[3] = q[4];
    }
    release(&j);
    return 0;
}

#include "accuracy.h"

#undef LOAD
#undef LOAD_CODES
#undef STORE
#undef SPLAT
#undef ABS
#undef SELECT
#undef MAX
#undef FOLD_COUNT
#undef FN
