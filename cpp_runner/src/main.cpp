// ddpm_runner: sample images from an exported DDPM eps_theta ONNX file.
#include <png.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "ddpm/sampler.h"
#include "mt19937.h"
#include "parse.h"

namespace {

using ddpm::Error;

const char* kUsage =
    "usage: ddpm_runner --model MODEL.onnx --out FILE.png|FILE.npy [--n N] [--batch B]\n"
    "         [--sampler ancestral|ddim|dpmpp2m|dpmpp2m-sde] [--steps S] [--eta E]\n"
    "         [--spacing uniform|linspace|trailing|quadratic|logsnr] [--corrector-steps K] [--snr R]\n"
    "         [--clip|--no-clip] [--seed SEED] [--provider cpu|cuda] [--threads K] [--json]\n"
    "         [--init FILE.npy [--invert]] [--class K | --classes K1,K2,...] [--guidance S]\n"
    "Defaults: n 16, batch n, sampler ancestral, steps T (ancestral) or min(50, T) (the others), eta 0 (ddim only),\n"
    "spacing uniform, corrector steps 0 (K Langevin rows per timestep, ancestral or ddim), snr 0.16,\n"
    "clip as the model says, seed 0, provider cpu. --init starts from the float32 [N, C, H, W] of a .npy (latents to\n"
    "decode; N replaces --n) instead of drawing x_T; with --invert it encodes those images by DDIM inversion over\n"
    "--steps and --spacing (write the latents to a .npy). A class-conditional model samples the classes given (indices;\n"
    "default: all, in equal blocks, a grid row each) with classifier-free guidance S (1: conditional, 0: unconditional). The same seed and batch give the same images as the\n"
    "Python sampler. .png: a grid, pixel = round((clamp(x, -1, 1) + 1) * 127.5); .npy: float32 [N, C, H, W].\n";

struct Args {
  std::string model, out, provider = "cpu", init, classes;
  double guidance = 1.0;
  ddpm::PlanOptions plan;
  int64_t n = 16, batch = 0, threads = 0, dump_noise = -1, seed = 0;
  bool json = false, help = false, dump_plan = false, step_graph = false, invert = false, n_given = false;
};

int64_t int_in(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  const int64_t x = ddpm::parse_int(v, flag);
  if (x < lo || x > hi) throw Error(flag + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

Args parse_args(int argc, char** argv) {
  static const std::set<std::string> switches = {"--clip", "--no-clip", "--json", "--dump-plan", "--step-graph",
                                                 "--invert", "--help", "-h"};
  static const std::set<std::string> valued = {"--model", "--out", "--n", "--batch", "--sampler", "--steps", "--eta",
                                               "--spacing", "--seed", "--provider", "--threads", "--dump-noise",
                                               "--corrector-steps", "--snr", "--init", "--class", "--classes",
                                               "--guidance"};
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string f = argv[i], v;
    if (switches.count(f) == 0 && valued.count(f) == 0) throw Error("unknown option '" + f + "' (see --help)");
    if (valued.count(f)) {
      if (i + 1 >= argc) throw Error(f + " needs a value");
      v = argv[++i];
    }
    if (f == "--model") a.model = v;
    else if (f == "--out") a.out = v;
    else if (f == "--n") a.n = int_in(f, v, 1, 1 << 24), a.n_given = true;
    else if (f == "--init") a.init = v;
    else if (f == "--class" || f == "--classes") a.classes = v;
    else if (f == "--guidance") a.guidance = ddpm::parse_double(v, f);
    else if (f == "--invert") a.invert = true;
    else if (f == "--batch") a.batch = int_in(f, v, 1, 1 << 24);
    else if (f == "--sampler") a.plan.sampler = v;
    else if (f == "--steps") a.plan.steps = int_in(f, v, 1, 1 << 24);
    else if (f == "--eta") a.plan.eta = ddpm::parse_double(v, f);
    else if (f == "--spacing") a.plan.spacing = v;
    else if (f == "--corrector-steps") a.plan.corrector_steps = int_in(f, v, 0, 1000);
    else if (f == "--snr") a.plan.snr = ddpm::parse_double(v, f);
    else if (f == "--clip" || f == "--no-clip") a.plan.clip = f == "--clip";
    else if (f == "--seed") a.seed = int_in(f, v, 0, 4294967295LL);  // numpy's RandomState seed range
    else if (f == "--provider") a.provider = v;
    else if (f == "--threads") a.threads = int_in(f, v, 0, 1024);
    else if (f == "--json") a.json = true;
    else if (f == "--dump-noise") a.dump_noise = int_in(f, v, 0, 1 << 30);  // testing aid
    else if (f == "--dump-plan") a.dump_plan = true;                        // testing aid
    else if (f == "--step-graph") a.step_graph = true;  // the CUDA path's update, on the CPU: testing aid
    else a.help = true;
  }
  if (a.help || a.dump_noise >= 0) return a;
  if (a.model.empty()) throw Error("--model is required (see --help)");
  if (a.out.empty() && !a.dump_plan) throw Error("--out is required (see --help)");
  if (a.provider != "cpu" && a.provider != "cuda") throw Error("--provider must be cpu or cuda");
  if (a.invert && a.init.empty()) throw Error("--invert encodes images: give them with --init FILE.npy");
  return a;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

void check_writable(const std::string& out) {
  if (!ends_with(out, ".png") && !ends_with(out, ".npy")) throw Error("--out must end in .png or .npy: " + out);
  std::filesystem::path dir = std::filesystem::path(out).parent_path();
  if (dir.empty()) dir = ".";
  if (!std::filesystem::is_directory(dir) || access(dir.c_str(), W_OK) != 0)
    throw Error("cannot write " + out + ": " + dir.string() + " is not a writable folder");
}

// Write to a temporary file in the same folder, then rename: nobody sees half a file.
template <typename WriteFn>
void write_atomically(const std::string& path, WriteFn write) {
  const std::string tmp = path + ".tmp" + std::to_string(getpid());
  if (!write(tmp) || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("cannot write " + path);
  }
}

// float32 [N, C, H, W] as .npy format 1.0 (little-endian, C order), header padded to 64 bytes.
void write_npy(const std::string& path, const std::vector<float>& x, const ddpm::ModelInfo& m, int64_t n, int64_t) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(n) + ", " +
                       std::to_string(m.C) + ", " + std::to_string(m.H) + ", " + std::to_string(m.W) + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ').push_back('\n');
  const char preamble[10] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0, char(header.size() & 0xff), char(header.size() >> 8)};
  write_atomically(path, [&](const std::string& tmp) {
    std::ofstream f(tmp, std::ios::binary);
    f.write(preamble, 10).write(header.data(), header.size());
    f.write(reinterpret_cast<const char*>(x.data()), std::streamsize(x.size() * sizeof(float)));
    return bool(f.flush());
  });
}

// float32 [N, C, H, W] from a .npy (format 1.0-3.0, '<f4', C order) whose image shape is the model's.
std::vector<float> read_npy(const std::string& path, const ddpm::ModelInfo& m, int64_t* n) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  char magic[8] = {};
  if (!f.read(magic, 8) || std::string(magic, 6) != "\x93NUMPY" || magic[6] < 1 || magic[6] > 3)
    throw Error(path + ": not a .npy file");
  uint32_t len = 0;
  unsigned char bytes[4] = {};
  f.read(reinterpret_cast<char*>(bytes), magic[6] == 1 ? 2 : 4);
  for (int i = (magic[6] == 1 ? 1 : 3); i >= 0; --i) len = len << 8 | bytes[i];
  std::string header(len < (1u << 16) ? len : 0, ' ');
  if (!f || header.empty() || !f.read(&header[0], std::streamsize(header.size())))
    throw Error(path + ": truncated .npy header");
  const auto has = [&](const char* what) { return header.find(what) != std::string::npos; };
  const size_t open = header.find("'shape': (");
  if (!has("'descr': '<f4'") || !has("'fortran_order': False") || open == std::string::npos)
    throw Error(path + ": --init needs float32 ('<f4') C-order data");
  const std::string shape = header.substr(open + 10, header.find(')', open) - open - 10);
  std::vector<int64_t> dims;
  std::stringstream ss(shape);
  for (std::string d; std::getline(ss, d, ',');)
    if (d.find_first_not_of(' ') != std::string::npos) dims.push_back(ddpm::parse_int(d.substr(d.find_first_not_of(' ')), path));
  if (dims.size() != 4 || dims[1] != m.C || dims[2] != m.H || dims[3] != m.W || dims[0] < 1 || dims[0] > (1 << 24))
    throw Error(path + ": --init needs [N, " + std::to_string(m.C) + ", " + std::to_string(m.H) + ", " +
                     std::to_string(m.W) + "], got (" + shape + ")");
  const uint64_t count = uint64_t(dims[0]) * uint64_t(m.image_floats());
  const std::streamoff data_at = f.tellg();
  f.seekg(0, std::ios::end);
  // The header's shape is checked against the file's size before it sizes an allocation.
  if (!f || uint64_t(f.tellg() - data_at) < count * sizeof(float)) throw Error(path + ": truncated .npy data");
  f.seekg(data_at);
  std::vector<float> x(count);
  if (!f.read(reinterpret_cast<char*>(x.data()), std::streamsize(x.size() * sizeof(float))))
    throw Error(path + ": truncated .npy data");
  *n = dims[0];
  return x;
}

