// The JavaScript ports of web/ run on the cases of tests/test_web.py: reads a JSON request on stdin, writes the
// answers as JSON (inf, -inf and nan as strings) on stdout.
import { readFileSync } from "node:fs";
import * as plans from "../web/plan.js";
import { RandomState } from "../web/random.js";
import { modelInfo, readMetadata, sampleLabels } from "../web/sampler.js";

const request = JSON.parse(readFileSync(0, "utf8"));
const attempt = (f) => {
  try {
    return f();
  } catch (e) {
    return { error: e.message };
  }
};
const answer = {
  plans: (request.plans || []).map(({ betas, parameterization, variance, own, options }) => attempt(() =>
    plans.makePlan(plans.alphasCumprod(betas), parameterization, variance,
      own ? plans.modelOptions(plans.planOptions(own), options) : options))),
  noise: (request.noise || []).map(({ seed, sizes }) => {
    const rng = new RandomState(seed);
    return sizes.map((n) => Array.from({ length: n }, () => rng.standardNormalDouble()));
  }),
  metadata: (request.metadata || []).map((path) => attempt(() => readMetadata(readFileSync(path)))),
  info: (request.info || []).map((metadata) => attempt(() => {
    const { defaultOptions, classNames, numClasses } = modelInfo(metadata, "model.onnx");
    return { defaultOptions, classNames, numClasses };
  })),
  labels: (request.labels || []).map(({ numClasses, classes, n, guidance }) => attempt(() =>
    sampleLabels({ numClasses, nullLabel: numClasses, classNames: [] }, classes, n, guidance))),
};
const special = (_, v) => (v === Infinity ? "inf" : v === -Infinity ? "-inf" : Number.isNaN(v) ? "nan" : v);
process.stdout.write(JSON.stringify(answer, special));
