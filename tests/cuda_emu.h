// cuda_emu.h: just enough of CUDA C++ to run nodulekit's kernels on the CPU, for tests.
//
// Included (with -include) in front of a kernels/*.cu file compiled by g++ as C++17. A
// launch runs its blocks one after another; the threads of a block are fibers (ucontext)
// on one OS thread, each run until it reaches __syncthreads or leaves the kernel, then the
// next one: a barrier is a real barrier, deterministically. Even blocks run their threads
// in order 0..n-1, odd blocks in reverse, so a missing barrier between a write by one
// thread and a read by a neighbour (either side) reads stale data in some block. Since one
// block is alive at a time, `__shared__` is `static` (each such array is filled
// with 0xFF bytes, NaN as float, before every block, so that a read of shared memory no
// thread of the block wrote shows up; tests/cuda_emu.py finds these function-local statics
// in the compiled library's symbol table and registers them with emu_add_shared).
//
// It flags a block whose threads do not all meet at the same barriers (a thread leaving
// the kernel while others wait in __syncthreads). The Python side (tests/cuda_emu.py)
// checks argument types, launch limits and guard bytes around every array.
//
// Warp-collective instructions (the tensor cores' mma.sync): threads t = 32w .. 32w+31
// form warp w, as on the GPU. A lane that reaches emu::mma_sync deposits its fragments in
// its warp's slot and waits (a fiber state of its own); the 32nd lane to arrive unpacks
// all 32 lanes' fragments into the A, B, C matrices with the PTX ISA's layouts (see
// conv_mma.cu's head), computes D = A * B + C and wakes the others, each of which takes
// its own D fragment back. A warp whose lanes do not all reach the same mma (divergence,
// a lane waiting at a barrier instead) fails the launch. The products are exact (double)
// and each D element is rounded to float once; the GPU's tensor cores add in their own
// order and precision, so results agree to a few fp32 ulps, not bit for bit.
// Operand rounding (cvt.rna.tf32.f32, cvt.rn.bf16.f32) is emulated bit-exactly. A TF32
// operand whose low 13 bits are not zero (an fp32 value passed without cvt.rna) fails the
// launch: our kernels round every operand first and never rely on what the hardware does
// with the extra bits.
//
// What it cannot see: races between blocks, the GPU's float rounding (no FMA contraction
// here; denormals are kept; the host's libm; the tensor cores' internal adds).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

struct alignas(16) float4 { float x, y, z, w; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z,
                          unsigned char w) { return {x, y, z, w}; }

