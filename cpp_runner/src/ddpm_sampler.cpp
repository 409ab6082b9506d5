#include "ddpm_sampler.h"

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <future>
#include <memory>
#include <numeric>
#include <sstream>
#include <thread>

#include "mt19937.h"

namespace ddpm {
namespace {

void need(bool ok, const std::string& message) {
  if (!ok) throw UsageError(message);
}

bool one_of(const std::string& v, std::initializer_list<const char*> allowed) {
  return std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return v == a; });
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> parts;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) parts.push_back(item);
  return parts;
}

std::string one_line(std::string s) {
  std::replace(s.begin(), s.end(), '\n', ' ');
  return s;
}

ModelInfo read_metadata(const Ort::Session& session, const std::string& path) {
  Ort::AllocatorWithDefaultOptions alloc;
  const Ort::ModelMetadata md = session.GetModelMetadata();
  const auto get = [&](const std::string& key) -> std::string {
    const auto v = md.LookupCustomMetadataMapAllocated(("ddpm." + key).c_str(), alloc);
    need(bool(v), path + " is not a DDPM model: metadata key 'ddpm." + key + "' is missing (make it with ddpm export)");
    return v.get();
  };
  const std::string in = path + ": ";
  need(get("format") == "1", in + "ddpm.format is not 1; this runner reads format 1");
  ModelInfo m;
  for (const auto& b : split(get("betas"))) m.betas.push_back(parse_double(b, "ddpm.betas"));
  need(parse_int(get("num_timesteps"), "ddpm.num_timesteps") == int64_t(m.betas.size()),
       in + "ddpm.num_timesteps differs from the number of ddpm.betas");
  need(!m.betas.empty() && std::all_of(m.betas.begin(), m.betas.end(), [](double b) { return b > 0 && b <= 1; }),
       in + "ddpm.betas must lie in (0, 1]");
  m.parameterization = get("parameterization"), m.variance = get("variance");
  need(one_of(m.parameterization, {"eps", "x0", "v"}), in + "unknown ddpm.parameterization " + m.parameterization);
  double abar_T = 1.0;
  for (double b : m.betas) abar_T *= 1.0 - b;
  need(abar_T > 0 || m.parameterization != "eps", in + "zero terminal SNR (alpha_bar_T = 0) needs the v or x0 parameterization");
  need(one_of(m.variance, {"fixed_small", "fixed_large", "learned_range"}), in + "unknown ddpm.variance " + m.variance);
  const auto shape = split(get("image_shape"));
  need(shape.size() == 3, in + "ddpm.image_shape must be C,H,W");
  m.C = parse_int(shape[0], "ddpm.image_shape"), m.H = parse_int(shape[1], "ddpm.image_shape");
  m.W = parse_int(shape[2], "ddpm.image_shape");
  need(m.C > 0 && m.H > 0 && m.W > 0, in + "ddpm.image_shape must be positive");
  const std::string clip = get("clip_denoised");
  need(one_of(clip, {"true", "false"}), in + "ddpm.clip_denoised must be true or false");
  m.clip_denoised = clip == "true";
  need(get("timestep_dtype") == "int64", in + "ddpm.timestep_dtype must be int64");
  if (md.LookupCustomMetadataMapAllocated("ddpm.num_classes", alloc)) {
    m.num_classes = parse_int(get("num_classes"), "ddpm.num_classes");
    need(m.num_classes >= 0 && m.num_classes <= (1 << 20) && parse_int(get("null_label"), "ddpm.null_label") == m.num_classes,
         in + "ddpm.num_classes K and ddpm.null_label K must agree");
  }
  return m;
}

struct Pair {
  double a, b;
};

// x0 = a x_t + b out: Eq. (4) solved for x0 under each parameterisation (v = sqrt(ab) eps - sqrt(1-ab) x0).
Pair x0_coefficients(double ab, const std::string& par) {
  if (par == "eps") return {std::sqrt(1.0 / ab), -std::sqrt(1.0 / ab - 1.0)};
  if (par == "v") return {std::sqrt(ab), -std::sqrt(1.0 - ab)};
  return {0.0, 1.0};
}

// beta-tilde of the respaced process, Eq. (7).
double posterior_variance(double ab, double ab_prev) { return (1.0 - ab / ab_prev) * (1.0 - ab_prev) / (1.0 - ab); }

// Coefficients of x0 and x_t in the posterior mean mu-tilde, Eq. (7).
Pair posterior_mean(double ab, double ab_prev) {
  const double beta = 1.0 - ab / ab_prev, alpha = 1.0 - beta;
  return {beta * std::sqrt(ab_prev) / (1.0 - ab), (1.0 - ab_prev) * std::sqrt(alpha) / (1.0 - ab)};
}

// sigma(eta) of DDIM, Song et al. Eq. (16).
double ddim_sigma(double ab, double ab_prev, double eta) {
  return eta * std::sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev));
}

// DDIM, Song et al. Eq. (12), with eps re-derived from the (clipped) x0: coefficients of x0 and x_t.
Pair ddim_mean(double ab, double ab_prev, double sigma) {
  const double d = std::sqrt(std::max(1.0 - ab_prev - sigma * sigma, 0.0));
  return {std::sqrt(ab_prev) - d * std::sqrt(ab) / std::sqrt(1.0 - ab), d / std::sqrt(1.0 - ab)};
}

