// 256-bit SIMD vectors through GCC/Clang vector extensions, shared by the
// kernels. osgd_jax.native compiles for the CPU it runs on (-march=native),
// so these become AVX2/AVX-512VL (x86) or pairs of NEON registers (ARM).

#ifndef OSGD_JAX_CSRC_SIMD_H_
#define OSGD_JAX_CSRC_SIMD_H_

#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace osgd_jax {

// SIMD registers the compiler may use: AVX-512 has 32 (the 256-bit vectors
// use them through AVX-512VL), AVX2 and a 256-bit vector split over NEON's q
// registers 16. Register blocks are sized to them.
#if defined(__AVX512F__) && defined(__AVX512VL__)
constexpr int kSimdRegisters = 32;
#else
constexpr int kSimdRegisters = 16;
#endif

#define OSGD_INLINE inline __attribute__((always_inline))
// Each register block shape is a function of its own, so it gets a register
// allocation of its own: inlined into one large function, GCC spilled the
// accumulators of some shapes to the stack (the Gram kernel at K = 8 ran
// 1.5× slower).
#define OSGD_NOINLINE __attribute__((noinline))

template <typename T>
struct Simd {
  static constexpr int kWidth = 32 / sizeof(T);
  typedef T Vec __attribute__((vector_size(32)));
};

template <typename T>
OSGD_INLINE typename Simd<T>::Vec Load(const T* p) {
  typename Simd<T>::Vec v;
  std::memcpy(&v, p, sizeof(v));  // unaligned
  return v;
}

// Every lane = *p, loaded by one broadcast instruction where the CPU has one
// (x86 AVX). GCC's generic forms cost more: `Vec{} + *p` adds 0.0 to the
// scalar first (x + 0.0 is not x for x = -0.0), and setting the lanes one
// by one becomes a chain of inserts.
template <typename T>
OSGD_INLINE typename Simd<T>::Vec Broadcast(const T* p) {
#if defined(__AVX__)
  if constexpr (sizeof(T) == 4) {
    return (typename Simd<T>::Vec)_mm256_set1_ps(float(*p));
  } else {
    return (typename Simd<T>::Vec)_mm256_set1_pd(double(*p));
  }
#else
  return *p - typename Simd<T>::Vec{};  // exact: x − 0.0 = x, −0.0 included
#endif
}

template <typename T>
OSGD_INLINE void Store(T* p, typename Simd<T>::Vec v) {
  std::memcpy(p, &v, sizeof(v));  // unaligned
}

}  // namespace osgd_jax

#endif  // OSGD_JAX_CSRC_SIMD_H_