namespace emu {

inline dim3 tidx, bidx, grid_dim, block_dim;

enum State { RUNNING, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    State state = DONE;
};

constexpr size_t STACK = 64 * 1024;
inline ucontext_t scheduler;
inline std::vector<Fiber>* fibers = new std::vector<Fiber>();
inline unsigned current = 0;
inline const std::function<void()>* body = nullptr;

// the __shared__ variables (static locals), poisoned before every block
inline char anchor;  // their addresses are registered relative to this one
struct Region {
    char* p;
    size_t n;
};
inline std::vector<Region>* shared_regions = new std::vector<Region>();

// the first problem a launch ran into (empty: none); emu_last_error() hands it to Python
inline char error[512] = "";
inline void fail(const char* what) {
    if (!error[0]) std::snprintf(error, sizeof error, "%s", what);
}

// warp-collective mma.sync: what each warp's lanes deposited, until all 32 are there
enum MmaKind { MMA_TF32_M16N8K8 = 1, MMA_BF16_M16N8K16 = 2 };
struct WarpSlot {
    int arrived = 0, kind = 0;
    unsigned a[32][4], b[32][2];
    float c[32][4], d[32][4];
};
inline std::vector<WarpSlot>* warps = new std::vector<WarpSlot>();

inline void fiber_main() {
    (*body)();
    (*fibers)[current].state = DONE;
    swapcontext(&(*fibers)[current].ctx, &scheduler);
}

inline void sync() {
    (*fibers)[current].state = AT_BARRIER;
    swapcontext(&(*fibers)[current].ctx, &scheduler);
}

inline float u2f(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned f2u(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, round to nearest, ties away from zero (add half
// of the dropped part to the magnitude, then clear it); NaN and infinity pass unchanged.
inline float cvt_rna_tf32(float v) {
    unsigned u = f2u(v);
    if ((u & 0x7F800000u) == 0x7F800000u) return v;
    return u2f((u + 0x1000u) & 0xFFFFE000u);
}

// cvt.rn.bf16.f32: keep 7 mantissa bits, round to nearest, ties to even; NaN stays NaN.
inline float cvt_rn_bf16(float v) {
    unsigned u = f2u(v);
    if ((u & 0x7F800000u) == 0x7F800000u) return u2f((u & 0x7FFFFFFFu) > 0x7F800000u
                                                         ? (u | 0x00400000u) & 0xFFFF0000u
                                                         : u);
    return u2f((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
}

inline float bf16_half(unsigned reg, int half) { return u2f(((reg >> (16 * half)) & 0xFFFFu) << 16); }

// D = A * B + C for a whole warp from its 32 lanes' fragments (PTX ISA layouts; g = lane
// >> 2, t = lane & 3). TF32 m16n8k8: a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);
// b0 (k = t, n = g) b1 (k = t+4, n = g). BF16 m16n8k16: register r of A holds elements
// i = 2r, 2r+1 (lower index in the lower half) at row g + 8 * ((i >> 1) & 1), column
// 2t + (i & 1) + 8 * (i >= 4); register r of B holds i = 2r, 2r+1 at k = 2t + (i & 1) +
// 8 * (i >= 2), n = g. C and D: c0 (g, 2t) c1 (g, 2t+1) c2 (g+8, 2t) c3 (g+8, 2t+1).
inline void warp_mma(WarpSlot& w) {
    const int K = w.kind == MMA_TF32_M16N8K8 ? 8 : 16;
    double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        if (w.kind == MMA_TF32_M16N8K8) {
            for (int r = 0; r < 4; ++r)
                if (w.a[lane][r] & 0x1FFFu) fail("mma tf32: an A operand is not rounded to tf32");
            for (int r = 0; r < 2; ++r)
                if (w.b[lane][r] & 0x1FFFu) fail("mma tf32: a B operand is not rounded to tf32");
            A[g][t] = u2f(w.a[lane][0]);
            A[g + 8][t] = u2f(w.a[lane][1]);
            A[g][t + 4] = u2f(w.a[lane][2]);
            A[g + 8][t + 4] = u2f(w.a[lane][3]);
            B[t][g] = u2f(w.b[lane][0]);
            B[t + 4][g] = u2f(w.b[lane][1]);
        } else {
            for (int i = 0; i < 8; ++i)
                A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] =
                    bf16_half(w.a[lane][i >> 1], i & 1);
            for (int i = 0; i < 4; ++i)
                B[2 * t + (i & 1) + 8 * (i >= 2)][g] = bf16_half(w.b[lane][i >> 1], i & 1);
        }
        for (int e = 0; e < 4; ++e) C[g + 8 * (e >> 1)][2 * t + (e & 1)] = w.c[lane][e];
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
            double sum = C[row][col];
            for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
            w.d[lane][e] = (float)sum;
        }
    }
}

inline void set_thread(unsigned t) {
    current = t;
    tidx.x = t % block_dim.x;
    tidx.y = (t / block_dim.x) % block_dim.y;
    tidx.z = t / (block_dim.x * block_dim.y);
}

// Run f() as every thread of every block; returns 0, or 1 if a block's threads did not
// all meet at the same barriers.
inline int launch(dim3 grid, dim3 block, const std::function<void()>& f) {
    grid_dim = grid;
    block_dim = block;
    body = &f;
    const unsigned n = block.x * block.y * block.z;
    while (fibers->size() < n) {
        fibers->emplace_back();
        fibers->back().stack.reset(new char[STACK]);
    }
    warps->assign((n + 31) / 32, WarpSlot());
    error[0] = 0;
    unsigned long long block_no = 0;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x, ++block_no) {
                bidx.x = x;
                bidx.y = y;
                bidx.z = z;
                for (const Region& r : *shared_regions) std::memset(r.p, 0xFF, r.n);
                for (WarpSlot& w : *warps) w.arrived = 0;
                for (unsigned t = 0; t < n; ++t) {
                    Fiber& fb = (*fibers)[t];
                    getcontext(&fb.ctx);
                    fb.ctx.uc_stack.ss_sp = fb.stack.get();
                    fb.ctx.uc_stack.ss_size = STACK;
                    fb.ctx.uc_link = nullptr;
                    makecontext(&fb.ctx, fiber_main, 0);
                    fb.state = RUNNING;
                }
                const bool reverse = block_no % 2 == 1;
                for (;;) {
                    // run every runnable thread until it waits (barrier or warp) or ends;
                    // a warp's last lane wakes the other 31, so go round until none runs
                    for (bool ran = true; ran;) {
                        ran = false;
                        for (unsigned i = 0; i < n; ++i) {
                            const unsigned t = reverse ? n - 1 - i : i;
                            if ((*fibers)[t].state != RUNNING) continue;
                            set_thread(t);
                            swapcontext(&scheduler, &(*fibers)[t].ctx);
                            ran = true;
                        }
                    }
                    if (error[0]) return 3;
                    unsigned done = 0, at_warp = 0;
                    for (unsigned t = 0; t < n; ++t) {
                        done += (*fibers)[t].state == DONE;
                        at_warp += (*fibers)[t].state == AT_WARP;
                    }
                    if (at_warp) return 2;    // some lanes of a warp never reached its mma
                    if (done == n) break;
                    if (done != 0) return 1;  // some left, others wait in __syncthreads
                    for (unsigned t = 0; t < n; ++t) (*fibers)[t].state = RUNNING;
                }
            }
    return 0;
}

// One lane's part of a warp-wide mma.sync: deposit, wait for the other 31 (the last one
// computes for all), take this lane's D fragment back. d holds C on the way in.
inline void mma_sync(int kind, float* d, const unsigned* a, const unsigned* b) {
    WarpSlot& w = (*warps)[current / 32];
    const unsigned lane = current % 32;
    if (w.arrived == 0) w.kind = kind;
    if (w.kind != kind) fail("lanes of a warp reached different mma.sync shapes");
    std::memcpy(w.a[lane], a, sizeof w.a[lane]);
    std::memcpy(w.b[lane], b, sizeof w.b[lane]);
    std::memcpy(w.c[lane], d, sizeof w.c[lane]);
    if (++w.arrived < 32) {
        (*fibers)[current].state = AT_WARP;
        swapcontext(&(*fibers)[current].ctx, &scheduler);
    } else {
        warp_mma(w);
        w.arrived = 0;
        const unsigned first = current - lane;
        for (unsigned t = first; t < first + 32 && t < fibers->size(); ++t)
            if ((*fibers)[t].state == AT_WARP) (*fibers)[t].state = RUNNING;
    }
    std::memcpy(d, w.d[lane], sizeof w.d[lane]);
}

}  // namespace emu

extern "C" __attribute__((visibility("default"))) const char* emu_last_error() {
    return emu::error;
}

extern "C" __attribute__((visibility("default"))) void emu_add_shared(long long offset,
                                                                      unsigned long long n) {
    emu::shared_regions->push_back({&emu::anchor + offset, (size_t)n});
}

#define threadIdx (emu::tidx)
#define blockIdx (emu::bidx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define NODULEKIT_CUDA_EMU 1  // kernels swap their inline PTX for the emu:: models

inline void __syncthreads() { emu::sync(); }

// the device intrinsics the kernels use: round-to-nearest, never contracted
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __uint_as_float(unsigned u) { return emu::u2f(u); }
inline unsigned __float_as_uint(float f) { return emu::f2u(f); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline void __threadfence() {}

// one OS thread runs every fiber: plain additions are atomic enough
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    *p = old + v;
    return old;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}
inline int atomicAdd(int* p, int v) {
    const int old = *p;
    *p = old + v;
    return old;
}

using std::max;
using std::min;
