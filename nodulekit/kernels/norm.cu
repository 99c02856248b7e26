// norm.cu: the normalisation layers (instance norm, batch norm), forward and backward,
// with the ReLU fused, NHWC, as four passes around a little per-channel arithmetic.
//
// What it computes (ops.py: instance_norm_*, batch_norm_*). An activation x [N, H, W, C] is
// seen as [N, P, C], P = H*W pixels per sample. Statistics are [G, C] rows, G = N (instance
// norm: a row per sample, per_sample = 1) or G = 1 (batch norm: one row for all, 0):
//   norm_moments        partial[n, s, 0, c] = sum x, partial[n, s, 1, c] = sum x^2 over
//                       split s of sample n's pixels, in float64 (a float32 sum of squares
//                       would cancel in var = E[x^2] - mean^2)
//   norm_sum_splits     out[n, j] = sum_s partial[n, s, j]   (in float64, s in order)
//   norm_apply          y = (x - mean[g, c]) * scale[g, c] + beta[c], max(y, 0) if relu
//   norm_grad_sums      partial[n, s, 0, c] = sum g, partial[n, s, 1, c] = sum g * xhat,
//                       g = dy * (y > 0) if relu else dy, xhat = (x - mean) * invstd
//   norm_grad_apply     dx = k * (g - a - xhat * b), (k, a, b) = coef[g, 0..2, c]
// Between the passes cuda.py / ops.py turn the sums into mean, invstd, scale = gamma *
// invstd and (k, a, b) = (gamma * invstd, mean of g, mean of g * xhat) on [G, C] arrays in
// float64, and batch norm may sum them over the data-parallel ranks (one all-reduce).
// Every sum has a fixed order (per-split partials, then one pass that adds them): the
// same inputs give the same bits on every run.
//
// Versions: one of each pass, the sums as reduce.cu's channel sums (in float64, two at
// once); the two elementwise passes also as *_vec4 (four channels as a float4 where
// C % 4 == 0 and the buffers are 16-byte aligned).
//
// Launch:
//   norm_moments, norm_grad_sums   grid (ceil(C / bx), splits, N), block (bx, 256 / bx),
//                   bx = min(32, next power of two >= C): a warp reads bx consecutive
//                   channels of 32 / bx pixels; each thread sums its pixels in float64,
//                   then the block adds its 256 / bx row sums in shared memory (a tree)
//   norm_sum_splits 1-D grid-stride over N * 2C, 256 threads
//   norm_apply, norm_grad_apply[_vec4]   1-D grid-stride over the elements (or groups of
//                   four), 256 threads, about 32 blocks per SM; 32-bit indices (cuda.py
//                   refuses arrays of 2^31 elements or more)
//
// Napkin math (paper shape, level 0: 12 x 512 x 512 x 64, 805 MB an activation): the
// forward reads x twice and writes y once (2.4 GB), the backward reads dy, x, y twice and
// writes dx (5.6 GB): 8 GB a layer, ~2.7 ms at 3 TB/s, next to ~5 ms of the 3x3
// convolution's 231 GFLOP forward (~15 ms forward and backward at ~50 TFLOP/s fp32).
// A handful of FLOPs per element (one float64 add and FMA per sum): memory-bound; the
// target is >= 80% of the device-to-device copy bandwidth on the compulsory traffic.
//
// Check: pytest -m gpu tests/test_ops.py -k norm   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "norm and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

