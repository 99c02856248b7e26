// common.cuh: the helpers more than one kernel file uses, in one place.
//
// Not a kernel file of its own: conv.cu, conv_mma.cu, upconv.cu and pool.cu say
// #include "common.cuh", and cuda.py's kernel_source() puts this text in place of that
// line (between #line directives, so messages still name this file) before anything
// compiles it: CuPy's RawModule, the NVRTC check (kernel_check.py, `nodulekit inspect
// --kernels`), nvcc and the tests' CPU emulator all get one self-contained text, and CuPy's
// on-disk cache, which is keyed by that text, recompiles when this file changes. Compiled
// on its own (nvcc on a kernels/*.cu file), the #include finds it beside the including file.
//
// Everything here is __forceinline__: inlined into each kernel, no calls, no stack.

#ifndef NODULEKIT_COMMON_CUH
#define NODULEKIT_COMMON_CUH

// ------------------------------------------------------------------ implicit-GEMM pixels
// A pixel index past the end of the data is decoded to this image row. Every patch gather
// computes hh = h + r - P (kernel row r, padding P) and loads only where 0 <= hh < H, so a
// row this far above the image fails that test for any kernel size, and the gather needs no
// separate "pixel exists" test. Why not -1: with r - P up to +P, -1 + 1 = 0 is a real row.
// Why not INT_MIN: h + r - P would then overflow (undefined behaviour) for r < P. -2^28
// leaves 2^31 - 2^28 of room either way, and the 64-bit address built from it (never
// dereferenced) cannot overflow.
enum : int { OFF_IMAGE_ROW = -(1 << 28) };  // (an enumerator, not a __device__ variable)

// Pixel m = (n, h, w) of an [N, H, W] batch (m = (n * H + h) * W + w), or (0,
// OFF_IMAGE_ROW, 0) where m >= m_end: the implicit GEMM's row m, decoded once per staged
// tile and kept in shared memory (pix_n, pix_h, pix_w) by the 3x3 convolutions.
__device__ __forceinline__ void decode_pixel(int m, int m_end, int H, int W, int& n, int& h,
                                             int& w) {
    if (m < m_end) {
        const int nn = m / (H * W), rem = m - nn * (H * W);
        n = nn;
        h = rem / W;
        w = rem - (rem / W) * W;
    } else {
        n = 0;
        h = OFF_IMAGE_ROW;
        w = 0;
    }
}

// Column j of the patch matrix X (conv.cu's head): the reduction index j = (r * R + s) * C
// + c, i.e. kernel tap (r, s) and input channel c. ok: j < J; past the end r = s = 0 (and c
// out of range), so that no address built from it leaves the image, and X is 0 there.
struct Tap {
    int r, s, c;
    bool ok;
};

__device__ __forceinline__ Tap decode_tap(int j, int J, int R, int C) {
    const bool ok = j < J;
    const int r = ok ? j / (R * C) : 0, rs = ok ? j / C : 0;
    return {r, rs - r * R, j - rs * C, ok};
}

// X[m, j] = x[n, h + r - P, w + s - P, c] for pixel m = (n, h, w) and column j = tap t, or 0
// where the tap falls off the image (zero padding), m is past the end (h = OFF_IMAGE_ROW)
// or j is (!t.ok): one value of the patch matrix, gathered straight from x [N, H, W, C].
__device__ __forceinline__ float gather_patch(const float* __restrict__ x, int n, int h, int w,
                                              Tap t, int P, int H, int W, int C) {
    const int hh = h + t.r - P, ww = w + t.s - P;
    const bool in = t.ok && hh >= 0 && hh < H && ww >= 0 && ww < W;
    const long long at = (((long long)n * H + hh) * W + ww) * C + t.c;
    return in ? x[at] : 0.0f;
}

