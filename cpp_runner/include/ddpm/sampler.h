// ddpm/sampler.h: sample images from an eps_theta ONNX file written by `ddpm export` (the ddpm_runner::sampler
// library). It reads the schedule from the file's metadata, checks the graph against it, builds the sampling plan
// (Algorithm 2 of Ho et al. on the respaced process, DDIM with eta, DPM-Solver++(2M) and its SDE variant,
// optionally with Langevin corrector rows) and runs it with ONNX Runtime. Plan and noise stream follow the
// contract shared with ddpm.py and the onnxruntime sampler, so all three give the same samples for the same seed
// and batch size.
//
// This header holds declarations only: no ONNX Runtime types, and no arithmetic whose rounding could depend on the
// including program's compiler flags. Every failure is a ddpm::Error; the library never exits, aborts or writes
// to stdout.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__GNUC__)
#define DDPM_API __attribute__((visibility("default")))
#else
#define DDPM_API
#endif

namespace ddpm {

// A bad file, a bad option, or a failed run, with a one-line message that says what is wrong.
struct DDPM_API Error : std::runtime_error {
  using std::runtime_error::runtime_error;
  ~Error() override;
};

// What the file's metadata says (the README's "The ONNX file").
struct ModelInfo {
  std::vector<double> betas;                // float64, length T
  std::string parameterization, variance;   // eps | x0 | v;  fixed_small | fixed_large | learned_range
  int64_t C = 0, H = 0, W = 0;
  bool clip_denoised = true;
  int64_t num_classes = 0;  // K > 0: class-conditional, with a label input y in 0..K (K: the null label)
  int64_t out_channels() const { return variance == "learned_range" ? 2 * C : C; }
  size_t image_floats() const { return size_t(C * H * W); }
};

struct PlanOptions {
  std::string sampler = "ancestral";  // ancestral | ddim | dpmpp2m | dpmpp2m-sde
  int64_t steps = 0;                  // 0: T for ancestral, min(50, T) for the others
  double eta = 0.0;                   // ddim only
  std::string spacing = "uniform";    // uniform | linspace | trailing | quadratic | logsnr
  int clip = -1;                      // -1: the model's ddpm.clip_denoised; 0: off; 1: on
  int64_t corrector_steps = 0;        // Langevin rows per timestep (ancestral, ddim)
  double snr = 0.16;                  // the corrector's signal-to-noise ratio r
};

struct Step {  // float64 coefficients of one row (the README's "Building the plan")
  int64_t t;
  double x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, log_var_max;
  bool add_noise, learned;
  std::vector<double> mean_x0_prev;  // weights of the x0 predictions of the previous rows, the latest first
};
struct Plan {
  std::vector<Step> steps;  // sampling order
  bool clip = true;
  int64_t channels = 0, memory = 0;  // memory: the length of every row's mean_x0_prev
};

// The kept timesteps, ascending; abar (alpha_bar, length >= T) is read by the logsnr spacing only.
DDPM_API std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, const std::string& spacing,
                                             const std::vector<double>& abar);
DDPM_API Plan make_plan(const ModelInfo& info, const PlanOptions& options);
// DDIM encoding x_0 -> x_T (Song et al. Section 4.3): rows t_0..t_{S-2}, each Eq. (12) with eta = 0 from t_k up
// to t_{k+1}; run it from the data (SampleOptions::init). steps 0: min(50, T).
DDPM_API Plan make_inversion_plan(const ModelInfo& info, int64_t steps, const std::string& spacing = "uniform");

struct LoadOptions {
  std::string provider = "cpu";  // cpu | cuda
  int threads = 0;               // ONNX Runtime intra-op threads (0: its default, a thread per core)
  bool step_graph = false;       // run each row's update as a small ONNX graph on the provider (always with cuda)
};

// What a class-conditional model samples: one label in 0..K-1 per image (none: the null label, i.e.
// unconditionally) and the classifier-free guidance s of out_u + s (out_c - out_u) on the prediction channels.
struct Conditioning {
  std::vector<int64_t> labels;
  double guidance = 1.0;
};

struct RunStats {
  double total_s = 0, network_s = 0;  // the whole sampling loop; inside ONNX Runtime's Run
};
using Progress = std::function<void(int64_t batch, int64_t n_batches, int64_t step, int64_t n_steps)>;

struct SampleOptions {
  int64_t batch = 0;            // images per network call; 0: all at once
  const float* init = nullptr;  // as many floats as out: start from them (latents, or images to encode) instead of x_T
  Conditioning conditioning;
  Progress progress;            // called after every row, on the calling thread
};

class DDPM_API Sampler {
 public:
  // Loads the file and checks its metadata and graph (inputs, outputs, dtypes, ranks, channels) before any run.
  explicit Sampler(const std::string& model_path, const LoadOptions& options = {});
  ~Sampler();
  Sampler(Sampler&&) noexcept;
  Sampler& operator=(Sampler&&) noexcept;

  const ModelInfo& info() const;
  size_t image_floats() const { return info().image_floats(); }  // C * H * W
  const std::string& provider() const;                           // "CPUExecutionProvider" or "CUDAExecutionProvider"

  // n = n_floats / image_floats() images [n, C, H, W] into out, in batches, all drawing from one
  // RandomState(seed): each batch x_T (unless options.init is given), then each noisy row's z. The sessions of
  // the network and of the row updates are built once per Sampler and reused by every call. A network output
  // that holds NaN or inf is an Error. Not to be called from two threads at once on the same Sampler.
  RunStats sample(const Plan& plan, uint32_t seed, float* out, size_t n_floats, const SampleOptions& options = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ddpm
