// conv_mma.cu: 3x3 / 1x1 convolution on tensor cores, the next steps of conv.cu's
// progression: 4. mma_tf32 (TF32 operands) and 5. mma_bf16 (BF16 operands), fp32
// accumulation, NHWC, fp32 in memory. Forward (bias + ReLU fused), data gradient (the
// forward kernel on dz with conv.cu's flip_transpose_weight), weight gradient (split over
// N*H*W, ordered sum). At the end, the 2x2 stride-2 up-convolution's three GEMMs
// (upconv.cu) the same way, for CudaBackend(precision="tf32" / "bf16"), reading and writing
// the concat buffer.
//
// What it computes: what conv.cu computes (read its head first: the implicit GEMM, the
// patch matrix X[m, j], the splits of the weight gradient), with every operand of every
// multiplication rounded first, and the products summed in fp32:
//   4. mma_tf32  round = cvt.rna.tf32.f32: 10 mantissa bits kept, to nearest, ties
//                away from zero. Each product has a relative error below 2^-10.
//   5. mma_bf16  round = cvt.rn.bf16.f32: 7 mantissa bits kept, to nearest, ties to
//                even. Each product has a relative error below 2^-7.
// The bias, the ReLU and the sums stay fp32; so do x, w and y in memory (the operands are
// rounded as they are staged, so a BF16 kernel still reads 4 bytes per value: the gain is
// the tensor cores' arithmetic, not memory traffic).
//
// How, step by step from 3. register_blocked (conv.cu): the same 256-thread blocks stage
// BK = 16 reduction indices of both operands per step in shared memory, rounded on the way
// in (each value once per block, not once per use), with float4 loads where C % 4 == 0
// (_vec4, as there). The staged tiles are laid out by stage_index (16 words a row, XOR
// swizzled): every warp's staging store and fragment load hits 32 different banks.
// Then instead of each thread owning an 8x4 register tile of scalar FMAs, each of the 8
// warps owns a 32x32 piece of the block's tile and computes it with warp-wide mma.sync
// instructions:
//   TF32: mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32   (2 per 16-wide step)
//   BF16: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32  (1 per 16-wide step)
// so a warp's piece is 2 x 4 tiles of 16x8, 32 fp32 accumulators per thread. One mma
// m16n8k8 does 1024 multiply-adds for 6 register operands per thread; a scalar FMA
// loop would need 1024 / 32 = 32 FMAs per thread for the same work.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k8" / "mma.m16n8k16", the
// .tf32 and .bf16 cases; lane = %laneid, g = lane >> 2 (groupID), t = lane & 3
// (threadID_in_group)). A is row-major [16 rows][K], B is K x 8 taken column by column
// (".col": we keep it as B^T, [8 cols][K] row-major, so both are "rows of the reduction"),
// C/D are [16][8]:
//   m16n8k8 tf32   a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)     (row, k)
//                  b0 (k = t, n = g)  b1 (k = t+4, n = g)
//   m16n8k16 bf16  4 registers of 2 bf16 each, the lower index in the lower 16 bits:
//                  a{0,1} (g, 2t+{0,1})  a{2,3} (g+8, 2t+{0,1})
//                  a{4,5} (g, 2t+8+{0,1})  a{6,7} (g+8, 2t+8+{0,1})
//                  b{0,1} (k = 2t+{0,1}, n = g)  b{2,3} (k = 2t+8+{0,1}, n = g)
//   both           c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
// The inline PTX sits in four small helpers (to_tf32, to_bf16, mma_tf32_m16n8k8,
// mma_bf16_m16n8k16); tests/cuda_emu.h (NODULEKIT_CUDA_EMU) replaces them with C++ that
// implements these very layouts as one warp-wide step, so the emulator checks the index
// maths here against the PTX ISA's tables.
//
// Launches (cuda.py; 256 threads = 8 warps each, __launch_bounds__(256, 2): at most 128
// registers, so two blocks fit an SM; <PREC> = tf32 or bf16):
//   conv_forward_mma_<PREC>[_vec4]      grid (ceil(M/128), ceil(K/64))   warps 4 (m) x 2 (k)
//   conv_weight_grad_mma_<PREC>[_vec4]  grid (ceil(J/128), ceil(K/64), splits)
//                                                                    warps 2 (k) x 4 (j)
//       _vec4: float4 staging, where C % 4 == 0 (and K % 4 == 0 for the weight gradient)
//       as conv.cu's weight gradient: split s of the N*H*W pixels writes its own slice of a
//       [splits, K, J] buffer, reduce.cu's sum_partials adds the slices in split order.
//
// Napkin math (enc0.conv2 at the paper's shape, 232 GFLOP forward): an H100 SXM's dense
// TF32 peak is ~495 TFLOP/s and BF16 ~990 (~378 / 756 for the PCIe card), against ~67 for
// FP32 FMA. This first tensor-core version stages through shared memory with plain loads
// and one buffer (no cp.async pipeline, no ldmatrix, no wgmma), and gathers the patch
// matrix with 4-byte loads; it is latency- and load-bound far below those peaks. Expect
// it in tens of TFLOP/s, which is still 2-4x register_blocked; the next steps (double
// buffering with cp.async, 16-byte gathers where C % 4 == 0, ldmatrix, then wgmma on
// sm_90) are named here, not built. At 232 GFLOP, 100 TFLOP/s is 2.3 ms.
//
// Measured (one H200, 2026-12-04, bench/results/h200-2026-12-04/; batch 12, 512 x 512,
// width 64, CUDA events): correct (every GPU test of both versions passed), but only
// 27-42 TFLOP/s, 1.3-1.6x register_blocked where 2-4x was expected, and 3-12x (TF32) and
// 4.7-23x (BF16) cuDNN's time at the same precision. enc0.conv2's forward took 5.6 ms for
// 232 GFLOP. ncu on the TF32 forward (enc0.conv2 at batch 4, 77 GFLOP in 1.89 ms, 8% of
// the TF32 peak): 967 M warp instructions for 37.7 M mma.sync (65,536 warps x 36 steps x
// 16), 26 per mma. At one instruction a cycle per scheduler (132 SMs x 4 x 1.8 GHz) the
// issuing alone takes 1.0 ms; the issue slots were 54% busy, the integer ALU pipe the
// busiest (49%). 99 registers leave 4 warps per scheduler, 0.95 of them eligible; DRAM 6%.
// Per 16 mma a warp also issues the staging's address and stage_index arithmetic, 12 cvt
// and 12 scalar shared stores per thread, and 32 scalar fragment loads: the instructions
// around the mma and too few warps to hide latency set the pace, not the tensor cores. The
// next version gives each warp more mma per staged element (64 x 32 warp tiles), loads
// fragments with ldmatrix, copies with cp.async into two buffers, and computes the gather
// offsets once per tile.
//
// Compiled for sm_90: NVRTC 13.0 as CuPy calls it, -Xptxas -v:
// forward 96-107 registers, weight gradient 114-120, up-convolution 106-118, 12.2-13.8 KB
// shared memory, no stack, no spills (the swizzled layout costs a few registers for the
// indices and saves the padding's 20%). With a bare __launch_bounds__(256) ptxas aimed at
// 64 registers and spilled (4-8 bytes). The SASS (tests/test_kernels_sass.py) has HMMA.1688
// .F32.TF32 / HMMA.16816.F32.BF16, LDG.E.128 in the _vec4 kernels, no local memory.
//
// Check: pytest -m gpu tests/test_cuda_backend.py   (GPU: one-warp mma and cvt probes
//        against NumPy)
//        pytest -m gpu tests/test_ops.py -k every_version   (GPU: vs reference, direct,
//        torch, and the reference on operands rounded as here)
//        pytest tests/test_ops.py -k "every_version and emu"   (the same, CPU emulator)
//        nodulekit inspect --kernels   (sm_90 compile: registers, smem, spills)