// A grid of ceil(sqrt(N)) columns with 2-pixel black gutters; pixel = round((clamp(x, -1, 1) + 1) * 127.5),
// rounding half to even as numpy does. Images under 32 pixels are enlarged by an integer factor
// (nearest neighbour) so that a grid of 8x8 digits can be seen; the same as export/onnx_sampler.py.
void write_png(const std::string& path, const std::vector<float>& x, const ddpm::ModelInfo& m, int64_t n,
               int64_t columns) {
  if (m.C != 1 && m.C != 3) throw Error("a .png needs 1 or 3 channels, the model has " + std::to_string(m.C) + "; use .npy");
  const int64_t s = std::max<int64_t>(1, 32 / std::max(m.H, m.W)), th = m.H * s, tw = m.W * s;
  const int64_t pad = 2, cols = columns ? columns : int64_t(std::ceil(std::sqrt(double(n)))), rows = (n + cols - 1) / cols;
  const int64_t gw = cols * (tw + pad) + pad, gh = rows * (th + pad) + pad;
  std::vector<png_byte> img(gw * gh * m.C, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < m.C; ++c)
      for (int64_t y = 0; y < th; ++y)
        for (int64_t u = 0; u < tw; ++u) {
          const float v = std::min(std::max(x[((i * m.C + c) * m.H + y / s) * m.W + u / s], -1.0f), 1.0f);
          const int64_t gy = (i / cols) * (th + pad) + pad + y, gx = (i % cols) * (tw + pad) + pad + u;
          img[(gy * gw + gx) * m.C + c] = png_byte(std::nearbyint((v + 1.0f) * 127.5f));
        }
  write_atomically(path, [&](const std::string& tmp) {
    png_image im{};
    im.version = PNG_IMAGE_VERSION;
    im.width = png_uint_32(gw), im.height = png_uint_32(gh);
    im.format = m.C == 3 ? PNG_FORMAT_RGB : PNG_FORMAT_GRAY;
    return png_image_write_to_file(&im, tmp.c_str(), 0, img.data(), 0, nullptr) != 0;
  });
}

