// conv.cu: 3x3 / 1x1 convolution, stride 1, "same" zero padding, NHWC, fp32, as a
// progression of versions a reader can follow, each checked against the one before:
// forward (bias + ReLU fused) and the weight gradient. The data gradient is the forward
// kernel run on dz with the kernel flipped and transposed; the bias gradient and the
// ReLU's mask are in reduce.cu. The tensor-core versions (4. mma_tf32, 5. mma_bf16) are in
// conv_mma.cu; cuda.py's CONV_VARIANTS names every version and CudaBackend(conv_variant=)
// runs any of them.
//
// What it computes (ops.py), with P = R / 2, x [N,H,W,C], w [K,R,R,C], y [N,H,W,K]:
//   forward   y[n,h,w,k] = relu?(b[k] + sum_{r,s,c} x[n, h+r-P, w+s-P, c] * w[k,r,s,c])
//   dw        dw[k,r,s,c] = sum_{n,h,w} dz[n,h,w,k] * x[n, h+r-P, w+s-P, c]
//   dx        dx[n,h,w,c] = sum_{k,r,s} dz[n, h-r+P, w-s+P, k] * w[k,r,s,c]
//             = forward(dz, wf) with wf[c, r', s', k] = w[k, R-1-r', R-1-s', c]
//             (flip_transpose_weight), no bias, no ReLU.
//
// The versions, numbered in reading order and named by technique (cuda.py CONV_VARIANTS,
// whose vocabulary the CPU backend shares: one word, one technique, on either device):
//
//   1. direct: conv_forward_direct, conv_weight_grad_direct. One thread per
//      output element, a plain loop over its reduction, every operand read from global
//      memory. Obviously right; the yardstick for all the others. The weight gradient
//      sums all N*H*W pixels in one thread: fine for tests, very slow at 512x512.
//
//   2. smem_tiled, implicit GEMM with shared-memory tiles: conv_forward_smem_16x16,
//      conv_weight_grad_smem_16x16. Think of pixels m = (n, h, w) as rows and of the
//      reduction index j = (r, s, c) (contiguous c, as in w's rows) as columns of a
//      "patch matrix" X[m, j] = x[n, h+r-P, w+s-P, c] (0 off the image), never stored:
//        forward:  y[m, k] = sum_j X[m, j] w[k, j]          (rows m, cols k, reduce over j)
//        dw:       dw[k, j] = sum_m dz[m, k] X[m, j]         (rows k, cols j, reduce over m)
//      A block owns a 16x16 tile of the result; per step it stages BR = 16 reduction
//      indices of both operands in shared memory (the patch values gathered straight
//      from x), and each of its 256 threads adds 16 products to its one output. Each
//      staged value is now read 16 times from shared memory instead of 16 times from
//      global memory (L1/L2 at best).
//
//   3. register_blocked (the fp32 default): conv_forward_128x64 (and
//      _256x16 for K <= 16), conv_weight_grad_64x128 (_64x16 for J <= 16, _16x128 for
//      K <= 16). The same staging, but each thread accumulates a TM x TN register tile
//      (8x4 forward) of outer products: per reduction step TM + TN shared loads feed
//      TM*TN FMAs (12 loads for 32 FMAs instead of 2 for 1), and a 128x64 block stages
//      16 x (128 + 64) floats for 16 x 128 x 64 FMAs. A thread owns its rows and columns
//      in runs of 4 consecutive ones (common.cuh tile_index: rows 4ty..4ty+3 and, for TM
//      = 8, the same BM/2 further), so its 12 values of a step come in 3 float4 shared
//      loads, and the lanes of a warp read one contiguous stretch per load. Where TM or TN
//      is not a multiple of 4: one every BM/TM, neighbouring threads, neighbouring words.
//      smem_tiled is this template with TM = TN = 1.
//      Vectorised loads (the _vec4 kernels, picked where C % 4 == 0 and the arrays are
//      16-byte aligned: every layer of the U-Net but the first): a thread stages four
//      consecutive reduction indices at once, which are four channels of one tap, with one
//      float4 load (and, in the weight gradient, four consecutive k of dz): a quarter of
//      the load instructions and address arithmetic of the gather.
//
//   4. mma_tf32, 5. mma_bf16, tensor cores (conv_mma.cu): register_blocked's tiling with
//      warp-level mma.sync, TF32 or BF16 operands and fp32 accumulation.
//
// The weight gradient's long reduction (N*H*W = 3.1 M pixels at the paper's shape) is
// cut into `splits` ranges of `rows` pixels so that enough blocks run when the output is
// small (level 0: K x J = 64 x 576); split s writes its own slice of a [splits, K, J]
// buffer and reduce.cu's sum_partials adds them in split order (or, with one split, the
// block writes dw directly): a fixed order, so results repeat bit for bit.
//
// Launches (cuda.py picks; 256 threads each):
//   conv_forward_direct        1-D grid-stride over M*K outputs (k fastest)
//   conv_weight_grad_direct    1-D grid-stride over K*J outputs (j fastest)
//   conv_forward_smem_16x16    grid (ceil(M/16), ceil(K/16))    1 output per thread
//   conv_weight_grad_smem_16x16  grid (ceil(J/16), ceil(K/16), splits)
//   conv_forward_128x64[_vec4]  grid (ceil(M/128), ceil(K/64))  8x4 outputs a thread (K > 16)
//   conv_forward_256x16[_vec4]  grid (ceil(M/256), ceil(K/16))  8x2 outputs a thread (K <= 16)
//   conv_weight_grad_64x128[_vec4]  grid (ceil(J/128), ceil(K/64), splits)  4x8 per thread
//   conv_weight_grad_64x16          grid (ceil(J/16), ceil(K/64), splits)   4x1 (J <= 16)
//   conv_weight_grad_16x128[_vec4]  grid (ceil(J/128), ceil(K/16), splits)  1x8 (K <= 16)
//       _vec4: float4 staging, where C % 4 == 0 (and K % 4 == 0 for the weight gradient)
//   flip_transpose_weight    1-D grid-stride over K*R*R*C
//
// Napkin math (paper shape, enc0.conv2: 12 x 512 x 512, C = K = 64, 3x3): the forward is
// 2 * M * K * 9C = 2 * 3.15 M * 64 * 576 = 232 GFLOP; x and y are 805 MB each. direct
// reads 2 operands per FMA from L1/L2 (memory-bound, a few TFLOP/s at best). smem_tiled: 2
// shared loads per FMA, bound by shared-memory bandwidth (~1/3 of FP32 FMA peak at most).
// register_blocked: per reduction step a thread does TM*TN = 32 FMAs for TM + TN = 12
// shared loads; a 128x64 block stages 12 KB for 16 x 128 x 64 FMAs: 21 FLOP per staged
// byte, and x is re-read 9x (once per tap), mostly from L1/L2. So register_blocked is
// compute-bound on FP32 FMA (~67 TFLOP/s on an H100 SXM at best); a first version like this
// reaches a fraction of that: 232 GFLOP at 15 TFLOP/s is 15 ms. The backward costs twice
// the forward (dx and dw), plus the ReLU pass of reduce.cu. A whole U-Net step at the
// paper's shape is about 14 TFLOP.
//
// Measured (one H200, 2026-12-04, bench/results/h200-2026-12-04/): register_blocked ran
// at 20-25 TFLOP/s (enc0.conv2 forward 9.2 ms, 1.25x cuDNN's fp32 time; backward 1.1-2.5x).
// ncu on conv_forward_128x64_vec4 (batch 4): SM 74% busy, shared/L1 73%, 72 registers, 3
// blocks an SM. Its SASS then spent 1,466 instructions a step and thread on 512 FFMA
// (35%): 12 scalar shared loads per reduction index, and the staging's address arithmetic
// (each row's pixel from shared memory and its address, the tap divided out of j) every
// step. Since: the float4 shared loads above, and in the _vec4 forward the rows' pixels
// and base addresses in registers and the tap advanced by BR (as conv_mma.cu's forward):
// about 860 instructions a step (60% FFMA) for _128x64_vec4, about 620 for 1,470 in
// _256x16_vec4 (72 registers there against 56: 3 blocks an SM instead of 4). Counted in
// the SASS, checked on the emulator; not yet timed on a GPU.
//
// Check: pytest -m gpu tests/test_ops.py -k conv   (GPU: vs reference.py, torch, direct)
//        pytest tests/test_ops.py -k "conv and emu"   (the same tests, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

