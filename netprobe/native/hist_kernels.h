/* The kernels of hist.c for one element type, included once per type with T (the element type),
 * S (its name suffix) and VT (a vector of LANES elements) defined. */
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, S)

/* LANES elements from p as doubles (exactly), or the first m of them, then zeros. */
static inline f64x8 FN(load_)(const T *p, int64_t m) {
    VT v = {0};
    if (m >= LANES)
        memcpy(&v, p, sizeof v);
    else
        memcpy(&v, p, (size_t)m * sizeof(T));
    return __builtin_convertvector(v, f64x8);
}

/* First read: partial [Σx]; into the thread's tally the histogram counts, #(x ≤ 0) and, per
 * column, whether a value is not ≤ 0 (NaN is not). The slot of x is guessed from the edges'
 * spacing and moved to the one with bounds[s] ≤ x < bounds[s + 1], so the counts are those of a
 * binary search in the stored edges (a branchy scalar search, and a vector guess with scalar
 * increments, were 2× and 1.2× slower; copies of the counts, against a run of equal values
 * waiting on one counter, gained nothing). */
static void FN(first_block_)(const job_t *j, int64_t b, double *p, tally_t *t) {
    const int64_t start = b * BLOCK, n = j->n - start < BLOCK ? j->n - start : BLOCK;
    const int64_t full = n - n % LANES;
    const T *x = (const T *)j->x + start;
    f64x8 sum = {0};
    i64x8 zeros = {0};
    for (int64_t i = 0; i < full; i += LANES) {
        f64x8 v = FN(load_)(x + i, LANES);
        sum += v;
        zeros -= v <= 0;
    }
    if (full < n) {
        f64x8 v = FN(load_)(x + full, n - full);
        sum += v;
        zeros -= (v <= 0) & first_lanes(n - full);
    }
    p[0] = fold(sum);
    for (int l = 0; l < LANES; l++) t->zeros += zeros[l];

    for (int64_t i = 0, col = start % j->cols; i < n; col = 0) {
        const int64_t len = j->cols - col < n - i ? j->cols - col : n - i;
        uint8_t *active = t->active + col;
        const T *row = x + i;
        for (int64_t k = 0; k < len; k++) active[k] |= !(row[k] <= 0);
        i += len;
    }

    const double *c = j->bounds, e0 = j->edges[0], inv = j->inv;
    const int64_t bins = j->bins;
    int64_t *hist = t->hist;
    for (int64_t k = 0; k < n; k++) {
        const double v = x[k];
        double guess = (v - e0) * inv; /* NaN, ±inf and far outliers clamped to a valid slot */
        guess = guess > -1 ? guess : -1;
        guess = guess < (double)bins ? guess : (double)bins;
        int64_t s = (int64_t)guess + 1;
        s -= v < c[s];
        s += v >= c[s + 1];
        s = s < bins + 1 ? s : bins + 1; /* +inf */
        if (__builtin_expect(!(c[s] <= v && v < c[s + 1]), 0)) { /* repeated edges, ±inf, NaN */
            while (s > 0 && v < c[s]) s--;
            while (s < bins + 1 && v >= c[s + 1]) s++;
        }
        s = v == v ? s : bins + 2; /* NaN: counted nowhere */
        hist[s]++;
    }
}

/* Second read: partials [Σ(x−μ)², Σ(x−μ)³]. */
static void FN(second_block_)(const job_t *j, int64_t b, double *p, tally_t *t) {
    (void)t;
    const int64_t start = b * BLOCK, n = j->n - start < BLOCK ? j->n - start : BLOCK;
    const int64_t full = n - n % LANES;
    const T *x = (const T *)j->x + start;
    const f64x8 mean = (f64x8){0} + j->mean;
    f64x8 m2 = {0}, m3 = {0};
    for (int64_t i = 0; i < full; i += LANES) {
        f64x8 d = FN(load_)(x + i, LANES) - mean;
        f64x8 d2 = d * d;
        m2 += d2;
        m3 += d2 * d;
    }
    if (full < n) {
        f64x8 d = FN(load_)(x + full, n - full) - mean;
        d = (f64x8)((i64x8)d & first_lanes(n - full));
        f64x8 d2 = d * d;
        m2 += d2;
        m3 += d2 * d;
    }
    p[0] = fold(m2), p[1] = fold(m3);
}

/* For x [rows, cols]: stats [mean, std, skew, zero_frac, dead_frac] and counts [bins + 2]
 * (below, bins…, above) in `edges` [bins + 1]; see the activations probe for the formulas.
 * 0, or -1 when memory ran out. */
int FN(np_activation_stats_)(const T *x, int64_t rows, int64_t cols, const double *edges,
                             int64_t bins, double *stats, int64_t *counts, int nthreads) {
    const int64_t n = rows * cols, nblocks = (n + BLOCK - 1) / BLOCK, slots = bins + 3;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1) nthreads = 1;
    double *partials = calloc((size_t)nblocks * 2 + (size_t)bins + 3, sizeof(double));
    tally_t *tallies = calloc((size_t)nthreads, sizeof(tally_t));
    int64_t *hist = calloc((size_t)nthreads * (size_t)slots, sizeof(int64_t));
    uint8_t *active = calloc((size_t)nthreads * (size_t)cols, 1);
    int status = -1;
    if (!partials || !tallies || !hist || !active) goto done;
    for (int i = 0; i < nthreads; i++)
        tallies[i] = (tally_t){hist + (int64_t)i * slots, 0, active + (int64_t)i * cols};

    job_t j = {.fn = FN(first_block_), .x = x, .n = n, .cols = cols, .bins = bins,
               .edges = edges, .inv = (double)bins / (edges[bins] - edges[0]),
               .partials = partials};
    /* Slot s holds bounds[s] ≤ x < bounds[s + 1]: 0 below e_0, 1 + i in bin i, bins + 1 above;
     * the last edge one ulp up closes the last bin. */
    double *bounds = partials + 2 * nblocks;
    bounds[0] = -INFINITY;
    for (int64_t i = 0; i < bins; i++) bounds[i + 1] = edges[i];
    bounds[bins + 1] = nextafter(edges[bins], INFINITY), bounds[bins + 2] = INFINITY;
    j.bounds = bounds;
    run(&j, nthreads, tallies);
    double total = 0;
    for (int64_t b = 0; b < nblocks; b++) total += partials[2 * b];
    j.mean = total / (double)n;
    j.fn = FN(second_block_);
    run(&j, nthreads, tallies);
    double m2 = 0, m3 = 0;
    for (int64_t b = 0; b < nblocks; b++) m2 += partials[2 * b], m3 += partials[2 * b + 1];

    int64_t zeros = 0, dead = 0;
    for (int64_t s = 0; s < bins + 2; s++) counts[s] = 0;
    for (int i = 0; i < nthreads; i++) {
        zeros += tallies[i].zeros;
        for (int64_t s = 0; s < bins + 2; s++) counts[s] += tallies[i].hist[s];
    }
    for (int64_t c = 0; c < cols; c++) {
        uint8_t seen = 0;
        for (int i = 0; i < nthreads; i++) seen |= tallies[i].active[c];
        dead += !seen;
    }
    m2 /= (double)n, m3 /= (double)n;
    const double std = sqrt(m2);
    stats[0] = j.mean, stats[1] = std, stats[2] = m2 > 0 ? m3 / (m2 * std) : 0;
    stats[3] = (double)zeros / (double)n, stats[4] = (double)dead / (double)cols;
    status = 0;
done:
    free(partials), free(tallies), free(hist), free(active);
    return status;
}

#undef FN
