// Probe kernels for the tests: appended to conv_mma.cu (whose helpers they call), built by
// CuPy on a GPU and by the emulator on the CPU (tests/test_cuda_backend.py), and compiled for
// sm_90 with NVRTC in CI (tests/test_kernels_compile.py).

// one warp: D = A (16 x KK) * B (KK x 8) through conv_mma.cu's helpers and fragment layouts
extern "C" __global__ void mma_probe(const float* __restrict__ A, const float* __restrict__ B,
                                     float* __restrict__ D, int bf16) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    unsigned a[4], b[2];
    if (!bf16) {  // A [16][8], B [8][8]
        a[0] = __float_as_uint(to_tf32(A[g * 8 + t]));
        a[1] = __float_as_uint(to_tf32(A[(g + 8) * 8 + t]));
        a[2] = __float_as_uint(to_tf32(A[g * 8 + t + 4]));
        a[3] = __float_as_uint(to_tf32(A[(g + 8) * 8 + t + 4]));
        b[0] = __float_as_uint(to_tf32(B[t * 8 + g]));
        b[1] = __float_as_uint(to_tf32(B[(t + 4) * 8 + g]));
        mma_tf32_m16n8k8(d, a, b);
    } else {  // A [16][16], B [16][8]
        for (int r = 0; r < 4; ++r) {
            const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
            a[r] = pack_bf16x2(to_bf16(A[row * 16 + col]), to_bf16(A[row * 16 + col + 1]));
        }
        for (int r = 0; r < 2; ++r) {
            const int k = 2 * t + 8 * r;
            b[r] = pack_bf16x2(to_bf16(B[k * 8 + g]), to_bf16(B[(k + 1) * 8 + g]));
        }
        mma_bf16_m16n8k16(d, a, b);
    }
    for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = d[e];
}

extern "C" __global__ void round_probe(const float* __restrict__ x, float* __restrict__ tf,
                                       float* __restrict__ bf, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        tf[i] = to_tf32(x[i]);
        bf[i] = to_bf16(x[i]);
    }
}

extern "C" __global__ void diverged_mma(float* __restrict__ out) {
    if (threadIdx.x < 16) {  // half a warp: a bug the emulator must report
        float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        const unsigned a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
        mma_tf32_m16n8k8(d, a, b);
        out[threadIdx.x] = d[0];
    }
}
