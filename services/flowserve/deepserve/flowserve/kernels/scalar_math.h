// Element conversions and exp written as plain arithmetic, so that the loops of the kernels
// that use them vectorise. c10's BFloat16 conversions go through memcpy and a NaN branch and
// std::exp is a libm call: gcc leaves loops over either scalar (3-5 ns an element).
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace deepserve_kernels {

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  __builtin_memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
// Round to nearest even, as c10 does; a NaN stays a NaN.
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const uint32_t nan = (bits >> 16) | 0x40u;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? nan : rounded),
                       c10::BFloat16::from_bits());
}

// fast_exp's constants, shared by its scalar and vector forms: the clamp, log2(e), ln 2 split in
// two (high part exact in a float) and Cephes' expf polynomial.
constexpr float kExpFloor = -87.3f, kExpCeil = 88.7f, kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f, kLn2Low = 2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f, kExpP1 = 1.3981999507e-3f, kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f, kExpP4 = 1.6666665459e-1f, kExpP5 = 5.0000001201e-1f;

// e^x to about 1 ulp for x in [-87.3, 88.7] (clamped outside): Cephes' expf polynomial on
// x - n ln 2, scaled by 2^n through the exponent bits.
inline float fast_exp(float x) {
  // Comparisons, not std::fmin/fmax: with NaNs honoured (-fno-finite-math-only) gcc calls libm
  // for those, and a loop over them stays scalar. A NaN clamps to the floor either way.
  x = x > kExpFloor ? x : kExpFloor;
  x = x < kExpCeil ? x : kExpCeil;
  const float n = std::floor(x * kLog2e + 0.5f);
  const float r = x - n * kLn2High + n * kLn2Low;
  float p = kExpP0;
  p = p * r + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  const float y = p * r * r + r + 1.0f;
  const uint32_t scale_bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &scale_bits, sizeof(scale));
  return y * scale;
}

#if defined(__AVX512F__)
// 16 floats of a row (bfloat16 widens by a shift into the high half), and back (to nearest
// even; NaN handling as from_float's).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
#if defined(__AVX512BF16__)
  // One instruction, the same rounding (vcvtneps2bf16 also keeps a NaN a NaN).
  const __m256bh bits = _mm512_cvtneps_pbh(v);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)bits);
#else
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  rounded = _mm512_mask_or_epi32(rounded, nan, _mm512_srli_epi32(bits, 16),
                                 _mm512_set1_epi32(0x40));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
#endif
}

// v rounded to T's precision and widened back (the rounding a store then a load would do).
inline __m512 round16(float, __m512 v) { return v; }
inline __m512 round16(c10::BFloat16, __m512 v) {
#if defined(__AVX512BF16__)
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
#else
  alignas(32) c10::BFloat16 tmp[16];
  store16(tmp, v);
  return load16(tmp);
#endif
}

// fast_exp on 16 lanes.
inline __m512 fast_exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpFloor)), _mm512_set1_ps(kExpCeil));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpP0);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpP5));
  const __m512 y =
      _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i scale = _mm512_slli_epi32(
      _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(scale));
}
#endif

}  // namespace deepserve_kernels
