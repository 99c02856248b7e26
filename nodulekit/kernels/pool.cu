// pool.cu: 2x2 max-pool, stride 2, NHWC, with its argmax; forward and backward.
//
// What it computes (ops.py):
//   forward   y[n,i,j,c] = max_{a,b in {0,1}} x[n, 2i+a, 2j+b, c],  Ho = H/2, Wo = W/2 (floor:
//             an odd last row or column is dropped, as in PyTorch)
//             argmax[n,i,j,c] = 2a + b of the maximum (uint8); taps are visited in row-major
//             order (0,0) (0,1) (1,0) (1,1) and replace the best only when strictly greater,
//             so the first maximum wins a tie (and a NaN first tap stays, as on the CPU)
//   backward  dx[n,h,w,c] = dy[n,h/2,w/2,c] if argmax there == 2(h%2) + (w%2), else 0; every
//             element of dx is written, the dropped odd row/column with 0
//
// Launch: 1-D grid-stride, 256 threads, about 32 blocks per SM; one thread per OUTPUT
// element of the pass (y for the forward, dx for the backward), channels fastest so a warp
// reads and writes consecutive addresses. *_vec4 variants move four channels at once
// (float4 / uchar4) when C % 4 == 0 and the buffers are 16-byte aligned. Indices are 32-bit
// unsigned (cuda.py refuses arrays of 2^31 elements or more): 64-bit division would cost
// more than the memory access it addresses.
//
// Napkin math (paper shape, level 0: 12 x 512 x 512 x 64 in): the forward reads x (805 MB)
// and writes y (201 MB) and argmax (50 MB): 1.06 GB, 0.35 ms at 3 TB/s; the backward reads
// dy and argmax (251 MB; each read by the 4 threads of its window, from cache) and writes dx
// (805 MB). Three comparisons per output: memory-bound, target >= 80% of copy bandwidth.
//
// Check: pytest -m gpu tests/test_ops.py -k maxpool   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "maxpool and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

#include "common.cuh"  // unflatten4

extern "C" __global__ void maxpool2x2_forward(const float* __restrict__ x, float* __restrict__ y,
                                              unsigned char* __restrict__ argmax, int N, int H,
                                              int W, int C) {
    const int Ho = H / 2, Wo = W / 2;
    const unsigned total = (unsigned)N * Ho * Wo * C;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const Index4<unsigned> at = unflatten4<unsigned>(e, Ho, Wo, C);  // y [N, Ho, Wo, C]
        const unsigned n = at.i0, i = at.i1, j = at.i2, c = at.i3;
        const unsigned row = W * C;  // one input row
        const float* t = x + ((n * H + 2 * i) * W + 2 * j) * C + c;  // tap (0, 0)
        float best = t[0];
        unsigned char arg = 0;
        float v = t[C];
        if (v > best) { best = v; arg = 1; }
        v = t[row];
        if (v > best) { best = v; arg = 2; }
        v = t[row + C];
        if (v > best) { best = v; arg = 3; }
        y[e] = best;
        argmax[e] = arg;
    }
}

__device__ __forceinline__ void max_tap(float v, unsigned char code, float& best,
                                        unsigned char& arg) {
    if (v > best) { best = v; arg = code; }
}

extern "C" __global__ void maxpool2x2_forward_vec4(const float* __restrict__ x,
                                                   float* __restrict__ y,
                                                   unsigned char* __restrict__ argmax, int N,
                                                   int H, int W, int C) {
    const int Ho = H / 2, Wo = W / 2, C4 = C / 4;
    const unsigned total = (unsigned)N * Ho * Wo * C4;
    const unsigned stride = gridDim.x * blockDim.x;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* y4 = reinterpret_cast<float4*>(y);
    uchar4* a4 = reinterpret_cast<uchar4*>(argmax);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const Index4<unsigned> at = unflatten4<unsigned>(e, Ho, Wo, C4);  // in float4s
        const unsigned n = at.i0, i = at.i1, j = at.i2, c = at.i3;
        const unsigned row = W * C4;
        const float4* t = x4 + ((n * H + 2 * i) * W + 2 * j) * C4 + c;
        const float4 t0 = t[0], t1 = t[C4], t2 = t[row], t3 = t[row + C4];
        float4 best = t0;
        uchar4 arg = make_uchar4(0, 0, 0, 0);
        max_tap(t1.x, 1, best.x, arg.x); max_tap(t1.y, 1, best.y, arg.y);
        max_tap(t1.z, 1, best.z, arg.z); max_tap(t1.w, 1, best.w, arg.w);
        max_tap(t2.x, 2, best.x, arg.x); max_tap(t2.y, 2, best.y, arg.y);
        max_tap(t2.z, 2, best.z, arg.z); max_tap(t2.w, 2, best.w, arg.w);
        max_tap(t3.x, 3, best.x, arg.x); max_tap(t3.y, 3, best.y, arg.y);
        max_tap(t3.z, 3, best.z, arg.z); max_tap(t3.w, 3, best.w, arg.w);
        y4[e] = best;
        a4[e] = arg;
    }
}

extern "C" __global__ void maxpool2x2_backward(const float* __restrict__ dy,
                                               const unsigned char* __restrict__ argmax,
                                               float* __restrict__ dx, int N, int H, int W,
                                               int C) {
    const int Ho = H / 2, Wo = W / 2;
    const unsigned total = (unsigned)N * H * W * C;
    const unsigned stride = gridDim.x * blockDim.x;
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const Index4<unsigned> at = unflatten4<unsigned>(e, H, W, C);  // dx [N, H, W, C]
        const unsigned n = at.i0, h = at.i1, w = at.i2, c = at.i3;
        const unsigned i = h / 2, j = w / 2;
        float g = 0.0f;
        if (i < Ho && j < Wo) {
            const unsigned o = ((n * Ho + i) * Wo + j) * C + c;
            if (argmax[o] == 2 * (h - 2 * i) + (w - 2 * j)) g = dy[o];
        }
        dx[e] = g;
    }
}

extern "C" __global__ void maxpool2x2_backward_vec4(const float* __restrict__ dy,
                                                    const unsigned char* __restrict__ argmax,
                                                    float* __restrict__ dx, int N, int H, int W,
                                                    int C) {
    const int Ho = H / 2, Wo = W / 2, C4 = C / 4;
    const unsigned total = (unsigned)N * H * W * C4;
    const unsigned stride = gridDim.x * blockDim.x;
    const float4* dy4 = reinterpret_cast<const float4*>(dy);
    const uchar4* a4 = reinterpret_cast<const uchar4*>(argmax);
    float4* dx4 = reinterpret_cast<float4*>(dx);
    for (unsigned e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const Index4<unsigned> at = unflatten4<unsigned>(e, H, W, C4);  // in float4s
        const unsigned n = at.i0, h = at.i1, w = at.i2, c = at.i3;
        const unsigned i = h / 2, j = w / 2;
        float4 g = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (i < Ho && j < Wo) {
            const unsigned o = ((n * Ho + i) * Wo + j) * C4 + c;
            const unsigned char code = (unsigned char)(2 * (h - 2 * i) + (w - 2 * j));
            const uchar4 a = a4[o];
            if (a.x == code || a.y == code || a.z == code || a.w == code) {
                const float4 d = dy4[o];
                g.x = a.x == code ? d.x : 0.0f;
                g.y = a.y == code ? d.y : 0.0f;
                g.z = a.z == code ? d.z : 0.0f;
                g.w = a.w == code ? d.w : 0.0f;
            }
        }
        dx4[e] = g;
    }
}