// lambda = log(alpha / sigma) = log(ab / (1 - ab)) / 2, DPM-Solver's time variable: +inf at ab = 1.
double log_snr(double ab) { return 0.5 * (std::log(ab) - std::log1p(-ab)); }

// DPM-Solver keeps the timesteps with lambda >= this; the logsnr spacing spans lambda down to it at most
// (export/onnx_sampler.py's LAMBDA_MIN).
constexpr double kLambdaMin = -5.1;

struct Row {
  double mean_xt, mean_x0, mean_x0_prev, sigma;
};

// DPM-Solver++(2M) (Lu et al. 2022) from ab to ab_to with r = h_prev / h (inf: first order) on
// D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev. ODE: x_to = (sigma_to / sigma) x_t - alpha_to (e^-h - 1) D;
// SDE: x_to = (sigma_to / sigma) e^-h x_t + alpha_to (1 - e^-2h) D + sigma_to sqrt(1 - e^-2h) z.
Row dpmpp_2m(double ab, double ab_to, double r, bool sde) {
  const double alpha_to = std::sqrt(ab_to), sigma_to = std::sqrt(1.0 - ab_to), sigma = std::sqrt(1.0 - ab);
  const double h = log_snr(ab_to) - log_snr(ab);
  const double weight = sde ? -std::expm1(-2.0 * h) : -std::expm1(-h);
  const double half_r = std::isinf(r) ? 0.0 : 0.5 / r;
  return {sigma_to / sigma * (sde ? std::exp(-h) : 1.0), alpha_to * weight * (1.0 + half_r),
          -alpha_to * weight * half_r, sde ? sigma_to * std::sqrt(weight) : 0.0};
}

// A Langevin corrector row at ab (Song et al. 2021): x' = x + e score + sqrt(2e) z, score = -(x - sqrt(ab) x0)
// / (1 - ab), e = 2 (snr sqrt(1 - ab))^2: coefficients of x_t and x0, and the noise's standard deviation.
Row langevin(double ab, double snr) {
  return {1.0 - 2.0 * (snr * snr), 2.0 * (snr * snr) * std::sqrt(ab), 0.0, 2.0 * snr * std::sqrt(1.0 - ab)};
}

// One row on b images in float32, the coefficients cast to float32: x0 = clip(x0_x x + x0_o out[:C]);
// x = mean_x0 x0 + mean_xt x, then + w_j x0_j for the earlier x0s (the latest first), in that order; x0 is
// kept in x0_out when the plan has memory. Branch-free so that it vectorises (clipping to +-inf leaves x0).
void step_mean(const Plan& p, const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out,
               float* x0_out, const std::vector<const float*>& earlier) {
  const float ax = float(s.x0_x), ao = float(s.x0_o), m0 = float(s.mean_x0), mt = float(s.mean_xt);
  const float lo = p.clip ? -1.0f : -INFINITY, hi = p.clip ? 1.0f : INFINITY;
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float* oi = out + i * out_chw;
    if (earlier.empty()) {
      for (int64_t j = 0; j < chw; ++j) xi[j] = m0 * std::min(std::max(ax * xi[j] + ao * oi[j], lo), hi) + mt * xi[j];
      continue;
    }
    for (int64_t j = 0; j < chw; ++j) x0_out[i * chw + j] = std::min(std::max(ax * xi[j] + ao * oi[j], lo), hi);
    for (int64_t j = 0; j < chw; ++j) xi[j] = m0 * x0_out[i * chw + j] + mt * xi[j];
    for (size_t m = 0; m < earlier.size(); ++m) {
      const float w = float(s.mean_x0_prev[m]), *e = earlier[m] + i * chw;
      for (int64_t j = 0; j < chw; ++j) xi[j] = xi[j] + w * e[j];
    }
  }
}

// x += s z, with s = sigma, or on learned rows s = exp(0.5 (frac log_var_max + (1 - frac) log_var_min)),
// frac = (v + 1) / 2 and v the second C output channels (Nichol & Dhariwal Eq. 15).
void step_noise(const Step& s, int64_t b, int64_t chw, int64_t out_chw, float* x, const float* out, const float* z) {
  const float sigma = float(s.sigma), lmin = float(s.log_var_min), lmax = float(s.log_var_max);
  for (int64_t i = 0; i < b; ++i) {
    float* xi = x + i * chw;
    const float *vi = out + i * out_chw + chw, *zi = z + i * chw;
    if (!s.learned) {
      for (int64_t j = 0; j < chw; ++j) xi[j] = xi[j] + sigma * zi[j];
    } else {
      for (int64_t j = 0; j < chw; ++j) {
        const float frac = (vi[j] + 1.0f) / 2.0f;
        xi[j] = xi[j] + std::exp(0.5f * (frac * lmax + (1.0f - frac) * lmin)) * zi[j];
      }
    }
  }
}

