// Grouped-query attention of a few queries (a decode or verification step) over the KV cache, float32, on a CPU.
//
// out [B, T, Hq, Dh] from q [B, T, Hq, Dh], k, v [B, Hkv, S, Dh] and positions [B, T]: the query of token t
// reads cache slots s with s <= positions[b, t] (and s > positions[b, t] - window when window > 0).
//
// Why: XLA's reference builds the scores of every cache slot, masks them and runs two small batched products,
// all over the whole capacity S; this kernel reads each (row, KV head)'s keys and values once for all the
// queries of that head, stops at the last slot any of them reads, and runs an online softmax over blocks of
// kBlock slots. The blocks sit at multiples of kBlock and a query skips the blocks it cannot read, so a query's
// result does not depend on the other queries of the step (a verification reads what a one-token step reads).
//
// Two paths: with AVX-512 and Dh a multiple of 16 (`head_vector`) a score is a dot product over Dh in 16-lane
// vectors, summed by a fixed tree (`sum16`), the softmax runs on the block's 16 scores as one vector, and the next
// block's keys and values are prefetched; anything else takes `head_generic` (keys transposed per block, lane by
// lane). The vector path made a batch-4 decode step's attention 2.3x faster at 580 cached tokens, and a 2-token
// verification's 2.9x (C++ harness, SmolLM2-135M's shapes; docs/engine.md, "One 512-bit load per vector").
//
// Threads: one task per (batch row, KV head) on XLA's intra-op pool (cpu_parallel.h).

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 16;  // cache slots per online-softmax block
constexpr int64_t kAhead = 1;  // blocks ahead whose keys and values the vector path prefetches

typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// e^x for x <= 0, lane by lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7
// (relative error below 1e-8 there), times 2^n built in the exponent bits. Lanes below -87 give e^-87.
inline v16 exp_nonpositive(v16 x) {
  x = x < -87.f ? (v16){} - 87.f : x;
  const vi16 n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, vi16);  // round half away (x <= 0)
  const v16 nf = __builtin_convertvector(n, v16);
  const v16 r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  v16 p = (v16){} + (1.f / 5040.f);
  p = p * r + (1.f / 720.f);
  p = p * r + (1.f / 120.f);
  p = p * r + (1.f / 24.f);
  p = p * r + (1.f / 6.f);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi16 scale = (n + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &scale, 64);
  return p * two_n;
}

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
  std::vector<float> qs, acc, m, l;  // queries [R, Dh]; sums over V [R, Dh]; running max and total [R]
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
  std::vector<float>&qs = H.qs, &acc = H.acc, &m = H.m, &l = H.l;
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
      v16 p = exp_nonpositive(arg);
      float sum = 0.f;
      for (int64_t j = 0; j < kBlock; ++j) {
        p[j] = valid[j] != 0.f ? p[j] : 0.f;
        sum += p[j];
      }
      v16 corr_arg = (v16){} + (m[r] - m_new);
      const float corr = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : exp_nonpositive(corr_arg)[0];
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

#if defined(__AVX512F__)
// The sum of each of 16 vectors t[0..15], as lane j of the result: a fixed tree of adds (the same for every query).
inline __m512 sum16(__m512 t[16]) {
  __m512 u[8], w[4];
  for (int j = 0; j < 8; ++j)  // 256-bit halves: u[j] = [t_j's two halves summed | t_{j+8}'s]
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(t[j], t[j + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(t[j], t[j + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int j = 0; j < 4; ++j)  // 128-bit groups: w[j] = [t_j | t_{j+8} | t_{j+4} | t_{j+12}], 4 partial sums each
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[j], u[j + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[j], u[j + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 x01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
  const __m512 x23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
  const __m512 z = _mm512_add_ps(
      _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))),
      _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x01), _mm512_castps_pd(x23))));
  return _mm512_shuffle_f32x4(z, z, _MM_SHUFFLE(3, 1, 2, 0));  // groups held slots 0-3, 8-11, 4-7, 12-15
}