// partial[n, split, 0..1, k]: the sums of two values per pixel (pair(index, u, v) for the
// element at flat index n*P*C + p*C + k) over split `split` of sample n's P pixels. Thread
// (tx, ty) of a (bx, by) block sums pixels ty, ty + by, ... of channel k in float64; the
// block adds its by row sums in shared memory, in a fixed order; row 0 writes.
template <typename Pair>
__device__ __forceinline__ void sample_channel_sums2(int P, int C, int rows,
                                                     double* __restrict__ partial, Pair pair) {
    __shared__ double sh_u[256], sh_v[256];
    const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    const int k = blockIdx.x * bx + tx, split = blockIdx.y, n = blockIdx.z;
    const int p_end = min(P, (split + 1) * rows);
    double su = 0.0, sv = 0.0;
    if (k < C) {
        for (int p = split * rows + ty; p < p_end; p += by) {
            double u, v;
            pair(((long long)n * P + p) * C + k, u, v);
            su += u;
            sv += v;
        }
    }
    sh_u[ty * bx + tx] = su;
    sh_v[ty * bx + tx] = sv;
    for (int s = by / 2; s > 0; s /= 2) {
        __syncthreads();
        if (ty < s) {
            sh_u[ty * bx + tx] += sh_u[(ty + s) * bx + tx];
            sh_v[ty * bx + tx] += sh_v[(ty + s) * bx + tx];
        }
    }
    __syncthreads();
    if (ty == 0 && k < C) {
        const long long out = ((long long)n * gridDim.y + split) * 2 * C;
        partial[out + k] = sh_u[tx];
        partial[out + C + k] = sh_v[tx];
    }
}

extern "C" __global__ void norm_moments(const float* __restrict__ x, int P, int C, int rows,
                                        double* __restrict__ partial) {
    sample_channel_sums2(P, C, rows, partial, [&](long long i, double& u, double& v) {
        u = x[i];
        v = u * u;  // exact: a float32 value squared fits a double
    });
}

// g and xhat of one element, the same float32 steps in both backward passes: g = dy where
// y > 0 (the ReLU's mask, from its output; a NaN y keeps dy, as on the CPU), xhat = (x -
// mean) * invstd
__device__ __forceinline__ void grad_parts(float dy, float x, float y, float mean,
                                           float invstd, int relu, float& g, float& xhat) {
    g = relu && y <= 0.0f ? 0.0f : dy;
    xhat = (x - mean) * invstd;
}

extern "C" __global__ void norm_grad_sums(const float* __restrict__ dy,
                                          const float* __restrict__ x,
                                          const float* __restrict__ y,
                                          const float* __restrict__ mean,
                                          const float* __restrict__ invstd, int relu, int P,
                                          int C, int per_sample, int rows,
                                          double* __restrict__ partial) {
    const int row = per_sample ? blockIdx.z * C : 0;  // this sample's statistics
    sample_channel_sums2(P, C, rows, partial, [&](long long i, double& u, double& v) {
        const int k = (int)(i % C);
        float g, xhat;
        grad_parts(dy[i], x[i], relu ? y[i] : 1.0f, mean[row + k], invstd[row + k], relu, g,
                   xhat);
        u = g;
        v = (double)g * (double)xhat;  // exact product of two float32 values
    });
}

extern "C" __global__ void norm_sum_splits(const double* __restrict__ partial, int splits,
                                           int L, int total, double* __restrict__ out) {
    // out[n * L + j] = sum_s partial[(n * splits + s) * L + j], total = N * L
    const int stride = gridDim.x * blockDim.x;
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const int n = e / L, j = e - n * L;
        double acc = 0.0;
        for (int s = 0; s < splits; ++s) acc += partial[((long long)n * splits + s) * L + j];
        out[e] = acc;
    }
}

__device__ __forceinline__ float norm_one(float x, float mean, float scale, float beta,
                                          int relu) {
    const float v = (x - mean) * scale + beta;
    return relu && v < 0.0f ? 0.0f : v;
}

extern "C" __global__ void norm_apply(const float* __restrict__ x,
                                      const float* __restrict__ mean,
                                      const float* __restrict__ scale,
                                      const float* __restrict__ beta, int relu, int N, int P,
                                      int C, int per_sample, float* __restrict__ y) {
    const unsigned total = (unsigned)N * P * C, pc = (unsigned)P * C;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const unsigned c = e % C, s = per_sample ? (e / pc) * C + c : c;
        y[e] = norm_one(x[e], mean[s], scale[s], beta[c], relu);
    }
}

