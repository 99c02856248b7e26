// adam.cu: PyTorch's Adam over the ONE flat parameter buffer, in place, in one launch.
//
// What it computes (ops.py, adam_step), per element i, step t counted from 1:
//     m = b1 m + (1 - b1) g;    v = b2 v + (1 - b2) g^2
//     p -= lr_c * m / (sqrt(v) / sqrt_bc2 + eps)
// with lr_c = lr / (1 - b1^t) and sqrt_bc2 = sqrt(1 - b2^t) computed once on the host in
// float64. Like the CPU backend, each element's update is computed in float64 from the
// float32 values and rounded once when stored (m, v and p are float32 buffers).
//
// Launch: 1-D grid-stride, 256 threads, about 32 blocks per SM.
//   adam_step       one element per iteration (any length, any alignment)
//   adam_step_vec4  four elements per iteration as float4 (all four buffers 16-byte
//                   aligned); global threads 0..n%4-1 also do the ragged tail
//
// Napkin math (the paper's U-Net, width 64: 31.0 M parameters): reads p, g, m, v and
// writes p, m, v: 7 x 4 B = 28 B per parameter, 868 MB, about 0.3 ms at 3 TB/s. About 20
// float64 operations per element (a sqrt and a division among them): 0.6 GFLOP of FP64,
// well under the memory time on an H100. Memory-bound: the target is >= 80% of the
// device-to-device copy bandwidth (`nodulekit bench ops --device cuda --op adam`).
//
// Check: pytest -m gpu tests/test_ops.py -k adam   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "adam and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

__device__ __forceinline__ void adam_one(float& p, float gf, float& mf, float& vf,
                                         double lr_c, double b1, double b2, double eps,
                                         double sqrt_bc2) {
    const double g = gf;
    const double m = b1 * (double)mf + (1.0 - b1) * g;
    const double v = b2 * (double)vf + (1.0 - b2) * g * g;
    mf = (float)m;
    vf = (float)v;
    p = (float)((double)p - lr_c * m / (sqrt(v) / sqrt_bc2 + eps));
}

extern "C" __global__ void adam_step(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v, long long n,
                                     double lr_c, double b1, double b2, double eps,
                                     double sqrt_bc2) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        adam_one(param[i], grad[i], m[i], v[i], lr_c, b1, b2, eps, sqrt_bc2);
    }
}

extern "C" __global__ void adam_step_vec4(float* __restrict__ param,
                                          const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v,
                                          long long n, double lr_c, double b1, double b2,
                                          double eps, double sqrt_bc2) {
    const long long n4 = n / 4;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float4* p4 = reinterpret_cast<float4*>(param);
    const float4* g4 = reinterpret_cast<const float4*>(grad);
    float4* m4 = reinterpret_cast<float4*>(m);
    float4* v4 = reinterpret_cast<float4*>(v);
    for (long long i = gid; i < n4; i += stride) {
        float4 p = p4[i], g = g4[i], mm = m4[i], vv = v4[i];
        adam_one(p.x, g.x, mm.x, vv.x, lr_c, b1, b2, eps, sqrt_bc2);
        adam_one(p.y, g.y, mm.y, vv.y, lr_c, b1, b2, eps, sqrt_bc2);
        adam_one(p.z, g.z, mm.z, vv.z, lr_c, b1, b2, eps, sqrt_bc2);
        adam_one(p.w, g.w, mm.w, vv.w, lr_c, b1, b2, eps, sqrt_bc2);
        p4[i] = p;
        m4[i] = mm;
        v4[i] = vv;
    }
    if (gid < n - 4 * n4) {  // the last n % 4 elements
        const long long i = 4 * n4 + gid;
        adam_one(param[i], grad[i], m[i], v[i], lr_c, b1, b2, eps, sqrt_bc2);
    }
}
