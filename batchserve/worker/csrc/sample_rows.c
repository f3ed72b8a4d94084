/* LDA sampling on the CPU, float32, one pass per row: amplify, temperature, top-k / top-p,
 * the inverse-CDF draw at the row's uniform.
 *
 * The same rules as worker/sampling.py (its `sample_reference` is the specification):
 * - logits = after + alpha * (after - before), NaN as -inf (built with -ffp-contract=off, so
 *   the products and sums round as torch's separate operations do, bit for bit);
 * - a row is broken (token `invalid`) when either model gave a NaN or its largest amplified
 *   logit is not finite;
 * - a greedy row (temperature below `greedy_below`) takes the first largest logit; its kept
 *   probabilities, which only log-probabilities read, are scored at temperature 1;
 * - top-k keeps a token iff fewer than k tokens are strictly more likely; the nucleus keeps it
 *   iff the top-k mass strictly more likely than it is below top_p of the top-k mass (masses
 *   added in float64, as the reference's are). Ties are kept or dropped together, whatever
 *   order a sort gives them;
 * - the draw: the first token whose float64 running sum of kept probabilities, in vocabulary
 *   order, exceeds uniform * total (the last token if none does).
 * Sorting is a radix sort over the probabilities' bit patterns (non-negative float32s order
 * as their bits do), only in rows that filter, and without a top-k only of the tokens that can
 * be in the nucleus.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "exp_nonpositive.h"

/* keys[0..n) ascending; `spare` holds n more. Three passes of 11, 11 and 10 bits. */
static void radix_sort(uint32_t *keys, uint32_t *spare, int64_t n) {
    uint32_t *from = keys, *to = spare;
    for (int shift = 0; shift < 32; shift += 11) {
        int64_t count[2048] = {0};
        for (int64_t i = 0; i < n; ++i) ++count[(from[i] >> shift) & 2047];
        int64_t total = 0;
        for (int b = 0; b < 2048; ++b) {
            const int64_t c = count[b];
            count[b] = total;
            total += c;
        }
        for (int64_t i = 0; i < n; ++i) to[count[(from[i] >> shift) & 2047]++] = from[i];
        uint32_t *swap = from;
        from = to;
        to = swap;
    }
    if (from != keys) memcpy(keys, from, (size_t)n * sizeof *keys);
}