// Classifier-free guidance of a [2B] output (the conditional half, then the unconditional one) into `into` [B]:
// o_u + s (o_c - o_u) on the prediction channels, the conditional half's variance channels.
const float* guide(const float* out, int64_t b, int64_t chw, int64_t out_chw, float s, float* into) {
  for (int64_t i = 0; i < b; ++i) {
    const float *c = out + i * out_chw, *u = out + (b + i) * out_chw;
    float* o = into + i * out_chw;
    for (int64_t j = 0; j < chw; ++j) o[j] = u[j] + s * (c[j] - u[j]);
    std::copy(c + chw, c + out_chw, o + chw);
  }
  return into;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- the update of one step as an ONNX graph, so that it runs on the provider's device -------------------
// Protobuf by hand (varints and length-delimited fields) keeps the build free of onnx/protobuf.
std::string varint(uint64_t n) {
  std::string s;
  for (; n > 0x7f; n >>= 7) s += char((n & 0x7f) | 0x80);
  return s + char(n);
}
std::string field(int number, uint64_t value) { return varint(uint64_t(number) << 3) + varint(value); }
std::string field(int number, const std::string& bytes) {
  return varint(uint64_t(number) << 3 | 2) + varint(bytes.size()) + bytes;
}

// ValueInfoProto of a float tensor with symbolic dims.
std::string float_tensor(const std::string& name, std::initializer_list<const char*> dims) {
  std::string shape;
  for (const char* d : dims) shape += field(1, field(2, d));
  return field(1, name) + field(2, field(1, field(1, 1) + field(2, shape)));
}

// NodeProto from "Op in... -> out...": Split of a network output splits channels (axis 1), Halve the batch
// (a Split on axis 0) and Concat joins along the batch.
std::string node(const std::string& statement) {
  std::stringstream words(statement);
  std::string op, word, inputs, outputs;
  words >> op;
  for (bool out = false; words >> word;)
    if (word == "->") out = true;
    else (out ? outputs : inputs) += field(out ? 2 : 1, word);
  const int axis = op == "Halve" || op == "Concat" ? 0 : op == "Split" && inputs != field(1, "c") ? 1 : -1;
  if (op == "Halve") op = "Split";
  return inputs + outputs + field(4, op) + (axis >= 0 ? field(5, field(1, "axis") + field(3, axis) + field(20, 2)) : "");
}

// x_next = mean_x0 x0 + mean_xt x + w_1 x0_1 + ... + w_M x0_M + s z with x0 = clip(x0_x x + x0_o o), s = sigma
// or, when learned, Nichol & Dhariwal's Eq. (15) from the variance channels v; the float32 operations of
// step_mean and step_noise, in order. c = [x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, log_var_max, lo,
// hi, 1, 0.5, w_1..w_M]; z = 0 when no noise is added; with M > 0 the graph also outputs x0. Opset 17, the
// same graph as export/onnx_sampler.py builds.
std::string step_graph(bool learned, bool split_output, int64_t memory, bool guided) {
  std::string text = "Split c -> x0_x x0_o mean_x0 mean_xt sigma log_var_min log_var_max lo hi one half";
  for (int64_t j = 1; j <= memory; ++j) text += " w" + std::to_string(j);
  if (guided)  // out is [2B]: the conditional, then the unconditional half; o = o_u + scale (o_c - o_u)
    text += std::string("; Halve out -> cond uncond;") +
            (split_output ? "Split cond -> oc v; Split uncond -> ou vu;" : "Identity cond -> oc; Identity uncond -> ou;") +
            "Sub oc ou -> gd; Mul scale gd -> gsd; Add ou gsd -> o;";
  else
    text += split_output ? "; Split out -> o v;" : "; Identity out -> o;";
  text += "Mul x0_x x -> a; Mul x0_o o -> b; Add a b -> x0u; Max x0u lo -> x0l; Min x0l hi -> x0;"
          "Mul mean_x0 x0 -> m1; Mul mean_xt x -> m2; Add m1 m2 -> mean0;";
  for (int64_t j = 1; j <= memory; ++j) {
    const std::string n = std::to_string(j);
    text += "Mul w" + n + " x0_" + n + " -> q" + n + "; Add mean" + std::to_string(j - 1) + " q" + n + " -> mean" + n + ";";
  }
  text += learned ? "Add v one -> f1; Mul f1 half -> frac; Mul frac log_var_max -> p1; Sub one frac -> q;"
                    "Mul q log_var_min -> p2; Add p1 p2 -> p; Mul half p -> ph; Exp ph -> s;"
                  : "Identity sigma -> s;";
  text += "Mul s z -> n; Add mean" + std::to_string(memory) + " n -> x_next";
  if (guided) text += "; Concat x_next x_next -> x_pair";
  std::string graph;
  std::stringstream statements(text);
  for (std::string statement; std::getline(statements, statement, ';');) graph += field(1, node(statement));
  graph += field(2, "ddpm_step") + field(11, float_tensor("x", {"B", "C", "H", "W"})) +
           field(11, float_tensor("out", {guided ? "B2" : "B", "C_out", "H", "W"})) +
           field(11, float_tensor("z", {"B", "C", "H", "W"})) + field(11, float_tensor("c", {"K"}));
  for (int64_t j = 1; j <= memory; ++j) graph += field(11, float_tensor("x0_" + std::to_string(j), {"B", "C", "H", "W"}));
  if (guided) graph += field(11, float_tensor("scale", {"1"}));
  graph += field(12, float_tensor("x_next", {"B", "C", "H", "W"}));
  if (memory) graph += field(12, float_tensor("x0", {"B", "C", "H", "W"}));
  if (guided) graph += field(12, float_tensor("x_pair", {"B2", "C", "H", "W"}));
  return field(1, 8) + field(8, field(1, "") + field(2, 17)) + field(7, graph);
}

// The step's noise, drawn on a second thread while the network runs when a core is free for it and drawing
// costs more than starting a thread; the stream and its order stay those of the contract.
std::future<void> draw_noise(RandomState& rng, float* z, int64_t count, bool spare_core) {
  const auto policy = spare_core && count >= (1 << 14) ? std::launch::async : std::launch::deferred;
  return std::async(policy, [&rng, z, count] { rng.fill_normal(z, count); });
}

bool init_ort_api() {
  const OrtApi* api = OrtGetApiBase()->GetApi(ORT_API_VERSION);
  need(api != nullptr, "the ONNX Runtime library " + std::string(OrtGetApiBase()->GetVersionString()) +
                           " is older than the headers it was built with (API " + std::to_string(ORT_API_VERSION) + ")");
  Ort::InitApi(api);
  return true;
}

}  // namespace

