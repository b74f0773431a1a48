// Grouped-query attention of a few queries (a decode or verification step) over the KV cache, float32, on a CPU.
//
// out [B, T, Hq, Dh] from q [B, T, Hq, Dh], k, v [B, Hkv, S, Dh] and positions [B, T]: the query of token t
// reads cache slots s with s <= positions[b, t] (and s > positions[b, t] - window when window > 0).
//
// Why: XLA's reference builds the scores of every cache slot, masks them and runs two small batched products,
// all over the whole capacity S; this kernel reads each (row, KV head)'s keys and values once for all the
// queries of that head and stops at the last slot any of them reads.
//
// Two paths. With AVX-512, or AVX2 and FMA, and Dh a multiple of the vector's kLanes floats (`head_vector`), slots
// go in groups of kLanes at multiples of kLanes, in three passes: every query's scores (lane j of a group's
// scores a dot product over Dh, summed by a fixed tree, `sum_each`), each query's softmax over its own scores
// (one max, one sum), then the sums over the values; the next keys and values are prefetched. Anything else takes
// `head_generic`: an online softmax over blocks of kBlock slots at multiples of kBlock, keys transposed per block,
// lane by lane. Either way a query reads exactly the groups or blocks that overlap its own slots, so its result
// does not depend on the other queries of the step (a verification reads what a one-token step reads).
// Measured (docs/engine.md, "One 512-bit load per vector" and "The CPU attention in three passes"): on an AVX2
// EPYC, SmolLM2-135M's shapes, 30 layers at 800 cached tokens, batch 4, one query per row 29.9 -> 2.6 ms and five
// 140 -> 11 ms against the generic path (`scripts/cpu_attention_probe.py`).
//
// Threads: one task per (batch row, KV head) on XLA's intra-op pool (cpu_parallel.h).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "cpu_vector.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace eej;  // the vector (cpu_vector.h)

constexpr int64_t kBlock = 16;  // cache slots per online-softmax block of the generic path
constexpr int64_t kAhead = 16;  // slots ahead whose keys and values the vector path prefetches

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// e^x for x <= 0, lane by lane, for a float vector V with int32 lanes VI: x = n ln2 + r with |r| <= ln2 / 2, e^r by
// its Taylor polynomial to degree 7 (relative error below 1e-8 there), times 2^n built in the exponent bits. Lanes
// below -87 give e^-87.
template <class V, class VI>
inline V exp_nonpositive(V x) {
  x = x < -87.f ? (V){} - 87.f : x;
  const VI n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, VI);  // round half away (x <= 0)
  const V nf = __builtin_convertvector(n, V);
  const V r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  V p = (V){} + (1.f / 5040.f);
  p = p * r + (1.f / 720.f);
  p = p * r + (1.f / 120.f);
  p = p * r + (1.f / 24.f);
  p = p * r + (1.f / 6.f);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const VI scale = (n + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &scale, sizeof(V));
  return p * two_n;
}

// Float buffers on 64-byte boundaries, so a vector load of a query, score or sum never straddles two cache lines.
template <class T>
struct Aligned64 {
  typedef T value_type;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64)); }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const Aligned64&) const { return true; }
  bool operator!=(const Aligned64&) const { return false; }
};
typedef std::vector<float, Aligned64<float>> floats;

struct Problem {
  const float* q;
  const float* k;
  const float* v;
  const int32_t* positions;
  float* out;
  int64_t B, T, Hq, Hkv, S, Dh;
  int64_t window;
};

// The queries of batch row b that KV head h serves (R = G * T of them, r = t * G + g) and their online-softmax state;
// each reads cache slots [first[r], last[r]], all of them together [lo, hi].
struct Head {
  int64_t b, h, G, R;
  const float* kh;
  const float* vh;
  floats qs, acc;  // queries [R, Dh]; sums over V [R, Dh]
  std::vector<float> m, l;  // running max and total [R]
  std::vector<int64_t> first, last;
  int64_t lo, hi;

