// A DDPM sampler over an exported eps_theta ONNX file: reads the schedule from the file's metadata, builds
// the sampling plan (Algorithm 2 of Ho et al. on the respaced process, DDIM with eta, DPM-Solver++(2M) and
// its SDE variant, optionally with Langevin corrector rows) and runs it with ONNX Runtime. Plan and noise stream follow the contract shared with ddpm.py and the onnxruntime sampler,
// so all three give the same samples for the same seed and batch size.
#pragma once
#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ddpm {

// A mistake the user can fix (bad file, bad option): the CLI prints it as one line and exits with 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// All of s as an int64_t or a double, else UsageError naming `what`.
int64_t parse_int(const std::string& s, const std::string& what);
double parse_double(const std::string& s, const std::string& what);

struct ModelInfo {
  std::vector<double> betas;  // float64, length T
  std::string parameterization, variance;  // eps | x0 | v;  fixed_small | fixed_large | learned_range
  int64_t C = 0, H = 0, W = 0;
  bool clip_denoised = true;
  int64_t num_classes = 0;  // K > 0: class-conditional, with a label input y in 0..K (K: the null label)
  int64_t out_channels() const { return variance == "learned_range" ? 2 * C : C; }
};

// What a class-conditional model samples: one label in 0..K-1 per image (none: the null label, i.e.
// unconditionally) and the classifier-free guidance s of out_u + s (out_c - out_u) on the prediction channels.
struct Conditioning {
  std::vector<int64_t> labels;
  double guidance = 1.0;
};

struct PlanOptions {
  std::string sampler = "ancestral";  // ancestral | ddim | dpmpp2m | dpmpp2m-sde
  int64_t steps = 0;                  // 0: T for ancestral, min(50, T) for the others
  double eta = 0.0;                   // ddim only
  std::string spacing = "uniform";    // uniform | linspace | trailing | quadratic | logsnr
  int clip = -1;                      // -1: the model's ddpm.clip_denoised
  int64_t corrector_steps = 0;        // Langevin rows per timestep (ancestral, ddim)
  double snr = 0.16;                  // the corrector's signal-to-noise ratio r
};

struct Step {  // float64 coefficients of one row; see make_plan
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
std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, const std::string& spacing, const std::vector<double>& abar);
Plan make_plan(const ModelInfo& info, const PlanOptions& opt);
// DDIM encoding x_0 -> x_T (Song et al. Section 4.3): rows t_0..t_{S-2}, each Eq. (12) with eta = 0 from t_k up to
// t_{k+1}; run it from the data (Sampler::sample's x_init). steps 0: min(50, T).
Plan make_inversion_plan(const ModelInfo& info, int64_t steps, const std::string& spacing);

class RandomState;

struct RunStats {
  double total_s = 0, network_s = 0;  // the whole sampling loop; inside Session::Run
};
using Progress = std::function<void(int64_t batch, int64_t n_batches, int64_t step, int64_t n_steps)>;

class Sampler {
 public:
  // provider: "cpu" or "cuda"; threads: ONNX Runtime intra-op threads (0: its default). step_graph: run each
  // step's update as a small ONNX graph on the provider, keeping x on the device (always on with cuda).
  Sampler(const std::string& model_path, const std::string& provider, int threads, bool step_graph = false);
  const ModelInfo& info() const { return info_; }
  const std::string& provider() const { return provider_name_; }
  // n images [n, C, H, W] in batches of `batch`, all drawing from one RandomState(seed): each batch x_T, then each
  // noisy row's z. With x_init ([n, C, H, W]: latents to decode, or images to encode) the run starts from it
  // and draws only the z's.
  std::vector<float> sample(const Plan& plan, int64_t n, int64_t batch, uint32_t seed, RunStats* stats,
                            const Progress& progress = nullptr, const float* x_init = nullptr,
                            const Conditioning& cond = {});

 private:
  using Tick = std::function<void(int64_t step)>;
  using StepSessions = std::unique_ptr<Ort::Session>[2];  // the row update without, and with, learned variances
  struct Labels {  // the network's labels for one batch: [B], or [2B] (the labels, then the null label) if guided
    std::vector<int64_t> y;
    bool guided = false;
    float scale = 1.0f;
  };
  Labels batch_labels(const Conditioning& cond, int64_t first, int64_t b) const;
  // Both run the plan on x (the batch's slice of the result), which holds the start (x_init) or is drawn as x_T.
  double run_batch_on_host(const Plan& p, int64_t b, float* x, bool draw_x_T, RandomState& rng, const Tick& tick,
                           Labels& labels);
  double run_batch_on_provider(const Plan& p, StepSessions& steps, int64_t b, float* x, bool draw_x_T,
                               RandomState& rng, const Tick& tick, Labels& labels);

  bool api_ready_;  // ONNX Runtime's API table is fetched (and checked) before anything below is built
  Ort::Env env_;
  Ort::SessionOptions options_;
  Ort::Session session_{nullptr};
  ModelInfo info_;
  std::string provider_name_, out_name_;
  std::unique_ptr<Ort::Allocator> cuda_allocator_;
  OrtAllocator* device_allocator_ = nullptr;  // where x lives on the step-graph path
  bool cuda_ = false, step_graph_ = false, spare_core_ = false;
};

}  // namespace ddpm
