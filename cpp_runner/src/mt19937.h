// numpy.random.RandomState(seed) for an integer seed, reproduced bit for bit: MT19937 seeded with
// init_genrand, 53-bit doubles, and the legacy polar-method gauss that caches its second value.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

namespace ddpm {

class RandomState {
 public:
  explicit RandomState(uint32_t seed) {
    mt_[0] = seed;
    for (uint32_t i = 1; i < N; ++i) mt_[i] = 1812433253u * (mt_[i - 1] ^ (mt_[i - 1] >> 30)) + i;
  }

  uint32_t next32() {
    if (pos_ == N) twist();
    uint32_t y = mt_[pos_++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
  }

  double random_double() {  // numpy legacy_double: 27 + 26 bits
    const uint32_t a = next32() >> 5, b = next32() >> 6;
    return (a * 67108864.0 + b) / 9007199254740992.0;
  }

  double standard_normal() {  // numpy legacy_gauss
    if (has_gauss_) {
      has_gauss_ = false;
      return gauss_;
    }
    double x1, x2, r2;
    do {
      x1 = 2.0 * random_double() - 1.0;
      x2 = 2.0 * random_double() - 1.0;
      r2 = x1 * x1 + x2 * x2;
    } while (r2 >= 1.0 || r2 == 0.0);
    const double f = std::sqrt(-2.0 * std::log(r2) / r2);
    gauss_ = f * x1;
    has_gauss_ = true;
    return f * x2;
  }

  // standard_normal(n).astype(float32)
  void fill_normal(float* out, size_t n) {
    for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(standard_normal());
  }

 private:
  static constexpr uint32_t N = 624, M = 397;
  void twist() {
    for (uint32_t i = 0; i < N; ++i) {
      const uint32_t y = (mt_[i] & 0x80000000u) | (mt_[(i + 1) % N] & 0x7fffffffu);
      mt_[i] = mt_[(i + M) % N] ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
    }
    pos_ = 0;
  }
  uint32_t mt_[N];
  uint32_t pos_ = N;
  bool has_gauss_ = false;
  double gauss_ = 0.0;
};

}  // namespace ddpm