  Head(const Problem& P, int64_t b, int64_t h)
      : b(b), h(h), G(P.Hq / P.Hkv), R(G * P.T), kh(P.k + (b * P.Hkv + h) * P.S * P.Dh),
        vh(P.v + (b * P.Hkv + h) * P.S * P.Dh), qs(R * P.Dh), acc(R * P.Dh, 0.f),
        m(R, -std::numeric_limits<float>::infinity()), l(R, 0.f), first(R), last(R), lo(P.S), hi(-1) {
    const int64_t T = P.T, Dh = P.Dh;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = P.positions[b * T + t];
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g;
        std::memcpy(&qs[r * Dh], P.q + ((b * T + t) * P.Hq + h * G + g) * Dh, sizeof(float) * Dh);
        last[r] = std::min(pos, P.S - 1);
        first[r] = P.window > 0 ? std::max<int64_t>(0, pos - P.window + 1) : 0;
        if (first[r] <= last[r]) {
          lo = std::min(lo, first[r]);
          hi = std::max(hi, last[r]);
        }
      }
    }
  }

  // out = acc / l for every query (0 where a query read nothing).
  void write(const Problem& P) const {
    const int64_t Dh = P.Dh;
    for (int64_t t = 0; t < P.T; ++t)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = t * G + g;
        float* o = P.out + ((b * P.T + t) * P.Hq + h * G + g) * Dh;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        for (int64_t d = 0; d < Dh; ++d) o[d] = acc[r * Dh + d] * inv;
      }
  }
};

// Every query of batch row b that KV head h serves, any head size (the vector path below needs Dh % 16 == 0).
void head_generic(const Problem& P, int64_t b, int64_t h) {
  Head H(P, b, h);
  const int64_t Dh = P.Dh, R = H.R;
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  const float *kh = H.kh, *vh = H.vh;
  floats &qs = H.qs, &acc = H.acc;
  std::vector<float> &m = H.m, &l = H.l;
  const std::vector<int64_t>&first = H.first, &last = H.last;
  const int64_t lo = H.lo, hi = H.hi;
  std::vector<float> kt(Dh * kBlock);  // the block's keys, transposed: kt[d * kBlock + j] = k[s0 + j][d]
  for (int64_t s0 = lo / kBlock * kBlock; s0 <= hi; s0 += kBlock) {
    const int64_t n = std::min(kBlock, P.S - s0);
    for (int64_t j = 0; j < kBlock; ++j)
      for (int64_t d = 0; d < Dh; ++d) kt[d * kBlock + j] = j < n ? kh[(s0 + j) * Dh + d] : 0.f;
    for (int64_t r = 0; r < R; ++r) {
      if (last[r] < s0 || first[r] >= s0 + kBlock || first[r] > last[r]) continue;
      v16 sc = (v16){};
      const float* qr = &qs[r * Dh];
      for (int64_t d = 0; d < Dh; ++d) {
        v16 kd;
        std::memcpy(&kd, &kt[d * kBlock], 64);
        sc += qr[d] * kd;
      }
      sc *= scale;
      float valid[kBlock];
      float block_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < kBlock; ++j) {
        const int64_t s = s0 + j;
        valid[j] = (s >= first[r] && s <= last[r]) ? 1.f : 0.f;
        if (valid[j] != 0.f) block_max = std::max(block_max, sc[j]);
      }
      const float m_new = std::max(m[r], block_max);
      v16 arg = sc - m_new;
      for (int64_t j = 0; j < kBlock; ++j) arg[j] = valid[j] != 0.f ? arg[j] : 0.f;
      v16 p = exp_nonpositive<v16, vi16>(arg);
      float sum = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        p[j] = valid[j] != 0.f ? p[j] : 0.f;
        sum += p[j];
      }
      v16 corr_arg = (v16){} + (m[r] - m_new);
      const float corr =
          m[r] == -std::numeric_limits<float>::infinity() ? 0.f : exp_nonpositive<v16, vi16>(corr_arg)[0];
      l[r] = l[r] * corr + sum;
      m[r] = m_new;
      float* ar = &acc[r * Dh];
      for (int64_t d = 0; d < Dh; ++d) ar[d] *= corr;
      for (int64_t j = 0; j < n; ++j) {
        if (p[j] == 0.f) continue;
        const float pj = p[j];
        const float* vs = vh + (s0 + j) * Dh;
        for (int64_t d = 0; d < Dh; ++d) ar[d] += pj * vs[d];
      }
    }
  }
  H.write(P);
}

