// effnb CPU kernels for weight-only quantized Linear layers: y[M, N] = x[M, K] @ W[N, K]^T (+ bias).
//
// Plain C ABI (no torch headers: builds in about a second with g++), called through ctypes from
// kernels/cpu/__init__.py. The decode kernels split their rows over torch's OpenMP threads, and
// over effnb's own small thread pool for a while after an OpenMP call stalled (see `pool` and
// `over_rows` below); the quantization routines use OpenMP. The OpenMP runtime is torch's own
// libgomp, already loaded in the process, so there is one OpenMP pool, not two.
//
// The weights are read in exactly the formats effnb stores (see kernels/reference.py):
//   int4 : qweight u8 [N, K/2], column 2j in the LOW nibble, 2j+1 in the HIGH nibble;
//          scales fp16 [N, K/g], zeros fp16 [N, K/g] in code units (NULL: symmetric, z = 8);
//          w = (q - z) * s
//   lut4 : NF4 / FP4 as bitsandbytes stores them: W flattened row-major, element 2i in the HIGH
//          nibble, 2i+1 LOW; per block of `bs` elements an absmax, either fp32 or double-quantized
//          (u8 index into an fp32 code[256], times absmax2[block / bs2], plus offset);
//          w = table[q] * absmax
//   int8 : qweight i8 [N, K]; scales fp16 [N, K/g]; w = q * s
//
// All arithmetic is fp32 with fp32 accumulation, so results equal the PyTorch reference up to the
// order of the additions. Small M only (decode); the caller dequantizes and calls a GEMM for prefill.
// Requires AVX2 + FMA + F16C; K and the group size multiples of 32 (the caller checks).

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <system_error>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

// ------------------------------------------------------------------------------ thread pool
// The decode kernels are matrix-vector products of ~50-150 us. An OpenMP parallel region ends at
// a barrier that waits for every thread of its team, so on a shared machine (a 2-core Binder
// session, a laptop also running a browser) one worker that the OS has not scheduled stalls the
// call for a scheduler time slice: measured 16 ms per call instead of 0.5 ms on this project's
// 2-core machine while another process kept both cores busy. In this pool the caller and the
// workers claim chunks from one atomic counter, and the call returns as soon as every chunk is
// done: a worker that never woke up costs nothing, since the caller has done its share. Workers
// keep polling for 2 ms after a call, yielding the core at every turn, then sleep.
// On a quiet machine OpenMP is faster: torch's own OpenMP workers spin between torch's ops and
// these calls alike, while a second set of threads competes with them for the cores (measured:
// SmolLM2 int8 decode 44-50 ms/token on OpenMP threads, 63-70 ms on this pool). So `over_rows` uses
// OpenMP and measures each call's wait at the closing barrier; when those waits add up to more
// than 10 % of a 200 ms window (a busy machine, where nearly every call stalls), it runs on this
// pool for the next 2 s, then tries OpenMP again (mode 0, "auto"). A single stall on a quiet
// machine does not switch: 2 s on the pool would cost far more than it. Modes 1 and 2 force
// OpenMP or the pool (effnb.kernels.cpu.set_decode_threading). In a forked child the kernels always use the
// pool: GNU OpenMP's threads do not survive fork, and a parallel region there waits for them
// forever (so does torch's own matmul at 2 threads, measured).
namespace pool {

using Fn = void (*)(void*, int64_t);
constexpr uint64_t kIdx = (1ull << 20) - 1;  // word = epoch (24 bits) | chunks (20) | next chunk (20)
constexpr int kMaxWorkers = 63;
constexpr int kSpin = 2000;         // pause instructions of busy spin after a call
constexpr int kYieldSpinUs = 2000;  // then polling with sched_yield for up to this long, then sleep

struct State {
    alignas(64) std::atomic<uint64_t> word{0};  // claimed by every thread: its own cache line
    alignas(64) std::atomic<int64_t> done{0};
    alignas(64) std::atomic<int> sleepers{0};
    std::atomic<int> active{1};  // threads (caller included) the current call may use
    Fn fn = nullptr;
    void* ctx = nullptr;
    std::mutex run_mu;  // one call at a time; a concurrent caller runs its call alone
    std::mutex mu;
    std::condition_variable cv;
    int workers = 0;
    pid_t pid = 0;
};

// Never freed: detached workers may still be waiting on it while the process exits.
std::atomic<State*> g_state{nullptr};
std::atomic<int> g_mode{0};  // 0: auto (OpenMP, the pool after a stall), 1: OpenMP, 2: this pool
std::atomic<int64_t> g_pool_until{0};  // steady-clock ns: auto mode uses the pool until then
std::atomic<int64_t> g_stalls{0};      // OpenMP calls that stalled (effnb.kernels.cpu.decode_threading_stats)
std::atomic<int64_t> g_switches{0};    // times auto mode moved to the pool
std::atomic<bool> g_forked{false};     // this process is a fork()ed child: OpenMP would hang
void on_fork_child() { g_forked.store(true); }
const int g_atfork = pthread_atfork(nullptr, nullptr, on_fork_child);
std::atomic<int64_t> g_window_start{0}, g_window_stalled{0};  // stall time in the current 200 ms window

constexpr int64_t kStallNs = 1000000;       // a closing-barrier wait longer than this is a stall
constexpr int64_t kWindowNs = 200000000;    // stall time is summed over windows of 200 ms
constexpr int64_t kSwitchNs = 20000000;     // 10 % of the window stalled: move to the pool
constexpr int64_t kPoolNs = 2000000000;     // for 2 s

// Auto mode's bookkeeping after an OpenMP call that waited `waited` ns at its closing barrier.
void note_wait(int64_t now, int64_t waited, int64_t busy) {
    if (now - g_window_start.load(std::memory_order_relaxed) > kWindowNs) {
        g_window_start.store(now, std::memory_order_relaxed);
        g_window_stalled.store(0, std::memory_order_relaxed);
    }
    if (waited <= kStallNs || waited <= busy / 2) return;
    g_stalls.fetch_add(1, std::memory_order_relaxed);
    if (g_window_stalled.fetch_add(waited, std::memory_order_relaxed) + waited > kSwitchNs) {
        g_pool_until.store(now + kPoolNs, std::memory_order_relaxed);
        g_switches.fetch_add(1, std::memory_order_relaxed);
        g_window_stalled.store(0, std::memory_order_relaxed);
    }
}

inline uint32_t epoch_of(uint64_t w) { return (uint32_t)(w >> 40); }

// Claim and run chunks of the job in `w`'s epoch until none is left; returns the last word read.
inline uint64_t drain(State* s, uint64_t w) {
    const uint32_t e = epoch_of(w);
    for (;;) {
        const uint64_t n = (w >> 20) & kIdx, i = w & kIdx;
        if (epoch_of(w) != e || i >= n) return w;
        if (s->word.compare_exchange_weak(w, w + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
            s->fn(s->ctx, (int64_t)i);  // fn/ctx were written before the epoch was published
            s->done.fetch_add(1, std::memory_order_release);
            w = s->word.load(std::memory_order_acquire);
        }
    }
}

void worker_loop(State* s, int index);

// A worker ends quietly if waiting ever throws (its unclaimed chunks are the caller's to run).
void worker_main(State* s, int index) {
    try {
        worker_loop(s, index);
    } catch (...) {
    }
}

void worker_loop(State* s, int index) {
    uint32_t seen = epoch_of(s->word.load(std::memory_order_acquire));
    for (;;) {
        uint64_t w = s->word.load(std::memory_order_acquire);
        if (epoch_of(w) != seen) {
            seen = epoch_of(w);
            if (index < s->active.load(std::memory_order_acquire)) drain(s, w);
            continue;
        }
        // Stay awake for the next call: decode calls come every ~50-200 us with torch's own ops in
        // between. First a short busy spin, then a spin that yields the core at every turn (so a
        // thread of torch's that wants this core gets it at once), then sleep.
        bool changed = false;
        for (int k = 0; k < kSpin && !changed; ++k) {
            _mm_pause();
            changed = epoch_of(s->word.load(std::memory_order_relaxed)) != seen;
        }
        if (!changed) {
            const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kYieldSpinUs);
            for (int k = 0; !changed; ++k) {
                sched_yield();
                changed = epoch_of(s->word.load(std::memory_order_relaxed)) != seen;
                if ((k & 15) == 15 && std::chrono::steady_clock::now() > until) break;
            }
        }
        if (changed) continue;
        std::unique_lock<std::mutex> lk(s->mu);
        s->sleepers.fetch_add(1, std::memory_order_seq_cst);
        s->cv.wait(lk, [&] { return epoch_of(s->word.load(std::memory_order_seq_cst)) != seen; });
        s->sleepers.fetch_sub(1, std::memory_order_seq_cst);
    }
}

template <typename G>
void call_chunk(void* ctx, int64_t i) { (*static_cast<G*>(ctx))(i); }

State* state() {
    State* s = g_state.load(std::memory_order_acquire);
    const pid_t pid = getpid();
    if (s == nullptr || s->pid != pid) {  // first use, or a forked child: the parent's workers are not here
        State* fresh = new (std::nothrow) State();
        if (fresh == nullptr) return nullptr;  // the caller runs its call alone
        fresh->pid = pid;
        if (g_state.compare_exchange_strong(s, fresh)) return fresh;
        delete fresh;
        return g_state.load(std::memory_order_acquire);
    }
    return s;
}

// run(i) for i in [0, n), on up to `nthreads` threads (the caller included).
template <typename G>
void parallel(int64_t n, int nthreads, G& run) {
    if (nthreads > kMaxWorkers + 1) nthreads = kMaxWorkers + 1;
    if (nthreads <= 1 || n <= 1 || n > (int64_t)kIdx) {
        for (int64_t i = 0; i < n; ++i) run(i);
        return;
    }
    State* s = state();
    std::unique_lock<std::mutex> busy;
    if (s != nullptr) busy = std::unique_lock<std::mutex>(s->run_mu, std::try_to_lock);
    if (!busy.owns_lock()) {  // another thread's call is running (or no memory for the pool): do this one alone
        for (int64_t i = 0; i < n; ++i) run(i);
        return;
    }
    while (s->workers < nthreads - 1) {
        try {
            std::thread(worker_main, s, s->workers + 1).detach();
        } catch (const std::system_error&) {  // no thread (a memory or process limit): use the ones there are
            break;
        }
        ++s->workers;
    }
    if (nthreads > s->workers + 1) nthreads = s->workers + 1;
    s->fn = &call_chunk<G>;
    s->ctx = &run;
    s->done.store(0, std::memory_order_relaxed);
    s->active.store(nthreads, std::memory_order_relaxed);
    uint32_t e = (epoch_of(s->word.load(std::memory_order_relaxed)) + 1) & 0xFFFFFF;
    if (e == 0) e = 1;
    const uint64_t w = ((uint64_t)e << 40) | ((uint64_t)n << 20);
    s->word.store(w, std::memory_order_seq_cst);
    if (s->sleepers.load(std::memory_order_seq_cst) > 0) {
        std::lock_guard<std::mutex> lk(s->mu);
        s->cv.notify_all();
    }
    drain(s, w);
    // every chunk is claimed; wait only for chunks a worker claimed and is still running
    for (int k = 0; s->done.load(std::memory_order_acquire) < n; ++k) {
        if (k < 2000) _mm_pause();
        else sched_yield();  // a claimed chunk's worker was descheduled: let it run
    }
}

}  // namespace pool

