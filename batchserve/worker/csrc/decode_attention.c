/* Paged decode attention on the CPU, float32: one query per row against the keys its block
 * table names, read where they lie in the store.
 *
 * Plain C with no torch headers, so it builds in well under a second (worker/native.py calls
 * the C compiler once per machine and loads it with ctypes). Per row, three passes over its
 * own keys only (not the batch's longest row):
 *   1. scores[h][t] = scale * q[h] . key[t][h]
 *   2. a softmax over each head's contiguous scores (vectorised exp)
 *   3. out[h] = sum_t weights[h][t] * value[t][h]
 * The store holds [slots, kv_heads, dim]; slot = table[t / block_size] * block_size + t % bs.
 *
 * With AVX-512 and a head size of whole vectors, decode_row_avx512 does the same passes 16 keys
 * at a time: a score per (key, head) is a 32-float dot, and reducing each alone (lane by lane,
 * in order) cost ~8x its multiply-adds. Still one row at a time, its own keys only, so a row's
 * arithmetic never depends on the other rows in the call (batch invariance).
 */
/* GCC vectorises exp_nonpositive's floorf only where float operations are taken not to trap
 * (no flag is read here); otherwise the softmax is a scalar exp per score. Same results. */
#pragma GCC optimize("no-trapping-math")

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "exp_nonpositive.h"

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8
#endif

/* Ask for a store row a few keys ahead: rows lie block by block, scattered over the store. */
static inline void prefetch_row(const float *row, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(row + i, 0, 3);
}

/* The store slots of a row's keys first..first+n-1, walked block by block (an int64 division
 * per key costs more than its dot product). */
static inline void row_slots(const int64_t *table, int64_t first, int64_t n, int64_t block_size,
                             int64_t *slots) {
    int64_t block = first / block_size, offset = first % block_size;
    for (int64_t t = 0; t < n; ++t) {
        slots[t] = table[block] * block_size + offset;
        if (++offset == block_size) {
            offset = 0;
            ++block;
        }
    }
}

/* One row. `dim` is a constant wherever the dispatcher below calls it with one, so the
 * compiler unrolls the dot products and the multiply-adds at the model's head size. */
static inline __attribute__((always_inline)) void decode_row(
    const float *q, const float *key_store, const float *value_store, const int64_t *table,
    int64_t first, int64_t n, float *o, int64_t heads, const int64_t *kv_of, int64_t slot_width,
    int64_t block_size, float scale, float *scores, int64_t *slots, const int64_t dim) {
    row_slots(table, first, n, block_size, slots);
    for (int64_t t = 0; t < n; ++t) { /* scores [heads, n]: each store row read once */
        const float *key = key_store + slots[t] * slot_width;
        if (t + PREFETCH_AHEAD < n) {
            prefetch_row(key_store + slots[t + PREFETCH_AHEAD] * slot_width, slot_width);
        }
        for (int64_t h = 0; h < heads; ++h) {
            const float *qh = q + h * dim;
            const float *kh = key + kv_of[h] * dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < dim; ++d) dot += qh[d] * kh[d];
            scores[h * n + t] = dot * scale;
        }
    }
    for (int64_t h = 0; h < heads; ++h) { /* softmax over each head's contiguous scores */
        float *s = scores + h * n;
        float top = s[0];
        for (int64_t t = 1; t < n; ++t) top = s[t] > top ? s[t] : top;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t t = 0; t < n; ++t) {
            const float e = exp_nonpositive(s[t] - top);
            s[t] = e;
            total += e;
        }
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t t = 0; t < n; ++t) s[t] *= inv;
    }
    for (int64_t i = 0; i < heads * dim; ++i) o[i] = 0.0f;
    for (int64_t t = 0; t < n; ++t) { /* out[h] = sum_t weight[h][t] * value[t][h] */
        const float *value = value_store + slots[t] * slot_width;
        if (t + PREFETCH_AHEAD < n) {
            prefetch_row(value_store + slots[t + PREFETCH_AHEAD] * slot_width, slot_width);
        }
        for (int64_t h = 0; h < heads; ++h) {
            const float w = scores[h * n + t];
            const float *vh = value + kv_of[h] * dim;
            float *oh = o + h * dim;
#pragma omp simd
            for (int64_t d = 0; d < dim; ++d) oh[d] += w * vh[d];
        }
    }
}

