/* Shared by the C kernels (worker/native.py builds each with this header beside it). */
#ifndef BATCHSERVE_EXP_NONPOSITIVE_H
#define BATCHSERVE_EXP_NONPOSITIVE_H
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (a score minus its row's maximum), vectorisable: 2^k times a degree-6
 * polynomial on [-ln2/2, ln2/2] (Cephes' expf coefficients, ~1e-7 relative error). Below -87
 * the result is 0, as float32's own exp underflows there; a NaN stays NaN. */
#pragma omp declare simd notinbranch
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float k = __builtin_floorf(clamped * 1.44269504088896341f + 0.5f);
    const float r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float value = p * scale;
    return x < -87.0f ? 0.0f : (x != x ? x : value);
}

#endif