#include "common.cuh"

// =================================================================== 1. direct
// One thread per output element; every operand straight from global memory.

// y[m, k] = relu?(b[k] + sum_{r,s,c} x[n, h+r-P, w+s-P, c] * w[k, r, s, c]), m = (n, h, w)
extern "C" __global__ void conv_forward_direct(const float* __restrict__ x,
                                               const float* __restrict__ w,
                                               const float* __restrict__ bias, int relu,
                                               float* __restrict__ y, int N, int H, int W,
                                               int C, int K, int R) {
    const int P = R / 2;
    const long long total = (long long)N * H * W * K;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += stride) {
        const int k = (int)(e % K);
        const long long m = e / K;
        const int n = (int)(m / ((long long)H * W)), rem = (int)(m % ((long long)H * W));
        const int h = rem / W, wc = rem % W;
        float acc = 0.0f;
        for (int r = 0; r < R; ++r) {
            const int hh = h + r - P;
            if (hh < 0 || hh >= H) continue;
            for (int s = 0; s < R; ++s) {
                const int ww = wc + s - P;
                if (ww < 0 || ww >= W) continue;
                const float* xp = x + (((long long)n * H + hh) * W + ww) * C;
                const float* wp = w + (((long long)k * R + r) * R + s) * C;
                for (int c = 0; c < C; ++c) acc += xp[c] * wp[c];
            }
        }
        float v = acc + bias[k];
        if (relu && v < 0.0f) v = 0.0f;
        y[e] = v;
    }
}