// The labels of n images: the classes asked for (all of a conditional model's by default) in equal blocks,
// classes[i / ceil(n / len(classes))], as export/onnx_sampler.balanced_labels; none for an unconditional model.
ddpm::Conditioning conditioning(const Args& a, const ddpm::ModelInfo& m, int64_t n) {
  ddpm::Conditioning c;
  c.guidance = a.guidance;
  if (!m.num_classes) {
    if (!a.classes.empty() || a.guidance != 1.0)
      throw Error("--class/--guidance need a class-conditional model (this one is unconditional)");
    return c;
  }
  std::vector<int64_t> classes;
  std::stringstream ss(a.classes);
  for (std::string k; std::getline(ss, k, ',');) classes.push_back(ddpm::parse_int(k, "--class"));
  if (a.classes.empty())
    for (int64_t k = 0; k < m.num_classes; ++k) classes.push_back(k);
  for (int64_t k : classes)
    if (k < 0 || k >= m.num_classes)
      throw Error("--class " + std::to_string(k) + ": the model's classes are 0.." + std::to_string(m.num_classes - 1));
  const int64_t per = (n + int64_t(classes.size()) - 1) / int64_t(classes.size());
  for (int64_t i = 0; i < n; ++i) c.labels.push_back(classes[i / per]);
  return c;
}

// Testing aid: the plan as JSON, float64 values printed so that they round-trip exactly.
void dump_plan(const ddpm::Plan& p) {
  const auto column = [&](const char* name, auto field) {
    std::printf("\"%s\": [", name);
    for (size_t k = 0; k < p.steps.size(); ++k) std::printf(k ? ", %.17g" : "%.17g", double(p.steps[k].*field));
    std::printf("], ");
  };
  std::printf("{");
  column("t", &ddpm::Step::t), column("x0_x", &ddpm::Step::x0_x), column("x0_o", &ddpm::Step::x0_o);
  column("mean_x0", &ddpm::Step::mean_x0), column("mean_xt", &ddpm::Step::mean_xt), column("sigma", &ddpm::Step::sigma);
  column("log_var_min", &ddpm::Step::log_var_min), column("log_var_max", &ddpm::Step::log_var_max);
  column("add_noise", &ddpm::Step::add_noise), column("learned", &ddpm::Step::learned);
  std::printf("\"mean_x0_prev\": [");
  for (size_t k = 0; k < p.steps.size(); ++k) {
    std::printf(k ? ", [" : "[");
    for (size_t j = 0; j < p.steps[k].mean_x0_prev.size(); ++j) std::printf(j ? ", %.17g" : "%.17g", p.steps[k].mean_x0_prev[j]);
    std::printf("]");
  }
  std::printf("], \"clip\": %d, \"channels\": %lld, \"memory\": %lld}\n", p.clip, (long long)p.channels,
              (long long)p.memory);
}

