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
 */
#include <stdint.h>
#include <string.h>

#include "exp_nonpositive.h"

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8
#endif

/* Ask for a store row a few keys ahead: rows lie block by block, scattered over the store. */
static inline void prefetch_row(const float *row, int64_t floats) {
    for (int64_t i = 0; i < floats; i += 16) __builtin_prefetch(row + i, 0, 3);
}

/* One row. `dim` is a constant wherever the dispatcher below calls it with one, so the
 * compiler unrolls the dot products and the multiply-adds at the model's head size. */
static inline __attribute__((always_inline)) void decode_row(
    const float *q, const float *key_store, const float *value_store, const int64_t *table,
    int64_t first, int64_t n, float *o, int64_t heads, const int64_t *kv_of, int64_t slot_width,
    int64_t block_size, float scale, float *scores, int64_t *slots, const int64_t dim) {
    /* The row's store slots, walked block by block (an int64 division per key costs more
     * than its dot product). */
    int64_t block = first / block_size, offset = first % block_size;
    for (int64_t t = 0; t < n; ++t) {
        slots[t] = table[block] * block_size + offset;
        if (++offset == block_size) {
            offset = 0;
            ++block;
        }
    }
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
#define ROW(D)                                                                             \
    decode_row(q, key_store, value_store, table, first, n, o, heads, kv_of, slot_width,      \
               block_size, scale, scores, slots, D)
        switch (dim) {
            case 32: ROW(32); break;
            case 64: ROW(64); break;
            case 128: ROW(128); break;
            case 256: ROW(256); break;
            default: ROW(dim); break;
        }
#undef ROW
    }
    return 0;
}
