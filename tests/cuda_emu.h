// cuda_emu.h: just enough of CUDA C++ to run nodulekit's kernels on the CPU, for tests.
//
// Included (with -include) in front of a kernels/*.cu file compiled by g++ as C++17 with
// -fsanitize=thread instrumentation but without ThreadSanitizer's runtime: the compiler
// turns every load and store of the kernel code into a call of __tsan_read<N> /
// __tsan_write<N>, which this header defines (see "Memory checks" below). A launch runs
// its blocks one after another; the threads of a block are fibers (ucontext) on one OS
// thread, each run until it reaches __syncthreads, a warp-wide mma.sync or the end of the
// kernel, then another: a barrier is a real barrier. Since one block is alive at a time,
// `__shared__` is `static` (each such array is filled with 0xFF bytes, NaN as float,
// before every block, so that a read of shared memory no thread of the block wrote shows
// up; tests/cuda_emu.py finds these function-local statics in the compiled library's
// symbol table and registers them with emu_add_shared).
//
// Thread order. With seed 0 even blocks run their threads in order 0..n-1 and odd blocks
// in reverse (the old fixed order). With any other seed (emu_configure; tests/cuda_emu.py
// takes NODULEKIT_EMU_SEED, default 1) every pass over the runnable threads of every
// barrier interval runs them in a fresh pseudo-random order drawn from (seed, launch,
// block, interval, pass): a missing barrier between a write by one thread and a read by
// another reads stale data under some seed, and the race checker below names it.
//
// Memory checks (each can be switched off with emu_configure):
// - races in shared memory: two threads of a block touching one 4-byte word of a
//   __shared__ array in the same barrier interval, at least one of them writing, fail the
//   launch, naming the array, the threads and the interval (what compute-sanitizer's
//   racecheck reports on the GPU). Atomics (atomicAdd here) are exempt, as on the GPU.
// - bounds of global memory: every access that falls inside one of the launch's array
//   allocations (tests/cuda_emu.py registers each array argument: its view and the whole
//   allocation with its guard bytes, emu_set_spans) but outside every argument's own
//   bytes fails the launch: an out-of-bounds read as well as a write, with the thread,
//   block and the distance past the array (what memcheck reports).
// - recording: the shared-memory accesses of one chosen block (thread, barrier interval,
//   the instruction's address, array, byte offset, size, read or write) for the tests'
//   static counts of bank conflicts (emu_record_block, emu_records).
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
// a lane waiting at a barrier instead) fails the launch.
// How D is summed (emu_configure's mma model):
// - MMA_HARDWARE (default), a model of the tensor cores' adder after the published
//   measurements (products exact; a multi-term sum whose addends are aligned to the
//   largest exponent and truncated; one final rounding toward zero; 24 bits kept on A100,
//   25 on H100): per output element, the products are taken in groups of G (4 for TF32
//   m16n8k8, 8 for BF16 m16n8k16: two groups per instruction, on the pessimistic side of
//   one group of 8 / 16) plus the running sum; each addend is truncated toward zero to
//   MMA_BITS = 24 bits below the leading bit of the largest one (the pessimistic choice),
//   the truncated addends are added exactly and the result is truncated toward zero to
//   fp32. It is a model for setting tolerances, not a bit-exact copy of any chip: it errs
//   toward zero by up to G + 1 units in the last place of the largest addend per group,
//   more than round-to-nearest's half unit, and always the same way.
// - MMA_EXACT: exact products and sums (double), each D element rounded to float once.
// Operand rounding (cvt.rna.tf32.f32, cvt.rn.bf16.f32) is emulated bit-exactly. A TF32
// operand whose low 13 bits are not zero (an fp32 value passed without cvt.rna) fails the
// launch: our kernels round every operand first and never rely on what the hardware does
// with the extra bits.
//
// What it cannot see: races between blocks, warp-level behaviour beyond mma.sync, the
// GPU's float rounding outside the tensor cores (no FMA contraction here; denormals are
// kept; the host's libm).
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

// the emulator's own code is not instrumented: only the kernels' accesses are checked
#define EMU_NOINST __attribute__((no_sanitize_thread))

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

