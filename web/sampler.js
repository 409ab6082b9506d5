// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The DDPM reference authors
// A file of `ddpm export` sampled with onnxruntime-web: the metadata read from the file's bytes, checked as
// export/onnx_sampler.py checks it, the plan of plan.js executed row by row. The network runs in onnxruntime-web;
// each row's update runs here in float32, in the order of operations of onnx_sampler.py's update graph (IEEE
// float32 products and sums, so the same numbers), with the noise of numpy's RandomState (random.js). No DOM:
// the page (app.js) drives it.
import * as plans from "./plan.js";
import { RandomState } from "./random.js";

export const FORMAT = "1";

export class ModelError extends Error {}

// The metadata_props of an ONNX ModelProto (field 14: StringStringEntryProto key = 1, value = 2), read from the
// protobuf bytes: onnxruntime-web does not expose them. Throws ModelError on bytes that are not a protobuf.
export function readMetadata(bytes) {
  const data = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const utf8 = new TextDecoder();
  const fields = function* (start, end) {  // [field number, wire type, value or [from, to]]
    let pos = start;
    const varint = () => {
      let value = 0, scale = 1, byte;
      do {
        if (pos >= end) throw new ModelError("truncated");
        byte = data[pos++];
        value += (byte & 0x7f) * scale;
        scale *= 128;
      } while (byte & 0x80);
      return value;
    };
    while (pos < end) {
      const key = varint(), number = Math.floor(key / 8), wire = key % 8;
      if (wire === 0) yield [number, wire, varint()];
      else if (wire === 1 || wire === 5) pos += wire === 1 ? 8 : 4;
      else if (wire === 2) {
        const length = varint();
        if (pos + length > end) throw new ModelError("truncated");
        yield [number, wire, [pos, pos + length]];
        pos += length;
      } else throw new ModelError(`wire type ${wire}`);
      if (pos > end) throw new ModelError("truncated");
    }
  };
  const metadata = {};
  try {
    for (const [number, wire, span] of fields(0, data.length)) {
      if (number !== 14 || wire !== 2) continue;
      let key = "", value = "";
      for (const [n, w, [from, to]] of fields(span[0], span[1])) {
        if (w !== 2) continue;
        if (n === 1) key = utf8.decode(data.subarray(from, to));
        if (n === 2) value = utf8.decode(data.subarray(from, to));
      }
      metadata[key] = value;
    }
  } catch (e) {
    if (e instanceof ModelError) throw new ModelError(`not an ONNX file (${e.message})`);
    throw e;
  }
  return metadata;
}

// The schedule and options of a file's metadata, checked as onnx_sampler.py's OnnxSampler._read_metadata does:
// {betas, alphasCumprod, T, parameterization, variance, imageShape, clip, precision, numClasses, nullLabel,
// classNames, defaultOptions (the file's own plan: ddpm.sampler, ddpm.steps, ddpm.spacing), outChannels}.
export function modelInfo(metadata, name = "the file") {
  const meta = (key) => {
    if (!(key in metadata))
      throw new ModelError(`${name} is not a DDPM model: missing metadata '${key}' (export it with \`ddpm export\`)`);
    return metadata[key];
  };
  if (meta("ddpm.format") !== FORMAT)
    throw new ModelError(`${name}: ddpm.format '${metadata["ddpm.format"]}' is not supported (this page reads ` +
      `format ${FORMAT}; re-export the model)`);
  const info = {};
  const bad = (problem) => new ModelError(`${name}: bad DDPM metadata: ${problem}`);
  const whole = (text) => (/^\d+$/.test(text) ? Number(text) : NaN);
  info.betas = meta("ddpm.betas").split(",").map(Number);
  info.T = whole(meta("ddpm.num_timesteps"));
  info.imageShape = meta("ddpm.image_shape").split(",").map(whole);
  info.numClasses = whole(metadata["ddpm.num_classes"] ?? "0");
  info.nullLabel = whole(metadata["ddpm.null_label"] ?? String(info.numClasses));
  try {
    info.classNames = JSON.parse(metadata["ddpm.class_names"] ?? "[]").map(String);
  } catch {
    throw bad(`ddpm.class_names is not a JSON list`);
  }
  info.parameterization = meta("ddpm.parameterization");
  info.variance = meta("ddpm.variance");
  const clip = meta("ddpm.clip_denoised"), timestep = metadata["ddpm.timestep_dtype"] ?? "int64";
  const checks = [
    [info.betas.every(Number.isFinite) && Number.isInteger(info.T), "malformed numbers"],
    [info.T === info.betas.length, `ddpm.num_timesteps is ${info.T} but there are ${info.betas.length} betas`],
    [info.betas.every((b) => b > 0 && b <= 1), "ddpm.betas must lie in (0, 1]"],
    [plans.PARAMETERIZATIONS.includes(info.parameterization), `ddpm.parameterization '${info.parameterization}' is unknown`],
    [plans.VARIANCES.includes(info.variance), `ddpm.variance '${info.variance}' is unknown`],
    [info.imageShape.length === 3 && info.imageShape.every(Number.isInteger),
      `ddpm.image_shape must be C,H,W, got '${metadata["ddpm.image_shape"]}'`],
    [clip === "true" || clip === "false", `ddpm.clip_denoised must be true or false, got '${clip}'`],
    [timestep === "int64", `ddpm.timestep_dtype must be int64, got '${timestep}'`],
    [info.numClasses >= 0 && info.nullLabel === info.numClasses && info.classNames.length === info.numClasses,
      "ddpm.num_classes K, ddpm.null_label K and K ddpm.class_names must agree"],
  ];
  for (const [ok, problem] of checks) if (!ok) throw bad(problem);
  const sampler = metadata["ddpm.sampler"] ?? "ancestral", steps = metadata["ddpm.steps"] ?? null;
  const spacing = metadata["ddpm.spacing"] ?? null;
  for (const [ok, problem] of [
    [plans.SAMPLERS.includes(sampler), `ddpm.sampler '${sampler}' is unknown`],
    [steps === null || (/^\d+$/.test(steps) && Number(steps) >= 1 && Number(steps) <= info.T),
      `ddpm.steps must be a whole number in 1..${info.T}, got '${steps}'`],
    [spacing === null || plans.SPACINGS.includes(spacing), `ddpm.spacing '${spacing}' is unknown`],
  ]) if (!ok) throw bad(problem);
  info.clip = clip === "true";
  info.precision = metadata["ddpm.precision"] ?? "fp32";  // how the network computes (informative)
  info.defaultOptions = plans.planOptions({ sampler, steps: steps === null ? null : Number(steps), spacing,
    clip: info.clip });
  info.alphasCumprod = plans.alphasCumprod(info.betas);
  if (info.parameterization === "eps" && info.alphasCumprod[info.T - 1] === 0.0)
    throw new ModelError(`${name}: zero terminal SNR needs the v or x0 parameterization, not eps`);
  info.outChannels = info.variance === "learned_range" ? 2 * info.imageShape[0] : info.imageShape[0];
  return info;
}

