// metrics.cu: per-sample true positives, false positives and false negatives.
//
// What it computes (ops.py, confusion_counts): with pred = logits > 0 (p > 0.5 without
// sigmoid's rounding) and truth = target != 0, per sample n over its P pixels:
//     counts[n] = (sum pred & truth, sum pred & !truth, sum !pred & truth)   (int64)
//
// Launch: grid (B, N), block 256. Each thread counts its pixels (b*256 + tid + k*B*256),
// the block adds its 256 counts in shared memory, and thread 0 adds the three totals to
// counts[n] with 64-bit integer atomics (exact and order-free: integers). counts must be
// zeroed before the launch (cuda.py allocates it with zeros).
//
// Napkin math (paper batch 12 x 512 x 512): reads 5 B per pixel, 16 MB, ~5 us at 3 TB/s;
// two comparisons per pixel. Memory-bound (and tiny next to a training step).
//
// Check: pytest -m gpu tests/test_ops.py -k confusion   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "confusion and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

extern "C" __global__ void confusion_counts(const float* __restrict__ logits,
                                            const unsigned char* __restrict__ target, int P,
                                            unsigned long long* __restrict__ counts) {
    __shared__ unsigned int sh[3][256];
    const int n = blockIdx.y, B = gridDim.x, tid = threadIdx.x;
    const float* z = logits + (long long)n * P;
    const unsigned char* t = target + (long long)n * P;
    unsigned int tp = 0, fp = 0, fn = 0;
    for (int i = blockIdx.x * 256 + tid; i < P; i += B * 256) {
        const bool pred = z[i] > 0.0f, truth = t[i] != 0;
        tp += pred && truth;
        fp += pred && !truth;
        fn += !pred && truth;
    }
    sh[0][tid] = tp;
    sh[1][tid] = fp;
    sh[2][tid] = fn;
    for (int s = 128; s > 0; s /= 2) {
        __syncthreads();
        if (tid < s) {
            sh[0][tid] += sh[0][tid + s];
            sh[1][tid] += sh[1][tid + s];
            sh[2][tid] += sh[2][tid + s];
        }
    }
    if (tid == 0) {
        atomicAdd(&counts[3 * n + 0], (unsigned long long)sh[0][0]);
        atomicAdd(&counts[3 * n + 1], (unsigned long long)sh[1][0]);
        atomicAdd(&counts[3 * n + 2], (unsigned long long)sh[2][0]);
    }
}
