// The sampling plan: the C++ port of plan.py, held equal to it by tests/test_cpp_runner.py (plans, rows and
// samples). A sampler is the choice of timesteps (kept_timesteps) and of each row's coefficients.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "internal.h"

namespace ddpm {

using namespace internal;

namespace {

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
  double mean_xt, mean_x0, sigma;
  std::vector<double> prev;  // the weights of the earlier x0s, the latest first
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
          sde ? sigma_to * std::sqrt(weight) : 0.0, {-alpha_to * weight * half_r}};
}

// DPM-Solver++(3M) (diffusers' multistep_dpm_solver_third_order_update) from ab to ab_to, r0 = h_0 / h, r1 = h_1 / h:
// D1_0 = (x0 - x0_1) / r0, D1_1 = (x0_1 - x0_2) / r1, D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1),
// D2 = (D1_0 - D1_1) / (r0 + r1);
// x_to = (sigma_to / sigma) x_t - alpha_to phi_1 x0 + alpha_to phi_2 D1 - alpha_to phi_3 D2.
Row dpmpp_3m(double ab, double ab_to, double r0, double r1) {
  const double alpha_to = std::sqrt(ab_to), sigma_to = std::sqrt(1.0 - ab_to), sigma = std::sqrt(1.0 - ab);
  const double h = log_snr(ab_to) - log_snr(ab);
  const double phi_1 = std::expm1(-h), phi_2 = phi_1 / h + 1.0, phi_3 = phi_2 / h - 0.5;
  const double d1_0 = alpha_to * (phi_2 * (1.0 + r0 / (r0 + r1)) - phi_3 / (r0 + r1));  // the weights of D1_0, D1_1
  const double d1_1 = alpha_to * (phi_3 / (r0 + r1) - phi_2 * r0 / (r0 + r1));
  return {sigma_to / sigma, d1_0 / r0 - alpha_to * phi_1, 0.0, {d1_1 / r1 - d1_0 / r0, -d1_1 / r1}};
}

// DPM-Solver++ rows in sampling order over ab (the kept alpha_bar in sampling order), with diffusers' orders: 1, 2,
// then 2 (2M) or 3 (3M); 1 for the last step, to ab = 1; 3M under 15 steps: at most 2 for the one before it.
std::vector<Row> dpmpp_rows(const std::vector<double>& ab, bool sde, bool third) {
  const int64_t S = ab.size();
  std::vector<double> h(S);  // lambda_{k+1} - lambda_k; inf at the end
  for (int64_t k = 0; k < S; ++k) h[k] = (k + 1 < S ? log_snr(ab[k + 1]) : INFINITY) - log_snr(ab[k]);
  std::vector<Row> rows;
  for (int64_t k = 0; k < S; ++k) {
    int64_t order = std::min<int64_t>(k + 1, third ? 3 : 2);
    if (k == S - 2 && S < 15) order = std::min<int64_t>(order, 2);
    if (k == S - 1) order = 1;
    const double ab_to = k + 1 < S ? ab[k + 1] : 1.0;
    if (order == 3) {
      rows.push_back(dpmpp_3m(ab[k], ab_to, h[k - 1] / h[k], h[k - 2] / h[k]));
    } else {
      rows.push_back(dpmpp_2m(ab[k], ab_to, order == 2 ? h[k - 1] / h[k] : INFINITY, sde));
      rows.back().prev.resize(third ? 2 : 1, 0.0);
    }
  }
  return rows;
}

// phi_k(z) = (e^z - sum_{m < k} z^m / m!) / z^k, as its series sum_m z^m / (m + k)! where |z| < 1.
double phi(double z, int k) {
  double factorial = 1.0, sum = 0.0;
  if (std::abs(z) >= 1.0) {
    for (int m = 1; m < k; ++m) sum += std::pow(z, m) / (factorial *= m);
    return (std::expm1(z) - sum) / std::pow(z, k);
  }
  for (int m = 2; m <= k; ++m) factorial *= m;
  double term = 1.0 / factorial;
  for (int m = 1; m < 30; ++m) {
    sum += term;
    term *= z / double(m + k);
  }
  return sum;
}

// The solution x of sum_i a[k][i] x_i = a[k][n], k < n <= 3: Gaussian elimination with partial pivoting.
using System = std::array<std::array<double, 4>, 3>;
std::vector<double> solve(System a, size_t n) {
  for (size_t c = 0; c < n; ++c) {
    size_t pivot = c;
    for (size_t k = c + 1; k < n; ++k)
      if (std::abs(a[k][c]) > std::abs(a[pivot][c])) pivot = k;
    std::swap(a[c], a[pivot]);
    for (size_t k = c + 1; k < n; ++k) {
      const double f = a[k][c] / a[c][c];
      for (size_t i = c; i <= n; ++i) a[k][i] -= f * a[c][i];
    }
  }
  std::vector<double> x(n);
  for (size_t k = n; k-- > 0;) {
    double v = a[k][n];
    for (size_t i = k + 1; i < n; ++i) v -= a[k][i] * x[i];
    x[k] = v / a[k][k];
  }
  return x;
}