// ------------------------------------------------------------------------- errors and fork
// No C++ exception may cross the C ABI (it would abort the whole Python process): every exported
// function returns kOk or an error code, with what failed kept per thread for effnb_last_error,
// which kernels/cpu/__init__.py turns into a one-line MemoryError / RuntimeError.
constexpr int kOk = 0, kNoMemory = 1, kFailed = 2, kBadSizes = 3;
thread_local char g_error[256];
thread_local int64_t g_error_bytes = -1;

int note_error(int code, const char* fn, const char* what, int64_t bytes) {
    snprintf(g_error, sizeof g_error, "%s: %s", fn, what);
    g_error_bytes = bytes;
    return code;
}

// Called inside a catch block: classify the exception in flight.
int on_exception(const char* fn) {
    try {
        throw;
    } catch (const std::bad_alloc&) {
        return note_error(kNoMemory, fn, "memory for its working buffers", -1);
    } catch (const std::exception& e) {
        return note_error(kFailed, fn, e.what(), -1);
    } catch (...) {
        return note_error(kFailed, fn, "an unknown C++ exception", -1);
    }
}

// Threads for an OpenMP region: one in a fork()ed child, where GNU OpenMP's worker threads (made
// by the parent) do not exist and a parallel region would wait for them forever.
inline int team(int nthreads) { return pool::g_forked.load(std::memory_order_relaxed) ? 1 : nthreads; }

using Buffer = std::unique_ptr<float, decltype(&free)>;

