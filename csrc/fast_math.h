// A vectorisable exp (and log, below) for the CPU row loops (inside `#pragma omp simd` loops the compiler turns
// it into SIMD code; std::exp would stay a scalar call). float: Cody-Waite range reduction and a
// degree-6 polynomial, within ~2 ulp; exp(-inf) = 0 and NaN stays NaN. double: std::exp (fp64
// is the precision path, not the fast one).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

// Inside `omp simd` loops a call that is not inlined stays scalar: force it.
#define ICON_SIMD_INLINE inline __attribute__((always_inline))

namespace icon {

ICON_SIMD_INLINE float vexp(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = std::nearbyint(xc * kLog2e);
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float y = p * scale;
  y = x < -87.0f ? 0.0f : y;           // underflow (and -inf) to exactly 0
  y = x > 88.0f ? INFINITY : y;
  return x != x ? x : y;               // NaN stays NaN
}

inline double vexp(double x) { return std::exp(x); }

// A vectorisable log (float: Cephes' logf, range reduction to [sqrt(1/2), sqrt(2)) and a degree-9
// polynomial, within ~1 ulp; subnormals scaled first). log(0) = -inf, log(x < 0) = NaN,
// log(inf) = inf, NaN stays NaN. double: std::log.
ICON_SIMD_INLINE float vlog(float x) {
  const bool sub = x < 1.17549435e-38f;                 // subnormal (or 0, negative: fixed below)
  const float xs = sub ? x * 8388608.0f : x;            // * 2^23
  int32_t bits;
  std::memcpy(&bits, &xs, sizeof(bits));
  float e = float(((bits >> 23) & 0xff) - 126) - (sub ? 23.0f : 0.0f);
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;   // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e = low ? e - 1.0f : e;
  const float f = low ? m + m - 1.0f : m - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  float r = f + y + e * 0.693359375f;
  r = x == 0.0f ? -INFINITY : r;
  r = x < 0.0f ? NAN : r;
  r = x == INFINITY ? INFINITY : r;
  return x != x ? x : r;                                 // NaN stays NaN
}

inline double vlog(double x) { return std::log(x); }

}  // namespace icon
