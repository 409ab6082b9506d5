// The network of an exported file on OpenVINO's CPU plugin: the engine of LoadOptions::engine = Engine::OpenVino
// (internal to the library). A library built without -DDDPM_WITH_OPENVINO=ON has this class too: its constructor
// throws an Error that says how to build it.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ddpm/sampler.h"

namespace ddpm {

struct TensorPort {  // an input or output: its ONNX element type (1 float, 7 int64, ...), dims (-1: dynamic)
  std::string name;
  int onnx_type = 0;
  std::vector<int64_t> dims;
};

class OpenVinoNetwork {
 public:
  // Reads the .onnx file with OpenVINO for the CPU at `precision` (Auto: bf16 where the CPU has AVX512-BF16 or AMX,
  // else fp32; Bf16 on a CPU without them is an Error), with `threads` inference threads (none: OpenVINO's choice).
  OpenVinoNetwork(const std::string& path, Precision precision, std::optional<int> threads);
  ~OpenVinoNetwork();
  std::vector<TensorPort> inputs() const;
  std::vector<TensorPort> outputs() const;
  const std::string& description() const;  // "OpenVINO CPU bf16 (auto: the CPU has AVX512-BF16)"
  // One call on nb images: x [nb, C, H, W], t [nb] and, when y is not null, y [nb] into out [nb, C_out, H, W] (every
  // buffer the caller's). The model is compiled for a static batch of nb at the first call with nb, and kept.
  void run(float* x, int64_t* t, int64_t* y, const int64_t x_shape[4], float* out, const int64_t out_shape[4]);
  void prepare(int64_t nb);  // compiles for a static batch of nb now, where run would at its first call

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ddpm
