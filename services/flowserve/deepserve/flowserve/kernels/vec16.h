// Sixteen float lanes as one value, for kernels written once for AVX-512 and AVX2 hosts.
//
// The kernels' vector paths work in rows of 16 floats. On AVX-512 an f32x16 is one __m512 and
// every function below is the intrinsic itself, so the generated code is the intrinsics'. On
// AVX2 (with FMA: Zen 1-3, Intel from Haswell) it is two __m256 halves, so a kernel keeps its
// algorithm and only its register tiles shrink (16 ymm registers instead of 32 zmm; see each
// kernel's kVecRegs use). DEEPSERVE_VEC16 is defined where either is available.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#define DEEPSERVE_VEC16 1
#endif

#include "scalar_math.h"

#if defined(DEEPSERVE_VEC16)
namespace deepserve_kernels {

#if defined(__AVX512F__)
// Vector registers the ISA has (the kernels size their register tiles by it).
constexpr int kVecRegs = 32;
using f32x16 = __m512;

inline f32x16 zero16() { return _mm512_setzero_ps(); }
inline f32x16 set1_16(float v) { return _mm512_set1_ps(v); }
inline f32x16 loadu16(const float* p) { return _mm512_loadu_ps(p); }
inline void storeu16(float* p, f32x16 v) { _mm512_storeu_ps(p, v); }
inline f32x16 fmadd16(f32x16 a, f32x16 b, f32x16 c) { return _mm512_fmadd_ps(a, b, c); }
inline f32x16 mul16(f32x16 a, f32x16 b) { return _mm512_mul_ps(a, b); }
inline f32x16 add16(f32x16 a, f32x16 b) { return _mm512_add_ps(a, b); }
inline f32x16 sub16(f32x16 a, f32x16 b) { return _mm512_sub_ps(a, b); }
inline f32x16 max16(f32x16 a, f32x16 b) { return _mm512_max_ps(a, b); }
inline float reduce_add16(f32x16 v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max16(f32x16 v) { return _mm512_reduce_max_ps(v); }

// Lanes whose position (first + lane) is after `last` take `fill` (a causal mask).
inline f32x16 mask_after16(f32x16 v, int32_t first, int32_t last, f32x16 fill) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 seen =
      _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(first)), _mm512_set1_epi32(last));
  return _mm512_mask_blend_ps(seen, fill, v);
}
#else
constexpr int kVecRegs = 16;
struct f32x16 {
  __m256 lo, hi;
};

inline f32x16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f32x16 set1_16(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
inline f32x16 loadu16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void storeu16(float* p, f32x16 v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline f32x16 fmadd16(f32x16 a, f32x16 b, f32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 mul16(f32x16 a, f32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f32x16 add16(f32x16 a, f32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f32x16 sub16(f32x16 a, f32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f32x16 max16(f32x16 a, f32x16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }

inline float reduce_add8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline float reduce_add16(f32x16 v) { return reduce_add8(_mm256_add_ps(v.lo, v.hi)); }
inline float reduce_max16(f32x16 v) {
  const __m256 m8 = _mm256_max_ps(v.lo, v.hi);
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
}

inline f32x16 mask_after16(f32x16 v, int32_t first, int32_t last, f32x16 fill) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i limit = _mm256_set1_epi32(last);
  const __m256i pos_lo = _mm256_add_epi32(lane, _mm256_set1_epi32(first));
  const __m256i pos_hi = _mm256_add_epi32(pos_lo, _mm256_set1_epi32(8));
  const __m256 after_lo = _mm256_castsi256_ps(_mm256_cmpgt_epi32(pos_lo, limit));
  const __m256 after_hi = _mm256_castsi256_ps(_mm256_cmpgt_epi32(pos_hi, limit));
  return {_mm256_blendv_ps(v.lo, fill.lo, after_lo), _mm256_blendv_ps(v.hi, fill.hi, after_hi)};
}
#endif

#if !defined(__AVX512F__)
// Rows of either dtype (scalar_math.h has these for AVX-512). A bfloat16 is the high half of a
// float's bits; stores round through from_float (AVX2 has no bfloat16 instructions).
inline f32x16 load16(const float* p) { return loadu16(p); }
inline void store16(float* p, f32x16 v) { storeu16(p, v); }
inline f32x16 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw));
  const __m256i hi = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
}
inline void store16(c10::BFloat16* p, f32x16 v) {
  alignas(32) float tmp[16];
  storeu16(tmp, v);
  for (int i = 0; i < 16; ++i) p[i] = from_float<c10::BFloat16>(tmp[i]);
}

// fast_exp (scalar_math.h) on 16 lanes.
inline __m256 fast_exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpFloor)), _mm256_set1_ps(kExpCeil));
  const __m256 n = _mm256_floor_ps(
      _mm256_fmadd_ps(x, _mm256_set1_ps(kLog2e), _mm256_set1_ps(0.5f)));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpP0);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP1));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP2));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP3));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP4));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpP5));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i scale =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}
inline f32x16 fast_exp16(f32x16 x) { return {fast_exp8(x.lo), fast_exp8(x.hi)}; }
#endif

}  // namespace deepserve_kernels
#endif  // DEEPSERVE_VEC16