int64_t parse_int(const std::string& s, const std::string& what) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(s.c_str(), &end, 10);
  need(!s.empty() && *end == '\0' && errno == 0, what + ": not an integer: '" + s + "'");
  return v;
}

double parse_double(const std::string& s, const std::string& what) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  need(!s.empty() && *end == '\0' && std::isfinite(v), what + ": not a number: '" + s + "'");
  return v;
}

std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, const std::string& spacing, const std::vector<double>& abar) {
  need(one_of(spacing, {"uniform", "linspace", "trailing", "quadratic", "logsnr"}),
       "unknown spacing '" + spacing + "' (uniform, linspace, trailing, quadratic or logsnr)");
  need(S >= 1 && S <= T, "steps must be in 1.." + std::to_string(T) + ", got " + std::to_string(S));
  std::vector<int64_t> ts(S);
  std::iota(ts.begin(), ts.end(), 0);
  if (S == T) return ts;
  // numpy's linspace (start + i * step, the last value exactly `stop`) and round (half to even: nearbyint).
  auto linspace = [S](double start, double stop, int64_t i) {
    return S == 1 ? start : i == S - 1 ? stop : double(i) * ((stop - start) / double(S - 1)) + start;
  };
  std::vector<double> lam;
  if (spacing == "logsnr")
    for (int64_t t = 0; t < T; ++t) lam.push_back(log_snr(abar[t]));
  for (int64_t i = 0; i < S; ++i) {
    if (spacing == "uniform") {
      ts[i] = i * (T / S);
    } else if (spacing == "linspace") {
      ts[i] = int64_t(std::nearbyint(linspace(0.0, double(T - 1), i)));
    } else if (spacing == "trailing") {  // round(T - j T/S) - 1 with j = S-1-i: already ascending
      ts[i] = int64_t(std::nearbyint(double(T) - double(S - 1 - i) * (double(T) / double(S)))) - 1;
    } else if (spacing == "quadratic") {
      const double r = linspace(0.0, std::sqrt(0.8 * double(T)), i);
      ts[i] = int64_t(r * r);
    } else {  // the timestep whose lambda is nearest to linspace(lambda_0, max(lambda_{T-1}, kLambdaMin), S)[i],
              // the first on a tie
      const double v = linspace(lam[0], std::max(lam[T - 1], kLambdaMin), i);
      int64_t best = 0;
      for (int64_t t = 1; t < T; ++t)
        if (std::abs(lam[t] - v) < std::abs(lam[best] - v)) best = t;
      ts[i] = i ? std::max(best, ts[i - 1] + 1) : best;  // one above the previous where they would coincide
    }
  }
  for (int64_t i = 0; i < S; ++i)
    need(ts[i] >= 0 && ts[i] <= T - 1 && (i == 0 || ts[i] > ts[i - 1]),
         "spacing " + spacing + " cannot give " + std::to_string(S) + " distinct steps for T=" + std::to_string(T));
  return ts;
}

