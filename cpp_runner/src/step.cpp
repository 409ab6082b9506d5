// One row of a plan applied to x: on the host (step_mean, step_noise, guide), and as a tiny ONNX graph that
// runs on the network's provider (step_graph, the twin of export/onnx_sampler.py's).
#include <algorithm>
#include <cmath>
#include <sstream>

#include "internal.h"

namespace ddpm::internal {

namespace {

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
// update export/onnx_sampler.py builds, plus bad_next = bad + sum(out - out): NaN from the first row whose
// network output holds NaN or inf on, kept on the device and read once per batch.

}  // namespace

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
  text += "Mul s z -> n; Add mean" + std::to_string(memory) + " n -> x_next;";
  text += "Sub out out -> nonfinite; ReduceSum nonfinite -> nonfinite_sum; Add bad nonfinite_sum -> bad_next";
  if (guided) text += "; Concat x_next x_next -> x_pair";
  std::string graph;
  std::stringstream statements(text);
  for (std::string statement; std::getline(statements, statement, ';');) graph += field(1, node(statement));
  graph += field(2, "ddpm_step") + field(11, float_tensor("x", {"B", "C", "H", "W"})) +
           field(11, float_tensor("out", {guided ? "B2" : "B", "C_out", "H", "W"})) +
           field(11, float_tensor("z", {"B", "C", "H", "W"})) + field(11, float_tensor("c", {"K"})) +
           field(11, float_tensor("bad", {"1", "1", "1", "1"}));
  for (int64_t j = 1; j <= memory; ++j) graph += field(11, float_tensor("x0_" + std::to_string(j), {"B", "C", "H", "W"}));
  if (guided) graph += field(11, float_tensor("scale", {"1"}));
  graph += field(12, float_tensor("x_next", {"B", "C", "H", "W"})) + field(12, float_tensor("bad_next", {"1", "1", "1", "1"}));
  if (memory) graph += field(12, float_tensor("x0", {"B", "C", "H", "W"}));
  if (guided) graph += field(12, float_tensor("x_pair", {"B2", "C", "H", "W"}));
  return field(1, 8) + field(8, field(1, "") + field(2, 17)) + field(7, graph);
}

// The step graph's input c of row s, as export/onnx_sampler.py's step_coefficients: the row's coefficients in float32
// (lo, hi = -1, 1 when clipping, else +-inf), then its M weights of the earlier x0 predictions.
void row_coefficients(const Plan& p, const Step& s, float* c) {
  const float lim = p.clip ? 1.0f : INFINITY;
  const float row[kCoefficients] = {float(s.x0_x),  float(s.x0_o),        float(s.mean_x0),     float(s.mean_xt),
                                    float(s.sigma), float(s.log_var_min), float(s.log_var_max), -lim, lim, 1.0f, 0.5f};
  std::copy(row, row + kCoefficients, c);
  for (int64_t j = 0; j < p.memory; ++j) c[kCoefficients + j] = float(s.mean_x0_prev[j]);
}

}  // namespace ddpm::internal
