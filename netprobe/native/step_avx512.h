/* optim_dynamics' two loops for float32 with AVX-512 (F and BW), in place of the generic ones of
 * step_kernels.h: the same code bytes, counts and sums, bit for bit (but for the sign of a NaN
 * sum, which no build fixes), in half the instructions.
 * The generic loops turn each comparison into a vector of lane masks and count with vector
 * arithmetic; here comparisons land in mask registers, 64 elements' worth are combined as one
 * 64-bit word (the code bytes' bits are read the same way, 64 bytes at a time) and counted with
 * popcount. The float sums keep the generic order: lane l of a 16-wide float accumulator takes
 * the elements l, l + 16, ... of each run of SUB × LANES, then its double lane l. Included by
 * step_kernels.h for T = float where the compiler targets AVX-512 BW. */
#include <immintrin.h>

#define WORD 64 /* elements per mask word: four vectors of 16 floats */

/* The lanes of elements [0, m) of a word, m ≤ 64. */
static inline uint64_t word_lanes(int64_t m) { return m >= WORD ? ~0ull : (1ull << m) - 1; }

static inline int64_t count(uint64_t bits) { return __builtin_popcountll(bits); }

/* The code bits `bit` of 64 code bytes, as a mask word. */
static inline uint64_t code_bits(__m512i codes, char bit) {
    return _mm512_test_epi8_mask(codes, _mm512_set1_epi8(bit));
}

static inline __m512 abs16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)));
}