extern "C" __global__ void norm_apply_vec4(const float* __restrict__ x,
                                           const float* __restrict__ mean,
                                           const float* __restrict__ scale,
                                           const float* __restrict__ beta, int relu, int N,
                                           int P, int C, int per_sample,
                                           float* __restrict__ y) {
    const unsigned total = (unsigned)N * P * C / 4, pc = (unsigned)P * C;
    const unsigned stride = gridDim.x * blockDim.x;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const unsigned c = (4 * e) % C, s = per_sample ? (4 * e / pc) * C + c : c;
        const float4 v = x4[e];
        float4 o;
        o.x = norm_one(v.x, mean[s], scale[s], beta[c], relu);
        o.y = norm_one(v.y, mean[s + 1], scale[s + 1], beta[c + 1], relu);
        o.z = norm_one(v.z, mean[s + 2], scale[s + 2], beta[c + 2], relu);
        o.w = norm_one(v.w, mean[s + 3], scale[s + 3], beta[c + 3], relu);
        y4[e] = o;
    }
}

// dx of one element: k (g - a - xhat b); cs is the element's statistics index (group * C +
// c), cc its coefficients' in coef [G, 3, C] (group * 3C + c)
__device__ __forceinline__ float norm_grad_one(float dy, float x, float y,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ invstd,
                                               const float* __restrict__ coef, int relu,
                                               int C, unsigned cs, unsigned cc) {
    float g, xhat;
    grad_parts(dy, x, y, mean[cs], invstd[cs], relu, g, xhat);
    return coef[cc] * ((g - coef[cc + C]) - xhat * coef[cc + 2 * C]);
}

extern "C" __global__ void norm_grad_apply(const float* __restrict__ dy,
                                           const float* __restrict__ x,
                                           const float* __restrict__ y,
                                           const float* __restrict__ mean,
                                           const float* __restrict__ invstd,
                                           const float* __restrict__ coef, int relu, int N,
                                           int P, int C, int per_sample,
                                           float* __restrict__ dx) {
    const unsigned total = (unsigned)N * P * C, pc = (unsigned)P * C;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const unsigned c = e % C, group = per_sample ? e / pc : 0;
        dx[e] = norm_grad_one(dy[e], x[e], relu ? y[e] : 1.0f, mean, invstd, coef, relu, C,
                              group * C + c, group * 3 * C + c);
    }
}

extern "C" __global__ void norm_grad_apply_vec4(const float* __restrict__ dy,
                                                const float* __restrict__ x,
                                                const float* __restrict__ y,
                                                const float* __restrict__ mean,
                                                const float* __restrict__ invstd,
                                                const float* __restrict__ coef, int relu,
                                                int N, int P, int C, int per_sample,
                                                float* __restrict__ dx) {
    const unsigned total = (unsigned)N * P * C / 4, pc = (unsigned)P * C;
    const unsigned stride = gridDim.x * blockDim.x;
    const float4* dy4 = reinterpret_cast<const float4*>(dy);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    const float4* y4 = reinterpret_cast<const float4*>(y);
    float4* dx4 = reinterpret_cast<float4*>(dx);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const unsigned c = (4 * e) % C, group = per_sample ? 4 * e / pc : 0;
        const unsigned cs = group * C + c, cc = group * 3 * C + c;
        const float4 d = dy4[e], v = x4[e];
        const float4 m = relu ? y4[e] : make_float4(1.0f, 1.0f, 1.0f, 1.0f);
        float4 o;
        o.x = norm_grad_one(d.x, v.x, m.x, mean, invstd, coef, relu, C, cs, cc);
        o.y = norm_grad_one(d.y, v.y, m.y, mean, invstd, coef, relu, C, cs + 1, cc + 1);
        o.z = norm_grad_one(d.z, v.z, m.z, mean, invstd, coef, relu, C, cs + 2, cc + 2);
        o.w = norm_grad_one(d.w, v.w, m.w, mean, invstd, coef, relu, C, cs + 3, cc + 3);
        dx4[e] = o;
    }
}
