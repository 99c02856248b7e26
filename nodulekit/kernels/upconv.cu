// upconv.cu: 2x2 transposed convolution, stride 2, NHWC, fp32: forward (bias fused),
// data gradient and weight gradient. The bias gradient is reduce.cu's channel_sums.
//
// What it computes (ops.py), x [N,H,W,C], w [K,2,2,C], y [N,2H,2W,K]:
//   forward   y[n, 2i+a, 2j+b, k] = b[k] + sum_c x[n,i,j,c] * w[k,a,b,c]
//   dx        dx[n,i,j,c] = sum_{a,b,k} dy[n, 2i+a, 2j+b, k] * w[k,a,b,c]
//   dw        dw[k,a,b,c] = sum_{n,i,j} dy[n, 2i+a, 2j+b, k] * x[n,i,j,c]
// Each input pixel m = (n,i,j) feeds exactly one 2x2 output block, so all three are plain
// matrix products over the column index q = (2a + b) * K + k of the 4K outputs per input
// pixel, with "row" w[k,a,b,:] = w[(4k + 2a + b) * C : ... + C]:
//   forward:  Y[m, q] = sum_c x[m, c] Wq[q, c]        (rows m, cols q, reduce over c)
//   dx:       dx[m, c] = sum_q DY[m, q] Wq[q, c]      (rows m, cols c, reduce over q)
//   dw:       dWq[q, c] = sum_m DY[m, q] x[m, c]      (rows q, cols c, reduce over m)
// where DY[m, q] = dy[n, 2i+a, 2j+b, k] is gathered, never stored. Same tiling as conv.cu
// (BR = 16 reduction indices staged per step in shared memory, a TM x TN register tile
// per thread, 256 threads).
//
// The output of the forward and the dy of the backward are addressed with a channel
// stride ld and offset off: y[..., off + k] of a buffer with ld channels. So the forward
// can write straight into its half of the decoder's concat buffer [skip | up], and the
// backward can read its half of the concat gradient, with no concat or split pass
// (cuda.py: upconv2x2_concat_forward, upconv2x2_split_backward). Plain calls use
// ld = K, off = 0.
//
// This file is the fp32 version (the progression's step 3, register_blocked: shared-memory
// tiles and register blocks, like conv.cu's conv_forward_128x64, with the same GEMM step
// from common.cuh). The next step, the same three GEMMs on tensor cores (TF32 / BF16
// operands, fp32 sums; mma_tf32, mma_bf16) for CudaBackend(precision="tf32" / "bf16"), is at
// the end of conv_mma.cu, next to the helpers it shares with the 3x3 kernels.
//
// Launches:
//   upconv_forward_128x64        grid (ceil(M/128), ceil(4K/64))  8x4 outputs per thread
//   upconv_backward_data_128x64  grid (ceil(M/128), ceil(C/64))   8x4
//   upconv_weight_grad_64x128    grid (ceil(C/128), ceil(4K/64), splits)  4x8, pixels split
//       into `rows`-sized ranges; partials [splits, K, 2, 2, C] added by sum_partials
//
// Napkin math (paper shape, dec0.up: 12 x 256 x 256 x 128 -> 12 x 512 x 512 x 64): the
// forward is 2 * M * 4K * C = 2 * 786 k * 256 * 128 = 51.5 GFLOP; it reads x (403 MB) and
// writes y (805 MB). The backward is twice that. Compute-bound on FP32 FMA like conv.cu.
//
// Check: pytest -m gpu tests/test_ops.py -k upconv   (GPU: vs reference.py, torch)
//        pytest tests/test_ops.py -k "upconv and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

#include "common.cuh"  // BR, register_tile_step, store_register_tile, upconv_wq

