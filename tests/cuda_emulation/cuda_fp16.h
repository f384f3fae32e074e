// fp16 for the CPU emulation (see cuda_runtime.h), through the compiler's _Float16 (GCC >= 12
// on x86-64 and aarch64), whose conversions round to nearest even as CUDA's do.
#pragma once

struct __half {
  _Float16 value;
};

inline float __half2float(__half value) { return static_cast<float>(value.value); }
inline __half __float2half(float value) { return {static_cast<_Float16>(value)}; }
inline unsigned short __half_as_ushort(__half value) {
  unsigned short bits;
  __builtin_memcpy(&bits, &value.value, sizeof(bits));
  return bits;
}
inline __half __ushort_as_half(unsigned short bits) {
  __half value;
  __builtin_memcpy(&value.value, &bits, sizeof(bits));
  return value;
}