// The labels a sampling run gives the network: the null label for a conditional file sampled without classes,
// else the balanced sweep (plan.balanced_labels) over `classes`; null for an unconditional file.
export function sampleLabels(info, classes, n, guidance) {
  if (!info.numClasses) {
    if (classes !== null || guidance !== null) throw new Error("classes and guidance need a class-conditional model");
    return [null, 1.0];
  }
  if (classes === null) {
    if (guidance !== null && guidance !== 1.0) throw new Error("a guidance scale needs labels (the classes to guide to)");
    return [new Array(n).fill(info.nullLabel), 1.0];
  }
  for (const c of classes)
    if (!(Number.isInteger(c) && c >= 0 && c < info.numClasses))
      throw new Error(`class ${c}: not a class of this model (${info.classNames.join(", ")}; or 0..${info.numClasses - 1})`);
  guidance = guidance ?? plans.DEFAULT_GUIDANCE;
  const labels = plans.balancedLabels(classes, n);
  return [guidance === 0 ? labels.map(() => info.nullLabel) : labels, guidance];
}

// One plan row's update of onnx_sampler.py's step graph, in float32: x0 = clip(x0_x x + x0_o o), x_next = mean_x0 x0
// + mean_xt x + sum_j w_j x0_j + s z. o: the output's prediction channels (guided: ou + scale (oc - ou)); s: sigma,
// or Nichol & Dhariwal's Eq. (15) from the conditional half's variance channels where learned.
function update(plan, k, shape, x, out, z, x0s, scale, guided) {
  const f = Math.fround, [B, C, H, W] = shape, HW = H * W, outC = out.length / ((guided ? 2 : 1) * B * HW);
  const c = {};
  for (const key of ["x0_x", "x0_o", "mean_x0", "mean_xt", "sigma", "log_var_min", "log_var_max"]) c[key] = f(plan[key][k]);
  const [lo, hi] = plan.clip ? [-1, 1] : [-Infinity, Infinity];
  const w = plan.mean_x0_prev[k].map(f), M = w.length, learned = plan.learned[k];
  const xNext = new Float32Array(x.length), x0 = new Float32Array(x.length);
  const half = B * outC * HW;
  for (let b = 0; b < B; b++)
    for (let ch = 0; ch < C; ch++)
      for (let p = 0; p < HW; p++) {
        const i = (b * C + ch) * HW + p, oi = (b * outC + ch) * HW + p, vi = oi + C * HW;
        let o = out[oi];
        if (guided) o = f(out[oi + half] + f(scale * f(o - out[oi + half])));
        const x0i = Math.min(Math.max(f(f(c.x0_x * x[i]) + f(c.x0_o * o)), lo), hi);
        let mean = f(f(c.mean_x0 * x0i) + f(c.mean_xt * x[i]));
        for (let j = 0; j < M; j++) mean = f(mean + f(w[j] * x0s[j][i]));
        let s = c.sigma;
        if (learned) {
          const frac = f(f(out[vi] + 1) * 0.5);
          s = f(Math.exp(f(0.5 * f(f(frac * c.log_var_max) + f(f(1 - frac) * c.log_var_min)))));
        }
        xNext[i] = f(mean + f(s * z[i]));
        x0[i] = x0i;
      }
  return [xNext, x0];
}

