// dice.cu: sigmoid + per-sample soft Dice loss + its gradient, fused into two launches.
//
// What it computes (ops.py, sigmoid_dice_loss), with p = sigmoid(z), target t in {0, 1},
// smoothing s, per sample n over its P = H*W pixels:
//     I = sum p t,   S = sum p + sum t,   dice_n = (2 I + s) / (S + s)
//     loss = mean_n (1 - dice_n)                                (0-d, float64)
//     dz = -(1/N) (2 t (S + s) - (2 I + s)) / (S + s)^2 * p (1 - p)   (float32)
// p and p(1-p) come from e = exp(-|z|) in float32: p = 1/(1+e) or e/(1+e), p(1-p) =
// e/(1+e)^2, which keeps p(1-p) accurate where 1 - p would cancel. Each thread sums its
// few pixels in float32, everything above that in float64, in a fixed order (the one
// atomic only elects the block that adds up): the same inputs give the same bits. The
// gradient's per-sample factors are computed in float64 (2t(S+s) - (2I+s) cancels) and
// rounded once; per pixel the work is float32 only.
//
// Launches (two):
//   dice_partial_sums  grid (B, N), block 256: block b of sample n sums I and S over the
//                      pixels b*256 + tid + k*B*256 (float4 + uchar4 when P % 4 == 0) and
//                      writes partial[n, b] = (I, S). The last block to finish (a counter
//                      bumped with an atomic after a __threadfence) then adds every
//                      sample's partials in order of b: sums[n] = (I, S), dice[n], the loss;
//                      and sets the counter back to 0 for the next call.
//   dice_grad          grid (B, N), block 256: dz for every pixel from its sample's I, S
//
// Napkin math (paper batch 12 x 512 x 512): the two passes read z and t twice (2 x 5 B per
// pixel; the second read mostly from the 50 MB L2, as the 16 MB of inputs fit) and write dz
// (4 B): 9 B of compulsory traffic per pixel, 28 MB, ~9 us at 3 TB/s. About 20 FLOPs per
// pixel per pass. Memory-bound: the target is >= 80% of the device-to-device copy
// bandwidth, counting the compulsory 9 B per pixel.
//
// Check: pytest -m gpu tests/test_ops.py -k dice   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "dice and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

// e = exp(-|z|) -> p = sigmoid(z) and p (1 - p), accurate for any z
__device__ __forceinline__ void sigmoid_parts(float z, float& p, float& pq) {
    const float e = expf(-fabsf(z));
    const float inv = 1.0f / (1.0f + e);
    p = z >= 0.0f ? inv : e * inv;
    pq = e * inv * inv;
}

