// The optimizer update on CUDA (kernels/src/optim.rs), compiled at run time with NVRTC: one
// launch per tensor instead of a dozen elementwise candle ops, each over the whole tensor.
// Every array is f32 and updated in place.

// AdamW with decoupled weight decay; the gradient is multiplied by g_scale first (the
// global-norm clipping factor). Same formulas, in the same order, as trainer/src/optim.rs.
extern "C" __global__ void adamw_f32(float* w, float* m, float* v, const float* g, long n,
                                     float lr, float beta1, float beta2, float bc1, float bc2,
                                     float eps, float weight_decay, float g_scale) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i] * g_scale;
        float mi = m[i] * beta1 + gi * (1.f - beta1);
        float vi = v[i] * beta2 + gi * gi * (1.f - beta2);
        m[i] = mi;
        v[i] = vi;
        float update = (mi / bc1) / (sqrtf(vi / bc2) + eps);
        w[i] = w[i] * (1.f - lr * weight_decay) - update * lr;
    }
}

// shadow = shadow * decay + w * (1 - decay).
extern "C" __global__ void ema_f32(float* shadow, const float* w, long n, float decay) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        shadow[i] = shadow[i] * decay + w[i] * (1.f - decay);
    }
}