// dw[k, r, s, c] = sum_{n,h,w} dz[n, h, w, k] * x[n, h+r-P, w+s-P, c]
extern "C" __global__ void conv_weight_grad_direct(const float* __restrict__ dz,
                                                   const float* __restrict__ x,
                                                   float* __restrict__ dw, int N, int H,
                                                   int W, int C, int K, int R) {
    const int P = R / 2, J = R * R * C;
    const long long total = (long long)K * J;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total;
         e += stride) {
        const int j = (int)(e % J), k = (int)(e / J);
        const int r = j / (R * C), s = (j / C) % R, c = j % C;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n)
            for (int h = 0; h < H; ++h) {
                const int hh = h + r - P;
                if (hh < 0 || hh >= H) continue;
                for (int wc = 0; wc < W; ++wc) {
                    const int ww = wc + s - P;
                    if (ww < 0 || ww >= W) continue;
                    acc += dz[(((long long)n * H + h) * W + wc) * K + k] *
                           x[(((long long)n * H + hh) * W + ww) * C + c];
                }
            }
        dw[e] = acc;
    }
}

// ================== 2. smem_tiled (TM = TN = 1) and 3. register_blocked: implicit GEMM
// BR (common.cuh): reduction indices staged per step

// ------------------------------------------------------------------------------ forward
// out[m, k] = epilogue(sum_j X[m, j] * w[k, j] + b[k]); X gathered from x, w is [K, J]
template <int BM, int BN, int TM, int TN, bool VEC = false>
__device__ __forceinline__ void conv_forward_tile(const float* __restrict__ x,
                                                  const float* __restrict__ w,
                                                  const float* __restrict__ bias, int relu,
                                                  float* __restrict__ y, int N, int H, int W,
                                                  int C, int K, int R) {
    constexpr int NT = (BM / TM) * (BN / TN);  // 256 threads
    static_assert(NT % BR == 0, "each thread stages a fixed reduction index");
    // As[jj][i] = X[m0 + i, j0 + jj], Bs[jj][q] = w[k0 + q, j0 + jj] (tile_pitch)
    __shared__ __align__(16) float As[BR][tile_pitch<BM, TM>()];
    __shared__ __align__(16) float Bs[BR][tile_pitch<BN, TN>()];
    __shared__ int pix_n[VEC ? 1 : BM], pix_h[VEC ? 1 : BM], pix_w[VEC ? 1 : BM];  // scalar

    const int P = R / 2, J = R * R * C, M = N * H * W;
    const int m0 = blockIdx.x * BM, k0 = blockIdx.y * BN;
    const int tid = threadIdx.x, tx = tid % (BN / TN), ty = tid / (BN / TN);

    // VEC (one float4 = 4 channels of one tap: C % 4 == 0, x and w 16-byte aligned): a
    // thread stages reduction index jq of every step for rows first, first + STRIDE, ...;
    // their pixels and base addresses stay in registers and its tap advances by BR each
    // step (as conv_mma.cu's forward: the step's address arithmetic out of the loop).
    // Scalar: the block's BM pixels decoded once into shared memory.
    constexpr int STRIDE = NT / (BR / 4), RA = VEC ? BM / STRIDE : 1;
    const int jq = (tid % (BR / 4)) * 4, first = tid / (BR / 4);
    int a_h[RA], a_w[RA];
    long long a_base[RA];  // ((n H + h) W + w) C
    if constexpr (VEC) {
        decode_rows(m0, first, STRIDE, M, H, W, C, a_h, a_w, a_base);
    } else {
        for (int i = tid; i < BM; i += NT)
            decode_pixel(m0 + i, M, H, W, pix_n[i], pix_h[i], pix_w[i]);
    }
    Tap vtap = decode_tap(jq, J, R, C);  // VEC: the tap of j0 + jq

    float acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int q = 0; q < TN; ++q) acc[i][q] = 0.0f;

    for (int j0 = 0; j0 < J; j0 += BR) {
        __syncthreads();  // the previous step's reads are done (and pix_* written)
        if constexpr (VEC) {
            // four consecutive j are all in or all out (J % 4 == 0)
            const int j = j0 + jq;
            const Tap tap = {vtap.r, vtap.s, vtap.c, j < J};
            const int dh = tap.r - P, dw = tap.s - P;
            const long long at = ((long long)dh * W + dw) * C + tap.c;
            #pragma unroll
            for (int t = 0; t < RA; ++t) {
                const int i = first + t * STRIDE, hh = a_h[t] + dh, ww = a_w[t] + dw;
                const bool in = tap.ok && (unsigned)hh < (unsigned)H && (unsigned)ww < (unsigned)W;
                const float4 v = load4_if(x, a_base[t] + at, in);
                As[jq][i] = v.x;
                As[jq + 1][i] = v.y;
                As[jq + 2][i] = v.z;
                As[jq + 3][i] = v.w;
            }
            advance_tap(vtap, BR, R, C);
            for (int q = tid / (BR / 4); q < BN; q += NT / (BR / 4)) {
                const int k = k0 + q;
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (tap.ok && k < K) v = *reinterpret_cast<const float4*>(w + (long long)k * J + j);
                Bs[jq][q] = v.x;
                Bs[jq + 1][q] = v.y;
                Bs[jq + 2][q] = v.z;
                Bs[jq + 3][q] = v.w;
            }
        } else {
            const int jj = tid % BR;  // the reduction index this thread stages
            const int j = j0 + jj;
            const Tap tap = decode_tap(j, J, R, C);
            for (int i = tid / BR; i < BM; i += NT / BR)
                As[jj][i] = gather_patch(x, pix_n[i], pix_h[i], pix_w[i], tap, P, H, W, C);
            for (int q = tid / BR; q < BN; q += NT / BR) {
                const int k = k0 + q;
                Bs[jj][q] = (tap.ok && k < K) ? w[(long long)k * J + j] : 0.0f;
            }
        }
        __syncthreads();
        register_tile_step<BM, BN>(As, Bs, ty, tx, acc);
    }

    for (int i = 0; i < TM; ++i) {
        const int m = m0 + tile_index<BM, TM>(ty, i);
        if (m >= M) continue;
        for (int q = 0; q < TN; ++q) {
            const int k = k0 + tile_index<BN, TN>(tx, q);
            if (k >= K) continue;
            float v = acc[i][q] + bias[k];
            if (relu && v < 0.0f) v = 0.0f;
            y[(long long)m * K + k] = v;
        }
    }
}

