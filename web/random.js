// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The DDPM reference authors
// numpy.random.RandomState(seed) for an integer seed, reproduced bit for bit (as cpp_runner/src/mt19937.h):
// MT19937 seeded with init_genrand, 53-bit doubles, and the legacy polar-method gauss that caches its second
// value. standardNormal(n) is RandomState(seed).standard_normal(n).astype(float32): the noise of `ddpm
// onnx-sample` and the C++ runner.

const N = 624, M = 397;

export class RandomState {
  constructor(seed) {
    if (!(Number.isInteger(seed) && seed >= 0 && seed < 2 ** 32)) throw new Error(`seed must be in 0..2^32-1, got ${seed}`);
    this.mt = new Uint32Array(N);
    this.mt[0] = seed >>> 0;
    for (let i = 1; i < N; i++) {
      const prev = this.mt[i - 1] ^ (this.mt[i - 1] >>> 30);
      this.mt[i] = (Math.imul(1812433253, prev) + i) >>> 0;
    }
    this.pos = N;
    this.gauss = null;
  }

  next32() {
    if (this.pos === N) this.twist();
    let y = this.mt[this.pos++];
    y ^= y >>> 11;
    y ^= (y << 7) & 0x9d2c5680;
    y ^= (y << 15) & 0xefc60000;
    return (y ^ (y >>> 18)) >>> 0;
  }

  randomDouble() {  // numpy legacy_double: 27 + 26 bits
    const a = this.next32() >>> 5, b = this.next32() >>> 6;
    return (a * 67108864.0 + b) / 9007199254740992.0;
  }

  standardNormalDouble() {  // numpy legacy_gauss
    if (this.gauss !== null) {
      const g = this.gauss;
      this.gauss = null;
      return g;
    }
    let x1, x2, r2;
    do {
      x1 = 2.0 * this.randomDouble() - 1.0;
      x2 = 2.0 * this.randomDouble() - 1.0;
      r2 = x1 * x1 + x2 * x2;
    } while (r2 >= 1.0 || r2 === 0.0);
    const f = Math.sqrt((-2.0 * Math.log(r2)) / r2);
    this.gauss = f * x1;
    return f * x2;
  }

  standardNormal(n) {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.standardNormalDouble();
    return out;
  }

  twist() {
    const mt = this.mt;
    for (let i = 0; i < N; i++) {
      const y = (mt[i] & 0x80000000) | (mt[(i + 1) % N] & 0x7fffffff);
      mt[i] = (mt[(i + M) % N] ^ (y >>> 1) ^ (y & 1 ? 0x9908b0df : 0)) >>> 0;
    }
    this.pos = 0;
  }
}