extern "C" __global__ void dice_partial_sums(const float* __restrict__ logits,
                                             const unsigned char* __restrict__ target, int P,
                                             int vec4, double smooth,
                                             double* __restrict__ partial,
                                             unsigned int* __restrict__ counter,
                                             double* __restrict__ sums,
                                             double* __restrict__ dice,
                                             double* __restrict__ loss) {
    __shared__ double sh_i[256], sh_s[256];
    __shared__ bool last;
    const int n = blockIdx.y, B = gridDim.x, N = gridDim.y, tid = threadIdx.x;
    const float* z = logits + (long long)n * P;
    const unsigned char* t = target + (long long)n * P;
    // each thread sums a handful of pixels in float32 (B is chosen so that it is a
    // handful), the block adds the threads' sums in float64
    float inter = 0.0f, total = 0.0f;
    if (vec4) {
        const float4* z4 = reinterpret_cast<const float4*>(z);
        const uchar4* t4 = reinterpret_cast<const uchar4*>(t);
        for (int i = blockIdx.x * 256 + tid; i < P / 4; i += B * 256) {
            const float4 zz = z4[i];
            const uchar4 tt = t4[i];
            float p, pq;
            sigmoid_parts(zz.x, p, pq); inter += p * tt.x; total += p + tt.x;
            sigmoid_parts(zz.y, p, pq); inter += p * tt.y; total += p + tt.y;
            sigmoid_parts(zz.z, p, pq); inter += p * tt.z; total += p + tt.z;
            sigmoid_parts(zz.w, p, pq); inter += p * tt.w; total += p + tt.w;
        }
    } else {
        for (int i = blockIdx.x * 256 + tid; i < P; i += B * 256) {
            float p, pq;
            sigmoid_parts(z[i], p, pq);
            inter += p * t[i];
            total += p + t[i];
        }
    }
    sh_i[tid] = inter;
    sh_s[tid] = total;
    for (int s = 128; s > 0; s /= 2) {
        __syncthreads();
        if (tid < s) {
            sh_i[tid] += sh_i[tid + s];
            sh_s[tid] += sh_s[tid + s];
        }
    }
    if (tid == 0) {
        partial[2 * ((long long)n * B + blockIdx.x) + 0] = sh_i[0];
        partial[2 * ((long long)n * B + blockIdx.x) + 1] = sh_s[0];
        __threadfence();  // the partials are visible to every block before the count says so
        last = atomicAdd(counter, 1u) == (unsigned int)(B * N) - 1;
    }
    __syncthreads();
    if (!last) return;  // the same for every thread of the block

    // the last block: each sample's I and S, its dice, and the loss, in a fixed order
    for (int m = tid; m < N; m += blockDim.x) {
        double i_sum = 0.0, s_sum = 0.0;
        for (int b = 0; b < B; ++b) {  // __ldcg: from L2, not a stale L1 line
            i_sum += __ldcg(&partial[2 * ((long long)m * B + b) + 0]);
            s_sum += __ldcg(&partial[2 * ((long long)m * B + b) + 1]);
        }
        sums[2 * m + 0] = i_sum;
        sums[2 * m + 1] = s_sum;
        dice[m] = (2.0 * i_sum + smooth) / (s_sum + smooth);
    }
    __syncthreads();
    if (tid == 0) {
        double acc = 0.0;
        for (int m = 0; m < N; ++m) acc += 1.0 - dice[m];
        loss[0] = acc / N;
        *counter = 0;  // ready for the next call
    }
}

extern "C" __global__ void dice_grad(const float* __restrict__ logits,
                                     const unsigned char* __restrict__ target, int P, int N,
                                     double smooth, const double* __restrict__ sums, int vec4,
                                     float* __restrict__ dlogits) {
    const int n = blockIdx.y, B = gridDim.x, tid = threadIdx.x;
    // dz = scale (2 t den - num) p (1 - p): one float64 factor for t = 1, one for t = 0,
    // each rounded once to float32; per pixel only float32 work remains
    const double den = sums[2 * n + 1] + smooth;        // S + s
    const double num = 2.0 * sums[2 * n + 0] + smooth;  // 2 I + s
    const double scale = -1.0 / ((double)N * den * den);
    const float c1 = (float)(scale * (2.0 * den - num)), c0 = (float)(scale * -num);
    const float* z = logits + (long long)n * P;
    const unsigned char* t = target + (long long)n * P;
    float* dz = dlogits + (long long)n * P;
    if (vec4) {
        const float4* z4 = reinterpret_cast<const float4*>(z);
        const uchar4* t4 = reinterpret_cast<const uchar4*>(t);
        float4* d4 = reinterpret_cast<float4*>(dz);
        for (int i = blockIdx.x * 256 + tid; i < P / 4; i += B * 256) {
            const float4 zz = z4[i];
            const uchar4 tt = t4[i];
            float p, pq;
            float4 d;
            sigmoid_parts(zz.x, p, pq); d.x = (tt.x ? c1 : c0) * pq;
            sigmoid_parts(zz.y, p, pq); d.y = (tt.y ? c1 : c0) * pq;
            sigmoid_parts(zz.z, p, pq); d.z = (tt.z ? c1 : c0) * pq;
            sigmoid_parts(zz.w, p, pq); d.w = (tt.w ? c1 : c0) * pq;
            d4[i] = d;
        }
    } else {
        for (int i = blockIdx.x * 256 + tid; i < P; i += B * 256) {
            float p, pq;
            sigmoid_parts(z[i], p, pq);
            dz[i] = (t[i] ? c1 : c0) * pq;
        }
    }
}