// One step of UniPC (bh2, data prediction; export/onnx_sampler.unipc_coefficients) from lambda to lambda + h with
// r_i = (lambda_i - lambda) / h of the earlier x0s: the weights of x0_to (UniC only), x0, x0_1, ..., x0_{p-1} in
// x_to = (sigma_to / sigma) x_t - alpha_to B x0 - alpha_to B sum_i rho_i (x0_i - x0) / r_i, B = e^-h - 1.
std::vector<double> unipc_step(double h, std::vector<double> r, double alpha_to, bool corrector) {
  const double B = std::expm1(-h);
  std::vector<double> weights(r.size() + 2, 0.0);
  weights[1] = -alpha_to * B;
  if (corrector) r.push_back(1.0);
  if (r.empty()) return weights;
  std::vector<double> rho = {0.5};
  if (r.size() > 1) {  // UniP-3 (2 unknowns) or UniC-2, UniC-3
    const size_t n = r.size();
    System system{};
    double factorial = 1.0;
    for (size_t k = 0; k < n; ++k) {
      for (size_t i = 0; i < n; ++i) system[k][i] = std::pow(r[i], double(k));
      system[k][n] = (factorial *= double(k + 1)) * phi(-h, int(k) + 2) / phi(-h, 1);
    }
    rho = solve(system, n);
  }
  for (size_t i = 0; i < r.size(); ++i) {
    const double w = alpha_to * B * rho[i] / r[i];
    weights[corrector && i + 1 == r.size() ? 0 : i + 2] -= w;
    weights[1] += w;
  }
  return weights;
}

// UniPC-3 rows in sampling order over ab (export/onnx_sampler._unipc_rows): step k of order min(3, k + 1, S - k);
// UniC corrects x_k by the difference of its weights and those of the UniP step that gave x_k.
std::vector<Row> unipc_rows(std::vector<double> ab) {
  const int64_t S = ab.size();
  ab.push_back(1.0);
  std::vector<double> lam(S + 1);
  for (int64_t k = 0; k <= S; ++k) lam[k] = log_snr(ab[k]);
  const auto order = [S](int64_t k) { return std::min<int64_t>({3, k + 1, S - k}); };
  const auto step = [&](int64_t j, int64_t p, bool corrector) {
    const double h = lam[j + 1] - lam[j];
    std::vector<double> r;
    for (int64_t i = 1; i < p; ++i) r.push_back((lam[j - i] - lam[j]) / h);
    return unipc_step(h, r, std::sqrt(ab[j + 1]), corrector);
  };
  std::vector<Row> rows;
  for (int64_t k = 0; k < S; ++k) {
    const double ratio = std::sqrt(1.0 - ab[k + 1]) / std::sqrt(1.0 - ab[k]);
    std::vector<double> weights(4, 0.0), p = step(k, order(k), false);  // of x0_k, x0_{k-1}, x0_{k-2}, x0_{k-3}
    std::copy(p.begin() + 1, p.end(), weights.begin());
    if (k) {
      std::vector<double> correction = step(k - 1, order(k - 1), true);
      const std::vector<double> predictor = step(k - 1, order(k - 1), false);
      for (size_t i = 1; i < correction.size(); ++i) correction[i] -= predictor[i];
      for (size_t i = 0; i < correction.size(); ++i) weights[i] += ratio * correction[i];
    }
    rows.push_back({ratio, weights[0], 0.0, {weights[1], weights[2], weights[3]}});
  }
  return rows;
}

// A Langevin corrector row at ab (Song et al. 2021): x' = x + e score + sqrt(2e) z, score = -(x - sqrt(ab) x0)
// / (1 - ab), e = 2 (snr sqrt(1 - ab))^2: coefficients of x_t and x0, and the noise's standard deviation.
Row langevin(double ab, double snr) {
  return {1.0 - 2.0 * (snr * snr), 2.0 * (snr * snr) * std::sqrt(ab), 2.0 * snr * std::sqrt(1.0 - ab), {}};
}

}  // namespace