#if defined(__AVX512F__)
/* The 16 sums of a[0..15] as one vector (lane j = sum of a[j]'s lanes): a transposing tree,
 * 45 shuffles and adds for 16 scores where GCC's reduction of each took ~30 in one chain. */
static inline __attribute__((always_inline)) __m512 sum16(const __m512 a[16]) {
    __m512 b[8], c[4], d[2];
    for (int j = 0; j < 8; ++j) { /* per 128-bit lane: [a0 a1 a0 a1] halves summed */
        b[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]),
                             _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
    }
    for (int j = 0; j < 4; ++j) { /* per 128-bit lane: keys 4j..4j+3, a quarter each */
        c[j] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0x44),
                             _mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0xee));
    }
    for (int j = 0; j < 2; ++j) { /* lanes: keys 8j..8j+3 halves, keys 8j+4..8j+7 halves */
        d[j] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * j], c[2 * j + 1], 0xdd));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88),
                         _mm512_shuffle_f32x4(d[0], d[1], 0xdd));
}

/* Asks for the keys and values the call reads next, AHEAD_KEYS keys before it reads them and
 * on into the next rows: rows' blocks lie scattered over the store (in 4 KiB pages, where the
 * hardware prefetcher stops), so from memory a row's keys otherwise arrive a few misses at a
 * time (measured: ~1.4x faster with the 8 layers' stores out of cache, ~10% slower in cache).
 * Into L2 (locality 2): keys and values ahead outgrow L1. A prefetch changes no result, so
 * rows stay independent of each other's arithmetic. */
#ifndef AHEAD_KEYS
#define AHEAD_KEYS 64
#endif
typedef struct {
    const float *key_store, *value_store;
    const int64_t *tables, *positions;
    int64_t rows, table_width, block_size, window, slot_width;
    int64_t row, block, offset, left; /* the next key asked for, and its row's keys left */
} ahead_t;

static inline __attribute__((always_inline)) void ask_ahead(ahead_t *a, int64_t keys) {
    for (; keys > 0; --keys) {
        while (a->left == 0) { /* the next row that has keys and stays inside its table */
            if (++a->row >= a->rows) return;
            const int64_t length = a->positions[a->row] + 1;
            const int64_t first =
                (a->window > 0 && length > a->window) ? length - a->window : 0;
            if (length - first <= 0 || length > a->table_width * a->block_size) continue;
            a->block = a->row * a->table_width + first / a->block_size;
            a->offset = first % a->block_size;
            a->left = length - first;
        }
        const int64_t at = (a->tables[a->block] * a->block_size + a->offset) * a->slot_width;
        for (int64_t i = 0; i < a->slot_width; i += 16) {
            __builtin_prefetch(a->key_store + at + i, 0, 2);
            __builtin_prefetch(a->value_store + at + i, 0, 2);
        }
        --a->left;
        if (++a->offset == a->block_size) {
            a->offset = 0;
            ++a->block;
        }
    }
}