// X[m, j .. j+3] as one float4: four channels of one tap (C % 4 == 0, x 16-byte aligned), a
// quarter of gather_patch's load instructions; four consecutive j are all in or all out.
__device__ __forceinline__ float4 gather_patch4(const float* __restrict__ x, int n, int h,
                                                int w, Tap t, int P, int H, int W, int C) {
    const int hh = h + t.r - P, ww = w + t.s - P;
    const bool in = t.ok && hh >= 0 && hh < H && ww >= 0 && ww < W;
    const long long at = (((long long)n * H + hh) * W + ww) * C + t.c;
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (in) v = *reinterpret_cast<const float4*>(x + at);
    return v;
}

// The tap of reduction index j + step from that of j (the same r, s, c as decode_tap, by
// carrying c into s and r instead of dividing): a thread that stages the same index of
// each step keeps its tap in registers. Past J the values are meaningless (ok is the
// caller's: j < J).
__device__ __forceinline__ void advance_tap(Tap& t, int step, int R, int C) {
    t.c += step;
    while (t.c >= C) {
        t.c -= C;
        if (++t.s == R) {
            t.s = 0;
            ++t.r;
        }
    }
}

// The pixels of a thread's RA staged rows first, first + stride, ... of a forward block's
// tile at m0, decoded once into registers: h, w and the base address ((n H + h) W + w) C
// of each (a row past M gets a row off the image, as decode_pixel's)
template <int RA>
__device__ __forceinline__ void decode_rows(int m0, int first, int stride, int M, int H,
                                            int W, int C, int (&h)[RA], int (&w)[RA],
                                            long long (&base)[RA]) {
    #pragma unroll
    for (int t = 0; t < RA; ++t) {
        int n;
        decode_pixel(m0 + first + t * stride, M, H, W, n, h[t], w[t]);
        base[t] = (((long long)n * H + h[t]) * W + w[t]) * C;
    }
}

// p[at .. at + 3] as one float4 (16-byte aligned) where in, else zeros; nothing is read
// where not in
__device__ __forceinline__ float4 load4_if(const float* __restrict__ p, long long at, bool in) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    if (in) v = *reinterpret_cast<const float4*>(p + at);
    return v;
}

// Which rows (and columns) of a block's tile thread t owns in the fp32 register-blocked
// GEMMs: side B shared among B / T threads, T values each. Where T % 4 == 0, in runs of 4
// consecutive values (one float4 shared load each), the runs B / (T / 4) apart, so that
// the lanes of a warp read one contiguous stretch per load (no bank conflicts); else one
// every B / T (neighbouring threads, neighbouring words).
template <int B, int T>
__device__ __forceinline__ int tile_index(int t, int e) {
    if constexpr (T % 4 == 0) return (e / 4) * (B / (T / 4)) + t * 4 + e % 4;
    else return t + e * (B / T);
}

// Thread (ty, tx)'s TM x TN register tile (rows tile_index<BM, TM>(ty, i), columns
// tile_index<BN, TN>(tx, q) of the block's tile at (row0, col0)) to out [rows, cols],
// row-major, where inside it: the plain epilogue of the fp32 GEMMs without bias (weight
// gradients, data gradients).
template <int BM, int BN, int TM, int TN>
__device__ __forceinline__ void store_register_tile(const float (&acc)[TM][TN],
                                                    float* __restrict__ out, int row0,
                                                    int rows, int col0, int cols, int ty,
                                                    int tx) {
    for (int i = 0; i < TM; ++i) {
        const int row = row0 + tile_index<BM, TM>(ty, i);
        if (row >= rows) continue;
        for (int q = 0; q < TN; ++q) {
            const int col = col0 + tile_index<BN, TN>(tx, q);
            if (col < cols) out[(long long)row * cols + col] = acc[i][q];
        }
    }
}

// ------------------------------------------------------------ register-blocked GEMM step
#define BR 16  // reduction indices staged per step in shared memory (fp32 kernels)

// A staged tile's row pitch for a side of B values read T at a time: a multiple of 4 where
// T % 4 == 0 (the float4 loads; the tile is declared __align__(16)), else B + 1 (the
// padding that spreads a column's words over the banks for the scalar path).
template <int B, int T>
__host__ __device__ constexpr int tile_pitch() {
    return T % 4 == 0 ? (B % 4 == 0 ? B : B + 4 - B % 4) : B + 1;
}

