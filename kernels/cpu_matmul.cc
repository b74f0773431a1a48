// y [M, N] = x [M, K] @ w [K, N] in float32 on a CPU, for the few rows of a decode or verification step.
//
// Why: XLA:CPU runs a one-row product as a matrix-vector kernel and from two rows on switches to a matrix-product
// kernel that packs the weights first; on a 2-core AMD EPYC that made a 2..5-token verification of SmolLM2-135M
// cost 1.3-1.5x a one-token step (LM head: 4 ms at 1 row, 7 ms at 2..5). Decoding is bound by reading the
// weights, so this kernel reads w once, in place, for up to kGroupRows rows (docs/engine.md, "The CPU matmul").
//
// Order of work: columns are cut into chunks of kChunk (the chunk's outputs stay in cache); a chunk is swept by
// passes over kPassRows rows of w, each pass walking register tiles of 64 columns: for each tile, every
// block of up to kBlockRows rows of x takes its turn while the tile's rows of w sit in L1, so w comes from memory
// once for all of them. Accumulators go through memory once per pass. Each tile prefetches the next tile's
// columns: the hardware prefetcher alone did not keep the FMA units fed from 12 rows on (LM head at 12 rows:
// 12-14 ms without, 7-7.5 ms with, in a throwaway C++ harness on this machine).
//
// Arithmetic: every output element is one chain of fused multiply-adds over k in increasing order, starting from
// zero, whatever M, the tiling or the path (vector or the scalar tail), so one row's result does not depend on the
// rows beside it (a verification's logits are bit-identical to a one-token step's). FMA rather than a multiply
// and an add: with broadcasts of x in the loop, separate multiplies and adds issued at two thirds of the rate.
//
// Threads: the rows of w are split into one contiguous slab per thread of XLA's intra-op pool (cpu_parallel.h);
// the slabs' partial sums are added in slab order.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>

#if defined(__AVX512F__) || defined(__FMA__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

constexpr int R = 4;                 // vectors of 16 columns per register tile: 64 columns
constexpr int64_t kTile = 16 * R;
constexpr int kBlockRows = 6;        // rows of x per register tile: 6 x 4 accumulators + 4 vectors of w
constexpr int kGroupRows = 24;       // rows of x per sweep of w (more rows: another sweep)
constexpr int64_t kChunk = 4096;     // columns per cache chunk
constexpr int64_t kMinSlab = 128;    // fewest rows of w a thread takes

// Rows of w per pass, whatever M: a pass reads that many rows of w side by side, one memory stream each (more
// streams, presumably, than the hardware prefetcher follows). 32 rows for more than 6 rows of x looked better in a
// C++ harness but measured worse inside XLA (SmolLM2-135M's forward at batch 4, both CPU kernels, back-to-back
// probes: 8 rows of x 41-44 -> 32-36 ms per step, 12 rows 46-59 -> 36-45 ms).
constexpr int64_t kPassRows = 8;