Plan make_plan(const ModelInfo& info, const PlanOptions& opt) {
  need(one_of(opt.sampler, {"ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde"}),
       "unknown sampler '" + opt.sampler + "' (ancestral, ddim, dpmpp2m or dpmpp2m-sde)");
  need(opt.eta >= 0.0 && opt.eta <= 1.0, "eta must be in [0, 1]");
  need(opt.eta == 0.0 || opt.sampler == "ddim", "eta applies to the ddim sampler only");
  need(opt.corrector_steps >= 0 && opt.snr > 0, "corrector steps must be >= 0 and snr > 0");
  const bool ddim = opt.sampler == "ddim", dpmpp = opt.sampler.rfind("dpmpp", 0) == 0;
  need(!(dpmpp && opt.corrector_steps), "the Langevin corrector runs with the one-step samplers (ancestral, ddim): a "
       "corrector row would replace the x0 that DPM-Solver++(2M) keeps from its previous step");
  std::vector<double> abar(info.betas.size());
  for (size_t i = 0; i < abar.size(); ++i) abar[i] = (i ? abar[i - 1] : 1.0) * (1.0 - info.betas[i]);
  const int64_t T = dpmpp ? std::count_if(abar.begin(), abar.end(), [](double ab) { return log_snr(ab) >= kLambdaMin; })
                          : int64_t(abar.size());
  const int64_t S = opt.steps ? opt.steps : (opt.sampler == "ancestral" ? T : std::min<int64_t>(50, T));
  const std::vector<int64_t> ts = kept_timesteps(T, S, opt.spacing, abar);
  const auto ab_prev = [&](int64_t k) { return k ? abar[ts[k - 1]] : 1.0; };
  std::vector<double> h(S), r(S, INFINITY);  // DPM-Solver: h and r = h_prev / h in sampling order
  for (int64_t k = 0; k < S; ++k) {
    const double lam = log_snr(abar[ts[S - 1 - k]]), lam_to = k + 1 < S ? log_snr(abar[ts[S - 2 - k]]) : INFINITY;
    need(!dpmpp || k + 1 == S || lam_to > lam, "the kept timesteps' lambdas are not strictly decreasing (" +
         opt.spacing + ", " + std::to_string(S) + " steps): DPM-Solver's step h would be 0; use fewer steps or another spacing");
    h[k] = lam_to - lam;
    if (k >= 1 && k + 1 < S) r[k] = h[k - 1] / h[k];
  }
  Plan p;
  p.clip = opt.clip < 0 ? info.clip_denoised : opt.clip != 0;
  p.channels = info.C;
  p.memory = dpmpp ? 1 : 0;
  for (int64_t i = S - 1; i >= 0; --i) {  // kept timestep i, sampling row S-1-i
    const double ab = abar[ts[i]], ap = ab_prev(i), beta = 1.0 - ab / ap;
    const Pair x0 = x0_coefficients(ab, info.parameterization);
    // beta-tilde at i = 0 is 0: its log is clipped to the value at i = 1, as in the original implementation.
    const double log_var_min = i ? std::log(posterior_variance(ab, ap))
                               : S > 1 ? std::log(posterior_variance(abar[ts[1]], ab_prev(1))) : std::log(beta);
    Step step{ts[i], x0.a, x0.b, 0, 0, 0, log_var_min, std::log(beta), i > 0 && (!ddim || opt.eta > 0.0),
              info.variance == "learned_range" && opt.sampler == "ancestral", {}};
    if (dpmpp) {
      const Row row = dpmpp_2m(ab, ap, r[S - 1 - i], opt.sampler == "dpmpp2m-sde");
      step.mean_xt = row.mean_xt, step.mean_x0 = row.mean_x0, step.sigma = row.sigma;
      step.mean_x0_prev = {row.mean_x0_prev};
      step.add_noise = step.add_noise && opt.sampler == "dpmpp2m-sde";
    } else {
      step.sigma = ddim ? ddim_sigma(ab, ap, opt.eta)
                        : std::sqrt(info.variance == "fixed_large" ? beta : posterior_variance(ab, ap));
      const Pair mean = ddim ? ddim_mean(ab, ap, step.sigma) : posterior_mean(ab, ap);
      step.mean_x0 = mean.a, step.mean_xt = mean.b;
    }
    for (int64_t j = 0; j < (i < S - 1 ? opt.corrector_steps : 0); ++j) {  // Langevin rows at t_i before its predictor
      const Row c = langevin(ab, opt.snr);
      const double log_var = 2.0 * std::log(c.sigma);
      p.steps.push_back({ts[i], x0.a, x0.b, c.mean_x0, c.mean_xt, c.sigma, log_var, log_var, true, false, {}});
    }
    p.steps.push_back(step);
  }
  return p;
}

Plan make_inversion_plan(const ModelInfo& info, int64_t steps, const std::string& spacing) {
  std::vector<double> abar(info.betas.size());
  for (size_t i = 0; i < abar.size(); ++i) abar[i] = (i ? abar[i - 1] : 1.0) * (1.0 - info.betas[i]);
  const int64_t T = abar.size(), S = steps ? steps : std::min<int64_t>(50, T);
  const std::vector<int64_t> ts = kept_timesteps(T, S, spacing, abar);
  Plan p;
  p.clip = false;
  p.channels = info.C;
  for (int64_t k = 0; k + 1 < S; ++k) {
    const Pair x0 = x0_coefficients(abar[ts[k]], info.parameterization);
    const Pair mean = ddim_mean(abar[ts[k]], abar[ts[k + 1]], 0.0);
    p.steps.push_back({ts[k], x0.a, x0.b, mean.a, mean.b, 0.0, 0.0, 0.0, false, false, {}});
  }
  return p;
}

