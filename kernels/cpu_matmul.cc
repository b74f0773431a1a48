// y [M, N] = x [M, K] @ w [K, N] in float32 on a CPU, for the few rows of a decode or verification step.
//
// Why: XLA:CPU runs a one-row product as a matrix-vector kernel and from two rows on switches to a matrix-product
// kernel that packs the weights first; on a 2-core AMD EPYC that made a 2..5-token verification of SmolLM2-135M
// cost 1.3-1.5x a one-token step (LM head: 4 ms at 1 row, 7 ms at 2..5). Decoding is bound by reading the
// weights, so this kernel reads w once, in place, for up to 8 rows at a time (docs/engine.md, "The CPU matmul").
//
// Order of work: columns are cut into chunks of kChunk (the chunk's outputs stay in cache); a chunk is swept by
// passes over kRows rows of w, each pass walking register tiles of 16 * R columns x MB rows of x, so the
// accumulators go through memory once every kRows rows of w. Every output element is summed over k in the same
// order whatever M is, so one row's result does not depend on the rows beside it (a verification's logits are
// bit-identical to a one-token step's).
//
// Threads: the rows of w are split into one contiguous slab per thread of XLA's intra-op pool (cpu_parallel.h);
// the slabs' partial sums are added in slab order.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

constexpr int64_t kRows = 8;       // rows of w per pass over a register tile
constexpr int64_t kChunk = 4096;   // columns per cache chunk
constexpr int kMaxRowBlock = 8;    // rows of x per sweep of w
constexpr int64_t kMinSlab = 128;  // fewest rows of w a thread takes

// y [MB, c0:c1] = x [MB, k0:k1] @ w [k0:k1, c0:c1]; x has row stride ldx, w and y row stride N.
template <int MB, int R>
void sweep(const float* x, int64_t ldx, const float* w, int64_t N, float* y, int64_t k0, int64_t k1,
           int64_t c0, int64_t c1) {
  constexpr int64_t T = 16 * R;
  for (int64_t p0 = k0; p0 < k1; p0 += kRows) {
    const int64_t p1 = std::min(k1, p0 + kRows);
    int64_t n = c0;
    for (; n + T <= c1; n += T) {
      v16 acc[MB][R];
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r) {
          if (p0 == k0) acc[m][r] = (v16){};
          else std::memcpy(&acc[m][r], y + m * N + n + 16 * r, 64);
        }
      const float* wk = w + p0 * N + n;
      for (int64_t k = p0; k < p1; ++k, wk += N) {
        v16 wv[R];
        for (int r = 0; r < R; ++r) std::memcpy(&wv[r], wk + 16 * r, 64);
        for (int m = 0; m < MB; ++m) {
          const float xv = x[m * ldx + k];
          for (int r = 0; r < R; ++r) acc[m][r] += xv * wv[r];
        }
      }
      for (int m = 0; m < MB; ++m)
        for (int r = 0; r < R; ++r) std::memcpy(y + m * N + n + 16 * r, &acc[m][r], 64);
    }
    for (; n < c1; ++n)  // the last columns of a width that is not a multiple of the tile, same order over k
      for (int m = 0; m < MB; ++m) {
        float s = p0 == k0 ? 0.f : y[m * N + n];
        for (int64_t k = p0; k < p1; ++k) s += x[m * ldx + k] * w[k * N + n];
        y[m * N + n] = s;
      }
  }
}

template <int MB>
void row_block(const float* x, int64_t ldx, const float* w, int64_t N, float* y, int64_t k0, int64_t k1) {
  for (int64_t c = 0; c < N; c += kChunk) {
    const int64_t c1 = std::min(N, c + kChunk);
    // accumulators + a row of w in AVX-512's 32 registers: 2 rows x 8 vectors, 6 x 4, 8 x 2; the columns
    // left over go one vector at a time, then one by one (the same sums in the same order on every path)
    constexpr int R = MB <= 2 ? 8 : MB <= 6 ? 4 : 2;
    const int64_t wide = c + (c1 - c) / (16 * R) * (16 * R);
    sweep<MB, R>(x, ldx, w, N, y, k0, k1, c, wide);
    sweep<MB, 1>(x, ldx, w, N, y, k0, k1, wide, c1);
  }
}

// y [M, N] = x [M, k0:k1] @ w [k0:k1, :] (x's row stride K).
void partial(const float* x, const float* w, int64_t M, int64_t K, int64_t N, float* y, int64_t k0, int64_t k1) {
  for (int64_t m = 0; m < M; m += kMaxRowBlock) {
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (std::min<int64_t>(kMaxRowBlock, M - m)) {
      case 1: row_block<1>(xm, K, w, N, ym, k0, k1); break;
      case 2: row_block<2>(xm, K, w, N, ym, k0, k1); break;
      case 3: row_block<3>(xm, K, w, N, ym, k0, k1); break;
      case 4: row_block<4>(xm, K, w, N, ym, k0, k1); break;
      case 5: row_block<5>(xm, K, w, N, ym, k0, k1); break;
      case 6: row_block<6>(xm, K, w, N, ym, k0, k1); break;
      case 7: row_block<7>(xm, K, w, N, ym, k0, k1); break;
      default: row_block<8>(xm, K, w, N, ym, k0, k1); break;
    }
  }
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