/* decode_row's passes for a head size of whole vectors (`dim` % 16 == 0, a constant). */
static inline __attribute__((always_inline)) void decode_row_avx512(
    const float *q, const float *key_store, const float *value_store, const int64_t *table,
    int64_t first, int64_t n, float *o, int64_t heads, const int64_t *kv_of, int64_t slot_width,
    int64_t block_size, float scale, float *scores, int64_t *slots, ahead_t *ahead,
    const int64_t dim) {
    enum { V = 16 };
    const int64_t vecs = dim / V;
    row_slots(table, first, n, block_size, slots);
    const __m512 vscale = _mm512_set1_ps(scale);
    /* 1. scores, 16 keys at a time, asking for as many keys ahead. */
    for (int64_t t0 = 0; t0 < n; t0 += V) {
        const int64_t live = n - t0 < V ? n - t0 : V;
        const __mmask16 mask = (__mmask16)((1u << live) - 1u);
        ask_ahead(ahead, live);
        const float *key[V]; /* lanes past the row's end repeat its last key, then are masked */
        for (int j = 0; j < V; ++j) {
            key[j] = key_store + slots[t0 + (j < live ? j : live - 1)] * slot_width;
        }
        for (int64_t h = 0; h < heads; ++h) {
            const float *qh = q + h * dim;
            const int64_t at = kv_of[h] * dim;
            __m512 acc[V];
            for (int j = 0; j < V; ++j) {
                const float *kh = key[j] + at;
                __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(qh), _mm512_loadu_ps(kh));
                for (int64_t v = 1; v < vecs; ++v) {
                    const __m512 qv = _mm512_loadu_ps(qh + v * V);
                    dot = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kh + v * V), dot);
                }
                acc[j] = dot;
            }
            _mm512_mask_storeu_ps(scores + h * n + t0, mask, _mm512_mul_ps(sum16(acc), vscale));
        }
    }
    /* 2. softmax per head; lanes past the end read as -inf, whose e^x is 0. exp_nonpositive
     * over a 16-float array: GCC makes it one vector of each operation. */
    const __m512 minus_inf = _mm512_set1_ps(-__builtin_inff());
    for (int64_t h = 0; h < heads; ++h) {
        float *s = scores + h * n;
        __m512 top = minus_inf;
        for (int64_t t0 = 0; t0 < n; t0 += V) {
            const __mmask16 mask = (__mmask16)(n - t0 < V ? (1u << (n - t0)) - 1u : 0xffffu);
            top = _mm512_max_ps(top, _mm512_mask_loadu_ps(minus_inf, mask, s + t0));
        }
        const __m512 vtop = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        __m512 total = _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < n; t0 += V) {
            const __mmask16 mask = (__mmask16)(n - t0 < V ? (1u << (n - t0)) - 1u : 0xffffu);
            float x[V] __attribute__((aligned(64)));
            const __m512 sv = _mm512_mask_loadu_ps(minus_inf, mask, s + t0);
            _mm512_store_ps(x, _mm512_sub_ps(sv, vtop));
#pragma omp simd aligned(x : 64)
            for (int j = 0; j < V; ++j) x[j] = exp_nonpositive(x[j]);
            const __m512 e = _mm512_load_ps(x);
            total = _mm512_add_ps(total, e);
            _mm512_mask_storeu_ps(s + t0, mask, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        for (int64_t t0 = 0; t0 < n; t0 += V) {
            const __mmask16 mask = (__mmask16)(n - t0 < V ? (1u << (n - t0)) - 1u : 0xffffu);
            const __m512 e = _mm512_maskz_loadu_ps(mask, s + t0);
            _mm512_mask_storeu_ps(s + t0, mask, _mm512_mul_ps(e, inv));
        }
    }
    /* 3. out[h] = sum_t weight[h][t] * value[t][h], a head at a time so its sums stay in
     * registers; keys alternate over 4 (or fewer, for larger heads) sets of sums, whose
     * chains of multiply-adds then overlap. */
    enum { SETS_MAX = 4 };
    const int64_t sets = dim <= 32 ? 4 : dim <= 64 ? 2 : 1;
    for (int64_t h = 0; h < heads; ++h) {
        const float *w = scores + h * n;
        const float *base = value_store + kv_of[h] * dim;
        __m512 acc[SETS_MAX][256 / V];
        for (int64_t k = 0; k < sets; ++k)
            for (int64_t v = 0; v < vecs; ++v) acc[k][v] = _mm512_setzero_ps();
        int64_t t = 0;
        for (; t + sets <= n; t += sets) {
            for (int64_t k = 0; k < sets; ++k) {
                const __m512 wk = _mm512_set1_ps(w[t + k]);
                const float *vh = base + slots[t + k] * slot_width;
                for (int64_t v = 0; v < vecs; ++v)
                    acc[k][v] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(vh + v * V), acc[k][v]);
            }
        }
        for (int64_t k = 0; t < n; ++t, ++k) {
            const __m512 wk = _mm512_set1_ps(w[t]);
            const float *vh = base + slots[t] * slot_width;
            for (int64_t v = 0; v < vecs; ++v)
                acc[k][v] = _mm512_fmadd_ps(wk, _mm512_loadu_ps(vh + v * V), acc[k][v]);
        }
        float *oh = o + h * dim;
        for (int64_t v = 0; v < vecs; ++v) {
            __m512 sum = acc[0][v];
            for (int64_t k = 1; k < sets; ++k) sum = _mm512_add_ps(sum, acc[k][v]);
            _mm512_storeu_ps(oh + v * V, sum);
        }
    }
}
#endif