/* Lane l of a double accumulator pair (lanes 0–7, 8–15) plus float lane l of v. */
static inline void add_to_doubles(__m512d acc[2], __m512 v) {
    acc[0] = _mm512_add_pd(acc[0], _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    acc[1] = _mm512_add_pd(acc[1], _mm512_cvtps_pd(high));
}

/* Lanes 0 to 15 of a double accumulator pair summed in order, as fold() does. */
static inline double fold_doubles(const __m512d acc[2]) {
    double lanes[16], s = 0;
    _mm512_storeu_pd(lanes, acc[0]);
    _mm512_storeu_pd(lanes + 8, acc[1]);
    for (int l = 0; l < 16; l++) s += lanes[l];
    return s;
}

static void dyn_grad_block_f32(const job_t *j, const block_t *b, double *p) {
    const float *g = (const float *)j->tensors[b->tensor] + b->start;
    uint8_t *c = j->codes + j->offsets[b->tensor] + b->start;
    const int64_t n = b->len;
    const __m512 zero = _mm512_set1_ps((float)j->zero), tiny = _mm512_set1_ps((float)j->tiny);
    const __m512 nil = _mm512_setzero_ps();
    const uint64_t keep = j->compare ? ~0ull : 0; /* step t−1's bits, or none */
    int64_t n_tiny = 0, n_zero = 0, n_prev = 0, n_ret = 0, n_rflip = 0, n_flip = 0;
    for (int64_t i = 0; i < n; i += WORD) {
        const uint64_t lanes = word_lanes(n - i);
        const __m512i old = _mm512_maskz_loadu_epi8(lanes, c + i);
        uint64_t pos = 0, neg = 0, z = 0, t = 0;
        for (int q = 0; q < 4; q++) { /* lanes past the end load as 0: neither sign, masked */
            const __mmask16 in = (__mmask16)(lanes >> (16 * q));
            const __m512 v = _mm512_maskz_loadu_ps(in, g + i + 16 * q), a = abs16(v);
            pos |= (uint64_t)_mm512_cmp_ps_mask(v, nil, _CMP_GT_OQ) << (16 * q);
            neg |= (uint64_t)_mm512_cmp_ps_mask(v, nil, _CMP_LT_OQ) << (16 * q);
            z |= (uint64_t)_mm512_mask_cmp_ps_mask(in, a, zero, _CMP_LE_OQ) << (16 * q);
            t |= (uint64_t)_mm512_mask_cmp_ps_mask(in, a, tiny, _CMP_LE_OQ) << (16 * q);
        }
        const uint64_t was_pos = code_bits(old, 1) & keep, was_neg = code_bits(old, 2) & keep;
        const uint64_t z_prev = code_bits(old, 4) & keep, ret = z_prev & z;
        const uint64_t flip = (was_pos & neg) | (was_neg & pos), rflip = flip & ret;
        n_tiny += count(t), n_zero += count(z), n_prev += count(z_prev);
        n_ret += count(ret), n_rflip += count(rflip), n_flip += count(flip);
        /* The bits are disjoint: adding each where set writes the code byte. */
        __m512i code = _mm512_maskz_mov_epi8(pos, _mm512_set1_epi8(1));
        code = _mm512_mask_add_epi8(code, neg, code, _mm512_set1_epi8(2));
        code = _mm512_mask_add_epi8(code, z, code, _mm512_set1_epi8(4));
        code = _mm512_mask_add_epi8(code, ret, code, _mm512_set1_epi8(8));
        code = _mm512_mask_add_epi8(code, rflip, code, _mm512_set1_epi8(16));
        _mm512_mask_storeu_epi8(c + i, lanes, code);
    }
    p[0] = (double)n_tiny, p[1] = (double)n_zero, p[2] = (double)n_prev;
    p[3] = (double)n_ret, p[4] = (double)n_rflip, p[5] = (double)n_flip;
}

static void dyn_update_block_f32(const job_t *j, const block_t *b, double *p) {
    const float *w = (const float *)j->tensors[b->tensor] + b->start;
    float *wp = (float *)j->flat + j->offsets[b->tensor] + b->start;
    const uint8_t *c = j->codes + j->offsets[b->tensor] + b->start;
    const int64_t n = b->len;
    const __m512 nil = _mm512_setzero_ps();
    __m512d sq[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, moved[2] = {sq[0], sq[0]};
    int64_t n_ret = 0, n_min = 0, n_max = 0;
    for (int64_t i = 0; i < n; i += SUB * LANES) {
        const int64_t end = n - i < SUB * LANES ? n : i + SUB * LANES;
        __m512 q = nil, mv = nil;
        for (int64_t k = i; k < end; k += WORD) {
            const uint64_t lanes = word_lanes(n - k);
            const __m512i code = _mm512_maskz_loadu_epi8(lanes, c + k);
            const uint64_t ret = code_bits(code, 8), rflip = code_bits(code, 16);
            const uint64_t g_pos = code_bits(code, 1), g_neg = code_bits(code, 2);
            uint64_t d_pos = 0, d_neg = 0;
            for (int s = 0; s < 4; s++) { /* lanes past the end load as 0: d = 0 adds nothing */
                const __mmask16 in = (__mmask16)(lanes >> (16 * s));
                const __m512 now = _mm512_maskz_loadu_ps(in, w + k + 16 * s);
                const __m512 d = _mm512_sub_ps(now, _mm512_maskz_loadu_ps(in, wp + k + 16 * s));
                q = _mm512_add_ps(q, _mm512_mul_ps(d, d));
                mv = _mm512_mask_add_ps(mv, (__mmask16)(ret >> (16 * s)), mv, abs16(d));
                d_pos |= (uint64_t)_mm512_cmp_ps_mask(d, nil, _CMP_GT_OQ) << (16 * s);
                d_neg |= (uint64_t)_mm512_cmp_ps_mask(d, nil, _CMP_LT_OQ) << (16 * s);
                _mm512_mask_storeu_ps(wp + k + 16 * s, in, now);
            }
            n_ret += count(ret);
            n_min += count(rflip & ((d_pos & g_pos) | (d_neg & g_neg)));
            n_max += count(rflip & ((d_pos & g_neg) | (d_neg & g_pos)));
        }
        add_to_doubles(sq, q);
        add_to_doubles(moved, mv);
    }
    p[0] = fold_doubles(sq), p[1] = fold_doubles(moved), p[2] = (double)n_ret;
    p[3] = (double)n_min, p[4] = (double)n_max;
}

#undef WORD