std::vector<int64_t> kept_timesteps(int64_t T, int64_t S, Spacing spacing, const std::vector<double>& abar) {
  const std::string name = to_string(spacing);
  need(S >= 1 && S <= T, "steps must be in 1.." + std::to_string(T) + ", got " + std::to_string(S));
  need(spacing != Spacing::LogSnr || int64_t(abar.size()) >= T, "the logsnr spacing needs alpha_bar for all T timesteps");
  std::vector<int64_t> ts(S);
  std::iota(ts.begin(), ts.end(), 0);
  if (S == T) return ts;
  // numpy's linspace (start + i * step, the last value exactly `stop`) and round (half to even: nearbyint).
  auto linspace = [S](double start, double stop, int64_t i) {
    return S == 1 ? start : i == S - 1 ? stop : double(i) * ((stop - start) / double(S - 1)) + start;
  };
  std::vector<double> lam;
  if (spacing == Spacing::LogSnr)
    for (int64_t t = 0; t < T; ++t) lam.push_back(log_snr(abar[t]));
  for (int64_t i = 0; i < S; ++i) {
    if (spacing == Spacing::Uniform) {
      ts[i] = i * (T / S);
    } else if (spacing == Spacing::Linspace) {
      ts[i] = int64_t(std::nearbyint(linspace(0.0, double(T - 1), i)));
    } else if (spacing == Spacing::Trailing) {  // round(T - j T/S) - 1 with j = S-1-i: already ascending
      ts[i] = int64_t(std::nearbyint(double(T) - double(S - 1 - i) * (double(T) / double(S)))) - 1;
    } else if (spacing == Spacing::Quadratic) {
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
         "spacing " + name + " cannot give " + std::to_string(S) + " distinct steps for T=" + std::to_string(T));
  return ts;
}

// alpha_bar_t = prod_{s <= t} (1 - beta_s), float64, in the order of Python's cumprod.
static std::vector<double> alphas_cumprod(const ModelInfo& info) {
  std::vector<double> abar(info.betas.size());
  for (size_t i = 0; i < abar.size(); ++i) abar[i] = (i ? abar[i - 1] : 1.0) * (1.0 - info.betas[i]);
  return abar;
}

Spacing default_spacing(const ModelInfo& info) {
  const std::vector<double> abar = alphas_cumprod(info);
  return !abar.empty() && abar.back() == 0.0 ? Spacing::Trailing : Spacing::Uniform;
}

namespace {

bool is_multistep(SamplerKind sampler) { return sampler != SamplerKind::Ddim && sampler != SamplerKind::Ancestral; }

// PlanOptions out of range (NaN and inf too) or that do not go together: an Error.
void check_options(const PlanOptions& opt) {
  to_string(*opt.sampler);  // an Error for a value outside the enum (kept_timesteps checks the spacing)
  need(opt.eta >= 0.0 && opt.eta <= 1.0, "eta must be in [0, 1], got " + str(opt.eta));  // NaN fails, too
  need(opt.eta == 0.0 || *opt.sampler == SamplerKind::Ddim, "eta applies to the ddim sampler only");
  need(opt.corrector_steps >= 0 && opt.corrector_steps <= kMaxCorrectorSteps,
       "corrector steps must be in 0.." + std::to_string(kMaxCorrectorSteps) + ", got " + std::to_string(opt.corrector_steps));
  need(opt.snr > 0 && std::isfinite(opt.snr), "snr must be a finite number > 0, got " + str(opt.snr));
  need(!(is_multistep(*opt.sampler) && opt.corrector_steps), "the Langevin corrector runs with the one-step samplers "
       "(ancestral, ddim): a corrector row would replace the x0s that " + to_string(*opt.sampler) +
       " keeps from its previous steps");
}

// The predictor's row at kept timestep t (ab its alpha_bar, ap the kept step's before it, 1 for the first, which
// adds no noise): Algorithm 2 on the respaced process or DDIM, or, for the multistep samplers, their `row`.
Step predictor_step(const ModelInfo& info, const PlanOptions& opt, int64_t t, double ab, double ap, bool first,
                    double log_var_min, const Row* row) {
  const bool ddim = *opt.sampler == SamplerKind::Ddim, ancestral = *opt.sampler == SamplerKind::Ancestral;
  const double beta = 1.0 - ab / ap;
  const Pair x0 = x0_coefficients(ab, info.parameterization);
  Step step{t, x0.a, x0.b, 0, 0, 0, log_var_min, std::log(beta), !first && (!ddim || opt.eta > 0.0),
            info.variance == "learned_range" && ancestral, {}};
  if (row) {
    step.mean_xt = row->mean_xt, step.mean_x0 = row->mean_x0, step.sigma = row->sigma;
    step.mean_x0_prev = row->prev;
    step.add_noise = step.add_noise && *opt.sampler == SamplerKind::DpmPP2MSde;
    return step;
  }
  step.sigma = ddim ? ddim_sigma(ab, ap, opt.eta) : std::sqrt(info.variance == "fixed_large" ? beta : posterior_variance(ab, ap));
  const Pair mean = ddim ? ddim_mean(ab, ap, step.sigma) : posterior_mean(ab, ap);
  step.mean_x0 = mean.a, step.mean_xt = mean.b;
  return step;
}

}  // namespace

PlanOptions model_options(const ModelInfo& info, const PlanOptions& options) {
  PlanOptions opt = options;
  if (!opt.sampler) {
    opt.sampler = info.default_options.sampler.value_or(SamplerKind::Ancestral);
    if (!opt.steps) opt.steps = info.default_options.steps;
    if (!opt.spacing) opt.spacing = info.default_options.spacing;
  }
  if (!opt.clip) opt.clip = info.clip_denoised;
  return opt;
}

Plan make_plan(const ModelInfo& info, const PlanOptions& options) {
  const PlanOptions opt = model_options(info, options);
  check_options(opt);
  const bool multistep = is_multistep(*opt.sampler);
  const std::vector<double> abar = alphas_cumprod(info);
  const auto finite_lambda = [](double ab) { return log_snr(ab) >= kLambdaMin; };
  const int64_t T = multistep ? std::count_if(abar.begin(), abar.end(), finite_lambda) : int64_t(abar.size());
  const int64_t S = opt.steps ? *opt.steps : *opt.sampler == SamplerKind::Ancestral ? T : std::min<int64_t>(50, T);
  const Spacing spacing = opt.spacing ? *opt.spacing : default_spacing(info);
  const std::vector<int64_t> ts = kept_timesteps(T, S, spacing, abar);
  const auto ab_prev = [&](int64_t k) { return k ? abar[ts[k - 1]] : 1.0; };
  std::vector<double> ab_sampling(S);  // the kept alpha_bar in sampling order
  for (int64_t k = 0; k < S; ++k) {
    ab_sampling[k] = abar[ts[S - 1 - k]];
    need(!multistep || k == 0 || log_snr(ab_sampling[k]) > log_snr(ab_sampling[k - 1]),
         "the kept timesteps' lambdas are not strictly decreasing (" + to_string(spacing) + ", " +
         std::to_string(S) + " steps): DPM-Solver's step h would be 0; use fewer steps or another spacing");
  }
  const std::vector<Row> rows = !multistep ? std::vector<Row>()
                                : *opt.sampler == SamplerKind::UniPC ? unipc_rows(ab_sampling)
                                : dpmpp_rows(ab_sampling, *opt.sampler == SamplerKind::DpmPP2MSde,
                                             *opt.sampler == SamplerKind::DpmPP3M);
  Plan p;
  p.clip = *opt.clip;
  p.channels = info.C;
  p.memory = multistep ? int64_t(rows[0].prev.size()) : 0;
  for (int64_t i = S - 1; i >= 0; --i) {  // kept timestep i, sampling row S-1-i
    const double ab = abar[ts[i]], ap = ab_prev(i);
    // beta-tilde at i = 0 is 0: its log is clipped to the value at i = 1, as in the original implementation.
    const double log_var_min = i ? std::log(posterior_variance(ab, ap))
                               : S > 1 ? std::log(posterior_variance(abar[ts[1]], ab_prev(1))) : std::log(1.0 - ab / ap);
    for (int64_t j = 0; j < (i < S - 1 ? opt.corrector_steps : 0); ++j) {  // Langevin rows at t_i before its predictor
      const Row c = langevin(ab, opt.snr);
      const Pair x0 = x0_coefficients(ab, info.parameterization);
      const double log_var = 2.0 * std::log(c.sigma);
      p.steps.push_back({ts[i], x0.a, x0.b, c.mean_x0, c.mean_xt, c.sigma, log_var, log_var, true, false, {}});
    }
    p.steps.push_back(predictor_step(info, opt, ts[i], ab, ap, i == 0, log_var_min,
                                     multistep ? &rows[S - 1 - i] : nullptr));
  }
  return p;
}

Plan make_inversion_plan(const ModelInfo& info, std::optional<int64_t> steps, std::optional<Spacing> spacing) {
  const std::vector<double> abar = alphas_cumprod(info);
  const int64_t T = abar.size(), S = steps.value_or(std::min<int64_t>(50, T));
  const std::vector<int64_t> ts = kept_timesteps(T, S, spacing ? *spacing : default_spacing(info), abar);
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

}  // namespace ddpm