// Sizes each kernel needs so that it stays inside its buffers (the Python side checks the buffers
// against the sizes; these cheap checks catch a caller that passes inconsistent sizes).
#define EFFNB_REQUIRE(cond, fn) \
    if (!(cond)) return note_error(kBadSizes, fn, "invalid sizes (needs " #cond ")", -1)

namespace {

inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// Reorder x so that each 16-column block reads [its 8 even columns, its 8 odd columns]: the low
// (or high) nibbles of 8 packed bytes then meet 8 contiguous x values.
void deinterleave(const float* x, float* xs, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; ++m) {
        const float* src = x + m * K;
        float* dst = xs + m * K;
        for (int64_t c = 0; c < K; c += 16)
            for (int i = 0; i < 8; ++i) {
                dst[c + i] = src[c + 2 * i];
                dst[c + 8 + i] = src[c + 2 * i + 1];
            }
    }
}

// Four vectors of 8 codes (int32 lanes) for 32 packed columns starting at p, in deinterleaved order:
// even columns 0..14, odd 1..15, even 16..30, odd 17..31. Each 8 bytes are widened to int32 lanes
// straight from memory (one shuffle), then split by a mask and a shift: 2 shuffles per 32 weights
// where splitting the bytes first and widening each half took 6 (measured, with the accumulators
// below: a 1536x576 int4 layer read from memory, 111 -> 78 us at 2 threads).
// first = the nibble that holds the even columns (low for int4, high for bitsandbytes).
struct Nibbles {
    __m256i a, b, c, d;
};

template <bool HighFirst>
inline Nibbles unpack32(const uint8_t* p) {
    const __m256i mask = _mm256_set1_epi32(0x0F);
    const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256i lo0 = _mm256_and_si256(b0, mask), hi0 = _mm256_srli_epi32(b0, 4);
    const __m256i lo1 = _mm256_and_si256(b1, mask), hi1 = _mm256_srli_epi32(b1, 4);
    return HighFirst ? Nibbles{hi0, lo0, hi1, lo1} : Nibbles{lo0, hi0, lo1, hi1};
}

inline __m256 lut16(__m256i idx, __m256 tlo, __m256 thi) {
    __m256 vlo = _mm256_permutevar8x32_ps(tlo, idx);
    __m256 vhi = _mm256_permutevar8x32_ps(thi, idx);
    return _mm256_blendv_ps(vlo, vhi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

constexpr int MB = 4;  // rows of x handled together: the weights are decoded once per MB rows

// Per x row, the partial sums of one group: w0..w3 (8 weights each, 32 consecutive columns from
// x + c) times x. With one x row (decode) there are four independent accumulators: with two, the
// FMAs formed dependency chains that held the kernels below the memory's rate (int8, measured on
// this project's 2-core machine: 12.9 -> 13.8-16.2 GB/s with the weights streaming from memory,
// 2 threads; 1.6x faster with them in cache).
template <int MM>
struct Acc {
    static constexpr int NA = MM == 1 ? 4 : 2;
    __m256 a[MM][NA];
    Acc() {
        for (int m = 0; m < MM; ++m)
            for (int j = 0; j < NA; ++j) a[m][j] = _mm256_setzero_ps();
    }
    inline void fma4(__m256 w0, __m256 w1, __m256 w2, __m256 w3, const float* x, int64_t K) {
        for (int m = 0; m < MM; ++m) {
            const float* xv = x + m * K;
            a[m][0 % NA] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xv), a[m][0 % NA]);
            a[m][1 % NA] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xv + 8), a[m][1 % NA]);
            a[m][2 % NA] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xv + 16), a[m][2 % NA]);
            a[m][3 % NA] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xv + 24), a[m][3 % NA]);
        }
    }
    inline __m256 sum(int m) const {
        __m256 s = _mm256_add_ps(a[m][0], a[m][1]);
        return NA == 4 ? _mm256_add_ps(s, _mm256_add_ps(a[m][2 % NA], a[m][3 % NA])) : s;
    }
};

// ---------------------------------------------------------------------------------------- int4

template <int MM>
void int4_rows(const float* xs, const float* xsum, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1,
               const uint8_t* qw, const uint16_t* scales, const uint16_t* zeros, int64_t g, const float* bias,
               float* y) {
    const int64_t G = K / g;
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = qw + n * (K / 2);
        __m256 tot[MM];
        float zc[MM];
        for (int m = 0; m < MM; ++m) { tot[m] = _mm256_setzero_ps(); zc[m] = 0.f; }
        for (int64_t gi = 0; gi < G; ++gi) {
            const float s = h2f(scales[n * G + gi]);
            const float z = zeros ? h2f(zeros[n * G + gi]) : 8.f;
            Acc<MM> acc;
            for (int64_t c = gi * g; c < (gi + 1) * g; c += 32) {
                Nibbles q = unpack32<false>(row + c / 2);
                acc.fma4(_mm256_cvtepi32_ps(q.a), _mm256_cvtepi32_ps(q.b), _mm256_cvtepi32_ps(q.c),
                         _mm256_cvtepi32_ps(q.d), xs + c, K);
            }
            const __m256 sv = _mm256_set1_ps(s);
            for (int m = 0; m < MM; ++m) {
                tot[m] = _mm256_fmadd_ps(acc.sum(m), sv, tot[m]);
                zc[m] += s * z * xsum[m * G + gi];  // sum_k x_k (q_k - z) s = s (sum x q) - s z (sum x)
            }
        }
        const float b = bias ? bias[n] : 0.f;
        for (int m = 0; m < MM; ++m) y[m * N + n] = hsum(tot[m]) - zc[m] + b;
    }
}

// ------------------------------------------------------------------------------ lut4 (nf4/fp4)

template <int MM>
void lut4_rows(const float* xs, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, const uint8_t* qw,
               const float* absmax, const uint8_t* qabsmax, const float* code2, const float* absmax2,
               float offset, int64_t bs, int64_t bs2, const float* table, const float* bias, float* y) {
    const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = qw + n * (K / 2);
        __m256 tot[MM];
        for (int m = 0; m < MM; ++m) tot[m] = _mm256_setzero_ps();
        for (int64_t k0 = 0; k0 < K; k0 += bs) {
            const int64_t blk = (n * K + k0) / bs;
            const float am = qabsmax ? code2[qabsmax[blk]] * absmax2[blk / bs2] + offset : absmax[blk];
            Acc<MM> acc;
            for (int64_t c = k0; c < k0 + bs; c += 32) {
                Nibbles q = unpack32<true>(row + c / 2);
                acc.fma4(lut16(q.a, tlo, thi), lut16(q.b, tlo, thi), lut16(q.c, tlo, thi), lut16(q.d, tlo, thi),
                         xs + c, K);
            }
            const __m256 av = _mm256_set1_ps(am);
            for (int m = 0; m < MM; ++m) tot[m] = _mm256_fmadd_ps(acc.sum(m), av, tot[m]);
        }
        const float b = bias ? bias[n] : 0.f;
        for (int m = 0; m < MM; ++m) y[m * N + n] = hsum(tot[m]) + b;
    }
}