// `head` for Dh a multiple of 16: per block, each slot's key and value are loaded once for all the queries, a
// score is a dot product summed by `sum16`, and the softmax runs on vectors of the block's 16 slots.
void head_vector(const Problem& P, int64_t b, int64_t h) {
  Head H(P, b, h);
  const int64_t Dh = P.Dh, R = H.R, C = Dh / 16;
  const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
  const float *kh = H.kh, *vh = H.vh;
  std::vector<float>&qs = H.qs, &acc = H.acc, &m = H.m, &l = H.l;
  const std::vector<int64_t>&first = H.first, &last = H.last;
  const int64_t lo = H.lo, hi = H.hi;
  std::vector<float> p(R * kBlock);
  std::vector<char> reads(R);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t s0 = lo / kBlock * kBlock; s0 <= hi; s0 += kBlock) {
    const int64_t n = std::min(kBlock, P.S - s0);
    const float* kb = kh + s0 * Dh;
    const float* vb = vh + s0 * Dh;
    if (s0 + kAhead * kBlock <= hi)  // ~10% faster at batch 4 than the hardware prefetcher alone
      for (int64_t x = 0; x < kBlock * Dh; x += 16) {
        __builtin_prefetch(kb + kAhead * kBlock * Dh + x);
        __builtin_prefetch(vb + kAhead * kBlock * Dh + x);
      }
    for (int64_t r = 0; r < R; ++r) {
      reads[r] = !(last[r] < s0 || first[r] >= s0 + kBlock || first[r] > last[r]);
      if (!reads[r]) continue;
      const float* qr = &qs[r * Dh];
      __m512 t[16];
      for (int64_t j = 0; j < kBlock; ++j) {
        __m512 dot = _mm512_setzero_ps();
        if (j < n)
          for (int64_t c = 0; c < C; ++c)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * c), _mm512_loadu_ps(kb + j * Dh + 16 * c), dot);
        t[j] = dot;
      }
      const __m512 sc = _mm512_mul_ps(sum16(t), _mm512_set1_ps(scale));
      const __m512i slot = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int32_t>(s0)));
      const __mmask16 valid = _mm512_cmpge_epi32_mask(slot, _mm512_set1_epi32(static_cast<int32_t>(first[r]))) &
                              _mm512_cmple_epi32_mask(slot, _mm512_set1_epi32(static_cast<int32_t>(last[r])));
      const float m_new = std::max(m[r], _mm512_mask_reduce_max_ps(valid, sc));
      const v16 arg = (v16)_mm512_maskz_sub_ps(valid, sc, _mm512_set1_ps(m_new));
      const __m512 e = _mm512_maskz_mov_ps(valid, (__m512)exp_nonpositive(arg));
      _mm512_storeu_ps(&p[r * kBlock], e);
      const float sum = _mm512_reduce_add_ps(e);
      if (m_new != m[r]) {  // else the correction is e^0 = 1 exactly
        v16 corr_arg = (v16){} + (m[r] - m_new);
        const float corr = m[r] == -std::numeric_limits<float>::infinity() ? 0.f : exp_nonpositive(corr_arg)[0];
        l[r] *= corr;
        float* ar = &acc[r * Dh];
        for (int64_t c = 0; c < C; ++c)
          _mm512_storeu_ps(ar + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * c), _mm512_set1_ps(corr)));
      }
      l[r] += sum;
      m[r] = m_new;
    }
    for (int64_t r = 0; r < R; ++r) {
      if (!reads[r]) continue;
      float* ar = &acc[r * Dh];
      for (int64_t c0 = 0; c0 < C; c0 += 4) {  // up to 4 vectors of the sums held in registers over the block's slots
        const int64_t cn = std::min<int64_t>(4, C - c0);
        __m512 a[4];
        for (int64_t c = 0; c < cn; ++c) a[c] = _mm512_loadu_ps(ar + 16 * (c0 + c));
        for (int64_t j = 0; j < n; ++j) {
          const float pj = p[r * kBlock + j];
          if (pj == 0.f) continue;
          const float* vs = vb + j * Dh + 16 * c0;
          for (int64_t c = 0; c < cn; ++c)
            a[c] = _mm512_fmadd_ps(_mm512_set1_ps(pj), _mm512_loadu_ps(vs + 16 * c), a[c]);
        }
        for (int64_t c = 0; c < cn; ++c) _mm512_storeu_ps(ar + 16 * (c0 + c), a[c]);
      }
    }
  }
  H.write(P);
}

#endif  // __AVX512F__

void head(const Problem& P, int64_t b, int64_t h) {
#if defined(__AVX512F__)
  if (P.Dh % 16 == 0) return head_vector(P, b, h);
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