#include "common.cuh"

#define BK 16  // reduction indices staged per step: one row of a staged tile
#define PREC_TF32 0
#define PREC_BF16 1

// ------------------------------------------------------------------ the PTX, in one place
// Round an fp32 value to TF32 (kept in an fp32 container, low 13 bits zero).
__device__ __forceinline__ float to_tf32(float v) {
#ifdef NODULEKIT_CUDA_EMU
    return emu::cvt_rna_tf32(v);
#else
    unsigned u;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(v));
    return __uint_as_float(u);
#endif
}

// Round an fp32 value to BF16 (kept in an fp32 container, low 16 bits zero).
__device__ __forceinline__ float to_bf16(float v) {
#ifdef NODULEKIT_CUDA_EMU
    return emu::cvt_rn_bf16(v);
#else
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return __uint_as_float((unsigned)h << 16);
#endif
}

// d += A (16x8, tf32) * B (8x8, tf32), all 32 lanes of the warp together
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], const unsigned (&a)[4],
                                                 const unsigned (&b)[2]) {
#ifdef NODULEKIT_CUDA_EMU
    emu::mma_sync(emu::MMA_TF32_M16N8K8, d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// d += A (16x16, bf16) * B (16x8, bf16), all 32 lanes of the warp together
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4],
                                                  const unsigned (&b)[2]) {
#ifdef NODULEKIT_CUDA_EMU
    emu::mma_sync(emu::MMA_BF16_M16N8K16, d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// ----------------------------------------------------------------------- shared pieces
template <int PREC>
__device__ __forceinline__ float round_operand(float v) {
    return PREC == PREC_TF32 ? to_tf32(v) : to_bf16(v);
}

// Where element (r, c) of a staged tile lives (r < 128 its row, c < BK its reduction
// index): 16 words a row, no padding; rows 2i and 2i+1 share the 32 words of line i, and
// those 32 words are permuted by XOR with a mask of the row's bits 1-6. The mask makes
// every warp-wide access of these kernels hit 32 different banks (bank = word % 32):
//   staging stores, a warp writing: 2 rows x 16 indices (scalar forward), 8 rows x 4
//   float4 groups (_vec4 forward), one index of 32 consecutive rows (scalar weight
//   gradient, up-convolution), one index of 16 rows 4 apart x 2 indices and one of 32 rows
//   4 apart (_vec4 weight gradient);
//   fragment loads: rows g = 0..7 at indices t, t + 4 (TF32) and 2t, 2t + 1, 2t + 8,
//   2t + 9 (BF16).
// With the former layout ([rows][BK + 4], the padding that made the TF32 fragment loads
// conflict-free) those stores were 16-way (_vec4 Xs), 8-way (_vec4 Ds), 4-way (a column of
// 32 rows, the _vec4 forward) and 2-way (scalar forward, BF16 loads) bank conflicts.
// mask bits: b0 = r1 ^ r6, b1 = r2, b2 = r1 ^ r3, b3 = r2 ^ r4, b4 = r5 (tests/
// test_cuda_emu.py counts the banks of every warp access from the emulator's record).
__device__ __forceinline__ int stage_index(int r, int c) {
    const int mask = (((r >> 1) & 3) * 5) ^ ((r >> 1) & 0x1C) ^ ((r >> 6) & 1);
    return ((r >> 1) << 5) | ((((r & 1) << 4) | c) ^ mask);
}

// The four values of v, rounded, into elements (r + s * dr, c + s * dc), s = 0..3, of a
// staged tile: a float4 load (four consecutive reduction indices: dr = 0, dc = 1; or four
// consecutive rows: dr = 1, dc = 0)
template <int PREC>
__device__ __forceinline__ void store_rounded4(float* S, int r, int c, int dr, int dc,
                                               float4 v) {
    S[stage_index(r, c)] = round_operand<PREC>(v.x);
    S[stage_index(r + dr, c + dc)] = round_operand<PREC>(v.y);
    S[stage_index(r + 2 * dr, c + 2 * dc)] = round_operand<PREC>(v.z);
    S[stage_index(r + 3 * dr, c + 3 * dc)] = round_operand<PREC>(v.w);
}

// The four values of v, rounded, into slots slot ^ 0..3 of a staged tile: elements (r, c
// + e) of stage_index(r, c) = slot with c % 4 == 0 (see stage_index)
template <int PREC>
__device__ __forceinline__ void store_rounded4_at(float* S, int slot, float4 v) {
    S[slot] = round_operand<PREC>(v.x);
    S[slot ^ 1] = round_operand<PREC>(v.y);
    S[slot ^ 2] = round_operand<PREC>(v.z);
    S[slot ^ 3] = round_operand<PREC>(v.w);
}

// a warp's MI x NI tiles of 16x8 fp32 accumulators (4 per lane), all zero
template <int MI, int NI>
__device__ __forceinline__ void zero_accumulators(float (&acc)[MI][NI][4]) {
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
}

// two bf16 values (already rounded, in fp32 containers) -> one .bf16x2 register, lo first
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    return (__float_as_uint(lo) >> 16) | (__float_as_uint(hi) & 0xFFFF0000u);
}

// One BK-wide step of a warp's (MI*16) x (NI*8) piece: acc += As[rows] * Bs[cols]^T, where
// As holds the warp's rows from row0 and Bs its columns from col0, both staged tiles
// (stage_index) with the reduction index along the row. The fragment loads follow the
// layouts in the header.
template <int PREC, int MI, int NI>
__device__ __forceinline__ void warp_mma_step(const float* As, const float* Bs, int row0,
                                              int col0, int lane, float (&acc)[MI][NI][4]) {
    // stage_index(r, c) = stage_index(r, 0) ^ c: one base per fragment row, then XORs
    const int g = lane >> 2, t = lane & 3;
    int ra[MI][2], rb[NI];
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
        ra[mi][0] = stage_index(row0 + mi * 16 + g, 0);
        ra[mi][1] = stage_index(row0 + mi * 16 + g + 8, 0);
    }
    #pragma unroll
    for (int ni = 0; ni < NI; ++ni) rb[ni] = stage_index(col0 + ni * 8 + g, 0);
    if constexpr (PREC == PREC_TF32) {
        #pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned a[MI][4], b[NI][2];
            #pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                a[mi][0] = __float_as_uint(As[ra[mi][0] ^ (kk + t)]);
                a[mi][1] = __float_as_uint(As[ra[mi][1] ^ (kk + t)]);
                a[mi][2] = __float_as_uint(As[ra[mi][0] ^ (kk + t + 4)]);
                a[mi][3] = __float_as_uint(As[ra[mi][1] ^ (kk + t + 4)]);
            }
            #pragma unroll
            for (int ni = 0; ni < NI; ++ni) {
                b[ni][0] = __float_as_uint(Bs[rb[ni] ^ (kk + t)]);
                b[ni][1] = __float_as_uint(Bs[rb[ni] ^ (kk + t + 4)]);
            }
            #pragma unroll
            for (int mi = 0; mi < MI; ++mi)
                #pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_tf32_m16n8k8(acc[mi][ni], a[mi], b[ni]);
        }
    } else {
        unsigned a[MI][4], b[NI][2];
        #pragma unroll
        for (int mi = 0; mi < MI; ++mi)
            #pragma unroll
            for (int r = 0; r < 4; ++r) {  // a0: (g, 2t) a1: (g+8, 2t) a2: (g, 2t+8) a3: (g+8, 2t+8)
                const int base = ra[mi][r & 1], c = 2 * t + 8 * (r >> 1);
                a[mi][r] = pack_bf16x2(As[base ^ c], As[base ^ (c + 1)]);
            }
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni)
            #pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int c = 2 * t + 8 * r;
                b[ni][r] = pack_bf16x2(Bs[rb[ni] ^ c], Bs[rb[ni] ^ (c + 1)]);
            }
        #pragma unroll
        for (int mi = 0; mi < MI; ++mi)
            #pragma unroll
            for (int ni = 0; ni < NI; ++ni) mma_bf16_m16n8k16(acc[mi][ni], a[mi], b[ni]);
    }
}