// ---- configuration (emu_configure)
enum Check : unsigned { CHECK_RACES = 1, CHECK_BOUNDS = 2 };
enum MmaModel { MMA_EXACT = 0, MMA_HARDWARE = 1 };
inline unsigned long long seed = 1;
inline unsigned checks = CHECK_RACES | CHECK_BOUNDS;
inline int mma_model = MMA_HARDWARE;
constexpr int MMA_BITS = 24;  // bits kept below an mma group's largest addend's leading bit

// the __shared__ variables (static locals), poisoned before every block
inline char anchor;  // their addresses are registered relative to this one
struct Region {
    char* p;
    size_t n;
};
// (plain arrays, not std::vector: the hooks below must call no instrumented code)
constexpr int MAX_REGIONS = 256;
inline Region regions[MAX_REGIONS];
inline int nregions = 0;
inline uintptr_t shared_lo = UINTPTR_MAX, shared_hi = 0;  // the regions' hull

// the first problem a launch ran into (empty: none); emu_last_error() hands it to Python
inline char error[1024] = "";
EMU_NOINST inline void fail(const char* what) {
    if (!error[0]) std::snprintf(error, sizeof error, "%s", what);
}

// where the running launch is: for messages and the thread order
inline unsigned long long launch_no = 0, block_no = 0, interval = 0;
inline unsigned long long epoch = 0;  // one per barrier interval of every block, never reused

// ---- race checker: per 4-byte word of shared memory, who touched it in which interval
struct WordState {
    unsigned epoch = 0;  // (the low 32 bits of the interval's epoch)
    short writer = -1;   // the thread that wrote it this interval, -1 none
    short reader = -1;   // the thread that read it this interval, -1 none, -2 several
};
inline WordState* words = nullptr;  // one per word of [shared_lo, shared_hi)

// ---- bounds: the launch's array arguments (emu_set_spans)
struct Span {
    uintptr_t root_lo, root_hi;  // the whole allocation, guard bytes included
    uintptr_t lo, hi;            // the argument's own bytes
    int arg;
};
constexpr int MAX_SPANS = 64;
inline Span spans[MAX_SPANS];
inline int nspans = 0;

// ---- recorded shared-memory accesses of one block (emu_record_block)
struct Record {
    unsigned thread, interval;
    unsigned long long pc;  // the accessing instruction, relative to anchor
    int region;             // index into shared_regions
    unsigned offset, size, write;
};
inline long long record_block = -1;
inline Record* records = nullptr;
inline size_t nrecords = 0, records_cap = 0;
inline bool in_hook = false;  // the hooks' own (library) code must not recurse into them

// warp-collective mma.sync: what each warp's lanes deposited, until all 32 are there
enum MmaKind { MMA_TF32_M16N8K8 = 1, MMA_BF16_M16N8K16 = 2 };
struct WarpSlot {
    int arrived = 0, kind = 0;
    unsigned a[32][4], b[32][2];
    float c[32][4], d[32][4];
};
inline std::vector<WarpSlot>* warps = new std::vector<WarpSlot>();

EMU_NOINST inline void where(char* out, size_t n) {
    std::snprintf(out, n, "block (%u,%u,%u), barrier interval %llu", bidx.x, bidx.y, bidx.z,
                  interval);
}

EMU_NOINST inline int region_of(uintptr_t a) {
    for (int i = 0; i < nregions; ++i)
        if (a - (uintptr_t)regions[i].p < regions[i].n) return i;
    return -1;
}

EMU_NOINST inline void race(uintptr_t a, const char* what, int other, const char* other_did) {
    const int region = region_of(a);
    if (error[0] || region < 0) return;
    char w[128], o[48];
    where(w, sizeof w);
    if (other >= 0) std::snprintf(o, sizeof o, "thread %d", other);
    else std::snprintf(o, sizeof o, "several threads");
    std::snprintf(error, sizeof error,
                  "shared-memory race: thread %u %s shared region %d byte %llu, which %s %s "
                  "in the same barrier interval (%s): a __syncthreads is missing, or two "
                  "threads own one element",
                  current, what, region,
                  (unsigned long long)(a - (uintptr_t)regions[region].p), o,
                  other_did, w);
}

