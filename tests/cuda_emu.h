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
// checks argument types, launch limits and guard bytes around every array. What it cannot
// see: races between blocks, warp-level behaviour, the GPU's float rounding (no FMA
// contraction here; denormals are kept; the host's libm).
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

enum State { RUNNING, AT_BARRIER, DONE };

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

inline void fiber_main() {
    (*body)();
    (*fibers)[current].state = DONE;
    swapcontext(&(*fibers)[current].ctx, &scheduler);
}

inline void sync() {
    (*fibers)[current].state = AT_BARRIER;
    swapcontext(&(*fibers)[current].ctx, &scheduler);
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
    unsigned long long block_no = 0;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x, ++block_no) {
                bidx.x = x;
                bidx.y = y;
                bidx.z = z;
                for (const Region& r : *shared_regions) std::memset(r.p, 0xFF, r.n);
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
                    for (unsigned i = 0; i < n; ++i) {
                        const unsigned t = reverse ? n - 1 - i : i;
                        if ((*fibers)[t].state != RUNNING) continue;
                        set_thread(t);
                        swapcontext(&scheduler, &(*fibers)[t].ctx);
                    }
                    unsigned done = 0;
                    for (unsigned t = 0; t < n; ++t) done += (*fibers)[t].state == DONE;
                    if (done == n) break;
                    if (done != 0) return 1;  // some left, others wait in __syncthreads
                    for (unsigned t = 0; t < n; ++t) (*fibers)[t].state = RUNNING;
                }
            }
    return 0;
}

}  // namespace emu

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

inline void __syncthreads() { emu::sync(); }

// the device intrinsics the kernels use: round-to-nearest, never contracted
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
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
