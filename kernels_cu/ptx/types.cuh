// Element types without cuda_fp16.h / cuda_bf16.h: NVRTC 13 ships neither header, so 16-bit values
// travel as raw bits and every conversion is one PTX instruction.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// No <math.h> under NVRTC: the IEEE infinity from its bit pattern.
#define CF_INF __int_as_float(0x7f800000)

#define CF_FP16 0
#define CF_BF16 1

// Two floats to one register holding two 16-bit values; `lo` lands in the low half, which is the element
// with the smaller column index in every mma.sync fragment.
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
#if CF_DTYPE == CF_BF16
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// Conversions of one element, by type (the merge kernel converts between types); to_float / from_float
// below pick them by CF_DTYPE.
__device__ __forceinline__ float bf16_to_float(u16 x) { return __uint_as_float(((u32)x) << 16); }  // bf16: fp32's top half

__device__ __forceinline__ float fp16_to_float(u16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}

__device__ __forceinline__ u16 float_to_bf16(float f) {
    u16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

__device__ __forceinline__ u16 float_to_fp16(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

__device__ __forceinline__ float to_float(u16 x) {
#if CF_DTYPE == CF_BF16
    return bf16_to_float(x);
#else
    return fp16_to_float(x);
#endif
}

__device__ __forceinline__ u16 from_float(float f) {
#if CF_DTYPE == CF_BF16
    return float_to_bf16(f);
#else
    return float_to_fp16(f);
#endif
}