EMU_NOINST inline void record(uintptr_t a, unsigned size, bool write, void* pc) {
    const int region = region_of(a);
    if (region < 0) return;
    {
        if (nrecords == records_cap) {
            records_cap = records_cap ? 2 * records_cap : 1 << 16;
            records = (Record*)std::realloc(records, records_cap * sizeof(Record));
        }
        records[nrecords++] = {current, (unsigned)interval,
                               (unsigned long long)((uintptr_t)pc - (uintptr_t)&anchor), region,
                               (unsigned)(a - (uintptr_t)regions[region].p), size, write};
    }
}

// the race checker's part of a shared-memory access (its region is looked up only to name
// it in a report: the hull of the regions holds little else, and nothing that instrumented
// code writes)
EMU_NOINST inline void check_race(uintptr_t a, unsigned size, bool write) {
    const int t = (int)current;
    const uintptr_t w0 = shared_lo >> 2;  // words are the aligned 4-byte words
    for (uintptr_t w = (a >> 2) - w0; w <= ((a + size - 1) >> 2) - w0; ++w) {
        WordState& s = words[w];
        if (s.epoch != (unsigned)epoch) s = WordState{(unsigned)epoch, -1, -1};
        if (write) {
            if (s.writer >= 0 && s.writer != t) race(a, "wrote", s.writer, "wrote");
            else if (s.reader == -2 || (s.reader >= 0 && s.reader != t))
                race(a, "wrote", s.reader, "read");
            s.writer = (short)t;
        } else {
            if (s.writer >= 0 && s.writer != t) race(a, "read", s.writer, "wrote");
            s.reader = (short)((s.reader == -1 || s.reader == t) ? t : -2);
        }
    }
}

EMU_NOINST inline void global_access(uintptr_t a, unsigned size, bool write) {
    const Span* near = nullptr;
    for (int i = 0; i < nspans; ++i) {
        const Span& s = spans[i];
        if (a >= s.lo && a + size <= s.hi) return;  // inside an argument: fine
        if (a >= s.root_lo && a < s.root_hi && !near) near = &s;
    }
    if (!near || error[0]) return;  // not near any array of the launch (stack, statics)
    char w[128], d[96];
    where(w, sizeof w);
    if (a >= near->hi)
        std::snprintf(d, sizeof d, "%llu bytes past the end of",
                      (unsigned long long)(a - near->hi));
    else
        std::snprintf(d, sizeof d, "%llu bytes before the start of",
                      (unsigned long long)(near->lo - a));
    std::snprintf(error, sizeof error,
                  "out-of-bounds %s of %u bytes, %s argument %d, by thread %u (%s)",
                  write ? "write" : "read", size, d, near->arg, current, w);
}

EMU_NOINST inline void access(void* p, unsigned size, bool write, void* pc) {
    if (in_hook) return;
    const uintptr_t a = (uintptr_t)p;
    if (a >= shared_lo && a < shared_hi) {
        if (checks & CHECK_RACES) check_race(a, size, write);
        if (record_block == (long long)block_no) {
            in_hook = true;
            record(a, size, write, pc);
            in_hook = false;
        }
        return;
    }
    if (checks & CHECK_BOUNDS) global_access(a, size, write);
}

EMU_NOINST inline void fiber_main() {
    (*body)();
    (*fibers)[current].state = DONE;
    swapcontext(&(*fibers)[current].ctx, &scheduler);
}

