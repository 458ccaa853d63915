// A vectorisable exp for the CPU row loops (inside `#pragma omp simd` loops the compiler turns
// it into SIMD code; std::exp would stay a scalar call). float: Cody-Waite range reduction and a
// degree-6 polynomial, within ~2 ulp; exp(-inf) = 0 and NaN stays NaN. double: std::exp (fp64
// is the precision path, not the fast one).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace icon {

inline float vexp(float x) {
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

}  // namespace icon