// ---------------------------------------------------------------------------------------- int8

// One output row at a time: the weight rows stream from memory in order, as the hardware
// prefetcher likes (blocking 4 rows together was 1.7x slower when the weights came from memory).
inline __m256 widen8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

template <int MM>
void int8_rows(const float* x, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t n1, const int8_t* qw,
               const uint16_t* scales, int64_t g, const float* bias, float* y) {
    const int64_t G = K / g;
    for (int64_t n = n0; n < n1; ++n) {
        const int8_t* row = qw + n * K;
        __m256 tot[MM];
        for (int m = 0; m < MM; ++m) tot[m] = _mm256_setzero_ps();
        for (int64_t gi = 0; gi < G; ++gi) {
            Acc<MM> acc;
            for (int64_t c = gi * g; c < (gi + 1) * g; c += 32) {
                const int8_t* p = row + c;  // vpmovsxbd straight from memory: one shuffle per 8 weights
                acc.fma4(widen8(p), widen8(p + 8), widen8(p + 16), widen8(p + 24), x + c, K);
            }
            const __m256 sv = _mm256_set1_ps(h2f(scales[n * G + gi]));
            for (int m = 0; m < MM; ++m) tot[m] = _mm256_fmadd_ps(acc.sum(m), sv, tot[m]);
        }
        const float b = bias ? bias[n] : 0.f;
        for (int m = 0; m < MM; ++m) y[m * N + n] = hsum(tot[m]) + b;
    }
}

inline int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Split the N output rows over the threads in chunks of 16; within a chunk, x rows go MB at a time.
template <typename F>
void over_rows(int64_t M, int64_t N, int nthreads, F body) {
    const int64_t chunk = 16;
    const int64_t nchunks = (N + chunk - 1) / chunk;
    auto run = [&](int64_t ci) {
        const int64_t n0 = ci * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mm = M - m0 < MB ? M - m0 : MB;
            body(m0, mm, n0, n1);
        }
    };
    // about 8 claims per thread: few enough that claiming costs little, enough that the caller
    // can take over a late worker's share
    const int64_t per = nthreads > 1 && nchunks > 8 * nthreads ? nchunks / (8 * nthreads) : 1;
    const int64_t nclaims = (nchunks + per - 1) / per;
    auto claim = [&](int64_t c) {
        const int64_t c1 = (c + 1) * per < nchunks ? (c + 1) * per : nchunks;
        for (int64_t ci = c * per; ci < c1; ++ci) run(ci);
    };
    const int mode = pool::g_mode.load(std::memory_order_relaxed);
    const int64_t t0 = mode == 0 ? now_ns() : 0;
    if (nthreads <= 1 || nclaims <= 1 || mode == 2 || pool::g_forked.load(std::memory_order_relaxed) ||
        (mode == 0 && t0 < pool::g_pool_until.load(std::memory_order_relaxed))) {
        pool::parallel(nclaims, nthreads, claim);
        return;
    }
    // OpenMP, with the same dynamic claiming: a late thread's share is taken by the others, so
    // the only wait a descheduled thread can cause is the region's closing barrier, measured here.
    std::atomic<int64_t> next{0};
    int64_t caller_done = 0;
#pragma omp parallel num_threads(nthreads)
    {
        for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < nclaims;
             c = next.fetch_add(1, std::memory_order_relaxed))
            claim(c);
#ifdef _OPENMP
        if (omp_get_thread_num() == 0) caller_done = now_ns();
#endif
    }
    if (mode == 0 && caller_done) {
        const int64_t t1 = now_ns();
        pool::note_wait(t1, t1 - caller_done, caller_done - t0);
    }
}

#define DISPATCH_MM(mm, FN, ...)             \
    switch (mm) {                            \
        case 1: FN<1>(__VA_ARGS__); break;   \
        case 2: FN<2>(__VA_ARGS__); break;   \
        case 3: FN<3>(__VA_ARGS__); break;   \
        default: FN<4>(__VA_ARGS__); break;  \
    }

}  // namespace