EMU_NOINST inline void sync() {
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

// (the emulator's own copies: code without instrumentation only inlines such code)
EMU_NOINST inline float bits_to_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
EMU_NOINST inline float bf16_half(unsigned reg, int half) {
    return bits_to_float(((reg >> (16 * half)) & 0xFFFFu) << 16);
}

EMU_NOINST inline uint64_t d2u(double d) {
    uint64_t u;
    std::memcpy(&u, &d, 8);
    return u;
}
EMU_NOINST inline double u2d(uint64_t u) {
    double d;
    std::memcpy(&d, &u, 8);
    return d;
}

// x (a double whose exponent field is ex) truncated toward zero to a multiple of 2^k
EMU_NOINST inline double trunc_to(double x, int k) {
    const uint64_t u = d2u(x);
    const int ex = (int)((u >> 52) & 0x7FF) - 1023;  // |x| in [2^ex, 2^(ex+1))
    if (ex < k) return 0.0;                             // below the quantum (or zero)
    const int drop = 52 - (ex - k);                     // mantissa bits worth < 2^k
    return drop <= 0 ? x : u2d(u & ~((uint64_t(1) << drop) - 1));
}

// double -> float rounded toward zero (the tensor cores' final rounding in the model)
EMU_NOINST inline float to_float_rz(double x) {
    if (std::fabs(x) >= 1.1754943508222875e-38 && std::fabs(x) < 3.4028234663852886e38)
        return (float)u2d(d2u(x) & ~((uint64_t(1) << 29) - 1));  // keep 23 mantissa bits
    float f = (float)x;  // zero, subnormal, overflow, NaN: round, then step toward zero
    if (std::isfinite(f) && std::fabs((double)f) > std::fabs(x)) f = std::nextafter(f, 0.0f);
    return f;
}

// One group of the hardware model: acc + sum of n exact products. Every addend is
// truncated toward zero to a multiple of 2^(e - MMA_BITS), 2^e the power of two just above
// the largest one; the truncated addends are added exactly (they fit a double: MMA_BITS
// plus a few carry bits < 53), and the sum is truncated toward zero to float.
EMU_NOINST inline float mma_group(float acc, const double* prod, int n) {
    int emax = (int)((d2u((double)acc) >> 52) & 0x7FF);
    for (int i = 0; i < n; ++i) {  // (no std::max here: templates would be instrumented)
        const int e = (int)((d2u(prod[i]) >> 52) & 0x7FF);
        emax = e > emax ? e : emax;
    }
    if (emax == 0 || emax == 0x7FF) {  // all zero, or infinity / NaN: plain sum
        double s = acc;
        for (int i = 0; i < n; ++i) s += prod[i];
        return (float)s;
    }
    const int k = emax - 1023 + 1 - MMA_BITS;
    double s = trunc_to((double)acc, k);
    for (int i = 0; i < n; ++i) s += trunc_to(prod[i], k);
    return to_float_rz(s);
}

// D = A * B + C for a whole warp from its 32 lanes' fragments (PTX ISA layouts; g = lane
// >> 2, t = lane & 3). TF32 m16n8k8: a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);
// b0 (k = t, n = g) b1 (k = t+4, n = g). BF16 m16n8k16: register r of A holds elements
// i = 2r, 2r+1 (lower index in the lower half) at row g + 8 * ((i >> 1) & 1), column
// 2t + (i & 1) + 8 * (i >= 4); register r of B holds i = 2r, 2r+1 at k = 2t + (i & 1) +
// 8 * (i >= 2), n = g. C and D: c0 (g, 2t) c1 (g, 2t+1) c2 (g+8, 2t) c3 (g+8, 2t+1).
EMU_NOINST inline void warp_mma(WarpSlot& w) {
    const int K = w.kind == MMA_TF32_M16N8K8 ? 8 : 16;
    double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        if (w.kind == MMA_TF32_M16N8K8) {
            for (int r = 0; r < 4; ++r)
                if (w.a[lane][r] & 0x1FFFu) fail("mma tf32: an A operand is not rounded to tf32");
            for (int r = 0; r < 2; ++r)
                if (w.b[lane][r] & 0x1FFFu) fail("mma tf32: a B operand is not rounded to tf32");
            A[g][t] = bits_to_float(w.a[lane][0]);
            A[g + 8][t] = bits_to_float(w.a[lane][1]);
            A[g][t + 4] = bits_to_float(w.a[lane][2]);
            A[g + 8][t + 4] = bits_to_float(w.a[lane][3]);
            B[t][g] = bits_to_float(w.b[lane][0]);
            B[t + 4][g] = bits_to_float(w.b[lane][1]);
        } else {
            for (int i = 0; i < 8; ++i)
                A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] =
                    bf16_half(w.a[lane][i >> 1], i & 1);
            for (int i = 0; i < 4; ++i)
                B[2 * t + (i & 1) + 8 * (i >= 2)][g] = bf16_half(w.b[lane][i >> 1], i & 1);
        }
        for (int e = 0; e < 4; ++e) C[g + 8 * (e >> 1)][2 * t + (e & 1)] = w.c[lane][e];
    }
    const int G = K / 2;  // products per group of the hardware model
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
            if (mma_model == MMA_EXACT) {
                double sum = C[row][col];
                for (int k = 0; k < K; ++k) sum += A[row][k] * B[k][col];
                w.d[lane][e] = (float)sum;
            } else {
                double prod[16];
                for (int k = 0; k < K; ++k) prod[k] = A[row][k] * B[k][col];  // exact
                float acc = (float)C[row][col];
                for (int k0 = 0; k0 < K; k0 += G) acc = mma_group(acc, prod + k0, G);
                w.d[lane][e] = acc;
            }
        }
    }
}