int run(int argc, char** argv) {
  const Args a = parse_args(argc, argv);
  if (a.help) return std::fputs(kUsage, stdout), 0;
  if (a.dump_noise >= 0) {  // RandomState(seed).standard_normal(count), float64
    ddpm::RandomState rng(uint32_t(a.seed));
    for (int64_t i = 0; i < a.dump_noise; ++i) std::printf("%.17g\n", rng.standard_normal());
    return 0;
  }
  if (!a.dump_plan) check_writable(a.out);
  const auto t0 = std::chrono::steady_clock::now();
  ddpm::Sampler sampler(a.model, {a.provider, int(a.threads), a.step_graph});
  const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const ddpm::Plan plan = a.invert ? ddpm::make_inversion_plan(sampler.info(), a.plan.steps, a.plan.spacing)
                                   : ddpm::make_plan(sampler.info(), a.plan);
  if (a.dump_plan) return dump_plan(plan), 0;
  int64_t n = a.n;
  const std::vector<float> init = a.init.empty() ? std::vector<float>() : read_npy(a.init, sampler.info(), &n);
  if (!a.init.empty() && a.n_given && n != a.n)
    throw Error("--n " + std::to_string(a.n) + " but " + a.init + " holds " + std::to_string(n) + " images");

  const bool tty = isatty(STDERR_FILENO);  // on a terminal every step, in a log once per batch
  const auto progress = [tty](int64_t b, int64_t nb, int64_t k, int64_t s) {
    if (!tty && k != s) return;
    std::fprintf(stderr, "%sbatch %lld/%lld step %lld/%lld", tty ? "\r" : "", (long long)b + 1, (long long)nb,
                 (long long)k, (long long)s);
    if (!tty || (b + 1 == nb && k == s)) std::fputc('\n', stderr);
  };
  const int64_t batch = std::min(a.batch ? a.batch : n, n);
  const ddpm::Conditioning cond = conditioning(a, sampler.info(), n);
  const int64_t blocks = cond.labels.empty() ? 0 : std::set<int64_t>(cond.labels.begin(), cond.labels.end()).size();
  std::vector<float> x(size_t(n) * sampler.image_floats());
  ddpm::SampleOptions options;
  options.batch = batch, options.init = init.empty() ? nullptr : init.data();
  options.conditioning = cond, options.progress = progress;
  const ddpm::RunStats st = sampler.sample(plan, uint32_t(a.seed), x.data(), x.size(), options);
  (ends_with(a.out, ".npy") ? write_npy : write_png)(a.out, x, sampler.info(), n, blocks ? (n + blocks - 1) / blocks : 0);
  const double overhead = st.total_s - st.network_s, ips = double(n) / std::max(st.total_s, 1e-9);
  std::fprintf(stderr, "%s: %lld images x %zu steps in %.3f s (%.2f images/s); Session::Run %.3f s, "
               "loop overhead %.4f s (%.2f%%); wrote %s\n", sampler.provider().c_str(), (long long)n,
               plan.steps.size(), st.total_s, ips, st.network_s, overhead, 100.0 * overhead / st.total_s, a.out.c_str());
  if (a.json)
    std::printf("{\"provider\": \"%s\", \"n\": %lld, \"batch\": %lld, \"sampler\": \"%s\", \"steps\": %zu, "
                "\"load_s\": %.6f, \"total_s\": %.6f, \"network_s\": %.6f, \"overhead_s\": %.6f, \"images_per_s\": %.4f}\n",
                sampler.provider().c_str(), (long long)n, (long long)batch, a.plan.sampler.c_str(), plan.steps.size(),
                load_s, st.total_s, st.network_s, overhead, ips);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // ddpm::Error: one line; anything else is a bug, also reported in one line
    std::fprintf(stderr, "ddpm_runner: error: %s\n", e.what());
  }
  return 2;
}
