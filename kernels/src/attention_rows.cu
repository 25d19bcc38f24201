// The CUDA forward of kernels::rows::attention_rows, compiled at run time with NVRTC after
// common.cuh (kernels/src/cuda.rs). ci/check-nvrtc.sh compiles it on a machine without a GPU.

template <typename T>
__device__ void rows(const T* q, const T* k, const unsigned* idx, float* out,
                     int H, int n_ref, int n_tgt, int D, float scale) {
    extern __shared__ float shared[];
    float* qs = shared;                // D
    float* logits = shared + D;        // n_tgt
    float* scratch = logits + n_tgt;   // blockDim.x
    int p = blockIdx.x;
    unsigned i = idx[p];
    float* row = out + (size_t)p * n_tgt;
    for (int j = threadIdx.x; j < n_tgt; j += blockDim.x) row[j] = 0.f;
    for (int h = 0; h < H; ++h) {
        const T* qv = q + ((size_t)h * n_ref + i) * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) qs[d] = to_f(qv[d]);
        __syncthreads();
        const T* kh = k + (size_t)h * n_tgt * D;
        float local_max = __int_as_float(0xff800000); // -inf (NVRTC has no math.h)
        for (int j = threadIdx.x; j < n_tgt; j += blockDim.x) {
            const T* kv = kh + (size_t)j * D;
            float dot = 0.f;
            for (int d = 0; d < D; ++d) dot += qs[d] * to_f(kv[d]);
            float l = dot * scale;
            logits[j] = l;
            if (isnan(l) || l > local_max) local_max = l;
        }
        float m = block_reduce<true>(local_max, scratch);
        float local_sum = 0.f;
        for (int j = threadIdx.x; j < n_tgt; j += blockDim.x) {
            float e = __expf(logits[j] - m);
            logits[j] = e;
            local_sum += e;
        }
        float s = block_reduce<false>(local_sum, scratch);
        float w = 1.f / (s * (float)H);
        for (int j = threadIdx.x; j < n_tgt; j += blockDim.x) row[j] += logits[j] * w;
        __syncthreads();
    }
}

extern "C" __global__ void attention_rows_f32(const float* q, const float* k, const unsigned* idx,
        float* out, int H, int n_ref, int n_tgt, int D, float scale) {
    rows<float>(q, k, idx, out, H, n_ref, n_tgt, D, scale);
}

extern "C" __global__ void attention_rows_bf16(const bf16_bits* q, const bf16_bits* k,
        const unsigned* idx, float* out, int H, int n_ref, int n_tgt, int D, float scale) {
    rows<bf16_bits>(q, k, idx, out, H, n_ref, n_tgt, D, scale);
}