static inline float float_of(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* The smallest kept probability of a filtering row (+inf: nothing is kept), from the `n`
 * candidates' probabilities sorted ascending (`sorted`, bit patterns): every token when a
 * top-k applies (`k < vocab`), else every token that can be in the nucleus. The masses add up
 * in float64, as the reference's do: in float32 the mass above a tail token can round up to
 * the whole. */
static float keep_threshold(const uint32_t *sorted, int64_t n, int64_t vocab, float top_p,
                            int64_t k) {
    /* Rank r (descending) is value sorted[n - 1 - r]. */
    const float kth = k < vocab ? float_of(sorted[n - k]) : -1.0f;
    double mass = 1.0;
    if (k < vocab) {
        mass = 0.0;
        for (int64_t r = 0; r < n; ++r) {
            const float v = float_of(sorted[n - 1 - r]);
            if (v < kth) break;
            mass += v;
        }
    }
    const double target = (double)top_p * mass;
    double above = 0.0;
    float threshold = INFINITY;
    int64_t r = 0;
    while (r < n) {
        const uint32_t run = sorted[n - 1 - r];
        const float v = float_of(run);
        if (v < kth || !(above < target)) break;
        threshold = v;
        while (r < n && sorted[n - 1 - r] == run) {
            above += v;
            ++r;
        }
    }
    return threshold;
}

/* Returns 0. `kept` may be NULL (no row needs its probabilities). Scratch: 3 * vocab uint32. */
int batchserve_sample_rows(
    const float *after, const float *before, /* [rows, vocab], rows `stride` floats apart */
    int64_t rows, int64_t vocab, int64_t stride,
    const float *alpha, const float *temperature, const float *top_p, const int64_t *top_k,
    const double *uniforms, float greedy_below, int64_t invalid,
    float *amplified, /* out [rows, vocab] */
    float *kept,      /* out [rows, vocab] or NULL */
    int64_t *tokens,  /* out [rows] */
    uint32_t *scratch) {
    for (int64_t row = 0; row < rows; ++row) {
        const float *a = after + row * stride, *b = before + row * stride;
        float *logits = amplified + row * vocab;
        const float scale = alpha[row];
        int nan_in = 0;
        float top = -INFINITY;
#pragma omp simd reduction(| : nan_in) reduction(max : top)
        for (int64_t i = 0; i < vocab; ++i) {
            const float diff = a[i] - b[i];
            const float product = scale * diff;
            float value = a[i] + product;
            nan_in |= (a[i] != a[i]) | (b[i] != b[i]);
            value = value != value ? -INFINITY : value;
            logits[i] = value;
            top = value > top ? value : top;
        }
        const int broken = nan_in || !isfinite(top);
        const int greedy = temperature[row] < greedy_below;
        float *probs = kept ? kept + row * vocab : (float *)scratch;
        if (broken) {
            tokens[row] = invalid;
            if (kept) memset(probs, 0, (size_t)vocab * sizeof *probs);
            continue;
        }
        if (greedy) { /* the first largest logit, as torch's argmax */
            int64_t best = 0;
            while (logits[best] != top) ++best;
            tokens[row] = best;
            if (!kept) continue;
        }
        /* softmax(logits / t): the largest logit gives the largest quotient (t > 0). */
        const float t = greedy ? 1.0f : temperature[row];
        const float shift = top / t;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < vocab; ++i) {
            const float e = exp_nonpositive(logits[i] / t - shift);
            probs[i] = e;
            total += e;
        }
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < vocab; ++i) probs[i] *= inv;
        const int64_t k = (top_k[row] > 0 && top_k[row] < vocab) ? top_k[row] : vocab;
        if (top_p[row] < 1.0f || k < vocab) {
            /* The sort's two vocab-long buffers follow `probs` where it lies in the scratch. */
            uint32_t *keys = kept ? scratch : scratch + vocab;
            uint32_t *spare = kept ? scratch + vocab : keys + vocab;
            int64_t n = vocab;
            if (k < vocab) {
                memcpy(keys, probs, (size_t)vocab * sizeof *keys);
            } else {
                /* Without a top-k, a token with p <= (total - top_p) / (2 vocab) has more than
                 * top_p of the mass above it (total - vocab * p at least): surely out, and
                 * every token above a candidate is one, so only candidates are sorted. */
                double total = 0.0;
#pragma omp simd reduction(+ : total)
                for (int64_t i = 0; i < vocab; ++i) total += probs[i];
                const double bound = 0.5 * (total - (double)top_p[row]) / (double)vocab;
                n = 0;
                for (int64_t i = 0; i < vocab; ++i) {
                    if ((double)probs[i] > bound) memcpy(&keys[n++], &probs[i], sizeof *keys);
                }
            }
            radix_sort(keys, spare, n);
            const float threshold = n ? keep_threshold(keys, n, vocab, top_p[row], k) : INFINITY;
            for (int64_t i = 0; i < vocab; ++i) probs[i] = probs[i] >= threshold ? probs[i] : 0.0f;
        }
        if (greedy) continue;
        double mass = 0.0;
        for (int64_t i = 0; i < vocab; ++i) mass += (double)probs[i];
        const double target = uniforms[row] * mass;
        double running = 0.0;
        int64_t token = vocab - 1;
        for (int64_t i = 0; i < vocab; ++i) {
            running += (double)probs[i];
            if (running > target) {
                token = i;
                break;
            }
        }
        tokens[row] = token;
    }
    return 0;
}
