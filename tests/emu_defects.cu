// emu_defects.cu: kernels with planted defects, for tests/test_cuda_emu.py: each check of
// the emulator (tests/cuda_emu.h) must catch its defect, and pass the same kernel without
// it. Appended to conv_mma.cu (whose mma helpers the layout probes call) and run on the
// emulator only; these are fixtures, never launched by nodulekit.

// Each thread stages its value, then reads its right neighbour's. `sync` = 0 is the
// planted defect: the __syncthreads between the write and the read is missing.
extern "C" __global__ void neighbour_sum(const float* __restrict__ x, float* __restrict__ y,
                                         int sync) {
    __shared__ float s[256];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = x[blockIdx.x * n + t];
    if (sync) __syncthreads();
    y[blockIdx.x * n + t] = s[t] + s[(t + 1) % n];
}

// Each thread adds its value into one slot of shared memory; `pairs` = 1 is the planted
// defect: threads 2i and 2i+1 write slot i in the same barrier interval (a racy write
// where an atomic or a second pass belongs). pairs = 0: one slot per thread.
extern "C" __global__ void racy_slots(const float* __restrict__ x, float* __restrict__ y,
                                      int pairs) {
    __shared__ float s[256];
    const int t = threadIdx.x;
    s[t] = 0.0f;
    __syncthreads();
    const int slot = pairs ? t / 2 : t;
    s[slot] = x[t];
    __syncthreads();
    y[t] = s[t];
}

// y[i] = x[i + shift] for i < n: shift = 1 reads one element past the end of x (the planted
// out-of-bounds read: y is still written in bounds, so guard bytes alone cannot see it);
// shift = -1 one before the start; 0 is correct.
extern "C" __global__ void shifted_copy(const float* __restrict__ x, float* __restrict__ y,
                                        int n, int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];  // the defect (shift != 0): i + shift is not clamped
}

// One warp: D = A (16x8) * B (8x8) through conv_mma.cu's tf32 helper, like tests/
// mma_probe.cu's mma_probe, but `swap` = 1 loads the A fragment with a1 and a2 exchanged
// (rows g+8 and columns t+4 mixed up): the planted wrong fragment layout.
extern "C" __global__ void mma_layout_probe(const float* __restrict__ A,
                                            const float* __restrict__ B,
                                            float* __restrict__ D, int swap) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    unsigned a[4], b[2];
    a[0] = __float_as_uint(to_tf32(A[g * 8 + t]));
    a[1] = __float_as_uint(to_tf32(A[(g + 8) * 8 + t]));
    a[2] = __float_as_uint(to_tf32(A[g * 8 + t + 4]));
    a[3] = __float_as_uint(to_tf32(A[(g + 8) * 8 + t + 4]));
    if (swap) {
        const unsigned tmp = a[1];
        a[1] = a[2];
        a[2] = tmp;
    }
    b[0] = __float_as_uint(to_tf32(B[t * 8 + g]));
    b[1] = __float_as_uint(to_tf32(B[(t + 4) * 8 + g]));
    mma_tf32_m16n8k8(d, a, b);
    for (int e = 0; e < 4; ++e) D[(g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = d[e];
}

// A staging store with conv_mma.cu's old layout ([rows][16 + 4 pad], one row per lane, a
// column of a tile written by a warp): 4-way bank conflicts, which the tests' count of
// recorded shared accesses must find (and none with the swizzled layout, `swizzled` = 1).
extern "C" __global__ void column_store(const float* __restrict__ x, float* __restrict__ y,
                                        int swizzled) {
    __shared__ float padded[64][20];
    __shared__ float tile[64 * 16];
    const int t = threadIdx.x;  // 64 threads: two warps, each a column of 32 rows
    for (int c = 0; c < 16; ++c) {
        if (swizzled) tile[stage_index(t, c)] = x[c * 64 + t];
        else padded[t][c] = x[c * 64 + t];
    }
    __syncthreads();
    float sum = 0.0f;
    for (int c = 0; c < 16; ++c) sum += swizzled ? tile[stage_index(t, c)] : padded[t][c];
    y[t] = sum;
}