// The vector path runs on the native vectors of cpu_vector.h (AVX-512's 16 floats, AVX2's 8), with `sum_lanes`,
// `max_lanes` and `sum_each`, lane j of which is the sum of d[j]'s lanes (a fixed tree of adds, the same for every
// query). Other CPUs take `head_generic` for every head size.
#if defined(EEJ_NATIVE_VECTOR) && defined(__AVX512F__)
inline float sum_lanes(vec x) { return _mm512_reduce_add_ps(x); }
inline float max_lanes(vec x) { return _mm512_reduce_max_ps(x); }
inline vec sum_each(const vec d[16]) {
  __m512 u[8], w[4];
  for (int j = 0; j < 8; ++j)  // 256-bit halves: u[j] = [d_j's two halves summed | d_{j+8}'s]
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(d[j], d[j + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(d[j], d[j + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 4; ++j)  // 128-bit groups: w[j] = [d_j | d_{j+8} | d_{j+4} | d_{j+12}], 4 partial sums each
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[j], u[j + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[j], u[j + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
  const __m512 z = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))));
  return _mm512_shuffle_f32x4(z, z, _MM_SHUFFLE(3, 1, 2, 0));  // groups held slots 0-3, 8-11, 4-7, 12-15
}
#elif defined(EEJ_NATIVE_VECTOR)
inline float sum_lanes(vec x) {
  __m128 z = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  z = _mm_add_ps(z, _mm_movehl_ps(z, z));
  return _mm_cvtss_f32(_mm_add_ss(z, _mm_movehdup_ps(z)));
}

inline float max_lanes(vec x) {
  __m128 z = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  z = _mm_max_ps(z, _mm_movehl_ps(z, z));
  return _mm_cvtss_f32(_mm_max_ss(z, _mm_movehdup_ps(z)));
}

inline vec sum_each(const vec d[8]) {
  const __m256 a01 = _mm256_hadd_ps(d[0], d[1]);  // [d0 01, 23, d1 01, 23 | d0 45, 67, d1 45, 67]
  const __m256 a23 = _mm256_hadd_ps(d[2], d[3]);
  const __m256 a45 = _mm256_hadd_ps(d[4], d[5]);
  const __m256 a67 = _mm256_hadd_ps(d[6], d[7]);
  const __m256 b03 = _mm256_hadd_ps(a01, a23);  // [d0..d3 lanes 0-3 | d0..d3 lanes 4-7]
  const __m256 b47 = _mm256_hadd_ps(a45, a67);
  return _mm256_add_ps(_mm256_permute2f128_ps(b03, b47, 0x20), _mm256_permute2f128_ps(b03, b47, 0x31));
}
#endif

#if defined(EEJ_NATIVE_VECTOR)
// Lane j: the dot product of q with key row j of k (rows Dh = C * kLanes floats apart), kLanes independent chains.
inline vec dots(const float* q, const float* k, int64_t Dh, int64_t C) {
  vec d[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) d[j] = zero_v();
  for (int64_t c = 0; c < C; ++c) {
    const vec qc = load_v(q + kLanes * c);
    for (int64_t j = 0; j < kLanes; ++j) d[j] = fma_v(qc, load_v(k + j * Dh + kLanes * c), d[j]);
  }
  return sum_each(d);
}

// acc[0, N * kLanes) += sum over slots j < n of p[j] * v[j * Dh + (0, N * kLanes)], the sums held in N registers
// (N a constant, so the compiler keeps them there).
template <int64_t N>
inline void accumulate_values(const float* p, int64_t n, const float* v, int64_t Dh, float* acc) {
  vec a[N];
  for (int64_t c = 0; c < N; ++c) a[c] = load_v(acc + kLanes * c);
  for (int64_t j = 0; j < n; ++j) {
    if (p[j] == 0.f) continue;
    const vec pj = broadcast_v(p[j]);
    for (int64_t c = 0; c < N; ++c) a[c] = fma_v(pj, load_v(v + j * Dh + kLanes * c), a[c]);
  }
  for (int64_t c = 0; c < N; ++c) store_v(acc + kLanes * c, a[c]);
}

// `head` for Dh a multiple of kLanes, over groups of kLanes slots at multiples of kLanes, in three passes: every
// query's scores (each group's keys loaded once for all the queries, lane j a dot product), each query's softmax
// over its own scores (one max, one sum), then the sums over the values (each group's values loaded once for all).
// A query reads the groups that overlap its slots, whichever other queries the step holds.
void head_vector(const Problem& P, int64_t b, int64_t h) {
  Head H(P, b, h);
  const int64_t Dh = P.Dh, R = H.R, C = Dh / kLanes;
  constexpr int64_t kHeld = 64 / kLanes;  // vectors of V sums held in registers: 64 floats
  const std::vector<int64_t>&first = H.first, &last = H.last;
  if (H.hi < 0) return H.write(P);
  const int64_t g0 = H.lo / kLanes * kLanes, span = (H.hi / kLanes + 1) * kLanes - g0;
  floats w(R * span);  // w[r * span + s - g0]: query r's score of slot s, then its softmax weight
  const auto reads = [&](int64_t r, int64_t s0) {
    return first[r] <= last[r] && last[r] >= s0 && first[r] < s0 + kLanes;
  };
  const auto inside = [&](int64_t r, int64_t s0) { return first[r] <= s0 && s0 + kLanes - 1 <= last[r]; };
  veci lane;
  for (int64_t j = 0; j < kLanes; ++j) lane[j] = static_cast<int32_t>(j);
  const auto valid = [&](int64_t r, int64_t s0) {  // -1 in the lanes of slots query r reads
    const veci slot = lane + static_cast<int32_t>(s0);
    return (slot >= static_cast<int32_t>(first[r])) & (slot <= static_cast<int32_t>(last[r]));
  };
  const vec scale = broadcast_v(1.f / std::sqrt(static_cast<float>(Dh))), minus_inf = broadcast_v(-INFINITY);
  floats top(R * kLanes, -INFINITY);  // each query's largest score, by lane
  floats tail(kLanes * Dh);  // the last group's keys where the cache ends inside it, zero past the end
  const auto prefetch_next = [&](const float* group, int64_t s0) {
    if (s0 + kAhead <= H.hi)  // ~10% faster at batch 4 than the hardware prefetcher alone (AVX-512 Xeon)
      for (int64_t x = 0; x < kLanes * Dh; x += 16) __builtin_prefetch(group + kAhead * Dh + x);
  };

  for (int64_t s0 = g0; s0 <= H.hi; s0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, P.S - s0);
    const float* kg = H.kh + s0 * Dh;
    prefetch_next(kg, s0);
    if (n < kLanes) {
      std::memcpy(tail.data(), kg, sizeof(float) * n * Dh);
      std::fill(tail.begin() + n * Dh, tail.end(), 0.f);
      kg = tail.data();
    }
    for (int64_t r = 0; r < R; ++r) {
      if (!reads(r, s0)) continue;
      vec sc = dots(&H.qs[r * Dh], kg, Dh, C) * scale;
      if (!inside(r, s0)) sc = valid(r, s0) ? sc : minus_inf;
      const vec t = load_v(&top[r * kLanes]);
      store_v(&top[r * kLanes], t > sc ? t : sc);
      store_v(&w[r * span + s0 - g0], sc);
    }
  }

  for (int64_t r = 0; r < R; ++r) {
    if (first[r] > last[r]) continue;
    const float m = max_lanes(load_v(&top[r * kLanes]));
    vec total = zero_v();
    for (int64_t s0 = first[r] / kLanes * kLanes; s0 <= last[r]; s0 += kLanes) {
      float* wg = &w[r * span + s0 - g0];
      vec e = exp_nonpositive<vec, veci>(load_v(wg) - m);
      if (!inside(r, s0)) e = valid(r, s0) ? e : zero_v();
      total += e;
      store_v(wg, e);
    }
    H.l[r] = sum_lanes(total);
  }

  for (int64_t s0 = g0; s0 <= H.hi; s0 += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, P.S - s0);
    const float* vg = H.vh + s0 * Dh;
    prefetch_next(vg, s0);
    for (int64_t r = 0; r < R; ++r) {
      if (!reads(r, s0)) continue;
      const float* pr = &w[r * span + s0 - g0];
      float* ar = &H.acc[r * Dh];
      int64_t c = 0;
      for (; c + kHeld <= C; c += kHeld) accumulate_values<kHeld>(pr, n, vg + kLanes * c, Dh, ar + kLanes * c);
      for (; c < C; ++c) accumulate_values<1>(pr, n, vg + kLanes * c, Dh, ar + kLanes * c);
    }
  }
  H.write(P);
}
#endif  // EEJ_NATIVE_VECTOR

void head(const Problem& P, int64_t b, int64_t h) {
#if defined(EEJ_NATIVE_VECTOR)
  if (P.Dh % kLanes == 0) return head_vector(P, b, h);
#endif
  head_generic(P, b, h);
}

ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                     ffi::Buffer<ffi::S32> positions, int64_t window, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions();
  const auto kd = k.dimensions();
  const auto pd = positions.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || pd.size() != 2 || v.dimensions().size() != 4 || qd[0] != kd[0] ||
      qd[3] != kd[3] || qd[2] % kd[1] != 0 || pd[0] != qd[0] || pd[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "eej_cpu_attention: expected q [B, T, Hq, Dh], k and v [B, Hkv, S, Dh], positions [B, T]");
  const Problem problem{q.typed_data(), k.typed_data(), v.typed_data(), positions.typed_data(), out->typed_data(),
                        qd[0], qd[1], qd[2], kd[1], kd[2], kd[3], window};
  if (qd[0] * kd[1] == 0 || qd[1] == 0) return ffi::Error::Success();
  eej::parallel_tasks(pool, qd[0] * kd[1], [problem](int64_t i) { head(problem, i / problem.Hkv, i % problem.Hkv); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EejCpuAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