// a * b + c, rounded once, lane by lane
inline v16 fma16(v16 a, v16 b, v16 c) {
#if defined(__AVX512F__)
  return (v16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  v8 a2[2], b2[2], c2[2];
  std::memcpy(a2, &a, 64), std::memcpy(b2, &b, 64), std::memcpy(c2, &c, 64);
  for (int h = 0; h < 2; ++h) c2[h] = (v8)_mm256_fmadd_ps((__m256)a2[h], (__m256)b2[h], (__m256)c2[h]);
  std::memcpy(&c, c2, 64);
  return c;
#elif defined(__aarch64__)
  float32x4_t a4[4], b4[4], c4[4];
  std::memcpy(a4, &a, 64), std::memcpy(b4, &b, 64), std::memcpy(c4, &c, 64);
  for (int q = 0; q < 4; ++q) c4[q] = vfmaq_f32(c4[q], a4[q], b4[q]);
  std::memcpy(&c, c4, 64);
  return c;
#else
  for (int i = 0; i < 16; ++i) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
  return c;
#endif
}

// y [MB, n:n+64] (+)= x [MB, p0:p1] @ w [p0:p1, n:n+64]: one register tile. `first` starts the sums at zero.
template <int MB, bool Prefetch>
__attribute__((always_inline)) inline void tile(const float* x, int64_t ldx, const float* w, int64_t N, float* y,
                                                bool first, int64_t p0, int64_t p1, int64_t n) {
  v16 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) {
      if (first) acc[m][r] = (v16){};
      else std::memcpy(&acc[m][r], y + m * N + n + 16 * r, 64);
    }
  const float* wk = w + p0 * N + n;
  for (int64_t k = p0; k < p1; ++k, wk += N) {
    v16 wv[R];
    for (int r = 0; r < R; ++r) std::memcpy(&wv[r], wk + 16 * r, 64);
    if (Prefetch)
      for (int r = 0; r < R; ++r) __builtin_prefetch(wk + kTile + 16 * r);
    for (int m = 0; m < MB; ++m) {
      const v16 xv = (v16){} + x[m * ldx + k];
      for (int r = 0; r < R; ++r) acc[m][r] = fma16(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) std::memcpy(y + m * N + n + 16 * r, &acc[m][r], 64);
}

// One register tile's columns for all M rows: block b is rows [M*b/B, M*(b+1)/B); block 0 prefetches.
template <int M, int B, int... b>
__attribute__((always_inline)) inline void blocks(const float* x, int64_t ldx, const float* w, int64_t N, float* y,
                                                  bool first, int64_t p0, int64_t p1, int64_t n,
                                                  std::integer_sequence<int, b...>) {
  (tile<M * (b + 1) / B - M * b / B, b == 0>(x + M * b / B * ldx, ldx, w, N, y + M * b / B * N, first, p0, p1, n),
   ...);
}

// y [M, c0:c1] = x [M, k0:k1] @ w [k0:k1, c0:c1] for M <= kGroupRows rows, in B near-equal blocks of at most
// kBlockRows; x has row stride ldx, w and y row stride N.
template <int M>
void sweep(const float* x, int64_t ldx, const float* w, int64_t N, float* y, int64_t k0, int64_t k1, int64_t c0,
           int64_t c1) {
  constexpr int B = (M + kBlockRows - 1) / kBlockRows;
  const int64_t wide = c0 + (c1 - c0) / kTile * kTile;
  for (int64_t p0 = k0; p0 < k1; p0 += kPassRows) {
    const int64_t p1 = std::min(k1, p0 + kPassRows);
    const bool first = p0 == k0;
    for (int64_t n = c0; n < wide; n += kTile)
      blocks<M, B>(x, ldx, w, N, y, first, p0, p1, n, std::make_integer_sequence<int, B>{});
    for (int64_t n = wide; n < c1; ++n)  // the last columns of a width that is not a multiple of the tile
      for (int m = 0; m < M; ++m) {
        float s = first ? 0.f : y[m * N + n];
        for (int64_t k = p0; k < p1; ++k) s = __builtin_fmaf(x[m * ldx + k], w[k * N + n], s);
        y[m * N + n] = s;
      }
  }
}

template <int M>
void group(const float* x, int64_t ldx, const float* w, int64_t N, float* y, int64_t k0, int64_t k1) {
  for (int64_t c = 0; c < N; c += kChunk) sweep<M>(x, ldx, w, N, y, k0, k1, c, std::min(N, c + kChunk));
}

// group<rows> for a run-time rows in 1..kGroupRows
template <int... g>
void any_group(int64_t rows, const float* x, int64_t ldx, const float* w, int64_t N, float* y, int64_t k0, int64_t k1,
               std::integer_sequence<int, g...>) {
  ((rows == g + 1 ? group<g + 1>(x, ldx, w, N, y, k0, k1) : void()), ...);
}

// y [M, N] = x [M, k0:k1] @ w [k0:k1, :] (x's row stride K), kGroupRows rows of x per sweep of w.
void partial(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y, int64_t k0, int64_t k1) {
  for (int64_t m0 = 0; m0 < M; m0 += kGroupRows)
    any_group(std::min<int64_t>(kGroupRows, M - m0), x + m0 * K, K, w, N, y + m0 * N, k0, k1,
              std::make_integer_sequence<int, kGroupRows>{});
}

// The rows of w are cut into `parts` contiguous slabs, one task each: each task streams one block of memory.
// Part 0 sums into y, the others into scratch, added to y in part order at the end, so the order of every
// sum depends on K and the part count only, never on M.
ffi::Error SmallMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0])
    return ffi::Error::InvalidArgument("eej_cpu_matmul: expected x [M, K] and w [K, N]");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t M = xd[0], K = xd[1], N = wd[1];
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(yp, 0, sizeof(float) * M * N);
    return ffi::Error::Success();
  }
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), K / kMinSlab));
  const int64_t slab = (K + parts - 1) / parts;
  parts = (K + slab - 1) / slab;
  std::unique_ptr<float[]> scratch(parts > 1 ? new float[(parts - 1) * M * N] : nullptr);
  float* sp = scratch.get();
  eej::parallel_tasks(pool, parts, [=](int64_t p) {
    partial(xp, wp, M, K, N, p == 0 ? yp : sp + (p - 1) * M * N, p * slab, std::min(K, (p + 1) * slab));
  });
  for (int64_t p = 1; p < parts; ++p) {
    const float* part = sp + (p - 1) * M * N;
    for (int64_t i = 0; i < M * N; ++i) yp[i] += part[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EejCpuMatmul, SmallMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