// ------------------------------------------------------------------------------------ HQQ
// Half-quadratic optimisation of the zero-point (Badri & Shaji, 2023) for asymmetric groups,
// one group of g weights (g a multiple of 8) at a time, 8 lanes wide; then least-squares refits of
// (scale, zero) on the chosen codes, each kept only where it lowers the group's squared error
// with scale and zero rounded to fp16 (as stored). Same steps as methods.hqq (the reference).
namespace {

// |x|^p for x > 0 (p < 0 here): 2^(p * log2 x) with polynomial log2/exp2 (relative error ~1e-5).
inline __m256 fast_pow(__m256 x, __m256 p) {
    __m256i xi = _mm256_castps_si256(x);
    __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(127)));
    __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x007FFFFF)),
                                                   _mm256_set1_epi32(0x3F800000)));  // [1, 2)
    __m256 t = _mm256_sub_ps(m, _mm256_set1_ps(1.0f));
    // log2(1 + t) on [0, 1): degree-6 polynomial
    __m256 l = _mm256_set1_ps(-0.0258411662f);
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(0.1217970128f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(-0.2779042655f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(0.4575485901f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(-0.7181451002f));
    l = _mm256_fmadd_ps(l, t, _mm256_set1_ps(1.4425449290f));
    l = _mm256_mul_ps(l, t);
    __m256 y = _mm256_mul_ps(p, _mm256_add_ps(e, l));
    y = _mm256_max_ps(_mm256_min_ps(y, _mm256_set1_ps(126.f)), _mm256_set1_ps(-126.f));
    __m256 yi = _mm256_floor_ps(y);
    __m256 f = _mm256_sub_ps(y, yi);
    // 2^f on [0, 1): degree-5 polynomial
    __m256 q = _mm256_set1_ps(1.8775767e-3f);
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(8.9893397e-3f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(5.5826318e-2f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(2.4015361e-1f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(6.9315308e-1f));
    q = _mm256_fmadd_ps(q, f, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(yi), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
}

inline float hsum8(__m256 v) { return hsum(v); }
inline float to_f16_and_back(float x) { return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); }

const __m256 kAbsMask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));

// codes for stored (fp16) s, z; returns the squared error. q written as floats.
inline float stored_codes(const float* w, int64_t g, float s16, float z16, float levels, float* q) {
    const __m256 sv = _mm256_set1_ps(s16), zv = _mm256_set1_ps(z16), lv = _mm256_set1_ps(levels);
    __m256 err = _mm256_setzero_ps();
    for (int64_t k = 0; k < g; k += 8) {
        __m256 wv = _mm256_loadu_ps(w + k);
        __m256 c = _mm256_round_ps(_mm256_add_ps(_mm256_div_ps(wv, sv), zv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c = _mm256_min_ps(_mm256_max_ps(c, _mm256_setzero_ps()), lv);
        _mm256_storeu_ps(q + k, c);
        __m256 d = _mm256_sub_ps(wv, _mm256_mul_ps(_mm256_sub_ps(c, zv), sv));
        err = _mm256_fmadd_ps(d, d, err);
    }
    return hsum8(err);
}

}  // namespace

extern "C" int effnb_hqq(const float* W, int64_t ngroups, int64_t g, int levels_i, int iters, float lp, float beta0,
                         float kappa, int refit_rounds, uint8_t* codes, uint16_t* scales16, uint16_t* zeros16,
                         double* sq_err, int nthreads) {
    EFFNB_REQUIRE(ngroups >= 0 && g > 0 && g % 8 == 0 && g <= 256 && levels_i > 0 && levels_i < 256, "effnb_hqq");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        const float levels = (float)levels_i;
        double total = 0.0;
    #pragma omp parallel for schedule(static, 64) num_threads(nthreads) if (nthreads > 1) reduction(+ : total)
        for (int64_t gi = 0; gi < ngroups; ++gi) {
            const float* w = W + gi * g;
            float q[256], qbest[256];
            float lo = w[0], hi = w[0];
            for (int64_t k = 1; k < g; ++k) { lo = w[k] < lo ? w[k] : lo; hi = w[k] > hi ? w[k] : hi; }
            float s = (hi - lo) / levels;
            s = s > 1e-8f ? s : 1e-8f;
            const float inv = 1.0f / s;
            float z = -lo / s, best_z = z, best_err = INFINITY, beta = beta0;
            const __m256 invv = _mm256_set1_ps(inv), lv = _mm256_set1_ps(levels), pv = _mm256_set1_ps(lp - 1.0f);
            for (int it = 0; it < iters; ++it) {
                const __m256 zv = _mm256_set1_ps(z), rb = _mm256_set1_ps(1.0f / beta);
                __m256 abs_err = _mm256_setzero_ps(), zsum = _mm256_setzero_ps();
                for (int64_t k = 0; k < g; k += 8) {
                    __m256 wv = _mm256_loadu_ps(w + k);
                    __m256 c = _mm256_round_ps(_mm256_fmadd_ps(wv, invv, zv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    c = _mm256_min_ps(_mm256_max_ps(c, _mm256_setzero_ps()), lv);
                    __m256 e = _mm256_sub_ps(wv, _mm256_div_ps(_mm256_sub_ps(c, zv), invv));
                    __m256 ae = _mm256_and_ps(e, kAbsMask);
                    abs_err = _mm256_add_ps(abs_err, ae);
                    // shrink_lp(e) = sign(e) * relu(|e| - |e|^(p-1) / beta); 0 where e == 0
                    __m256 safe = _mm256_max_ps(ae, _mm256_set1_ps(1e-30f));
                    __m256 mag = _mm256_max_ps(_mm256_sub_ps(ae, _mm256_mul_ps(fast_pow(safe, pv), rb)), _mm256_setzero_ps());
                    __m256 we = _mm256_or_ps(mag, _mm256_andnot_ps(kAbsMask, e));
                    zsum = _mm256_add_ps(zsum, _mm256_sub_ps(c, _mm256_mul_ps(_mm256_sub_ps(wv, we), invv)));
                }
                const float err = hsum8(abs_err) / g;
                if (err < best_err) { best_err = err; best_z = z; }
                z = hsum8(zsum) / g;
                beta *= kappa;
            }
            float s16 = to_f16_and_back(s), z16 = to_f16_and_back(best_z);
            float err = stored_codes(w, g, s16, z16, levels, q);
            for (int r = 0; r < refit_rounds; ++r) {  // least squares: w ~ s (q - z) on fixed codes
                float qm = 0.f, wm = 0.f;
                for (int64_t k = 0; k < g; ++k) { qm += q[k]; wm += w[k]; }
                qm /= g; wm /= g;
                float var = 0.f, cov = 0.f;
                for (int64_t k = 0; k < g; ++k) { var += (q[k] - qm) * (q[k] - qm); cov += (q[k] - qm) * (w[k] - wm); }
                var /= g; cov /= g;
                float sn = var > 1e-12f ? cov / var : 1.0f;
                sn = fabsf(sn) > 1e-12f ? sn : 1e-8f;
                const float sn16 = to_f16_and_back(sn), zn16 = to_f16_and_back(qm - wm / sn);
                const float err2 = stored_codes(w, g, sn16, zn16, levels, qbest);
                if (err2 < err) {
                    err = err2; s16 = sn16; z16 = zn16;
                    memcpy(q, qbest, sizeof(float) * g);
                }
            }
            for (int64_t k = 0; k < g; ++k) codes[gi * g + k] = (uint8_t)q[k];
            scales16[gi] = _cvtss_sh(s16, _MM_FROUND_TO_NEAREST_INT);
            zeros16[gi] = _cvtss_sh(z16, _MM_FROUND_TO_NEAREST_INT);
            total += err;
        }
        *sq_err = total;
    } catch (...) {
        return on_exception("effnb_hqq");
    }
    return kOk;
}

extern "C" {

int effnb_abi_version() { return 9; }

// What the last failed call on this thread could not do: writes a message into msg (n bytes) and
// returns the size it tried to allocate (-1 if unknown or not an allocation).
int64_t effnb_last_error(char* msg, int64_t n) {
    if (n > 0) snprintf(msg, (size_t)n, "%s", g_error);
    return g_error_bytes;
}

// The process is a fork()ed child although the library was loaded after the fork (kernels/cpu/__init__.py
// learns it from os.register_at_fork): as after pthread_atfork, no OpenMP region from now on.
void effnb_note_fork() { pool::g_forked.store(true); }

// 0: auto (OpenMP; effnb's pool for 2 s after a stalled call), 1: always OpenMP, 2: always the pool.
void effnb_set_decode_threading(int mode) {
    pool::g_mode.store(mode == 1 || mode == 2 ? mode : 0);
    pool::g_pool_until.store(0);
}

// [OpenMP calls that stalled, times auto mode moved to the pool, 1 if it is on the pool now]
void effnb_decode_threading_stats(int64_t* out) {
    out[0] = pool::g_stalls.load();
    out[1] = pool::g_switches.load();
    out[2] = now_ns() < pool::g_pool_until.load() ? 1 : 0;
}

int effnb_int4_linear(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* qw, const uint16_t* scales,
                      const uint16_t* zeros, int64_t g, const float* bias, float* y, int nthreads) {
    EFFNB_REQUIRE(M >= 0 && N >= 0 && K > 0 && g > 0 && K % g == 0 && g % 32 == 0, "effnb_int4_linear");
    try {
        const int64_t G = K / g;
        const int64_t bytes = (int64_t)sizeof(float) * (M * K + M * G);
        Buffer buf(static_cast<float*>(malloc(bytes)), &free);
        if (!buf) return note_error(kNoMemory, "effnb_int4_linear", "the reordered input", bytes);
        float* xs = buf.get();
        float* xsum = xs + M * K;
        deinterleave(x, xs, M, K);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t gi = 0; gi < G; ++gi) {
                float s = 0.f;
                for (int64_t k = gi * g; k < (gi + 1) * g; ++k) s += x[m * K + k];
                xsum[m * G + gi] = s;
            }
        over_rows(M, N, nthreads, [&](int64_t m0, int64_t mm, int64_t n0, int64_t n1) {
            DISPATCH_MM(mm, int4_rows, xs + m0 * K, xsum + m0 * G, mm, K, N, n0, n1, qw, scales, zeros, g, bias,
                        y + m0 * N);
        });
    } catch (...) {
        return on_exception("effnb_int4_linear");
    }
    return kOk;
}

int effnb_lut4_linear(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* qw, const float* absmax,
                      const uint8_t* qabsmax, const float* code2, const float* absmax2, float offset, int64_t bs,
                      int64_t bs2, const float* table, const float* bias, float* y, int nthreads) {
    EFFNB_REQUIRE(M >= 0 && N >= 0 && K > 0 && bs > 0 && K % bs == 0 && bs % 32 == 0 && bs2 > 0, "effnb_lut4_linear");
    try {
        const int64_t bytes = (int64_t)sizeof(float) * M * K;
        Buffer buf(static_cast<float*>(malloc(bytes)), &free);
        if (!buf) return note_error(kNoMemory, "effnb_lut4_linear", "the reordered input", bytes);
        float* xs = buf.get();
        deinterleave(x, xs, M, K);
        over_rows(M, N, nthreads, [&](int64_t m0, int64_t mm, int64_t n0, int64_t n1) {
            DISPATCH_MM(mm, lut4_rows, xs + m0 * K, mm, K, N, n0, n1, qw, absmax, qabsmax, code2, absmax2, offset, bs,
                        bs2, table, bias, y + m0 * N);
        });
    } catch (...) {
        return on_exception("effnb_lut4_linear");
    }
    return kOk;
}

int effnb_int8_linear(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* qw, const uint16_t* scales,
                      int64_t g, const float* bias, float* y, int nthreads) {
    EFFNB_REQUIRE(M >= 0 && N >= 0 && K > 0 && g > 0 && K % g == 0 && g % 32 == 0, "effnb_int8_linear");
    try {
        over_rows(M, N, nthreads, [&](int64_t m0, int64_t mm, int64_t n0, int64_t n1) {
            DISPATCH_MM(mm, int8_rows, x + m0 * K, mm, K, N, n0, n1, qw, scales, g, bias, y + m0 * N);
        });
    } catch (...) {
        return on_exception("effnb_int8_linear");
    }
    return kOk;
}

// ------------------------------------------------------------- int4 / int8 round to nearest
// reference.quantize_int4 / quantize_int8 value for value (one OpenMP region per layer instead of a
// dozen layer-sized PyTorch ops, each a parallel region that a busy shared CPU can stall), plus the
// squared error of the stored weights for the layer's SNR. W [N, K] row-major, groups of g along K.
//   mode 0: int4 asymmetric: s = fp16((max - min) / 15) (1 if 0, at least 2^-24), z = fp16(-min / s),
//           q = clamp(round(w / s + z), 0, 15), packed two per byte (2j low nibble, 2j+1 high)
//   mode 1: int4 symmetric: s = fp16(max(-min / 8, max / 7)) (1 if 0, at least 2^-24), q = clamp(round(w / s + 8), 0, 15)
//   mode 2: int8: s = fp16(absmax / 127) (1 if it rounds to 0), q = clamp(round(w / s), -127, 127)
constexpr float kFp16Tiny = 5.9604644775390625e-8f;  // 2^-24, the smallest positive fp16 (reference.FP16_TINY)

int effnb_quantize_rtn(const float* w, int64_t N, int64_t K, int64_t g, int mode, uint8_t* q, uint16_t* scales,
                       uint16_t* zeros, double* sq_err, int nthreads) {
    EFFNB_REQUIRE(N >= 0 && K > 0 && g > 0 && K % g == 0 && (mode == 2 || K % 2 == 0) && mode >= 0 && mode <= 2, "effnb_quantize_rtn");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        const int64_t G = K / g;
        double total = 0.0;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) reduction(+ : total)
        for (int64_t n = 0; n < N; ++n) {
            double err = 0.0;
            for (int64_t gi = 0; gi < G; ++gi) {
                const float* x = w + n * K + gi * g;
                float lo = x[0], hi = x[0];
                for (int64_t k = 1; k < g; ++k) { lo = x[k] < lo ? x[k] : lo; hi = x[k] > hi ? x[k] : hi; }
                float s, z;
                if (mode == 2) {
                    const float am = fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);
                    s = h2f(_cvtss_sh(am / 127.f, _MM_FROUND_TO_NEAREST_INT));
                    if (!(s > 0.f)) s = 1.f;
                    z = 0.f;
                } else if (mode == 1) {
                    const float a = -lo / 8.f, b = hi / 7.f;
                    float s32 = a > b ? a : b;
                    if (!(s32 > 0.f)) s32 = 1.f;
                    if (s32 < kFp16Tiny) s32 = kFp16Tiny;
                    s = h2f(_cvtss_sh(s32, _MM_FROUND_TO_NEAREST_INT));
                    z = 8.f;
                } else {
                    float s32 = (hi - lo) / 15.f;
                    if (!(s32 > 0.f)) s32 = 1.f;
                    if (s32 < kFp16Tiny) s32 = kFp16Tiny;  // a smaller scale would be stored as 0
                    s = h2f(_cvtss_sh(s32, _MM_FROUND_TO_NEAREST_INT));
                    z = h2f(_cvtss_sh(-lo / s, _MM_FROUND_TO_NEAREST_INT));
                    zeros[n * G + gi] = _cvtss_sh(z, _MM_FROUND_TO_NEAREST_INT);
                }
                scales[n * G + gi] = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
                const float qmin = mode == 2 ? -127.f : 0.f, qmax = mode == 2 ? 127.f : 15.f;
                for (int64_t k = 0; k < g; ++k) {
                    float v = nearbyintf(x[k] / s + z);
                    v = v < qmin ? qmin : (v > qmax ? qmax : v);
                    const float d = x[k] - (v - z) * s;
                    err += (double)d * d;
                    const int64_t col = gi * g + k;
                    if (mode == 2) {
                        reinterpret_cast<int8_t*>(q)[n * K + col] = (int8_t)v;
                    } else if (col % 2 == 0) {
                        q[n * (K / 2) + col / 2] = (uint8_t)v;
                    } else {
                        q[n * (K / 2) + col / 2] |= (uint8_t)((uint8_t)v << 4);
                    }
                }
            }
            total += err;
        }
        *sq_err = total;
    } catch (...) {
        return on_exception("effnb_quantize_rtn");
    }
    return kOk;
}

