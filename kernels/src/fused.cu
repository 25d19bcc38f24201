// Fused row ops of the FLUX blocks on CUDA (kernels/src/fused.rs), compiled at run time with
// NVRTC after common.cuh. Statistics are computed in f32 and each output is rounded once.
// Mean and 1/sqrt(var + eps) of a row of D, in every thread of the block.
template <typename T>
__device__ void row_moments(const T* xr, int D, float eps, float* scratch, float* mean, float* rstd) {
    float s = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) s += to_f(xr[j]);
    float m = block_reduce<false>(s, scratch) / D;
    float q = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { float c = to_f(xr[j]) - m; q += c * c; }
    *mean = m;
    *rstd = rsqrtf(block_reduce<false>(q, scratch) / D + eps);
}

// LayerNorm without affine parameters over rows of D; one block per row.
template <typename T>
__device__ void layer_norm_fwd(const T* x, T* y, int D, float eps) {
    extern __shared__ float scratch[];
    const T* xr = x + (long)blockIdx.x * D;
    T* yr = y + (long)blockIdx.x * D;
    float mean, rstd;
    row_moments(xr, D, eps, scratch, &mean, &rstd);
    for (int j = threadIdx.x; j < D; j += blockDim.x) store(yr + j, (to_f(xr[j]) - mean) * rstd);
}
// dx = rstd (dy - mean(dy) - xhat mean(dy xhat)).
template <typename T>
__device__ void layer_norm_bwd(const T* x, const T* dy, T* dx, int D, float eps) {
    extern __shared__ float scratch[];
    long off = (long)blockIdx.x * D;
    const T* xr = x + off;
    const T* gr = dy + off;
    float mean, rstd;
    row_moments(xr, D, eps, scratch, &mean, &rstd);
    float sg = 0.f, sgx = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float g = to_f(gr[j]);
        sg += g;
        sgx += g * (to_f(xr[j]) - mean) * rstd;
    }
    float mg = block_reduce<false>(sg, scratch) / D;
    float mgx = block_reduce<false>(sgx, scratch) / D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float xhat = (to_f(xr[j]) - mean) * rstd;
        store(dx + off + j, rstd * (to_f(gr[j]) - mg - xhat * mgx));
    }
}

// RMSNorm with a weight over rows of D: y = x rstd w; one block per row.
template <typename T>
__device__ void rms_norm_fwd(const T* x, const T* w, T* y, int D, float eps) {
    extern __shared__ float scratch[];
    long off = (long)blockIdx.x * D;
    float q = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { float v = to_f(x[off + j]); q += v * v; }
    float rstd = rsqrtf(block_reduce<false>(q, scratch) / D + eps);
    for (int j = threadIdx.x; j < D; j += blockDim.x) store(y + off + j, to_f(x[off + j]) * rstd * to_f(w[j]));
}
// dx = rstd (w dy - xhat mean(w dy xhat)), xhat = x rstd (the weight is frozen).
template <typename T>
__device__ void rms_norm_bwd(const T* x, const T* w, const T* dy, T* dx, int D, float eps) {
    extern __shared__ float scratch[];
    long off = (long)blockIdx.x * D;
    float q = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x) { float v = to_f(x[off + j]); q += v * v; }
    float rstd = rsqrtf(block_reduce<false>(q, scratch) / D + eps);
    float s = 0.f;
    for (int j = threadIdx.x; j < D; j += blockDim.x)
        s += to_f(w[j]) * to_f(dy[off + j]) * to_f(x[off + j]) * rstd;
    float m = block_reduce<false>(s, scratch) / D;
    for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float xhat = to_f(x[off + j]) * rstd;
        store(dx + off + j, rstd * (to_f(w[j]) * to_f(dy[off + j]) - xhat * m));
    }
}

// RoPE on consecutive pairs of the last dim of x [B, H, S, 2K] with angle tables cos, sin
// [S, K] (f32): (x0 c - x1 s, x1 c + x0 s); sign -1 rotates back (the backward).
template <typename T>
__device__ void rope(const T* x, const float* cos, const float* sin, T* y, long pairs, int S, int K, float sign) {
    for (long p = blockIdx.x * (long)blockDim.x + threadIdx.x; p < pairs; p += (long)gridDim.x * blockDim.x) {
        long t = (p / K) % S;
        int k = (int)(p % K);
        float c = cos[t * K + k], s = sign * sin[t * K + k];
        float x0 = to_f(x[2 * p]), x1 = to_f(x[2 * p + 1]);
        store(y + 2 * p, x0 * c - x1 * s);
        store(y + 2 * p + 1, x1 * c + x0 * s);
    }
}

// GELU with the tanh approximation, and its derivative times dy.
#define GELU_C 0.7978845608028654f  // sqrt(2 / pi)
template <typename T>
__device__ void gelu_fwd(const T* x, T* y, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float t = tanhf(GELU_C * v * (1.f + 0.044715f * v * v));
        store(y + i, 0.5f * v * (1.f + t));
    }
}
template <typename T>
__device__ void gelu_bwd(const T* x, const T* dy, T* dx, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = to_f(x[i]);
        float t = tanhf(GELU_C * v * (1.f + 0.044715f * v * v));
        float d = 0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * GELU_C * (1.f + 3.f * 0.044715f * v * v);
        store(dx + i, d * to_f(dy[i]));
    }
}

#define BOTH(NAME, PARAMS, ARGS) \
    extern "C" __global__ void NAME##_f32 PARAMS(float) { NAME ARGS; } \
    extern "C" __global__ void NAME##_bf16 PARAMS(bf16_bits) { NAME ARGS; }
#define P_LN_FWD(T) (const T* x, T* y, int D, float eps)
#define P_LN_BWD(T) (const T* x, const T* dy, T* dx, int D, float eps)
#define P_RMS_FWD(T) (const T* x, const T* w, T* y, int D, float eps)
#define P_RMS_BWD(T) (const T* x, const T* w, const T* dy, T* dx, int D, float eps)
#define P_ROPE(T) (const T* x, const float* cos, const float* sin, T* y, long pairs, int S, int K, float sign)
BOTH(layer_norm_fwd, P_LN_FWD, (x, y, D, eps))
BOTH(layer_norm_bwd, P_LN_BWD, (x, dy, dx, D, eps))
BOTH(rms_norm_fwd, P_RMS_FWD, (x, w, y, D, eps))
BOTH(rms_norm_bwd, P_RMS_BWD, (x, w, dy, dx, D, eps))
BOTH(rope, P_ROPE, (x, cos, sin, y, pairs, S, K, sign))
#define P_GELU_FWD(T) (const T* x, T* y, long n)
#define P_GELU_BWD(T) (const T* x, const T* dy, T* dx, long n)
BOTH(gelu_fwd, P_GELU_FWD, (x, y, n))
BOTH(gelu_bwd, P_GELU_BWD, (x, dy, dx, n))
