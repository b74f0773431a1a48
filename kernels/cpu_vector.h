// The SIMD vector eej's CPU kernels (cpu_*.cc) compute in, by instruction set: kLanes floats (`vec`, with int32
// lanes `veci`), a fused multiply-add, an unaligned load and store, a broadcast and zero.
//
// AVX-512: 16 floats (32 registers). AVX2 with FMA: 8 floats (16 registers). Both define EEJ_NATIVE_VECTOR.
// Anything else: a portable vector of 16 floats, what the compiler makes of it (NEON, SSE, scalar). On AVX2 the
// kernels once used 16-float vectors everywhere, and each one went through memory as two halves (docs/engine.md,
// "The CPU matmul on AVX2").

#ifndef EEJ_KERNELS_CPU_VECTOR_H_
#define EEJ_KERNELS_CPU_VECTOR_H_

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace eej {

#if defined(__AVX512F__)
#define EEJ_NATIVE_VECTOR 1
constexpr int kLanes = 16;
typedef __m512 vec;
typedef int32_t veci __attribute__((vector_size(64)));
inline vec fma_v(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec load_v(const float* p) { return _mm512_loadu_ps(p); }
inline void store_v(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec broadcast_v(float x) { return _mm512_set1_ps(x); }
inline vec zero_v() { return _mm512_setzero_ps(); }
#elif defined(__AVX2__) && defined(__FMA__)
#define EEJ_NATIVE_VECTOR 1
constexpr int kLanes = 8;
typedef __m256 vec;
typedef int32_t veci __attribute__((vector_size(32)));
inline vec fma_v(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec load_v(const float* p) { return _mm256_loadu_ps(p); }
inline void store_v(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec broadcast_v(float x) { return _mm256_set1_ps(x); }
inline vec zero_v() { return _mm256_setzero_ps(); }
#else
constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t veci __attribute__((vector_size(64), aligned(4)));
inline vec fma_v(vec a, vec b, vec c) {
#if defined(__aarch64__)
  float32x4_t a4[4], b4[4], c4[4];
  std::memcpy(a4, &a, 64), std::memcpy(b4, &b, 64), std::memcpy(c4, &c, 64);
  for (int q = 0; q < 4; ++q) c4[q] = vfmaq_f32(c4[q], a4[q], b4[q]);
  std::memcpy(&c, c4, 64);
#else
  for (int i = 0; i < 16; ++i) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
#endif
  return c;
}
inline vec load_v(const float* p) {
  vec v;
  std::memcpy(&v, p, 64);
  return v;
}
inline void store_v(float* p, vec v) { std::memcpy(p, &v, 64); }
inline vec broadcast_v(float x) {
  vec v;
  for (int i = 0; i < 16; ++i) v[i] = x;
  return v;
}
inline vec zero_v() { return (vec){}; }
#endif

}  // namespace eej

#endif  // EEJ_KERNELS_CPU_VECTOR_H_
