// ddpm_sample_each: the driver of the hostile-file tests. Loads each model file with the library and samples 3
// images (batches of 2, seed 5; a class-conditional model with labels i % K and guidance 2), in one process so
// that hundreds of files run quickly under the sanitizers. Prints one line per file, "ok" or "error<TAB>message",
// and writes an ok run's samples with ddpm::save_images: FILE.npy (the floats), FILE.npz (pixels and labels) and
// FILE.png. Each file is sampled twice with the same Sampler (whose sessions the second call reuses); a difference
// is an error, which the tests do not expect of a valid file.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "ddpm/sampler.h"

int main(int argc, char** argv) {
  ddpm::PlanOptions plan_options;
  ddpm::LoadOptions load;
  load.provider = ddpm::Provider::Cpu, load.threads = 1;
  int first = 1;
  for (; first + 1 < argc && argv[first][0] == '-'; first += 2) {
    const std::string flag = argv[first], value = argv[first + 1];
    if (flag == "--sampler") plan_options.sampler = ddpm::parse_sampler(value);
    else if (flag == "--steps") plan_options.steps = std::stoll(value);
    else if (flag == "--step-graph") load.step_graph = value == "1";
    else return std::fprintf(stderr, "usage: ddpm_sample_each [--sampler S] [--steps K] [--step-graph 0|1] FILE...\n"), 2;
  }
  for (int i = first; i < argc; ++i) {
    std::printf("%s\t", argv[i]);
    std::fflush(stdout);  // a crash names the file it happened on
    try {
      ddpm::Sampler sampler(argv[i], load);
      ddpm::PlanOptions opt = plan_options;
      if (opt.steps) opt.steps = std::min<int64_t>(*opt.steps, int64_t(sampler.info().betas.size()));
      const ddpm::Plan plan = ddpm::make_plan(sampler.info(), opt);
      ddpm::SampleOptions options;
      options.batch = 2;
      for (int64_t k = 0; k < 3 && sampler.info().num_classes; ++k) options.conditioning.labels.push_back(k % sampler.info().num_classes);
      if (sampler.info().num_classes) options.conditioning.guidance = 2.0;
      std::vector<float> x(3 * sampler.image_floats()), again(x.size());
      sampler.sample(plan, 5, x.data(), x.size(), options);
      sampler.sample(plan, 5, again.data(), again.size(), options);  // the sessions are reused: the same samples
      if (std::memcmp(x.data(), again.data(), x.size() * sizeof(float)) != 0) throw ddpm::Error("a second call differs");
      for (const char* format : {".npy", ".npz", ".png"})
        ddpm::save_images(argv[i] + std::string(format), x.data(), x.size(), sampler.info(), options.conditioning.labels);
      std::printf("ok\n");
    } catch (const ddpm::Error& e) {
      std::printf("error\t%s\n", e.what());
    }
    std::fflush(stdout);
  }
  return 0;
}