// ------------------------------------------------------------------------------ forward
// y[m, k] = epilogue(sum_j X[m, j] * w[k, j] + b[k]); block tile 128 (m) x 64 (k)
//
// The staging: a thread stages the same rows and the same reduction index of each BK-wide
// step, so what depends on them alone is computed once, before the loop (after the first
// GPU run, where ncu found the kernel issue-bound at 26 instructions per mma.sync and the
// SASS showed the step's address and swizzle arithmetic recomputed every step): each row's
// pixel and base address and its slots in the staged tile (stage_index(r, c + e) =
// stage_index(r, c) ^ e for c % 4 == 0), the weight rows. The tap (r, s, c) of the
// thread's reduction index advances by BK each step instead of being divided out of j.
// Static count (SASS of conv_forward_mma_tf32_vec4, the loop over j): 495 instructions
// per step and thread for 16 mma.sync a warp before (419 in the loop's code, its A
// staging loop run twice), 329 after: 31 per mma.sync down to 21. What is left is mostly
// the 32 fragment loads' XORed addresses (2 instructions each) and the operand rounding
// (3 each for TF32). Predicted, not yet measured on a GPU: where the issue rate bounds it
// (54% of the issue slots were busy), 1.89 ms -> ~1.3 ms for enc0.conv2 at batch 4.
template <int PREC, bool VEC>
__device__ __forceinline__ void conv_forward_mma(const float* __restrict__ x,
                                                 const float* __restrict__ w,
                                                 const float* __restrict__ bias, int relu,
                                                 float* __restrict__ y, int N, int H, int W,
                                                 int C, int K, int R) {
    constexpr int BM = 128, BN = 64, NT = 256, WM = 4;  // warps: 4 along m, 2 along k
    constexpr int MI = BM / WM / 16, NI = BN / (NT / 32 / WM) / 8;  // 2 x 4 tiles of 16x8
    __shared__ float As[BM * BK];  // (i, jj) = round(X[m0 + i, j0 + jj])   (stage_index)
    __shared__ float Bs[BN * BK];  // (q, jj) = round(w[k0 + q, j0 + jj])
    __shared__ int pix_n[VEC ? 1 : BM], pix_h[VEC ? 1 : BM], pix_w[VEC ? 1 : BM];  // scalar

    const int P = R / 2, J = R * R * C, M = N * H * W;
    const int m0 = blockIdx.x * BM, k0 = blockIdx.y * BN;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = (warp % WM) * (MI * 16), col0 = (warp / WM) * (NI * 8);

    // what this thread stages, every step: reduction index jj of the step (VEC: C % 4 == 0,
    // x and w 16-byte aligned: four consecutive ones, four channels of one tap, one float4)
    // of RA rows of X and RB rows of w, a row every NT / TPR
    constexpr int V = VEC ? 4 : 1, TPR = BK / V, STRIDE = NT / TPR;
    constexpr int RA = BM / STRIDE, RB = BN / STRIDE;
    const int jj = (tid % TPR) * V, first = tid / TPR;

    // VEC: the rows' pixels in registers (2 rows); scalar: in shared memory (8 rows a
    // thread would cost too many registers), decoded once either way
    int a_h[VEC ? RA : 1], a_w[VEC ? RA : 1];
    long long a_base[VEC ? RA : 1];  // ((n H + h) W + w) C: the pixel's first channel
    if constexpr (VEC) {
        decode_rows(m0, first, STRIDE, M, H, W, C, a_h, a_w, a_base);
    } else {
        for (int i = tid; i < BM; i += NT)
            decode_pixel(m0 + i, M, H, W, pix_n[i], pix_h[i], pix_w[i]);
    }
    int a_slot[RA], b_slot[RB];  // stage_index(row, jj)
    #pragma unroll
    for (int t = 0; t < RA; ++t) a_slot[t] = stage_index(first + t * STRIDE, jj);
    #pragma unroll
    for (int t = 0; t < RB; ++t) b_slot[t] = stage_index(first + t * STRIDE, jj);

    float acc[MI][NI][4];
    zero_accumulators(acc);

    // the tap of reduction index j = j0 + jj, advanced by BK each step (no division)
    Tap tap = decode_tap(jj, J, R, C);
    for (int j0 = 0; j0 < J; j0 += BK) {
        const int j = j0 + jj;
        tap.ok = j < J;  // with VEC, J % 4 == 0: all four in or out
        __syncthreads();  // the previous step's fragment loads are done (and pix_* written)
        if constexpr (VEC) {
            const int dh = tap.r - P, dw = tap.s - P;
            const long long at = ((long long)dh * W + dw) * C + tap.c;
            #pragma unroll
            for (int t = 0; t < RA; ++t) {
                const int hh = a_h[t] + dh, ww = a_w[t] + dw;
                const bool in = tap.ok && (unsigned)hh < (unsigned)H && (unsigned)ww < (unsigned)W;
                store_rounded4_at<PREC>(As, a_slot[t], load4_if(x, a_base[t] + at, in));
            }
        } else {
            #pragma unroll
            for (int t = 0; t < RA; ++t) {
                const int i = first + t * STRIDE;
                As[a_slot[t]] = round_operand<PREC>(
                    gather_patch(x, pix_n[i], pix_h[i], pix_w[i], tap, P, H, W, C));
            }
        }
        #pragma unroll
        for (int t = 0; t < RB; ++t) {
            const int k = k0 + first + t * STRIDE;
            const bool in = tap.ok && k < K;
            if constexpr (VEC) {
                store_rounded4_at<PREC>(Bs, b_slot[t], load4_if(w, (long long)k * J + j, in));
            } else {
                Bs[b_slot[t]] = round_operand<PREC>(in ? w[(long long)k * J + j] : 0.0f);
            }
        }
        __syncthreads();
        warp_mma_step<PREC, MI, NI>(As, Bs, row0, col0, lane, acc);
        advance_tap(tap, BK, R, C);  // the next step's
    }

    const int g = lane >> 2, t = lane & 3;
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {  // c0..c3 at (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
                const int m = m0 + row0 + mi * 16 + g + (e >> 1) * 8;
                const int k = k0 + col0 + ni * 8 + 2 * t + (e & 1);
                if (m >= M || k >= K) continue;
                float v = acc[mi][ni][e] + bias[k];
                if (relu && v < 0.0f) v = 0.0f;
                y[(long long)m * K + k] = v;
            }
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_forward_mma_tf32(const float* __restrict__ x, const float* __restrict__ w,
                      const float* __restrict__ bias, int relu, float* __restrict__ y,
                      int N, int H, int W, int C, int K, int R) {
    conv_forward_mma<PREC_TF32, false>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_forward_mma_tf32_vec4(const float* __restrict__ x, const float* __restrict__ w,
                           const float* __restrict__ bias, int relu, float* __restrict__ y,
                           int N, int H, int W, int C, int K, int R) {
    conv_forward_mma<PREC_TF32, true>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_forward_mma_bf16(const float* __restrict__ x, const float* __restrict__ w,
                      const float* __restrict__ bias, int relu, float* __restrict__ y,
                      int N, int H, int W, int C, int K, int R) {
    conv_forward_mma<PREC_BF16, false>(x, w, bias, relu, y, N, H, W, C, K, R);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_forward_mma_bf16_vec4(const float* __restrict__ x, const float* __restrict__ w,
                           const float* __restrict__ bias, int relu, float* __restrict__ y,
                           int N, int H, int W, int C, int K, int R) {
    conv_forward_mma<PREC_BF16, true>(x, w, bias, relu, y, N, H, W, C, K, R);
}

// ------------------------------------------------------------------------ weight gradient
// out[split, k, j] = sum over the split's pixels m of dz[m, k] * X[m, j]; tile 64 (k) x 128 (j)
template <int PREC, bool VEC>
__device__ __forceinline__ void conv_weight_grad_mma(const float* __restrict__ dz,
                                                     const float* __restrict__ x,
                                                     float* __restrict__ out, int N, int H,
                                                     int W, int C, int K, int R, int rows) {
    constexpr int BA = 64, BB = 128, NT = 256, WA = 2;  // warps: 2 along k, 4 along j
    constexpr int MI = BA / WA / 16, NI = BB / (NT / 32 / WA) / 8;  // 2 x 4 tiles of 16x8
    __shared__ float Ds[BA * BK];  // (a, mm) = round(dz[m0 + mm, k0 + a])   (stage_index)
    __shared__ float Xs[BB * BK];  // (b, mm) = round(X[m0 + mm, j0 + b])
    __shared__ int pix_n[BK], pix_h[BK], pix_w[BK];

    const int P = R / 2, J = R * R * C, M = N * H * W;
    const int j0 = blockIdx.x * BB, k0 = blockIdx.y * BA, split = blockIdx.z;
    const int m_begin = split * rows, m_end = min(M, m_begin + rows);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = (warp % WA) * (MI * 16), col0 = (warp / WA) * (NI * 8);

    // the columns this thread stages stay the same for every step: decode them once
    // (VEC: four consecutive ones, one float4 load each: C % 4 == 0 and K % 4 == 0)
    constexpr int V = VEC ? 4 : 1;
    const int ka = (tid % (BA / V)) * V, k = k0 + ka;
    const int jb = (tid % (BB / V)) * V;
    const Tap tap = decode_tap(j0 + jb, J, R, C);

    float acc[MI][NI][4];
    zero_accumulators(acc);

    for (int m0 = m_begin; m0 < m_end; m0 += BK) {
        __syncthreads();  // the previous step's reads of Ds, Xs and pix_* are done
        if (tid < BK) decode_pixel(m0 + tid, m_end, H, W, pix_n[tid], pix_h[tid], pix_w[tid]);
        for (int mm = tid / (BA / V); mm < BK; mm += NT / (BA / V)) {
            const int m = m0 + mm;
            const bool in = m < m_end && k < K;
            if constexpr (VEC) {
                float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (in) v = *reinterpret_cast<const float4*>(dz + (long long)m * K + k);
                store_rounded4<PREC>(Ds, ka, mm, 1, 0, v);
            } else {
                Ds[stage_index(ka, mm)] = round_operand<PREC>(in ? dz[(long long)m * K + k]
                                                                 : 0.0f);
            }
        }
        __syncthreads();  // pix_* ready
        for (int mm = tid / (BB / V); mm < BK; mm += NT / (BB / V)) {
            if constexpr (VEC) {
                store_rounded4<PREC>(Xs, jb, mm, 1, 0, gather_patch4(x, pix_n[mm], pix_h[mm],
                                                                     pix_w[mm], tap, P, H, W,
                                                                     C));
            } else {
                Xs[stage_index(jb, mm)] = round_operand<PREC>(
                    gather_patch(x, pix_n[mm], pix_h[mm], pix_w[mm], tap, P, H, W, C));
            }
        }
        __syncthreads();
        warp_mma_step<PREC, MI, NI>(Ds, Xs, row0, col0, lane, acc);
    }

    float* o = out + (long long)split * K * J;
    const int g = lane >> 2, t = lane & 3;
    #pragma unroll
    for (int mi = 0; mi < MI; ++mi)
        #pragma unroll
        for (int ni = 0; ni < NI; ++ni)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kk = k0 + row0 + mi * 16 + g + (e >> 1) * 8;
                const int jj = j0 + col0 + ni * 8 + 2 * t + (e & 1);
                if (kk < K && jj < J) o[(long long)kk * J + jj] = acc[mi][ni][e];
            }
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_weight_grad_mma_tf32(const float* __restrict__ dz, const float* __restrict__ x,
                          float* __restrict__ out, int N, int H, int W, int C, int K,
                          int R, int rows) {
    conv_weight_grad_mma<PREC_TF32, false>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_weight_grad_mma_tf32_vec4(const float* __restrict__ dz, const float* __restrict__ x,
                               float* __restrict__ out, int N, int H, int W, int C, int K,
                               int R, int rows) {
    conv_weight_grad_mma<PREC_TF32, true>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_weight_grad_mma_bf16(const float* __restrict__ dz, const float* __restrict__ x,
                          float* __restrict__ out, int N, int H, int W, int C, int K,
                          int R, int rows) {
    conv_weight_grad_mma<PREC_BF16, false>(dz, x, out, N, H, W, C, K, R, rows);
}

extern "C" __global__ void __launch_bounds__(256, 2)
conv_weight_grad_mma_bf16_vec4(const float* __restrict__ dz, const float* __restrict__ x,
                               float* __restrict__ out, int N, int H, int W, int C, int K,
                               int R, int rows) {
    conv_weight_grad_mma<PREC_BF16, true>(dz, x, out, N, H, W, C, K, R, rows);
}

// ============================================================ the 2x2 stride-2 up-convolution
// upconv.cu's three GEMMs (read its head: q = (2a + b) * K + k indexes the 4K outputs of an
// input pixel, Wq[q, c] = w[k, a, b, c], DY[m, q] = dy[n, 2i+a, 2j+b, off + k] in a buffer
// of ld channels) on tensor cores, operands rounded as they are staged, fp32 sums. The
// forward writes, and the backward reads, its channels of the decoder's concat buffer
// (ld, off) like upconv.cu's. Same blocks as above: 256 threads, 8 warps of 32x32.
//   upconv_forward_mma_<PREC>        Y[m, q] = x[m, :] . Wq[q, :]
//                                    grid (ceil(M/128), ceil(4K/64))
//   upconv_backward_data_mma_<PREC>  dx[m, c] = DY[m, :] . Wq[:, c]
//                                    grid (ceil(M/128), ceil(C/64))
//   upconv_weight_grad_mma_<PREC>    dWq[q, c] = DY[:, q] . x[:, c]
//                                    grid (ceil(C/128), ceil(4K/64), splits), partials as above

// the input pixel m = (n, i, j) -> offset of its 2x2 output block's (a, b) = (0, 0) pixel
__device__ __forceinline__ long long up_block(int m, int H, int W, int ld) {
    const int n = m / (H * W), rem = m - n * (H * W), i = rem / W, j = rem - (rem / W) * W;
    return (((long long)n * 2 * H + 2 * i) * 2 * W + 2 * j) * ld;
}

template <int PREC>
__device__ __forceinline__ void upconv_forward_mma(const float* __restrict__ x,
                                                   const float* __restrict__ w,
                                                   const float* __restrict__ bias,
                                                   float* __restrict__ y, int N, int H, int W,
                                                   int C, int K, int ld, int off) {
    constexpr int BM = 128, BN = 64, NT = 256, WM = 4;
    constexpr int MI = BM / WM / 16, NI = BN / (NT / 32 / WM) / 8;
    __shared__ float As[BM * BK];  // (i, cc) = round(x[m0 + i, c0 + cc])   (stage_index)
    __shared__ float Bs[BN * BK];  // (q, cc) = round(Wq[q0 + q, c0 + cc])
    const int M = N * H * W, Q = 4 * K;
    const int m0 = blockIdx.x * BM, q0 = blockIdx.y * BN;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = (warp % WM) * (MI * 16), col0 = (warp / WM) * (NI * 8);
    const int cc = tid % BK;

    float acc[MI][NI][4];
    zero_accumulators(acc);

    for (int c0 = 0; c0 < C; c0 += BK) {
        const int c = c0 + cc;
        __syncthreads();
        for (int i = tid / BK; i < BM; i += NT / BK) {
            const int m = m0 + i;
            As[stage_index(i, cc)] =
                round_operand<PREC>((m < M && c < C) ? x[(long long)m * C + c] : 0.0f);
        }
        for (int q = tid / BK; q < BN; q += NT / BK)
            Bs[stage_index(q, cc)] = round_operand<PREC>(upconv_wq(w, q0 + q, c, Q, C, K));
        __syncthreads();
        warp_mma_step<PREC, MI, NI>(As, Bs, row0, col0, lane, acc);
    }

    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int e2 = 0; e2 < 2; ++e2) {  // rows g and g + 8 of the 16x8 tiles
            const int m = m0 + row0 + mi * 16 + g + 8 * e2;
            if (m >= M) continue;
            const long long base = up_block(m, H, W, ld) + off;
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
#pragma unroll
                for (int e1 = 0; e1 < 2; ++e1) {
                    const int qq = q0 + col0 + ni * 8 + 2 * t + e1;
                    if (qq >= Q) continue;
                    const int ab = qq / K, k = qq - ab * K, a = ab / 2, b = ab - 2 * a;
                    y[base + ((long long)a * 2 * W + b) * ld + k] =
                        acc[mi][ni][2 * e2 + e1] + bias[k];
                }
        }
}

template <int PREC>
__device__ __forceinline__ void upconv_backward_data_mma(const float* __restrict__ dy,
                                                         const float* __restrict__ w,
                                                         float* __restrict__ dx, int N, int H,
                                                         int W, int C, int K, int ld, int off) {
    constexpr int BM = 128, BN = 64, NT = 256, WM = 4;
    constexpr int MI = BM / WM / 16, NI = BN / (NT / 32 / WM) / 8;
    __shared__ float As[BM * BK];  // (i, u) = round(DY[m0 + i, q0 + u])   (stage_index)
    __shared__ float Bs[BN * BK];  // (cc, u) = round(Wq[q0 + u, c0 + cc])
    __shared__ long long pix[BM];  // offset of each pixel's output block, -1 past the end
    const int M = N * H * W, Q = 4 * K;
    const int m0 = blockIdx.x * BM, c0 = blockIdx.y * BN;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = (warp % WM) * (MI * 16), col0 = (warp / WM) * (NI * 8);

    for (int i = tid; i < BM; i += NT) pix[i] = m0 + i < M ? up_block(m0 + i, H, W, ld) : -1;

    float acc[MI][NI][4];
    zero_accumulators(acc);

    const int uu = tid % BK;  // the q this thread stages
    for (int q0 = 0; q0 < Q; q0 += BK) {
        __syncthreads();  // (and pix written)
        const int qq = q0 + uu;
        const bool q_ok = qq < Q;
        const int ab = q_ok ? qq / K : 0, k = qq - ab * K, a = ab / 2, b = ab - 2 * a;
        for (int i = tid / BK; i < BM; i += NT / BK) {
            float v = 0.0f;
            if (q_ok && pix[i] >= 0) v = dy[pix[i] + ((long long)a * 2 * W + b) * ld + off + k];
            As[stage_index(i, uu)] = round_operand<PREC>(v);
        }
        for (int e = tid; e < BK * BN; e += NT) {  // rows of Wq, contiguous along c
            const int u = e / BN, ccol = e - u * BN;
            Bs[stage_index(ccol, u)] =
                round_operand<PREC>(upconv_wq(w, q0 + u, c0 + ccol, Q, C, K));
        }
        __syncthreads();
        warp_mma_step<PREC, MI, NI>(As, Bs, row0, col0, lane, acc);
    }

    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = m0 + row0 + mi * 16 + g + (e >> 1) * 8;
                const int c = c0 + col0 + ni * 8 + 2 * t + (e & 1);
                if (m < M && c < C) dx[(long long)m * C + c] = acc[mi][ni][e];
            }
}

template <int PREC>
__device__ __forceinline__ void upconv_weight_grad_mma(const float* __restrict__ dy,
                                                       const float* __restrict__ x,
                                                       float* __restrict__ out, int N, int H,
                                                       int W, int C, int K, int ld, int off,
                                                       int rows) {
    constexpr int BA = 64, BB = 128, NT = 256, WA = 2;
    constexpr int MI = BA / WA / 16, NI = BB / (NT / 32 / WA) / 8;
    __shared__ float Ds[BA * BK];  // (qa, mm) = round(DY[m0 + mm, q0 + qa])   (stage_index)
    __shared__ float Xs[BB * BK];  // (cb, mm) = round(x[m0 + mm, c0 + cb])
    __shared__ long long pix[BK];
    const int M = N * H * W, Q = 4 * K;
    const int c0 = blockIdx.x * BB, q0 = blockIdx.y * BA, split = blockIdx.z;
    const int m_begin = split * rows, m_end = min(M, m_begin + rows);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int row0 = (warp % WA) * (MI * 16), col0 = (warp / WA) * (NI * 8);

    const int qa = tid % BA, q = q0 + qa;  // the column of DY this thread stages
    const bool q_ok = q < Q;
    const int ab = q_ok ? q / K : 0, k = q - ab * K, a = ab / 2, b = ab - 2 * a;
    const int cb = tid % BB, c = c0 + cb;  // the column of x this thread stages

    float acc[MI][NI][4];
    zero_accumulators(acc);

    for (int m0 = m_begin; m0 < m_end; m0 += BK) {
        __syncthreads();
        if (tid < BK) pix[tid] = m0 + tid < m_end ? up_block(m0 + tid, H, W, ld) : -1;
        for (int mm = tid / BB; mm < BK; mm += NT / BB) {
            const int m = m0 + mm;
            Xs[stage_index(cb, mm)] =
                round_operand<PREC>((m < m_end && c < C) ? x[(long long)m * C + c] : 0.0f);
        }
        __syncthreads();  // pix ready
        for (int mm = tid / BA; mm < BK; mm += NT / BA) {
            float v = 0.0f;
            if (q_ok && pix[mm] >= 0) v = dy[pix[mm] + ((long long)a * 2 * W + b) * ld + off + k];
            Ds[stage_index(qa, mm)] = round_operand<PREC>(v);
        }
        __syncthreads();
        warp_mma_step<PREC, MI, NI>(Ds, Xs, row0, col0, lane, acc);
    }

    float* o = out + (long long)split * Q * C;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qq = q0 + row0 + mi * 16 + g + (e >> 1) * 8;
                const int cc = c0 + col0 + ni * 8 + 2 * t + (e & 1);
                if (qq >= Q || cc >= C) continue;
                const int qab = qq / K, qk = qq - qab * K;
                o[((long long)qk * 4 + qab) * C + cc] = acc[mi][ni][e];
            }
}

extern "C" __global__ void __launch_bounds__(256, 2)
upconv_forward_mma_tf32(const float* __restrict__ x, const float* __restrict__ w,
                        const float* __restrict__ bias, float* __restrict__ y, int N, int H,
                        int W, int C, int K, int ld, int off) {
    upconv_forward_mma<PREC_TF32>(x, w, bias, y, N, H, W, C, K, ld, off);
}

extern "C" __global__ void __launch_bounds__(256, 2)
upconv_backward_data_mma_tf32(const float* __restrict__ dy, const float* __restrict__ w,
                              float* __restrict__ dx, int N, int H, int W, int C, int K,
                              int ld, int off) {
    upconv_backward_data_mma<PREC_TF32>(dy, w, dx, N, H, W, C, K, ld, off);
}

extern "C" __global__ void __launch_bounds__(256, 2)
upconv_weight_grad_mma_tf32(const float* __restrict__ dy, const float* __restrict__ x,
                            float* __restrict__ out, int N, int H, int W, int C, int K, int ld,
                            int off, int rows) {
    upconv_weight_grad_mma<PREC_TF32>(dy, x, out, N, H, W, C, K, ld, off, rows);
}

extern "C" __global__ void __launch_bounds__(256, 2)
upconv_forward_mma_bf16(const float* __restrict__ x, const float* __restrict__ w,
                        const float* __restrict__ bias, float* __restrict__ y, int N, int H,
                        int W, int C, int K, int ld, int off) {
    upconv_forward_mma<PREC_BF16>(x, w, bias, y, N, H, W, C, K, ld, off);
}

extern "C" __global__ void __launch_bounds__(256, 2)
upconv_backward_data_mma_bf16(const float* __restrict__ dy, const float* __restrict__ w,
                              float* __restrict__ dx, int N, int H, int W, int C, int K,
                              int ld, int off) {
    upconv_backward_data_mma<PREC_BF16>(dy, w, dx, N, H, W, C, K, ld, off);
}

extern "C" __global__ void __launch_bounds__(256, 2)
upconv_weight_grad_mma_bf16(const float* __restrict__ dy, const float* __restrict__ x,
                            float* __restrict__ out, int N, int H, int W, int C, int K, int ld,
                            int off, int rows) {
    upconv_weight_grad_mma<PREC_BF16>(dy, x, out, N, H, W, C, K, ld, off, rows);
}
