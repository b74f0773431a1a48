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
// Order of work: a thread takes a contiguous run of tiles; for each tile, each block of rows of x takes its turn
// (one block for up to kOneBlockRows rows: 12 with AVX-512, 5 with AVX2; more rows in blocks of kBlockRows: 12 and
// 2), reading the tile's block of w; a second block re-reads the tile from cache. With one block, it prefetches the
// tile's rows ahead of its FMAs; with several, each prefetches its share of the next tile's, so memory streams
// while every block computes (prefetching in block 0 alone left it idle through the others: on an AVX2 EPYC, 8
// rows in blocks of 4 took 27 ms for SmolLM2-135M's products, 20 ms in blocks of 2 with the shares; docs/engine.md).
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

#include "cpu_parallel.h"
#include "cpu_vector.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace eej;  // the vector (cpu_vector.h)

// Rows per register block, by the vector (cpu_vector.h): kLanes floats, a tile row kTile / kLanes of them. AVX-512
// has 32 registers of 16 floats: blocks of up to 12 rows x 2 vectors = 24 accumulators. AVX2 has 16 registers of
// 8 and a tile row is 4 of them: up to 5 rows in one block (20 accumulators, a few of them kept in L1; faster than
// 2, 3, 4 or 6 there on an AVX2-only AMD EPYC VM, so a verification of up to 5 tokens at batch 1 reads w once),
// more in blocks of 2 (8 accumulators, none spilled, each block re-reading the tile from L2). Before, AVX2 ran
// 16-float vectors as pairs through memory in blocks of 12 rows (48 accumulators for 16 registers), and the kernel
// was slower than XLA's product from one row on (docs/engine.md, "The CPU matmul on AVX2").
#if defined(__AVX2__) && !defined(__AVX512F__)
constexpr int kOneBlockRows = 5;
constexpr int kBlockRows = 2;
#else
constexpr int kOneBlockRows = 12;
constexpr int kBlockRows = 12;
#endif

constexpr int64_t kTile = 32;        // columns per tile (eej.model.packed.TILE)
constexpr int R = kTile / kLanes;    // vectors per tile row
constexpr int kLineFloats = 16;      // floats per 64-byte cache line
// How far ahead of the FMAs a tile's only block prefetches w, in floats: 8 KB, 64 of a tile's rows (2048 beat 512,
// 1024 and 4096 in the harness above; with prefetches into L2, 1024 to 8192 were all within 2%). Into L2
// (`_MM_HINT_T1`): 4-14% faster than into L1; a non-temporal hint was 30% slower.
constexpr int64_t kPrefetch = 2048;

// Whether a block of 1 or 2 rows of x takes two rows of w per iteration of its loop over k (the sums are the same
// chains in the same order). With AVX-512, one row of w at a time, a block of 2 rows was slower than one of 3: on a
// 2-core Intel Xeon a 2-token verification of SmolLM2-135M at batch 1 cost 1.12x a one-token step and a 3-token one
// 1.06x (benchmarks/results/verify_width_cost_c512_intel); two rows of w at a time, 1.02x and 1.01x (`..._pairs`).
// Blocks of 3 or more rows were no faster two at a time (a harness of the kernel's loops over SmolLM2-135M's
// products). On the AVX2 path (the same Xeon with AVX-512 off, one run) it was mixed and is untried on an AVX2-only
// CPU: AVX2 keeps one row of w at a time (docs/engine.md, "Two rows of w a turn").
#if defined(__AVX512F__)
constexpr bool kPairRows = true;
#else
constexpr bool kPairRows = false;
#endif

// y [MB, 0:kTile] = x [MB, 0:K] @ tile [K, kTile]: one register tile (y's row stride ldy). Shares > 0: this block
// is one of that many and prefetches its share of the next tile, one row of it every `Shares` rows of this one
// (`next` is where its share starts); 0: it is the tile's only block and prefetches the tile itself, ahead.
template <int MB, int Shares>
__attribute__((always_inline)) inline void block(const float* x, int64_t K, const float* tile, float* y, int64_t ldy,
                                                 const float* next) {
  vec acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = zero_v();
  const auto row = [&](int64_t k, const float* wk) __attribute__((always_inline)) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_v(wk + kLanes * r);
    if (Shares == 0)
      for (int c = 0; c < kTile; c += kLineFloats) __builtin_prefetch(wk + kPrefetch + c, 0, 2);
    else if (k % Shares == 0)
      for (int c = 0; c < kTile; c += kLineFloats) __builtin_prefetch(next + k / Shares * kTile + c, 0, 2);
    for (int m = 0; m < MB; ++m) {
      const vec xv = broadcast_v(x[m * K + k]);
      for (int r = 0; r < R; ++r) acc[m][r] = fma_v(xv, wv[r], acc[m][r]);
    }
  };
  int64_t k = 0;
  if constexpr (kPairRows && MB <= 2)  // two rows of w an iteration (kPairRows)
    for (; k + 1 < K; k += 2) row(k, tile + k * kTile), row(k + 1, tile + (k + 1) * kTile);
  for (; k < K; ++k) row(k, tile + k * kTile);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) store_v(y + m * ldy + kLanes * r, acc[m][r]);
}

// One tile's columns for all M rows: block b is rows [M*b/B, M*(b+1)/B) and, when B > 1, prefetches rows
// [K*b/B, ...) of the next tile.
template <int M, int B, int... b>
__attribute__((always_inline)) inline void blocks(const float* x, int64_t K, const float* tile, float* y, int64_t ldy,
                                                  std::integer_sequence<int, b...>) {
  (block<M * (b + 1) / B - M * b / B, B == 1 ? 0 : B>(x + M * b / B * K, K, tile, y + M * b / B * ldy, ldy,
                                                      tile + K * kTile + K * b / B * kTile),
   ...);
}

// y [M, t0*T : t1*T] = x [M, K] @ tiles [t0:t1] for M rows of x: one block up to kOneBlockRows, else B near-equal
// blocks of at most kBlockRows.
template <int M>
void columns(const float* x, const float* tiles, int64_t K, float* y, int64_t ldy, int64_t t0, int64_t t1) {
  constexpr int B = M <= kOneBlockRows ? 1 : (M + kBlockRows - 1) / kBlockRows;
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
