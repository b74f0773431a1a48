// y [M, N] = x [M, K] @ w [K, N] in float32 on a CPU, for the few rows of a decode or verification step, with w
// given in column tiles: tiles [N / T, K, T] (T = kTile = 32 columns, N padded with zero columns to a multiple of
// T; eej.model.packed lays them out once, when an engine is built).
//
// Why: decoding is bound by reading the weights. XLA:CPU runs a one-row product as a matrix-vector kernel and from
// two rows on switches to a matrix-product kernel that packs the weights first, so a 2..5-token verification of
// SmolLM2-135M cost 1.3-1.5x a one-token step. This kernel reads w once, in place, for all the rows of x
// (docs/engine.md, "The CPU matmul"). In column tiles a tile's K rows are one contiguous block: each thread reads
// one sequential stream, and a register tile keeps its sums in registers over the whole of K. (In w's own [K, N]
// layout the sums went through memory every few rows of w, and each pass read several rows of w side by side: the
// full set of SmolLM2-135M's products at 1 / 4 / 8 / 12 rows took 18.3 / 21.0 / 27.4 / 35.0 ms that way and 12.1 /
// 13.3 / 15.8 / 20.5 ms in tiles, in a throwaway C++ harness on this machine, 2 threads, the minimum of 15
// interleaved rounds.) Loading w with one 512-bit load per vector (`load16`) and prefetching it into L2 rather than
// L1 then took the same set, on an Intel Xeon VM streaming ~22 GB/s (the numbers before: AMD EPYC), from 26.3 /
// 31.3 / 38.1 ms to 18.8 / 21.8 / 24.0 ms at 4 / 8 / 12 rows (medians of 15 interleaved rounds; with the weights in
// cache, 18.4 -> 7.6 ms at 4 rows: the loop had been bound by its own instructions, not by memory).
//
// Order of work: a thread takes a contiguous run of tiles; for each tile, each block of up to kBlockRows rows of x
// takes its turn (one block for up to 12 rows: 12 rows x 2 vectors = 24 accumulators), reading the tile's block
// of w while the next is prefetched; a second block re-reads the tile from cache.
//
// Arithmetic: every output element is one chain of fused multiply-adds over k in increasing order, starting from
// zero, whatever M, the blocking or the thread count, so one row's result does not
// depend on the rows beside it (a verification's logits are bit-identical to a one-token step's). FMA rather than
// a multiply and an add: with broadcasts of x in the loop, separate multiplies and adds issued at two thirds of the
// rate.

#include <algorithm>
#include <cstdint>
#include <cstring>
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

constexpr int R = 2;               // vectors of 16 columns per register tile
constexpr int64_t kTile = 16 * R;  // columns per tile (eej.model.packed.TILE)
constexpr int kBlockRows = 12;     // rows of x per register block: 12 x 2 accumulators + 2 vectors of w
// How far ahead of the FMAs block 0 prefetches w, in floats: 8 KB, 64 of a tile's rows (2048 beat 512, 1024 and
// 4096 in the harness above; with prefetches into L2, 1024 to 8192 were all within 2%). Into L2 (`_MM_HINT_T1`):
// 4-14% faster than into L1; a non-temporal hint was 30% slower.
constexpr int64_t kPrefetch = 2048;

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

// 16 floats from memory (unaligned): one 512-bit load (a 64-byte memcpy compiled to two 256-bit loads and stores
// and a 512-bit reload from the stack, which stalled every step of the loop on store forwarding)
inline v16 load16(const float* p) {
#if defined(__AVX512F__)
  return (v16)_mm512_loadu_ps(p);
#else
  v16 v;
  std::memcpy(&v, p, 64);
  return v;
#endif
}

// v16 of x in every lane
inline v16 broadcast16(float x) {
#if defined(__AVX512F__)
  return (v16)_mm512_set1_ps(x);
#else
  return (v16){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x};
#endif
}

// y [MB, 0:kTile] = x [MB, 0:K] @ tile [K, kTile]: one register tile (y's row stride ldy).
template <int MB, bool Prefetch>
__attribute__((always_inline)) inline void block(const float* x, int64_t K, const float* tile, float* y, int64_t ldy) {
  v16 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = (v16){};
  const float* wk = tile;
  for (int64_t k = 0; k < K; ++k, wk += kTile) {
    v16 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load16(wk + 16 * r);
    if (Prefetch)
      for (int r = 0; r < R; ++r) __builtin_prefetch(wk + kPrefetch + 16 * r, 0, 2);
    for (int m = 0; m < MB; ++m) {
      const v16 xv = broadcast16(x[m * K + k]);
      for (int r = 0; r < R; ++r) acc[m][r] = fma16(xv, wv[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) std::memcpy(y + m * ldy + 16 * r, &acc[m][r], 64);
}

// One tile's columns for all M rows: block b is rows [M*b/B, M*(b+1)/B); block 0 prefetches.
template <int M, int B, int... b>
__attribute__((always_inline)) inline void blocks(const float* x, int64_t K, const float* tile, float* y, int64_t ldy,
                                                  std::integer_sequence<int, b...>) {
  (block<M * (b + 1) / B - M * b / B, b == 0>(x + M * b / B * K, K, tile, y + M * b / B * ldy, ldy), ...);
}

// y [M, t0*T : t1*T] = x [M, K] @ tiles [t0:t1] for M rows of x, in B near-equal blocks of at most kBlockRows.
template <int M>
void columns(const float* x, const float* tiles, int64_t K, float* y, int64_t ldy, int64_t t0, int64_t t1) {
  constexpr int B = (M + kBlockRows - 1) / kBlockRows;
  for (int64_t t = t0; t < t1; ++t)
    blocks<M, B>(x, K, tiles + t * K * kTile, y + t * kTile, ldy, std::make_integer_sequence<int, B>{});
}

constexpr int kMaxRows = 36;  // the most rows one call takes (eej.kernels.cpu_matmul.CALL_ROWS is at most this)

// columns<rows> for a run-time rows in 1..kMaxRows
template <int... g>
void any_columns(int64_t rows, const float* x, const float* tiles, int64_t K, float* y, int64_t ldy, int64_t t0,
                 int64_t t1, std::integer_sequence<int, g...>) {
  ((rows == g + 1 ? columns<g + 1>(x, tiles, K, y, ldy, t0, t1) : void()), ...);
}

// The tiles are cut into one contiguous run per thread of XLA's intra-op pool (cpu_parallel.h); each output
// element is computed by one thread, so its sum does not depend on the thread count.
ffi::Error TiledMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> tiles,
                       ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto td = tiles.dimensions();
  if (xd.size() != 2 || td.size() != 3 || td[2] != kTile || xd[1] != td[1])
    return ffi::Error::InvalidArgument("eej_cpu_matmul: expected x [M, K] and tiles [N / 32, K, 32]");
  const int64_t M = xd[0], K = xd[1], count = td[0], ldy = count * kTile;
  if (M > kMaxRows) return ffi::Error::InvalidArgument("eej_cpu_matmul: more rows of x than the kernel takes");
  const float* xp = x.typed_data();
  const float* tp = tiles.typed_data();
  float* yp = y->typed_data();
  if (M == 0 || count == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(yp, 0, sizeof(float) * M * ldy);
    return ffi::Error::Success();
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), count));
  eej::parallel_tasks(pool, parts, [=](int64_t p) {
    any_columns(M, xp, tp, K, yp, ldy, count * p / parts, count * (p + 1) / parts,
                std::make_integer_sequence<int, kMaxRows>{});
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EejCpuMatmul, TiledMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
