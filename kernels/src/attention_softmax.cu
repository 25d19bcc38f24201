// The elementwise and row work of chunked attention on CUDA (kernels/src/softmax.rs), compiled
// at run time with NVRTC after common.cuh.
//
// Scores arrive raw (Q K^T, f32, [rows, S] with rows = batch x heads x chunk rows); the scale
// and the reference isolation mask are applied here, so neither is ever stored. Query row r of
// a chunk is token q_start + (r % L) of the joint sequence; token groups come as one u32 per
// token (0: text and target, g > 0: reference g) and a query of group g > 0 may not see a key
// of another group h > 0.
__device__ __forceinline__ bool blocked(const unsigned* groups, int has_mask, unsigned gq, int j) {
    if (!has_mask || gq == 0u) return false;
    unsigned gk = groups[j];
    return gk != 0u && gk != gq;
}

// lse[r] = log sum_j exp(scale * s[r, j]) over the keys row r may see. One block per row; each
// thread keeps a running max and a sum rescaled to it (one pass over the row).
extern "C" __global__ void row_logsumexp(const float* s, const unsigned* groups, float* lse,
                                         int L, int S, int q_start, float scale, int has_mask) {
    extern __shared__ float scratch[];
    long r = blockIdx.x;
    const float* x = s + r * (long)S;
    unsigned gq = has_mask ? groups[q_start + (int)(r % L)] : 0u;
    float m = __int_as_float(0xff800000); // -inf
    float sum = 0.f;
    for (int j = threadIdx.x; j < S; j += blockDim.x) {
        if (blocked(groups, has_mask, gq, j)) continue;
        float v = x[j] * scale;
        if (v > m) { sum = sum * expf(m - v) + 1.f; m = v; }
        else sum += expf(v - m);
    }
    float big = block_reduce<true>(m, scratch);
    float mine = (sum == 0.f) ? 0.f : sum * expf(m - big);
    float total = block_reduce<false>(mine, scratch);
    if (threadIdx.x == 0) lse[r] = big + logf(total);
}

// p[r, j] = exp(scale * s[r, j] - lse[r]), 0 where blocked, in the output type.
template <typename T>
__device__ void probs(const float* s, const float* lse, const unsigned* groups, T* p,
                      long n, int L, int S, int q_start, float scale, int has_mask) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / S;
        int j = (int)(i - r * S);
        unsigned gq = has_mask ? groups[q_start + (int)(r % L)] : 0u;
        float v = blocked(groups, has_mask, gq, j) ? 0.f : expf(s[i] * scale - lse[r]);
        store(p + i, v);
    }
}
extern "C" __global__ void probs_f32(const float* s, const float* lse, const unsigned* groups, float* p,
                                     long n, int L, int S, int q_start, float scale, int has_mask) {
    probs(s, lse, groups, p, n, L, S, q_start, scale, has_mask);
}
extern "C" __global__ void probs_bf16(const float* s, const float* lse, const unsigned* groups, bf16_bits* p,
                                      long n, int L, int S, int q_start, float scale, int has_mask) {
    probs(s, lse, groups, p, n, L, S, q_start, scale, has_mask);
}

// The softmax backward's dS = P * (dP - delta[r]), in P's type (delta = rowsum(dO * O)).
template <typename T>
__device__ void softmax_grad(const T* p, const float* dp, const float* delta, T* ds, long n, int S) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        long r = i / S;
        store(ds + i, to_f(p[i]) * (dp[i] - delta[r]));
    }
}
extern "C" __global__ void softmax_grad_f32(const float* p, const float* dp, const float* delta, float* ds,
                                            long n, int S) {
    softmax_grad(p, dp, delta, ds, n, S);
}
extern "C" __global__ void softmax_grad_bf16(const bf16_bits* p, const float* dp, const float* delta,
                                             bf16_bits* ds, long n, int S) {
    softmax_grad(p, dp, delta, ds, n, S);
}