/* Returns 0, or -1 when a row has more keys than the scratch space holds (nothing written
 * for it). Keys and values share one head size `dim`. */
int batchserve_decode_attention(
    const float *query,      /* [rows, heads, dim] */
    const float *key_store,  /* [slots, kv_heads, dim] */
    const float *value_store,
    const int64_t *tables,   /* [rows, table_width] block ids */
    const int64_t *positions, /* [rows] each query's position: it reads keys 0..position */
    float *out,              /* [rows, heads, dim] */
    int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, int64_t table_width,
    int64_t block_size, float scale, int64_t window,
    float *scores, /* scratch: [heads, max_keys] */
    int64_t *slots, /* scratch: [max_keys] */
    int64_t max_keys) {
    const int64_t group = heads / kv_heads;
    const int64_t slot_width = kv_heads * dim;
    int64_t kv_of[heads]; /* each query head's KV head (grouped-query attention) */
    for (int64_t h = 0; h < heads; ++h) kv_of[h] = h / group;
#if defined(__AVX512F__)
    ahead_t ahead = {key_store, value_store, tables, positions, rows, table_width, block_size,
                     window, slot_width, -1, 0, 0, 0};
    if (dim == 32 || dim == 64 || dim == 128 || dim == 256) ask_ahead(&ahead, AHEAD_KEYS);
#endif
    for (int64_t row = 0; row < rows; ++row) {
        const float *q = query + row * heads * dim;
        float *o = out + row * heads * dim;
        const int64_t length = positions[row] + 1;
        const int64_t first = (window > 0 && length > window) ? length - window : 0;
        const int64_t n = length - first;
        if (n <= 0) {
            for (int64_t i = 0; i < heads * dim; ++i) o[i] = 0.0f;
            continue;
        }
        /* A row may not read past its block table (nor the scratch, sized for the table). */
        if (length > table_width * block_size || n > max_keys) return -1;
        const int64_t *table = tables + row * table_width;
#define ARGS(...)                                                                          \
    q, key_store, value_store, table, first, n, o, heads, kv_of, slot_width, block_size, scale, \
        scores, slots, __VA_ARGS__
#if defined(__AVX512F__)
#define ROW(D) decode_row_avx512(ARGS(&ahead, D))
#else
#define ROW(D) decode_row(ARGS(D))
#endif
        switch (dim) {
            case 32: ROW(32); break;
            case 64: ROW(64); break;
            case 128: ROW(128); break;
            case 256: ROW(256); break;
            default: decode_row(ARGS(dim)); break;
        }
#undef ROW
#undef ARGS
    }
    return 0;
}
