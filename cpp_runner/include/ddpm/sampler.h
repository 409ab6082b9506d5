// ddpm/sampler.h: sample images from an eps_theta ONNX file written by `ddpm export` (the ddpm_runner::sampler
// library). It reads the schedule from the file's metadata, checks the graph against it, builds the sampling plan
// (Algorithm 2 of Ho et al. on the respaced process, DDIM with eta, DPM-Solver++(2M) and its SDE variant,
// DPM-Solver++(3M), UniPC, optionally with Langevin corrector rows) and runs it with ONNX Runtime. Plan and noise stream follow the
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
#include <optional>
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

// The closed sets of options. Their names on the command line (and in `ddpm onnx-sample`): ancestral, ddim,
// dpmpp2m, dpmpp2m-sde, dpmpp3m, unipc; uniform, linspace, trailing, quadratic, logsnr; auto, cpu, cuda;
// onnxruntime, openvino; auto, fp32, bf16.
enum class SamplerKind { Ancestral, Ddim, DpmPP2M, DpmPP2MSde, DpmPP3M, UniPC };
enum class Spacing { Uniform, Linspace, Trailing, Quadratic, LogSnr };
enum class Provider { Auto, Cpu, Cuda };  // Auto: CUDA when its execution provider can be used, else the CPU
// What runs the network: ONNX Runtime, or OpenVINO on the CPU (a library built with -DDDPM_WITH_OPENVINO=ON).
enum class Engine { OnnxRuntime, OpenVino };
// How the network computes. Auto: the file's own precision (ddpm.precision) under ONNX Runtime; under OpenVINO
// bf16 where the CPU has AVX512-BF16 or AMX, else fp32. Fp32 and Bf16 ask OpenVINO for that precision.
enum class Precision { Auto, Fp32, Bf16 };

// Name -> value (an Error listing the valid names otherwise) and value -> name.
DDPM_API SamplerKind parse_sampler(const std::string& name);
DDPM_API Spacing parse_spacing(const std::string& name);
DDPM_API Provider parse_provider(const std::string& name);
DDPM_API Engine parse_engine(const std::string& name);
DDPM_API Precision parse_precision(const std::string& name);
DDPM_API std::string to_string(SamplerKind sampler);
DDPM_API std::string to_string(Spacing spacing);
DDPM_API std::string to_string(Provider provider);
DDPM_API std::string to_string(Engine engine);
DDPM_API std::string to_string(Precision precision);

// What a plan is asked for (plan.PlanOptions in Python). A field left none is the model's (model_options).
struct PlanOptions {
  std::optional<SamplerKind> sampler;  // none: the model's own, with its steps and spacing (ModelInfo::default_options)
  std::optional<int64_t> steps;  // network calls, 1..T; none: T for ancestral, min(50, T) for the others
  double eta = 0.0;              // in [0, 1], ddim only
  std::optional<Spacing> spacing;  // none: default_spacing of the model's schedule
  std::optional<bool> clip;      // clip the predicted x0 to [-1, 1]; none: the model's ddpm.clip_denoised
  int64_t corrector_steps = 0;   // Langevin rows per timestep, 0..1000 (ancestral, ddim)
  double snr = 0.16;             // the corrector's signal-to-noise ratio r > 0
};

// What the file's metadata says (docs/internals.md, "The ONNX file").
struct ModelInfo {
  std::vector<double> betas;                // float64, length T
  std::string parameterization, variance;   // eps | x0 | v;  fixed_small | fixed_large | learned_range
  int64_t C = 0, H = 0, W = 0;
  bool clip_denoised = true;
  int64_t num_classes = 0;  // K > 0: class-conditional, with a label input y in 0..K (K: the null label)
  std::vector<std::string> class_names;  // ddpm.class_names: the K classes' names (empty when the file has none)
  // The plan the file samples with when none is named: ddpm.sampler (ancestral when absent), ddpm.steps and
  // ddpm.spacing (a distilled student's), its clip ddpm.clip_denoised.
  PlanOptions default_options;
  int64_t out_channels() const { return variance == "learned_range" ? 2 * C : C; }
  size_t image_floats() const { return size_t(C * H * W); }
};

