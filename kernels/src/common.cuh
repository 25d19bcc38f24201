// Helpers every kernel file of this crate starts with: kernels/src/cuda.rs prepends this file to
// each source before NVRTC compiles it (NVRTC gets no include path, and no math.h: hence the
// raw bit patterns). bf16 arrives as its raw 16 bits, the high half of an f32.
struct bf16_bits { unsigned short v; };
__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16_bits x) { return __uint_as_float(((unsigned)x.v) << 16); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
// Round to nearest even, as candle's f32 -> bf16 cast; NaN stays NaN.
__device__ __forceinline__ void store(bf16_bits* p, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p->v = (unsigned short)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    p->v = (unsigned short)(u >> 16);
}

// Block-wide max or sum through shared scratch (blockDim.x floats, a power of two); every
// thread gets the result. The max keeps NaN (fmaxf would drop it), so a NaN input yields a NaN.
template <bool IS_MAX>
__device__ float block_reduce(float v, float* scratch) {
    unsigned tid = threadIdx.x;
    scratch[tid] = v;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (tid < s) {
            float a = scratch[tid], b = scratch[tid + s];
            scratch[tid] = IS_MAX ? ((isnan(a) || a > b) ? a : b) : a + b;
        }
        __syncthreads();
    }
    float r = scratch[0];
    __syncthreads();
    return r;
}