// ------------------------------------------------------------------ nf4 / fp4 quantization
// Shared by effnb_quantize_4bit and effnb_nf4_search: the code bitsandbytes picks for one weight at
// a given scale's reciprocal, and a whole block encoded and packed with its squared error.
// The reciprocal of a scale, guarded against an all-zero block (scale 0).
static inline float safe_inv(float s) { return 1.0f / (s > 1e-38f ? s : 1e-38f); }

static inline uint8_t code4(float w, float inv, const float* bounds, const uint8_t* order) {
    float sc = w * inv;
    sc = sc < -1.f ? -1.f : (sc > 1.f ? 1.f : sc);
    int idx = 0;
    idx += (sc > bounds[idx + 7]) ? 8 : 0;
    idx += (sc > bounds[idx + 3]) ? 4 : 0;
    idx += (sc > bounds[idx + 1]) ? 2 : 0;
    idx += (sc > bounds[idx]) ? 1 : 0;
    return order[idx];
}

static inline float block_absmax(const float* w, int64_t k0, int64_t k1) {
    float am = 0.f;
    for (int64_t k = k0; k < k1; ++k) am = fabsf(w[k]) > am ? fabsf(w[k]) : am;
    return am;
}

// Codes of w[k0:k1] at scale s, packed (element 2i in the HIGH nibble); returns sum (w - table[q] s)^2.
static inline double encode_block4(const float* w, int64_t k0, int64_t k1, float s, const float* bounds,
                                   const uint8_t* order, const float* table, uint8_t* packed) {
    const float inv = safe_inv(s);
    double err = 0.0;
    for (int64_t k = k0; k < k1; k += 2) {
        uint8_t q2[2] = {0, 0};
        for (int j = 0; j < 2 && k + j < k1; ++j) {
            const uint8_t q = code4(w[k + j], inv, bounds, order);
            q2[j] = q;
            const float d = w[k + j] - table[q] * s;
            err += (double)d * d;
        }
        packed[k / 2] = (uint8_t)((q2[0] << 4) | q2[1]);
    }
    return err;
}

