// The optimizer update on CUDA (kernels/src/optim.rs), compiled at run time with NVRTC: one
// launch per tensor instead of a dozen elementwise candle ops, each over the whole tensor.
// Every array is f32 and updated in place.

// AdamW with decoupled weight decay; the gradient is multiplied by g_scale first (the
// global-norm clipping factor). Same formulas, in the same order, as trainer/src/optim.rs.
// Complements such as 1 - beta2 arrive computed in f64 by the host: in f32, 1 - 0.999f is off
// by 5e-5 relative (0.999 is not exact in f32), which the composed ops do not suffer.
extern "C" __global__ void adamw_f32(float* w, float* m, float* v, const float* g, long n,
                                     float lr, float beta1, float one_minus_beta1, float beta2,
                                     float one_minus_beta2, float bc1, float bc2, float eps,
                                     float decay_factor, float g_scale) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float gi = g[i] * g_scale;
        float mi = m[i] * beta1 + gi * one_minus_beta1;
        float vi = v[i] * beta2 + gi * gi * one_minus_beta2;
        m[i] = mi;
        v[i] = vi;
        float update = (mi / bc1) / (sqrtf(vi / bc2) + eps);
        w[i] = w[i] * decay_factor - update * lr;
    }
}

// shadow = shadow * decay + w * (1 - decay), the complement from the host as above.
extern "C" __global__ void ema_f32(float* shadow, const float* w, long n, float decay,
                                   float one_minus_decay) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        shadow[i] = shadow[i] * decay + w[i] * one_minus_decay;
    }
}