// Thread t's T values of one staged row (tile_index<B, T>(t, 0 .. T-1)) into v
template <int B, int T>
__device__ __forceinline__ void load_tile_values(const float* row, int t, float (&v)[T]) {
    if constexpr (T % 4 == 0) {
        #pragma unroll
        for (int r = 0; r < T / 4; ++r) {
            const float4 f = *reinterpret_cast<const float4*>(row + tile_index<B, T>(t, 4 * r));
            v[4 * r] = f.x;
            v[4 * r + 1] = f.y;
            v[4 * r + 2] = f.z;
            v[4 * r + 3] = f.w;
        }
    } else {
        #pragma unroll
        for (int e = 0; e < T; ++e) v[e] = row[tile_index<B, T>(t, e)];
    }
}

// One staged step of the fp32 register-blocked GEMMs (conv.cu, upconv.cu): for each of the
// BR staged reduction indices u, thread (ty, tx) adds the outer product of its TM values of
// A's row u and its TN values of B's row u (tile_index) to its TM x TN register tile: TM +
// TN values, in (TM + TN) / 4 float4 shared loads where both are multiples of 4, feed TM *
// TN FMAs. A and B are the staged tiles, [BR][LDA] and [BR][LDB] (LDA >= BM, LDB >= BN;
// tile_pitch's pitches where the float4 loads need them).
template <int BM, int BN, int TM, int TN, int LDA, int LDB>
__device__ __forceinline__ void register_tile_step(const float (*A)[LDA], const float (*B)[LDB],
                                                   int ty, int tx, float (&acc)[TM][TN]) {
    static_assert(TM % 4 != 0 || LDA % 4 == 0, "float4 loads of A need a pitch of 4k");
    static_assert(TN % 4 != 0 || LDB % 4 == 0, "float4 loads of B need a pitch of 4k");
    for (int u = 0; u < BR; ++u) {
        float a[TM], b[TN];
        load_tile_values<BM, TM>(A[u], ty, a);
        load_tile_values<BN, TN>(B[u], tx, b);
        for (int i = 0; i < TM; ++i)
            for (int q = 0; q < TN; ++q) acc[i][q] += a[i] * b[q];
    }
}

// -------------------------------------------------------------------- up-convolution GEMM
// Wq[q, c] of a 2x2 up-convolution's weight w [K, 2, 2, C], where q = (2a + b) * K + k
// indexes the 4K outputs of one input pixel (upconv.cu's head), or 0 outside [0, Q) x
// [0, C) (Q = 4K): the B operand of the forward and the data gradient, fp32 and mma alike.
__device__ __forceinline__ float upconv_wq(const float* __restrict__ w, int q, int c, int Q,
                                           int C, int K) {
    float v = 0.0f;
    if (q < Q && c < C) {
        const int ab = q / K, k = q - ab * K;
        v = w[((long long)k * 4 + ab) * C + c];
    }
    return v;
}

// ------------------------------------------------------------------------------- indexing
// e = ((i0 * D1 + i1) * D2 + i2) * D3 + i3  ->  (i0, i1, i2, i3): a grid-stride kernel's
// flat index back to the coordinates of a 4-D array [D0, D1, D2, D3] (NHWC: (n, h, w, c)).
// Index is unsigned (pool.cu: 32-bit division is much cheaper than 64-bit) or long long.
template <typename Index>
struct Index4 {
    Index i0, i1, i2, i3;
};

template <typename Index>
__device__ __forceinline__ Index4<Index> unflatten4(Index e, Index D1, Index D2, Index D3) {
    Index rest = e / D3;
    const Index i3 = e - rest * D3;
    const Index i2 = rest % D2;
    rest /= D2;
    return {rest / D1, rest % D1, i2, i3};
}

#endif  // NODULEKIT_COMMON_CUH