// Runs body(b, k0, k1, absmax of the block) over the blocks of bs elements of w[0, n) (the last
// may be shorter) on nthreads OpenMP threads and returns the sum of what body returns (each
// block's squared error): the one block loop of the 4-bit quantizers.
extern "C++" {  // a template inside the extern "C" section
template <typename Body>
static double over_blocks(const float* w, int64_t n, int64_t bs, int nthreads, Body body) {
    const int64_t nblocks = (n + bs - 1) / bs;
    double total = 0.0;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1) reduction(+ : total)
    for (int64_t b = 0; b < nblocks; ++b) {
        const int64_t k0 = b * bs, k1 = k0 + bs < n ? k0 + bs : n;
        total += body(b, k0, k1, block_absmax(w, k0, k1));
    }
    return total;
}
}  // extern "C++"

// bitsandbytes' quantize_4bit arithmetic, element for element (the PyTorch reference in
// reference.py does the same): per block absmax; scaled = clamp(w * (1 / absmax), -1, 1);
// index = number of midpoints between sorted table values that lie below `scaled` (a
// branchless binary search over the 15 midpoints), mapped through `order` (sorted position ->
// table index; identity for nf4). Packs element 2i in the HIGH nibble. Also returns the sum of
// squared errors (w - table[q] * absmax)^2, so the per-layer SNR needs no dequantization.
// n even; a last, shorter block gets its own absmax (as bitsandbytes does).
int effnb_quantize_4bit(const float* w, int64_t n, int64_t bs, const float* bounds, const uint8_t* order,
                        const float* table, uint8_t* packed, float* absmax, double* sq_err, int nthreads) {
    EFFNB_REQUIRE(n >= 0 && n % 2 == 0 && bs > 0, "effnb_quantize_4bit");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        *sq_err = over_blocks(w, n, bs, nthreads, [&](int64_t b, int64_t k0, int64_t k1, float am) {
            absmax[b] = am;
            return encode_block4(w, k0, k1, am, bounds, order, table, packed);
        });
    } catch (...) {
        return on_exception("effnb_quantize_4bit");
    }
    return kOk;
}

// ------------------------------------------------------------- hqq on the NF4 grid (scale search)
// Per block: the stored scale (bitsandbytes' "absmax" slot) is chosen among absmax * a for a in
// a_lo .. 1 (nsteps values, evenly spaced, 1 last) to minimise sum_k wt_k (w_k - table[q_k] s)^2 with
// wt_k = 1 + alpha (w_k / absmax)^2 (large weights count more); codes for each candidate as
// effnb_quantize_4bit picks them (bitsandbytes' arithmetic with that scale). A tie keeps the
// earlier candidate. Writes the codes (bitsandbytes layout), the chosen scales, and the plain
// (unweighted) squared error. methods.hqq_nf4_reference is the PyTorch reference.
int effnb_nf4_search(const float* w, int64_t n, int64_t bs, const float* bounds, const uint8_t* order,
                     const float* table, float alpha, float a_lo, int nsteps, uint8_t* packed, float* scales,
                     double* sq_err, int nthreads) {
    EFFNB_REQUIRE(n >= 0 && n % 2 == 0 && bs > 0 && nsteps > 0, "effnb_nf4_search");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        *sq_err = over_blocks(w, n, bs, nthreads, [&](int64_t b, int64_t k0, int64_t k1, float am) {
            const float inv_am = safe_inv(am);
            float best_s = am, best_e = INFINITY;
            for (int st = 0; st < nsteps; ++st) {
                const float a = nsteps > 1 ? a_lo + (1.0f - a_lo) * (float)st / (float)(nsteps - 1) : 1.0f;
                const float s = am * a;
                const float inv = safe_inv(s);
                float e = 0.f;
                for (int64_t k = k0; k < k1; ++k) {
                    const float d = w[k] - table[code4(w[k], inv, bounds, order)] * s;
                    const float r = w[k] * inv_am;
                    e += (1.0f + alpha * r * r) * d * d;
                }
                if (e < best_e) { best_e = e; best_s = s; }
            }
            scales[b] = best_s;
            return encode_block4(w, k0, k1, best_s, bounds, order, table, packed);
        });
    } catch (...) {
        return on_exception("effnb_nf4_search");
    }
    return kOk;
}