Sampler::Sampler(const std::string& model_path, const std::string& provider, int threads, bool step_graph)
    : api_ready_(init_ort_api()), env_(ORT_LOGGING_LEVEL_FATAL, "ddpm_runner") {
  std::error_code ec;
  need(std::filesystem::is_regular_file(model_path, ec), "model file not found: " + model_path);
  need(provider == "cpu" || provider == "cuda", "unknown provider '" + provider + "' (cpu or cuda)");
  if (threads > 0) options_.SetIntraOpNumThreads(threads);
  cuda_ = provider == "cuda";
  step_graph_ = step_graph || cuda_;
  // ONNX Runtime's CPU default is a thread per core, so only a GPU run or a capped thread count leaves one.
  spare_core_ = cuda_ || (threads > 0 && unsigned(threads) < std::thread::hardware_concurrency());
  provider_name_ = cuda_ ? "CUDAExecutionProvider" : "CPUExecutionProvider";
  if (cuda_) {
    const auto available = Ort::GetAvailableProviders();
    need(std::count(available.begin(), available.end(), provider_name_) == 1,
         "--provider cuda: this ONNX Runtime build has no CUDA execution provider");
    try {
      options_.AppendExecutionProvider_CUDA(OrtCUDAProviderOptions{});
    } catch (const Ort::Exception& e) {
      throw UsageError("--provider cuda: CUDA execution provider unavailable (it needs an NVIDIA GPU and the CUDA 12 "
                       "and cuDNN 9 libraries on the library path): " + one_line(e.what()));
    }
  }
  try {
    session_ = Ort::Session(env_, model_path.c_str(), options_);
  } catch (const Ort::Exception& e) {
    throw UsageError("cannot load " + model_path + " with " + provider_name_ + ": " + one_line(e.what()));
  }
  info_ = read_metadata(session_, model_path);
  Ort::AllocatorWithDefaultOptions alloc;
  std::vector<std::string> inputs;
  for (size_t i = 0; i < session_.GetInputCount(); ++i) inputs.push_back(session_.GetInputNameAllocated(i, alloc).get());
  std::sort(inputs.begin(), inputs.end());
  need(inputs == (info_.num_classes ? std::vector<std::string>{"t", "x", "y"} : std::vector<std::string>{"t", "x"}),
       model_path + (info_.num_classes ? ": the inputs must be x, t and y (an exported class-conditional eps_theta)"
                                       : ": the inputs must be x and t (an exported eps_theta)"));
  out_name_ = session_.GetOutputNameAllocated(0, alloc).get();
  device_allocator_ = alloc;
  if (cuda_) {
    cuda_allocator_ = std::make_unique<Ort::Allocator>(session_, Ort::MemoryInfo("Cuda", OrtArenaAllocator, 0, OrtMemTypeDefault));
    device_allocator_ = *cuda_allocator_;
  }
}

Sampler::Labels Sampler::batch_labels(const Conditioning& cond, int64_t first, int64_t b) const {
  Labels l;
  if (!info_.num_classes) {  // no y input: zeros of the batch size keep the tensor that is never bound valid
    l.y.assign(b, 0);
    return l;
  }
  const int64_t null = info_.num_classes;
  l.guided = !cond.labels.empty() && cond.guidance != 0.0 && cond.guidance != 1.0;
  l.scale = float(cond.guidance);
  for (int64_t i = 0; i < b; ++i)
    l.y.push_back(cond.labels.empty() || cond.guidance == 0.0 ? null : cond.labels[first + i]);
  if (l.guided) l.y.resize(2 * b, null);
  return l;
}

std::vector<float> Sampler::sample(const Plan& p, int64_t n, int64_t batch, uint32_t seed, RunStats* stats,
                                   const Progress& progress, const float* x_init, const Conditioning& cond) {
  need(n >= 1 && batch >= 1, "n and batch must be at least 1");
  need(info_.num_classes || cond.labels.empty(), "this model is unconditional: it takes no labels (--class)");
  need(!cond.labels.empty() || cond.guidance == 1.0, "a guidance scale needs labels (--class or --classes)");
  need(cond.labels.empty() || int64_t(cond.labels.size()) == n, "one label per image is needed");
  for (int64_t y : cond.labels)
    need(y >= 0 && y < info_.num_classes, "label " + std::to_string(y) + " is out of range: the model has classes 0.." +
         std::to_string(info_.num_classes - 1));
  batch = std::min(batch, n);
  std::vector<float> result(n * info_.C * info_.H * info_.W);
  if (x_init) std::copy(x_init, x_init + result.size(), result.begin());
  RandomState rng(seed);
  StepSessions steps;  // the update graphs of the plan's rows (plain and learned), built once per call
  const bool guided = batch_labels(cond, 0, 1).guided;
  if (step_graph_)
    for (const Step& s : p.steps)
      if (!steps[s.learned]) {
        const std::string graph = step_graph(s.learned, info_.out_channels() != info_.C, p.memory, guided);
        steps[s.learned] = std::make_unique<Ort::Session>(env_, graph.data(), graph.size(), options_);
      }
  const int64_t n_batches = (n + batch - 1) / batch;
  double network_s = 0.0;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t bi = 0; bi < n_batches; ++bi) {
    const int64_t b = std::min(batch, n - bi * batch);
    float* x = result.data() + bi * batch * info_.C * info_.H * info_.W;
    const auto tick = [&](int64_t k) {
      if (progress) progress(bi, n_batches, k, p.steps.size());
    };
    Labels labels = batch_labels(cond, bi * batch, b);
    network_s += step_graph_ ? run_batch_on_provider(p, steps, b, x, !x_init, rng, tick, labels)
                             : run_batch_on_host(p, b, x, !x_init, rng, tick, labels);
  }
  if (stats) *stats = RunStats{seconds_since(t0), network_s};
  return result;
}

