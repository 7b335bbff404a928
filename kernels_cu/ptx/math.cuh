// Fast special functions used inside the softmax loop.
#pragma once

// 2^x with one MUFU instruction; ex2.approx(-inf) = +0, which the online softmax relies on for masked
// scores and for the first rescale of an empty running max.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// log2(x) with one MUFU instruction (relative error ~2^-22 for normal x).
__device__ __forceinline__ float log2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// tanh through exp2 to ~1e-7 absolute error. tanh.approx.f32 (2^-11 relative) is too coarse here:
// softcap multiplies the error by the cap (e.g. 30), which would exceed fp16 rounding of the scores.
__device__ __forceinline__ float tanh_accurate(float x) {
    const float e = exp2_approx(fminf(2.f * 1.4426950408889634f * x, 126.f));
    return 1.f - __fdividef(2.f, e + 1.f);
}