// ------------------------------------------------------------------------------ forward
extern "C" __global__ void
upconv_forward_128x64(const float* __restrict__ x, const float* __restrict__ w,
                      const float* __restrict__ bias, float* __restrict__ y, int N, int H,
                      int W, int C, int K, int ld, int off) {
    constexpr int BM = 128, BN = 64, TM = 8, TN = 4, NT = 256;
    __shared__ __align__(16) float As[BR][tile_pitch<BM, TM>()];  // As[cc][i] = x[m0 + i, c0 + cc]
    __shared__ __align__(16) float Bs[BR][tile_pitch<BN, TN>()];  // Bs[cc][q] = Wq[q0 + q, c0 + cc]
    const int M = N * H * W, Q = 4 * K;
    const int m0 = blockIdx.x * BM, q0 = blockIdx.y * BN;
    const int tid = threadIdx.x, tx = tid % (BN / TN), ty = tid / (BN / TN);
    const int cc = tid % BR;

    float acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int q = 0; q < TN; ++q) acc[i][q] = 0.0f;

    for (int c0 = 0; c0 < C; c0 += BR) {
        const int c = c0 + cc;
        __syncthreads();
        for (int i = tid / BR; i < BM; i += NT / BR) {
            const int m = m0 + i;
            As[cc][i] = (m < M && c < C) ? x[(long long)m * C + c] : 0.0f;
        }
        for (int q = tid / BR; q < BN; q += NT / BR) Bs[cc][q] = upconv_wq(w, q0 + q, c, Q, C, K);
        __syncthreads();
        register_tile_step<BM, BN>(As, Bs, ty, tx, acc);
    }

    const int H2 = 2 * H, W2 = 2 * W;
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + tile_index<BM, TM>(ty, i);
        if (m >= M) continue;
        const int n = m / (H * W), rem = m - n * (H * W), ii = rem / W, jj = rem - ii * W;
        for (int q = 0; q < TN; ++q) {
            const int qq = q0 + tile_index<BN, TN>(tx, q);
            if (qq >= Q) continue;
            const int ab = qq / K, k = qq - ab * K, a = ab / 2, b = ab - 2 * a;
            const long long o = (((long long)n * H2 + 2 * ii + a) * W2 + 2 * jj + b) * ld + off + k;
            y[o] = acc[i][q] + bias[k];
        }
    }
}

// ------------------------------------------------------------------------ data gradient
extern "C" __global__ void
upconv_backward_data_128x64(const float* __restrict__ dy, const float* __restrict__ w,
                            float* __restrict__ dx, int N, int H, int W, int C, int K, int ld,
                            int off) {
    constexpr int BM = 128, BN = 64, TM = 8, TN = 4, NT = 256;
    __shared__ __align__(16) float As[BR][tile_pitch<BM, TM>()];  // As[u][i] = DY[m0 + i, q0 + u]
    __shared__ __align__(16) float Bs[BR][tile_pitch<BN, TN>()];  // Bs[u][c] = Wq[q0 + u, c0 + c]
    __shared__ int pix_n[BM], pix_i[BM], pix_j[BM];
    const int M = N * H * W, Q = 4 * K, H2 = 2 * H, W2 = 2 * W;
    const int m0 = blockIdx.x * BM, c0 = blockIdx.y * BN;
    const int tid = threadIdx.x, tx = tid % (BN / TN), ty = tid / (BN / TN);

    for (int i = tid; i < BM; i += NT) {
        const int m = m0 + i;
        const int n = m / (H * W), rem = m - n * (H * W);
        pix_n[i] = m < M ? n : -1;  // -1: past the end
        pix_i[i] = rem / W;
        pix_j[i] = rem - (rem / W) * W;
    }

    float acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int q = 0; q < TN; ++q) acc[i][q] = 0.0f;

    const int uu = tid % BR;  // the q this thread stages into As
    for (int q0 = 0; q0 < Q; q0 += BR) {
        __syncthreads();
        const int qq = q0 + uu;
        const bool q_ok = qq < Q;
        const int ab = q_ok ? qq / K : 0, k = qq - ab * K, a = ab / 2, b = ab - 2 * a;
        for (int i = tid / BR; i < BM; i += NT / BR) {
            float v = 0.0f;
            if (q_ok && pix_n[i] >= 0) {
                const long long o =
                    (((long long)pix_n[i] * H2 + 2 * pix_i[i] + a) * W2 + 2 * pix_j[i] + b) * ld;
                v = dy[o + off + k];
            }
            As[uu][i] = v;
        }
        for (int e = tid; e < BR * BN; e += NT) {  // rows of Wq, contiguous along c
            const int u = e / BN, cc = e - u * BN;
            Bs[u][cc] = upconv_wq(w, q0 + u, c0 + cc, Q, C, K);
        }
        __syncthreads();
        register_tile_step<BM, BN>(As, Bs, ty, tx, acc);
    }

    store_register_tile<BM, BN>(acc, dx, m0, M, c0, C, ty, tx);
}