// x stays in the result on the host; the network writes into a host buffer and the update is one fused loop.
// The last M x0 predictions are a ring of M + 1 buffers (zeros before the first row).
double Sampler::run_batch_on_host(const Plan& p, int64_t b, float* x, bool draw_x_T, RandomState& rng,
                                  const Tick& tick, Labels& labels) {
  const int64_t C = info_.C, Co = info_.out_channels(), chw = C * info_.H * info_.W, out_chw = Co * info_.H * info_.W;
  const int64_t nb = labels.guided ? 2 * b : b;  // the network's batch
  const int64_t x_shape[4] = {nb, C, info_.H, info_.W}, out_shape[4] = {nb, Co, info_.H, info_.W};
  std::vector<float> out(nb * out_chw), z(b * chw), pair(labels.guided ? nb * chw : 0), guided_out(labels.guided ? b * out_chw : 0);
  std::vector<std::vector<float>> x0s(p.memory ? p.memory + 1 : 0, std::vector<float>(b * chw, 0.0f));
  std::vector<int64_t> t(nb);
  const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  const Ort::Value inputs[3] = {Ort::Value::CreateTensor<float>(mem, labels.guided ? pair.data() : x, nb * chw, x_shape, 4),
                                Ort::Value::CreateTensor<int64_t>(mem, t.data(), nb, &nb, 1),
                                Ort::Value::CreateTensor<int64_t>(mem, labels.y.data(), labels.y.size(), &nb, 1)};
  Ort::Value output = Ort::Value::CreateTensor<float>(mem, out.data(), nb * out_chw, out_shape, 4);
  const char* input_names[3] = {"x", "t", "y"};
  const size_t n_inputs = info_.num_classes ? 3 : 2;
  const char* output_name = out_name_.c_str();
  double network_s = 0.0;
  if (draw_x_T) rng.fill_normal(x, b * chw);
  const int64_t ring = p.memory + 1;
  std::vector<const float*> earlier(p.memory);
  for (size_t k = 0; k < p.steps.size(); ++k) {
    const Step& s = p.steps[k];
    std::fill(t.begin(), t.end(), s.t);
    std::future<void> drawn = s.add_noise ? draw_noise(rng, z.data(), b * chw, spare_core_) : std::future<void>();
    if (labels.guided) {  // [x; x]
      std::copy(x, x + b * chw, pair.begin());
      std::copy(x, x + b * chw, pair.begin() + b * chw);
    }
    const auto r0 = std::chrono::steady_clock::now();
    session_.Run(Ort::RunOptions{nullptr}, input_names, inputs, n_inputs, &output_name, &output, 1);
    network_s += seconds_since(r0);
    const float* o = labels.guided ? guide(out.data(), b, chw, out_chw, labels.scale, guided_out.data()) : out.data();
    for (int64_t j = 1; j <= p.memory; ++j) earlier[j - 1] = x0s[(int64_t(k) - j + ring * j) % ring].data();
    step_mean(p, s, b, chw, out_chw, x, o, p.memory ? x0s[k % ring].data() : nullptr, earlier);
    if (drawn.valid()) {
      drawn.get();
      step_noise(s, b, chw, out_chw, x, o, z.data());
    }
    tick(k + 1);
  }
  return network_s;
}