struct Step {  // float64 coefficients of one row (docs/internals.md, "Building the plan")
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

// The spacing of a plan given none: trailing for a schedule that ends at zero SNR (abar_T = 0), whose sampler
// must start from T, which uniform never keeps (Lin et al. 2023, Section 3.3); uniform (DDIM's) otherwise.
DDPM_API Spacing default_spacing(const ModelInfo& info);
// The kept timesteps, ascending; abar (alpha_bar, length >= T) is read by the logsnr spacing only.
DDPM_API std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, Spacing spacing, const std::vector<double>& abar);
// The options with the model's own where they give none (plan.model_options in Python): where no sampler is named,
// the default's sampler, steps and spacing; where no clip is given, the default's clip.
DDPM_API PlanOptions model_options(const ModelInfo& info, const PlanOptions& options);
// The plan of model_options(info, options). An Error for options out of range (steps, eta, corrector_steps, snr: NaN
// and inf too) or that do not go together.
DDPM_API Plan make_plan(const ModelInfo& info, const PlanOptions& options);
// DDIM encoding x_0 -> x_T (Song et al. Section 4.3): rows t_0..t_{S-2}, each Eq. (12) with eta = 0 from t_k up
// to t_{k+1}; run it from the data (SampleOptions::init). steps none: min(50, T); spacing none: default_spacing.
DDPM_API Plan make_inversion_plan(const ModelInfo& info, std::optional<int64_t> steps = {},
                                  std::optional<Spacing> spacing = {});

struct LoadOptions {
  Provider provider = Provider::Auto;
  std::optional<int> threads;  // ONNX Runtime intra-op threads, 1..1024; none: its default, a thread per core
  bool step_graph = false;     // run each row's update as a small ONNX graph on the provider (always on CUDA)
  Engine engine = Engine::OnnxRuntime;  // OpenVino: the CPU (provider auto or cpu), no step_graph; threads are its own
  Precision precision = Precision::Auto;  // anything but the file's own precision needs Engine::OpenVino
};

// The classifier-free guidance of a class-conditional model when none is given, as in Python
// (export/onnx_sampler.DEFAULT_GUIDANCE): chosen from the guidance table of BENCHMARKS.md.
inline constexpr double kDefaultGuidance = 1.0;

// What a class-conditional model samples: one label in 0..K-1 per image (none: the null label, i.e.
// unconditionally) and the classifier-free guidance s of out_u + s (out_c - out_u) on the prediction channels
// (none: kDefaultGuidance with labels; 1 is one conditional call per row, 0 one unconditional call).
struct Conditioning {
  std::vector<int64_t> labels;
  std::optional<double> guidance;
};

struct RunStats {
  double total_s = 0, network_s = 0;  // the whole sampling loop; inside ONNX Runtime's Run
};
using Progress = std::function<void(int64_t batch, int64_t n_batches, int64_t step, int64_t n_steps)>;

struct SampleOptions {
  std::optional<int64_t> batch;  // images per network call, >= 1; none: all at once
  const float* init = nullptr;   // as many floats as out: start from them (latents, or images to encode), not x_T
  Conditioning conditioning;
  Progress progress;             // called after every row, on the calling thread
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
  // The one in use: "CPUExecutionProvider" or "CUDAExecutionProvider"; under OpenVINO the device, the precision and
  // why, e.g. "OpenVINO CPU bf16 (auto: the CPU has AVX512-BF16)".
  const std::string& provider() const;

  // n = n_floats / image_floats() images [n, C, H, W] into out, in batches, all drawing from one
  // RandomState(seed): each batch x_T (unless options.init is given), then each noisy row's z. The sessions of
  // the network and of the row updates are built once per Sampler and reused by every call. A network output
  // that holds NaN or inf is an Error. Not to be called from two threads at once on the same Sampler.
  RunStats sample(const Plan& plan, uint32_t seed, float* out, size_t n_floats, const SampleOptions& options = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Pixels as the Python side makes them (export/onnx_sampler.to_uint8): round((clamp(x, -1, 1) + 1) * 127.5) in
// float32, rounding half to even (NaN: 0).
DDPM_API std::vector<uint8_t> to_uint8(const float* x, size_t n);

// Writes the n_floats / (C H W) images [N, C, H, W] of x (C, H, W: info's) to path, atomically, in the format its
// suffix names, as `ddpm onnx-sample` writes them: .png, a grid (C = 1 or 3; given labels, a row per class); .npz,
// a numpy archive with arr_0 the uint8 pixels [N, H, W, C] and, given labels, arr_1 the int64 labels [N]; .npy,
// the float32 values [N, C, H, W] themselves (latents, for SampleOptions::init).
DDPM_API void save_images(const std::string& path, const float* x, size_t n_floats, const ModelInfo& info,
                          const std::vector<int64_t>& labels = {});

}  // namespace ddpm