// -------------------------------------------------------------------------- GPTQ inner loop
// One block of B columns of GPTQ (Frantar et al., 2022), all N rows (rows are independent given
// the Hessian, so they are split over the threads). W1 [N, B] row-major is updated in place;
// Hinv1 [B, B] is the block of the upper Cholesky factor of H^-1; the grid is fixed per group:
// scales/zeros [N, G] (zeros NULL: constant zconst), column c of the block is in group
// (c0 + c) / g. Writes codes Q1 [N, B] and scaled errors E1 [N, B] (for the caller's update of
// the later columns). Rounding is round-half-to-even, as torch.round.
int effnb_gptq_block(float* W1, int64_t N, int64_t B, const float* Hinv1, const float* scales, const float* zeros,
                     float zconst, int64_t G, int64_t g, int64_t c0, float qmin, float qmax, float* Q1, float* E1,
                     int nthreads) {
    EFFNB_REQUIRE(N >= 0 && B >= 0 && g > 0 && G > 0 && c0 >= 0 && c0 + B <= G * g, "effnb_gptq_block");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t n = 0; n < N; ++n) {
            float* w = W1 + n * B;
            for (int64_t i = 0; i < B; ++i) {
                const int64_t gi = (c0 + i) / g;
                const float s = scales[n * G + gi];
                const float z = zeros ? zeros[n * G + gi] : zconst;
                float q = nearbyintf(w[i] / s + z);
                q = q < qmin ? qmin : (q > qmax ? qmax : q);
                Q1[n * B + i] = q;
                const float e = (w[i] - (q - z) * s) / Hinv1[i * B + i];
                E1[n * B + i] = e;
                const float* h = Hinv1 + i * B;
                for (int64_t j = i + 1; j < B; ++j) w[j] -= e * h[j];
            }
        }
    } catch (...) {
        return on_exception("effnb_gptq_block");
    }
    return kOk;
}

// ------------------------------------------------------------------------ dequantize (prefill)
// The whole weight as fp32 [N, K], value for value what reference.py's dequantize_* compute (same
// fp32 operations, no fused multiply-add), so a prefill or a training step with gradients runs
// dequantize-here + torch's GEMM with results identical to the reference path, ~10x faster than
// dequantizing with PyTorch ops. K and g multiples of 32 for int4/int8 (the caller checks).
int effnb_int4_dequant(const uint8_t* qw, const uint16_t* scales, const uint16_t* zeros, int64_t N, int64_t K,
                       int64_t g, float* out, int nthreads) {
    EFFNB_REQUIRE(N >= 0 && K > 0 && g > 0 && K % g == 0 && g % 32 == 0, "effnb_int4_dequant");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        const int64_t G = K / g;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t n = 0; n < N; ++n) {
            const uint8_t* row = qw + n * (K / 2);
            float* o = out + n * K;
            for (int64_t gi = 0; gi < G; ++gi) {
                const __m256 sv = _mm256_set1_ps(h2f(scales[n * G + gi]));
                const __m256 zv = _mm256_set1_ps(zeros ? h2f(zeros[n * G + gi]) : 8.f);
                for (int64_t c = gi * g; c < (gi + 1) * g; c += 32) {
                    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2));
                    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
                    __m128i q0 = _mm_unpacklo_epi8(lo, hi), q1 = _mm_unpackhi_epi8(lo, hi);  // columns in order
                    __m128i parts[4] = {q0, _mm_srli_si128(q0, 8), q1, _mm_srli_si128(q1, 8)};
                    for (int j = 0; j < 4; ++j) {
                        __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j]));
                        _mm256_storeu_ps(o + c + 8 * j, _mm256_mul_ps(_mm256_sub_ps(v, zv), sv));
                    }
                }
            }
        }
    } catch (...) {
        return on_exception("effnb_int4_dequant");
    }
    return kOk;
}

int effnb_int8_dequant(const int8_t* qw, const uint16_t* scales, int64_t N, int64_t K, int64_t g, float* out,
                       int nthreads) {
    EFFNB_REQUIRE(N >= 0 && K > 0 && g > 0 && K % g == 0 && g % 8 == 0, "effnb_int8_dequant");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        const int64_t G = K / g;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t n = 0; n < N; ++n) {
            for (int64_t gi = 0; gi < G; ++gi) {
                const __m256 sv = _mm256_set1_ps(h2f(scales[n * G + gi]));
                for (int64_t c = gi * g; c < (gi + 1) * g; c += 8) {
                    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qw + n * K + c));
                    _mm256_storeu_ps(out + n * K + c, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), sv));
                }
            }
        }
    } catch (...) {
        return on_exception("effnb_int8_dequant");
    }
    return kOk;
}

// nf4/fp4 in bitsandbytes' flat layout (element 2i in the HIGH nibble); absmax fp32 per block of
// bs elements (the caller undoes double quantization first: a few thousand values).
int effnb_lut4_dequant(const uint8_t* qw, const float* absmax, int64_t n, int64_t bs, const float* table,
                       float* out, int nthreads) {
    EFFNB_REQUIRE(n >= 0 && bs > 0, "effnb_lut4_dequant");
    nthreads = team(nthreads);  // 1 in a forked child: GNU OpenMP's threads did not survive fork
    try {
        const int64_t nblocks = (n + bs - 1) / bs;
        const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t k0 = b * bs, k1 = k0 + bs < n ? k0 + bs : n;
            const float am = absmax[b];
            const __m256 av = _mm256_set1_ps(am);
            int64_t k = k0;
            if (k0 % 2 == 0) {
                for (; k + 32 <= k1; k += 32) {
                    __m128i by = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qw + k / 2));
                    __m128i lo = _mm_and_si128(by, _mm_set1_epi8(0x0F));
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(by, 4), _mm_set1_epi8(0x0F));
                    __m128i q0 = _mm_unpacklo_epi8(hi, lo), q1 = _mm_unpackhi_epi8(hi, lo);
                    __m128i parts[4] = {q0, _mm_srli_si128(q0, 8), q1, _mm_srli_si128(q1, 8)};
                    for (int j = 0; j < 4; ++j) {
                        __m256 v = lut16(_mm256_cvtepu8_epi32(parts[j]), tlo, thi);
                        _mm256_storeu_ps(out + k + 8 * j, _mm256_mul_ps(v, av));
                    }
                }
            }
            for (; k < k1; ++k) {
                const uint8_t byte = qw[k / 2];
                out[k] = table[(k % 2) ? (byte & 0x0F) : (byte >> 4)] * am;
            }
        }
    } catch (...) {
        return on_exception("effnb_lut4_dequant");
    }
    return kOk;
}

}  // extern "C"