extern "C" __global__ void
conv_forward_128x64(const float* __restrict__ x, const float* __restrict__ w,
                    const float* __restrict__ bias, int relu, float* __restrict__ y, int N,
                    int H, int W, int C, int K, int R) {
    conv_forward_tile<128, 64, 8, 4>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void
conv_forward_smem_16x16(const float* __restrict__ x, const float* __restrict__ w,
                        const float* __restrict__ bias, int relu, float* __restrict__ y, int N,
                        int H, int W, int C, int K, int R) {
    conv_forward_tile<16, 16, 1, 1>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void
conv_forward_256x16(const float* __restrict__ x, const float* __restrict__ w,
                    const float* __restrict__ bias, int relu, float* __restrict__ y, int N,
                    int H, int W, int C, int K, int R) {
    conv_forward_tile<256, 16, 8, 2>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void
conv_forward_128x64_vec4(const float* __restrict__ x, const float* __restrict__ w,
                         const float* __restrict__ bias, int relu, float* __restrict__ y,
                         int N, int H, int W, int C, int K, int R) {
    conv_forward_tile<128, 64, 8, 4, true>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void
conv_forward_256x16_vec4(const float* __restrict__ x, const float* __restrict__ w,
                         const float* __restrict__ bias, int relu, float* __restrict__ y,
                         int N, int H, int W, int C, int K, int R) {
    conv_forward_tile<256, 16, 8, 2, true>(x, w, bias, relu, y, N, H, W, C, K, R);
}

// ------------------------------------------------------------------------ weight gradient
// out[split, k, j] = sum over the split's pixels m of dz[m, k] * X[m, j]
template <int BA, int BB, int TA, int TB, bool VEC = false>
__device__ __forceinline__ void conv_weight_grad_tile(const float* __restrict__ dz,
                                                      const float* __restrict__ x,
                                                      float* __restrict__ out, int N, int H,
                                                      int W, int C, int K, int R, int rows) {
    constexpr int NT = (BA / TA) * (BB / TB);  // 256 threads
    static_assert(NT % BA == 0 && NT % BB == 0, "each thread stages a fixed column");
    __shared__ __align__(16) float Ds[BR][tile_pitch<BA, TA>()];  // Ds[mm][a] = dz[m0 + mm, k0 + a]
    __shared__ __align__(16) float Xs[BR][tile_pitch<BB, TB>()];  // Xs[mm][b] = X[m0 + mm, j0 + b]
    __shared__ int pix_n[BR], pix_h[BR], pix_w[BR];

    const int P = R / 2, J = R * R * C, M = N * H * W;
    const int j0 = blockIdx.x * BB, k0 = blockIdx.y * BA, split = blockIdx.z;
    const int m_begin = split * rows, m_end = min(M, m_begin + rows);
    const int tid = threadIdx.x, tx = tid % (BB / TB), ty = tid / (BB / TB);

    // the columns this thread stages stay the same for every step: decode them once
    // (VEC: four consecutive ones, one float4 load each: C % 4 == 0 and K % 4 == 0)
    constexpr int V = VEC ? 4 : 1;
    static_assert(NT % (BA / V) == 0 && NT % (BB / V) == 0, "fixed columns per thread");
    const int ka = (tid % (BA / V)) * V, k = k0 + ka;
    const int jb = (tid % (BB / V)) * V;
    const Tap tap = decode_tap(j0 + jb, J, R, C);

    float acc[TA][TB];
    for (int i = 0; i < TA; ++i)
        for (int q = 0; q < TB; ++q) acc[i][q] = 0.0f;

    for (int m0 = m_begin; m0 < m_end; m0 += BR) {
        __syncthreads();  // the previous step's reads of Ds, Xs and pix_* are done
        if (tid < BR) decode_pixel(m0 + tid, m_end, H, W, pix_n[tid], pix_h[tid], pix_w[tid]);
        for (int mm = tid / (BA / V); mm < BR; mm += NT / (BA / V)) {
            const int m = m0 + mm;
            if constexpr (VEC) {
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (m < m_end && k < K)
                    v = *reinterpret_cast<const float4*>(dz + (long long)m * K + k);
                Ds[mm][ka] = v.x;
                Ds[mm][ka + 1] = v.y;
                Ds[mm][ka + 2] = v.z;
                Ds[mm][ka + 3] = v.w;
            } else {
                Ds[mm][ka] = (m < m_end && k < K) ? dz[(long long)m * K + k] : 0.0f;
            }
        }
        __syncthreads();  // pix_* ready
        for (int mm = tid / (BB / V); mm < BR; mm += NT / (BB / V)) {
            if constexpr (VEC) {
                const float4 v =
                    gather_patch4(x, pix_n[mm], pix_h[mm], pix_w[mm], tap, P, H, W, C);
                Xs[mm][jb] = v.x;
                Xs[mm][jb + 1] = v.y;
                Xs[mm][jb + 2] = v.z;
                Xs[mm][jb + 3] = v.w;
            } else {
                Xs[mm][jb] = gather_patch(x, pix_n[mm], pix_h[mm], pix_w[mm], tap, P, H, W, C);
            }
        }
        __syncthreads();
        register_tile_step<BA, BB>(Ds, Xs, ty, tx, acc);
    }

    store_register_tile<BA, BB>(acc, out + (long long)split * K * J, k0, K, j0, J, ty, tx);
}

extern "C" __global__ void
conv_weight_grad_64x128(const float* __restrict__ dz, const float* __restrict__ x,
                        float* __restrict__ out, int N, int H, int W, int C, int K, int R,
                        int rows) {
    conv_weight_grad_tile<64, 128, 4, 8>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void
conv_weight_grad_smem_16x16(const float* __restrict__ dz, const float* __restrict__ x,
                            float* __restrict__ out, int N, int H, int W, int C, int K, int R,
                            int rows) {
    conv_weight_grad_tile<16, 16, 1, 1>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void
conv_weight_grad_64x128_vec4(const float* __restrict__ dz, const float* __restrict__ x,
                             float* __restrict__ out, int N, int H, int W, int C, int K, int R,
                             int rows) {
    conv_weight_grad_tile<64, 128, 4, 8, true>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void
conv_weight_grad_16x128_vec4(const float* __restrict__ dz, const float* __restrict__ x,
                             float* __restrict__ out, int N, int H, int W, int C, int K, int R,
                             int rows) {
    conv_weight_grad_tile<16, 128, 1, 8, true>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void
conv_weight_grad_64x16(const float* __restrict__ dz, const float* __restrict__ x,
                       float* __restrict__ out, int N, int H, int W, int C, int K, int R,
                       int rows) {
    conv_weight_grad_tile<64, 16, 4, 1>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void
conv_weight_grad_16x128(const float* __restrict__ dz, const float* __restrict__ x,
                        float* __restrict__ out, int N, int H, int W, int C, int K, int R,
                        int rows) {
    conv_weight_grad_tile<16, 128, 1, 8>(dz, x, out, N, H, W, C, K, R, rows);
}

// ----------------------------------------------------------------- data-gradient weights
// wf[c, r, s, k] = w[k, R-1-r, R-1-s, c]: the kernel rotated 180 degrees, in and out swapped
extern "C" __global__ void flip_transpose_weight(const float* __restrict__ w,
                                                 float* __restrict__ wf, int K, int R, int C) {
    const long long total = (long long)K * R * R * C;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += stride) {
        const Index4<long long> at = unflatten4<long long>(e, R, R, K);  // wf [C, R, R, K]
        const int c = (int)at.i0, r = (int)at.i1, s = (int)at.i2, k = (int)at.i3;
        wf[e] = w[(((long long)k * R + (R - 1 - r)) * R + (R - 1 - s)) * C + c];
    }
}