// x, the network output, the earlier x0s and the update stay on the provider's device (IO binding; the update
// is the ONNX graph of step_graph): per row only t, the coefficients and z (when drawn) go to the device, and x
// comes back once, after the last row. On the CPU the same path runs with host memory (tested with --step-graph).
double Sampler::run_batch_on_provider(const Plan& p, StepSessions& steps, int64_t b, float* x_out, bool draw_x_T,
                                      RandomState& rng, const Tick& tick, Labels& labels) {
  const int64_t n_c = 11 + p.memory, chw = info_.C * info_.H * info_.W, ring = p.memory + 1;
  const int64_t nb = labels.guided ? 2 * b : b;  // the network's batch
  const int64_t x_shape[4] = {b, info_.C, info_.H, info_.W}, out_shape[4] = {nb, info_.out_channels(), info_.H, info_.W};
  const int64_t pair_shape[4] = {nb, info_.C, info_.H, info_.W}, one = 1;
  const auto mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  std::vector<float> x_T(nb * chw), z(b * chw), zeros(b * chw, 0.0f), c(n_c);
  std::vector<int64_t> t(nb);
  float scale = labels.scale;
  const auto host = [&](float* data, int64_t count, const int64_t* shape, size_t rank) {
    return Ort::Value::CreateTensor<float>(mem, data, count, shape, rank);
  };
  const Ort::Value xT_v = host(x_T.data(), b * chw, x_shape, 4), z_v = host(z.data(), b * chw, x_shape, 4);
  const Ort::Value zeros_v = host(zeros.data(), b * chw, x_shape, 4), c_v = host(c.data(), n_c, &n_c, 1);
  const Ort::Value t_v = Ort::Value::CreateTensor<int64_t>(mem, t.data(), nb, &nb, 1);
  const Ort::Value y_v = Ort::Value::CreateTensor<int64_t>(mem, labels.y.data(), labels.y.size(), &nb, 1);
  const Ort::Value xpair_v = host(x_T.data(), nb * chw, pair_shape, 4), scale_v = host(&scale, 1, &one, 1);
  std::vector<Ort::Value> device_pair;  // guided: the network's next [x; x], written by the update
  for (int j = 0; j < (labels.guided ? 2 : 0); ++j)
    device_pair.push_back(Ort::Value::CreateTensor<float>(device_allocator_, pair_shape, 4));
  Ort::Value result_v = host(x_out, b * chw, x_shape, 4);
  Ort::Value device_x[2] = {Ort::Value::CreateTensor<float>(device_allocator_, x_shape, 4),
                            Ort::Value::CreateTensor<float>(device_allocator_, x_shape, 4)};
  std::vector<Ort::Value> x0s;  // the ring of earlier x0s on the device; rows before the first read zeros_v
  for (int64_t j = 0; j < (p.memory ? ring : 0); ++j) x0s.push_back(Ort::Value::CreateTensor<float>(device_allocator_, x_shape, 4));
  const Ort::Value out = Ort::Value::CreateTensor<float>(device_allocator_, out_shape, 4);
  Ort::IoBinding net(session_);
  std::unique_ptr<Ort::IoBinding> updates[2];
  for (int learned = 0; learned < 2; ++learned)
    if (steps[learned]) {
      updates[learned] = std::make_unique<Ort::IoBinding>(*steps[learned]);
      updates[learned]->BindInput("out", out);
      if (labels.guided) updates[learned]->BindInput("scale", scale_v);
    }
  net.BindOutput(out_name_.c_str(), out);
  if (info_.num_classes) net.BindInput("y", y_v);
  if (draw_x_T) rng.fill_normal(x_T.data(), b * chw);
  else std::copy(x_out, x_out + b * chw, x_T.begin());
  if (labels.guided) std::copy(x_T.begin(), x_T.begin() + b * chw, x_T.begin() + b * chw);  // [x_T; x_T]
  const Ort::Value* x = &xT_v;
  const Ort::Value* pair = &xpair_v;
  const Ort::Value* z_bound[2] = {nullptr, nullptr};  // zeros are bound once; z after every draw
  double network_s = 0.0;
  const size_t S = p.steps.size();
  for (size_t k = 0; k < S; ++k) {
    const Step& s = p.steps[k];
    std::fill(t.begin(), t.end(), s.t);
    std::future<void> drawn = s.add_noise ? draw_noise(rng, z.data(), b * chw, spare_core_) : std::future<void>();
    const auto r0 = std::chrono::steady_clock::now();
    net.BindInput("x", labels.guided ? *pair : *x);  // binding copies host tensors to the device: bind after every change
    net.BindInput("t", t_v);
    net.SynchronizeInputs();
    session_.Run(Ort::RunOptions{nullptr}, net);
    network_s += seconds_since(r0);
    const float lim = p.clip ? 1.0f : INFINITY;
    const float row[11] = {float(s.x0_x), float(s.x0_o), float(s.mean_x0), float(s.mean_xt), float(s.sigma),
                           float(s.log_var_min), float(s.log_var_max), -lim, lim, 1.0f, 0.5f};
    std::copy(row, row + 11, c.begin());  // c_v views c: write in place
    for (int64_t j = 0; j < p.memory; ++j) c[11 + j] = float(s.mean_x0_prev[j]);
    if (drawn.valid()) drawn.get();
    Ort::IoBinding& update = *updates[s.learned];
    if (s.add_noise || z_bound[s.learned] != &zeros_v) update.BindInput("z", s.add_noise ? z_v : zeros_v);
    z_bound[s.learned] = s.add_noise ? &z_v : &zeros_v;
    for (int64_t j = 1; j <= p.memory; ++j)
      update.BindInput(("x0_" + std::to_string(j)).c_str(), int64_t(k) >= j ? x0s[(int64_t(k) - j) % ring] : zeros_v);
    if (p.memory) update.BindOutput("x0", x0s[k % ring]);
    Ort::Value& next = k + 1 == S ? result_v : device_x[k % 2];
    update.BindInput("x", *x);
    update.BindInput("c", c_v);
    update.BindOutput("x_next", next);
    if (labels.guided) update.BindOutput("x_pair", device_pair[k % 2]);
    update.SynchronizeInputs();
    steps[s.learned]->Run(Ort::RunOptions{nullptr}, update);
    x = &next;
    if (labels.guided) pair = &device_pair[k % 2];
    tick(k + 1);
  }
  for (auto& update : updates)
    if (update) update->SynchronizeOutputs();
  return network_s;
}

}  // namespace ddpm