EMU_NOINST inline void set_thread(unsigned t) {
    current = t;
    tidx.x = t % block_dim.x;
    tidx.y = (t / block_dim.x) % block_dim.y;
    tidx.z = t / (block_dim.x * block_dim.y);
}

EMU_NOINST inline unsigned long long splitmix(unsigned long long x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

// the order of one pass over a block's n threads: seed 0 the fixed order (forward in even
// blocks, reversed in odd ones), else a permutation drawn from the seed and where we are
EMU_NOINST inline void thread_order(std::vector<unsigned>& order, unsigned n, unsigned pass) {
    order.resize(n);
    for (unsigned i = 0; i < n; ++i) order[i] = i;
    if (seed == 0) {
        if (block_no % 2 == 1) std::reverse(order.begin(), order.end());
        return;
    }
    unsigned long long state = splitmix(seed ^ splitmix(launch_no ^ splitmix(
        block_no ^ splitmix(interval ^ splitmix(pass)))));
    for (unsigned i = n - 1; i > 0; --i) {
        state = splitmix(state);
        std::swap(order[i], order[state % (i + 1)]);
    }
}

// Run one block; returns 0, 1 (threads met different barriers), 2 (a warp split at an
// mma), 3 (error[] says what).
EMU_NOINST inline int run_block(unsigned n, std::vector<unsigned>& order) {
    for (int i = 0; i < nregions; ++i) std::memset(regions[i].p, 0xFF, regions[i].n);
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
    for (interval = 0;; ++interval) {
        ++epoch;
        // run every runnable thread until it waits (barrier or warp) or ends; a warp's
        // last lane wakes the other 31, so go round until none runs
        unsigned pass = 0;
        for (bool ran = true; ran; ++pass) {
            ran = false;
            thread_order(order, n, pass);
            const unsigned* ord = order.data();
            for (unsigned i = 0; i < n; ++i) {
                const unsigned t = ord[i];
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
        if (done == n) return 0;
        if (done != 0) return 1;  // some left, others wait in __syncthreads
        for (unsigned t = 0; t < n; ++t) (*fibers)[t].state = RUNNING;
    }
}

// Run f() as every thread of every block; returns 0 or run_block's failure.
EMU_NOINST inline int launch(dim3 grid, dim3 block, const std::function<void()>& f) {
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
    nrecords = 0;
    ++launch_no;
    std::vector<unsigned> order;
    block_no = 0;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x, ++block_no) {
                bidx.x = x;
                bidx.y = y;
                bidx.z = z;
                if (const int rc = run_block(n, order)) return rc;
            }
    return 0;
}

// One lane's part of a warp-wide mma.sync: deposit, wait for the other 31 (the last one
// computes for all), take this lane's D fragment back. d holds C on the way in.
EMU_NOINST inline void mma_sync(int kind, float* d, const unsigned* a, const unsigned* b) {
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

// ---- the entry points tests/cuda_emu.py calls
#define EMU_EXPORT extern "C" __attribute__((visibility("default"))) EMU_NOINST

EMU_EXPORT const char* emu_last_error() { return emu::error; }

EMU_EXPORT void emu_add_shared(long long offset, unsigned long long n) {
    char* p = &emu::anchor + offset;
    if (emu::nregions == emu::MAX_REGIONS) return emu::fail("too many __shared__ arrays");
    emu::regions[emu::nregions++] = {p, (size_t)n};
    emu::shared_lo = std::min(emu::shared_lo, (uintptr_t)p);
    emu::shared_hi = std::max(emu::shared_hi, (uintptr_t)p + (uintptr_t)n);
    const size_t count = ((emu::shared_hi - 1) >> 2) - (emu::shared_lo >> 2) + 1;
    delete[] emu::words;
    emu::words = new emu::WordState[count];
}

// seed of the thread order (0: fixed), checks (CHECK_* bits), mma model (MMA_*)
EMU_EXPORT void emu_configure(unsigned long long seed, unsigned checks, int mma_model) {
    emu::seed = seed;
    emu::checks = checks;
    emu::mma_model = mma_model;
}

// the launch's array arguments: n rows of (root_lo, root_hi, lo, hi, argument index)
EMU_EXPORT void emu_set_spans(int n, const unsigned long long* rows) {
    emu::nspans = std::min(n, emu::MAX_SPANS);
    for (int i = 0; i < emu::nspans; ++i, rows += 5)
        emu::spans[i] = {(uintptr_t)rows[0], (uintptr_t)rows[1], (uintptr_t)rows[2],
                         (uintptr_t)rows[3], (int)rows[4]};
}

// record the shared-memory accesses of block number `block` (x fastest) of the next
// launches (-1: none); emu_records copies up to n of the last launch's records (6 words
// each: thread, interval, pc, region, offset, size | write << 31) and returns how many
// there were
EMU_EXPORT void emu_record_block(long long block) { emu::record_block = block; }
EMU_EXPORT long long emu_records(unsigned long long* out, long long n) {
    const long long have = (long long)emu::nrecords;
    for (long long i = 0; i < std::min(n, have); ++i, out += 6) {
        const emu::Record& r = emu::records[i];
        out[0] = r.thread;
        out[1] = r.interval;
        out[2] = r.pc;
        out[3] = (unsigned long long)r.region;
        out[4] = r.offset;
        out[5] = r.size | ((unsigned long long)r.write << 31);
    }
    return have;
}

// what -fsanitize=thread calls for every load and store of the kernels' code
#define EMU_HOOK(kind, n, write)                                                        \
    EMU_EXPORT void __tsan_##kind##n(void* p) {                                         \
        emu::access(p, n, write, __builtin_return_address(0));                          \
    }                                                                                   \
    EMU_EXPORT void __tsan_unaligned_##kind##n(void* p) {                               \
        emu::access(p, n, write, __builtin_return_address(0));                          \
    }
EMU_HOOK(read, 1, false)
EMU_HOOK(read, 2, false)
EMU_HOOK(read, 4, false)
EMU_HOOK(read, 8, false)
EMU_HOOK(read, 16, false)
EMU_HOOK(write, 1, true)
EMU_HOOK(write, 2, true)
EMU_HOOK(write, 4, true)
EMU_HOOK(write, 8, true)
EMU_HOOK(write, 16, true)
EMU_EXPORT void __tsan_read_range(void* p, unsigned long n) {
    emu::access(p, (unsigned)n, false, __builtin_return_address(0));
}
EMU_EXPORT void __tsan_write_range(void* p, unsigned long n) {
    emu::access(p, (unsigned)n, true, __builtin_return_address(0));
}
EMU_EXPORT void __tsan_init() {}
EMU_EXPORT void __tsan_func_entry(void*) {}
EMU_EXPORT void __tsan_func_exit() {}
EMU_EXPORT void __tsan_vptr_update(void**, void*) {}
EMU_EXPORT void __tsan_vptr_read(void**) {}

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
#define __align__(n) __attribute__((aligned(n)))
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

// One OS thread runs every fiber: plain additions are atomic enough. Not instrumented (an
// atomic is no race), but bounds-checked like any access.
template <class T> EMU_NOINST inline T emu_atomic_add(T* p, T v) {
    const uintptr_t a = (uintptr_t)p;
    if ((emu::checks & emu::CHECK_BOUNDS) && !(a >= emu::shared_lo && a < emu::shared_hi))
        emu::global_access(a, sizeof(T), true);
    const T old = *p;
    *p = old + v;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return emu_atomic_add(p, v);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return emu_atomic_add(p, v); }

using std::max;
using std::min;