// A model file ready to sample in onnxruntime-web: Model.load(ort, bytes, name, sessionOptions).
export class Model {
  static async load(ort, bytes, name, sessionOptions = {}) {
    const model = new Model();
    model.name = name;
    model.info = modelInfo(readMetadata(bytes), name);
    try {
      model.session = await ort.InferenceSession.create(bytes, sessionOptions);
    } catch (e) {
      throw new ModelError(`${name} cannot be loaded by onnxruntime-web (${String(e.message || e).split("\n")[0]})`);
    }
    const inputs = [...model.session.inputNames].sort().join(","), outputs = model.session.outputNames.join(",");
    const expected = model.info.numClasses ? "t,x,y" : "t,x";
    if (inputs !== expected || outputs !== "model_output")
      throw new ModelError(`${name} is not a DDPM eps_theta graph: expected inputs ${expected} and output ` +
        `model_output; found inputs ${inputs} and outputs ${outputs}`);
    model.ort = ort;
    return model;
  }

  plan(fields = {}) {
    const { alphasCumprod, parameterization, variance, defaultOptions } = this.info;
    return plans.makePlan(alphasCumprod, parameterization, variance, plans.modelOptions(defaultOptions, fields));
  }

  // n samples (Float32Array [n, C, H, W]) of the plan, in batches of `batch` from one RandomState(seed) stream (each
  // batch in order draws x_T, then each noisy row's z), as OnnxSampler.run. labels: n ints (or null), guidance:
  // classifier-free guidance (0 or 1: one call per row; else one call on [x; x] with labels [y; null]).
  // onRow({row, rows, x, batchStart, batchSize, networkSeconds}) after every network call; it may be async.
  async sample(plan, n, { seed = 0, batch = null, labels = null, guidance = 1.0, onRow = null } = {}) {
    const [C, H, W] = this.info.imageShape, size = C * H * W, rng = new RandomState(seed);
    batch = batch || n;
    const result = new Float32Array(n * size);
    let networkSeconds = 0, calls = 0;
    const rows = plan.t.length * Math.ceil(n / batch);
    for (let start = 0; start < n; start += batch) {
      const B = Math.min(batch, n - start), shape = [B, C, H, W];
      const guided = labels !== null && guidance !== 0 && guidance !== 1;
      const netB = guided ? 2 * B : B;
      let y = null;
      if (labels !== null) {
        const ys = labels.slice(start, start + B);
        if (guided) ys.push(...new Array(B).fill(this.info.nullLabel));
        y = new this.ort.Tensor("int64", BigInt64Array.from(ys.map(BigInt)), [netB]);
      }
      let x = rng.standardNormal(B * size);
      const x0s = Array.from({ length: plan.memory }, () => new Float32Array(B * size));
      const zeros = new Float32Array(B * size);  // the z of rows that add no noise
      for (let k = 0; k < plan.t.length; k++) {
        const input = guided ? concat(x, x) : x;
        const feeds = {
          x: new this.ort.Tensor("float32", input, [netB, C, H, W]),
          t: new this.ort.Tensor("int64", new BigInt64Array(netB).fill(BigInt(plan.t[k])), [netB]),
        };
        if (y) feeds.y = y;
        const t0 = performance.now();
        const output = await this.session.run(feeds);
        const out = await output.model_output.getData();
        networkSeconds += (performance.now() - t0) / 1000;
        calls += 1;
        const z = plan.add_noise[k] ? rng.standardNormal(B * size) : zeros;
        const [xNext, x0] = update(plan, k, shape, x, out, z, x0s, Math.fround(guidance), guided);
        if (plan.memory) {
          x0s.unshift(x0);
          x0s.pop();
        }
        x = xNext;
        output.model_output.dispose?.();
        if (onRow) await onRow({ row: calls, rows, x, batchStart: start, batchSize: B, networkSeconds });
      }
      result.set(x, start * size);
    }
    return { samples: result, calls, networkSeconds };
  }
}

function concat(a, b) {
  const out = new Float32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

// [-1, 1] floats -> uint8 pixels, round((clamp(x, -1, 1) + 1) * 127.5) half to even (images.to_uint8).
export function toUint8(x) {
  const out = new Uint8Array(x.length), f = Math.fround;
  for (let i = 0; i < x.length; i++) {
    const v = f(f(Math.min(Math.max(x[i], -1), 1) + 1) * 127.5), r = Math.round(v);
    out[i] = r - v === 0.5 && r % 2 ? r - 1 : r;
  }
  return out;
}
