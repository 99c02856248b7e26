// reduce.cu: sums over pixels per channel (bias gradients), fused with the ReLU's mask,
// and the final sum of per-block partial results (deterministic, no atomics).
//
// What it computes, for a [M, K] view of an NHWC tensor (M = N*H*W pixels):
//   relu_grad_channel_sums  dz[m,k] = dy[m,k] * (y[m,k] > 0)      (written out, for the
//                           convolution's weight and data gradients) and
//                           partial[s,k] = sum of dz[m,k] over split s's rows
//   channel_sums            partial[s,k] = sum of a[m*ld + off + k] over split s's rows
//                           (ld, off: read K channels out of a wider buffer, e.g. the
//                           up-convolution's half of a concat gradient)
//   sum_partials            out[i] = sum_s partial[s*L + i]   (in float64, s in order)
// Split s covers rows [s*rows, min(M, (s+1)*rows)); the two-pass scheme keeps the result
// independent of scheduling: the same inputs give the same bits on every run.
//
// Launch:
//   *_channel_sums  grid (ceil(K / bx), splits), block (bx, 256 / bx) with bx = min(32,
//                   next power of two >= K): a warp reads bx consecutive channels of
//                   32 / bx rows; each thread sums its rows in float64, then the block
//                   adds its 256 / bx row-sums in shared memory (a tree).
//   sum_partials    1-D grid-stride over L, 256 threads.
//
// Napkin math (paper shape, level 0, K = 64: M = 3.1 M): relu_grad_channel_sums reads dy
// and y (2 x 805 MB) and writes dz (805 MB): 2.4 GB, 0.8 ms at 3 TB/s; one FP64 add per
// element. Memory-bound. sum_partials moves splits x L x 4 B (a few MB at most).
//
// Check: pytest -m gpu tests/test_ops.py -k "conv or upconv"   (GPU)
//        pytest tests/test_ops.py -k "(conv or upconv) and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

// partial[split, k] = sum of value(m, k) over split s's rows m, for the block's columns k:
// thread (tx, ty) of a (bx, by) block sums rows ty, ty + by, ... of its column in float64,
// then the block adds its by row-sums in shared memory (a tree, in a fixed order) and row 0
// writes the total. value(m, k) is a [M, K] view's element (it may also write dz there).
template <typename Value>
__device__ __forceinline__ void column_sums(int M, int K, int rows,
                                            float* __restrict__ partial, Value value) {
    __shared__ float sh[256];
    const int bx = blockDim.x, by = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
    const int k = blockIdx.x * bx + tx, split = blockIdx.y;
    const int m_end = min(M, (split + 1) * rows);
    double acc = 0.0;
    if (k < K) {
        for (int m = split * rows + ty; m < m_end; m += by) acc += value(m, k);
    }
    sh[ty * bx + tx] = (float)acc;
    for (int s = by / 2; s > 0; s /= 2) {
        __syncthreads();
        if (ty < s) sh[ty * bx + tx] += sh[(ty + s) * bx + tx];
    }
    __syncthreads();
    if (ty == 0 && k < K) partial[(long long)split * K + k] = sh[tx];
}

extern "C" __global__ void relu_grad_channel_sums(const float* __restrict__ dy,
                                                  const float* __restrict__ y,
                                                  float* __restrict__ dz, int M, int K,
                                                  int rows, float* __restrict__ partial) {
    column_sums(M, K, rows, partial, [&](int m, int k) {
        const long long i = (long long)m * K + k;
        const float g = y[i] > 0.0f ? dy[i] : 0.0f;
        dz[i] = g;
        return g;
    });
}

extern "C" __global__ void channel_sums(const float* __restrict__ a, int ld, int off, int M,
                                        int K, int rows, float* __restrict__ partial) {
    column_sums(M, K, rows, partial,
                [&](int m, int k) { return a[(long long)m * ld + off + k]; });
}

extern "C" __global__ void sum_partials(const float* __restrict__ partial, int splits,
                                        long long L, float* __restrict__ out) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < L; i += stride) {
        double acc = 0.0;
        for (int s = 0; s < splits; ++s) acc += partial[s * L + i];
        out[i] = (float)acc;
    }
}