// ---------------------------------------------------------------------- weight gradient
// out[split, k, a, b, c] = sum over the split's input pixels m of DY[m, q] * x[m, c]
extern "C" __global__ void
upconv_weight_grad_64x128(const float* __restrict__ dy, const float* __restrict__ x,
                          float* __restrict__ out, int N, int H, int W, int C, int K, int ld,
                          int off, int rows) {
    constexpr int BA = 64, BB = 128, TA = 4, TB = 8, NT = 256;
    __shared__ __align__(16) float Ds[BR][tile_pitch<BA, TA>()];  // Ds[mm][qa] = DY[m0 + mm, q0 + qa]
    __shared__ __align__(16) float Xs[BR][tile_pitch<BB, TB>()];  // Xs[mm][cb] = x[m0 + mm, c0 + cb]
    __shared__ int pix_n[BR], pix_i[BR], pix_j[BR];
    const int M = N * H * W, Q = 4 * K, H2 = 2 * H, W2 = 2 * W;
    const int c0 = blockIdx.x * BB, q0 = blockIdx.y * BA, split = blockIdx.z;
    const int m_begin = split * rows, m_end = min(M, m_begin + rows);
    const int tid = threadIdx.x, tx = tid % (BB / TB), ty = tid / (BB / TB);

    const int qa = tid % BA, q = q0 + qa;  // the column of DY this thread stages
    const bool q_ok = q < Q;
    const int ab = q_ok ? q / K : 0, k = q - ab * K, a = ab / 2, b = ab - 2 * a;
    const int cb = tid % BB, c = c0 + cb;  // the column of x this thread stages

    float acc[TA][TB];
    for (int i = 0; i < TA; ++i)
        for (int t = 0; t < TB; ++t) acc[i][t] = 0.0f;

    for (int m0 = m_begin; m0 < m_end; m0 += BR) {
        __syncthreads();
        if (tid < BR) {
            const int m = m0 + tid;
            const int n = m / (H * W), rem = m - n * (H * W);
            pix_n[tid] = m < m_end ? n : -1;
            pix_i[tid] = rem / W;
            pix_j[tid] = rem - (rem / W) * W;
        }
        for (int mm = tid / BB; mm < BR; mm += NT / BB) {
            const int m = m0 + mm;
            Xs[mm][cb] = (m < m_end && c < C) ? x[(long long)m * C + c] : 0.0f;
        }
        __syncthreads();  // pix_* ready
        for (int mm = tid / BA; mm < BR; mm += NT / BA) {
            float v = 0.0f;
            if (q_ok && pix_n[mm] >= 0) {
                const long long o =
                    (((long long)pix_n[mm] * H2 + 2 * pix_i[mm] + a) * W2 + 2 * pix_j[mm] + b) *
                    ld;
                v = dy[o + off + k];
            }
            Ds[mm][qa] = v;
        }
        __syncthreads();
        register_tile_step<BA, BB>(Ds, Xs, ty, tx, acc);
    }

    float* o = out + (long long)split * Q * C;
    for (int i = 0; i < TA; ++i) {
        const int qq = q0 + tile_index<BA, TA>(ty, i);
        if (qq >= Q) continue;
        const int qab = qq / K, qk = qq - qab * K;
        for (int t = 0; t < TB; ++t) {
            const int cc = c0 + tile_index<BB, TB>(tx, t);
            if (cc < C) o[((long long)qk * 4 + qab) * C + cc] = acc[i][t];
        }
    }
}
