// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The DDPM reference authors
// The sampling plan of plan.py in JavaScript (float64, as numpy computes it): every sampler as a table of per-row
// coefficients. One function per function of plan.py, under the same name in camelCase, with the same order of
// operations, so that the rows equal Python's within 1e-10 (tests/test_web.py holds them so). No DOM: the page
// (app.js) and Node (the tests) import it alike.

export const SAMPLERS = ["ancestral", "ddim", "dpmpp2m", "dpmpp2m-sde", "dpmpp3m", "unipc"];
export const MULTISTEP = { dpmpp2m: 1, "dpmpp2m-sde": 1, dpmpp3m: 2, unipc: 3 };
export const SPACINGS = ["uniform", "linspace", "trailing", "quadratic", "logsnr"];
export const PARAMETERIZATIONS = ["eps", "x0", "v"];
export const VARIANCES = ["fixed_small", "fixed_large", "learned_range"];
export const DEFAULT_GUIDANCE = 1.0;
export const LAMBDA_MIN = -5.1;

export function checkOption(name, value, valid) {
  if (!valid.includes(value)) throw new Error(`${name} must be one of ${valid.join(", ")}, got '${value}'`);
}

const range = (n, f) => Array.from({ length: n }, (_, i) => f(i));
const factorial = (n) => (n <= 1 ? 1 : n * factorial(n - 1));
const reversed = (a) => a.slice().reverse();

// numpy's round: half to even.
function roundHalfEven(x) {
  const f = Math.floor(x), d = x - f;
  return d > 0.5 ? f + 1 : d < 0.5 ? f : f % 2 === 0 ? f : f + 1;
}

// numpy.linspace(start, stop, num): i * step + start, the last one exactly stop.
function linspace(start, stop, num) {
  const step = (stop - start) / (num - 1);
  return range(num, (i) => (num > 1 && i === num - 1 ? stop : i * step + start));
}

export function alphasCumprod(betas) {
  let p = 1.0;
  return betas.map((b) => (p *= 1.0 - b));
}

export function logSnr(ab) {
  return 0.5 * (Math.log(ab) - Math.log1p(-ab));
}

export function spaceTimesteps(T, steps, spacing = "uniform", ab = null) {
  checkOption("spacing", spacing, SPACINGS);
  if (!(Number.isInteger(steps) && steps >= 1 && steps <= T)) throw new Error(`steps must be in 1..${T}, got ${steps}`);
  if (steps === T) return range(T, (i) => i);
  let ts;
  if (spacing === "uniform") ts = range(steps, (i) => i * Math.floor(T / steps));
  else if (spacing === "linspace") ts = linspace(0, T - 1, steps).map(roundHalfEven);
  else if (spacing === "trailing") ts = range(steps, (i) => roundHalfEven(T - (steps - 1 - i) * (T / steps)) - 1);
  else if (spacing === "quadratic") ts = linspace(0, Math.sqrt(0.8 * T), steps).map((v) => Math.trunc(v * v));
  else {
    const lam = ab.slice(0, T).map(logSnr);
    ts = linspace(lam[0], Math.max(lam[T - 1], LAMBDA_MIN), steps).map((v) => {
      let best = 0;
      for (let j = 1; j < T; j++) if (Math.abs(lam[j] - v) < Math.abs(lam[best] - v)) best = j;
      return best;
    });
    for (let i = 1; i < steps; i++) ts[i] = Math.max(ts[i], ts[i - 1] + 1);
  }
  ts = ts.map(Math.trunc);
  if (ts.some((t, i) => i > 0 && t <= ts[i - 1]) || ts[0] < 0 || ts[steps - 1] > T - 1)
    throw new Error(`spacing '${spacing}' cannot give ${steps} distinct steps for T=${T}`);
  return ts;
}

export function defaultSpacing(ab) {
  return ab[ab.length - 1] === 0.0 ? "trailing" : "uniform";
}

export function x0Coefficients(ab, parameterization) {
  if (parameterization === "eps") return [Math.sqrt(1.0 / ab), -Math.sqrt(1.0 / ab - 1.0)];
  if (parameterization === "v") return [Math.sqrt(ab), -Math.sqrt(1.0 - ab)];
  return [0.0, 1.0];
}

// (beta, beta-tilde, coefficient of x0, coefficient of x_t) of q(x_{t-1} | x_t, x_0), Eq. (6)-(7) of Ho et al.
export function posteriorCoefficients(ab, abPrev) {
  const beta = 1.0 - ab / abPrev;
  return [beta, (beta * (1.0 - abPrev)) / (1.0 - ab), (beta * Math.sqrt(abPrev)) / (1.0 - ab),
    ((1.0 - abPrev) * Math.sqrt(1.0 - beta)) / (1.0 - ab)];
}

export function ddimSigma(ab, abPrev, eta) {
  return eta * Math.sqrt(((1.0 - abPrev) / (1.0 - ab)) * (1.0 - ab / abPrev));
}

export function ddimCoefficients(ab, abTo, sigma) {
  const d = Math.sqrt(Math.max(1.0 - abTo - sigma * sigma, 0.0));
  return [Math.sqrt(abTo) - (d * Math.sqrt(ab)) / Math.sqrt(1.0 - ab), d / Math.sqrt(1.0 - ab)];
}

export function dpmpp2mCoefficients(ab, abTo, r, sde) {
  const alphaTo = Math.sqrt(abTo), sigmaTo = Math.sqrt(1.0 - abTo), sigma = Math.sqrt(1.0 - ab);
  const h = logSnr(abTo) - logSnr(ab);
  const weight = sde ? -Math.expm1(-2.0 * h) : -Math.expm1(-h);
  const halfR = r === Infinity ? 0.0 : 0.5 / r;
  const meanXt = (sigmaTo / sigma) * (sde ? Math.exp(-h) : 1.0);
  const noise = sde ? sigmaTo * Math.sqrt(weight) : 0.0;
  return [meanXt, alphaTo * weight * (1.0 + halfR), -alphaTo * weight * halfR, noise];
}

export function langevinCoefficients(ab, snr) {
  return [1.0 - 2.0 * snr ** 2, 2.0 * snr ** 2 * Math.sqrt(ab), 2.0 * snr * Math.sqrt(1.0 - ab)];
}

export function dpmpp3mCoefficients(ab, abTo, r0, r1) {
  const alphaTo = Math.sqrt(abTo), sigmaTo = Math.sqrt(1.0 - abTo), sigma = Math.sqrt(1.0 - ab);
  const h = logSnr(abTo) - logSnr(ab);
  const phi1 = Math.expm1(-h), phi2 = phi1 / h + 1.0, phi3 = phi2 / h - 0.5;
  const d10 = alphaTo * (phi2 * (1.0 + r0 / (r0 + r1)) - phi3 / (r0 + r1));
  const d11 = alphaTo * (phi3 / (r0 + r1) - (phi2 * r0) / (r0 + r1));
  return [sigmaTo / sigma, d10 / r0 - alphaTo * phi1, d11 / r1 - d10 / r0, -d11 / r1];
}

// [meanXt, meanX0, meanX0Prev (rows of M), sigma] of DPM-Solver++(2M), (2M) SDE or (3M), in sampling order.
function dpmppRows(abTs, sampler) {
  const ab = reversed(abTs), S = ab.length, lam = ab.map(logSnr);
  const h = range(S, (k) => (k + 1 < S ? lam[k + 1] : Infinity) - lam[k]);
  const order = range(S, (k) => Math.min(k + 1, sampler === "dpmpp3m" ? 3 : 2));
  if (S >= 2 && S < 15) order[S - 2] = Math.min(order[S - 2], 2);
  order[S - 1] = 1;
  const h1 = range(S, (k) => (k >= 1 ? h[k - 1] : Infinity)), h2 = range(S, (k) => (k >= 2 ? h[k - 2] : Infinity));
  const columns = [[], [], [], []];
  for (let k = 0; k < S; k++) {
    const abTo = k + 1 < S ? ab[k + 1] : 1.0;
    const r0 = order[k] >= 2 ? h1[k] / h[k] : Infinity;
    let [meanXt, meanX0, prev1, sigma] = dpmpp2mCoefficients(ab[k], abTo, r0, sampler === "dpmpp2m-sde");
    let prev = [prev1];
    if (sampler === "dpmpp3m") {
      prev = [prev1, 0.0];
      if (order[k] === 3) {
        const third = dpmpp3mCoefficients(ab[k], abTo, r0, h2[k] / h[k]);
        [meanX0, prev] = [third[1], [third[2], third[3]]];
      }
    }
    [meanXt, meanX0, prev, sigma].forEach((v, i) => columns[i].push(v));
  }
  return columns;
}

export function phi(z, k) {
  if (Math.abs(z) >= 1.0) {
    let sum = 0;
    for (let m = 1; m < k; m++) sum += z ** m / factorial(m);
    return (Math.expm1(z) - sum) / z ** k;
  }
  let term = 1.0 / factorial(k), total = 0.0;
  for (let m = 1; m < 30; m++) {
    total += term;
    term *= z / (m + k);
  }
  return total;
}

// The solution of A x = b by Gaussian elimination with partial pivoting (A small and well conditioned).
function solve(A, b) {
  const n = b.length, M = A.map((row, i) => [...row, b[i]]);
  for (let c = 0; c < n; c++) {
    let p = c;
    for (let i = c + 1; i < n; i++) if (Math.abs(M[i][c]) > Math.abs(M[p][c])) p = i;
    [M[c], M[p]] = [M[p], M[c]];
    for (let i = c + 1; i < n; i++) {
      const f = M[i][c] / M[c][c];
      for (let j = c; j <= n; j++) M[i][j] -= f * M[c][j];
    }
  }
  const x = new Array(n);
  for (let i = n - 1; i >= 0; i--) {
    let s = M[i][n];
    for (let j = i + 1; j < n; j++) s -= M[i][j] * x[j];
    x[i] = s / M[i][i];
  }
  return x;
}

export function unipcCoefficients(h, r, alphaTo, corrector) {
  const B = Math.expm1(-h);
  const weights = new Array(r.length + 2).fill(0.0);
  weights[1] = -alphaTo * B;
  if (corrector) r = [...r, 1.0];
  if (!r.length) return weights;
  let rho;
  if (r.length === 1) rho = [0.5];
  else {
    const b = range(r.length, (i) => (factorial(i + 1) * phi(-h, i + 2)) / phi(-h, 1));
    rho = solve(range(r.length, (k) => r.map((ri) => ri ** k)), b);
  }
  r.forEach((ri, i) => {
    const w = (alphaTo * B * rho[i]) / ri;
    weights[corrector && i === r.length - 1 ? 0 : i + 2] -= w;
    weights[1] += w;
  });
  return weights;
}

// [meanXt, meanX0, meanX0Prev (rows of 3), sigma] of UniPC-3 with its corrector, in sampling order.
function unipcRows(abTs) {
  const ab = [...reversed(abTs), 1.0], S = abTs.length, lam = ab.map(logSnr);
  const alpha = ab.map(Math.sqrt), sigma = ab.map((a) => Math.sqrt(1.0 - a));
  const order = range(S, (k) => Math.min(3, k + 1, S - k));
  const step = (j, p, corrector) => {
    const h = lam[j + 1] - lam[j];
    return unipcCoefficients(h, range(p - 1, (i) => (lam[j - i - 1] - lam[j]) / h), alpha[j + 1], corrector);
  };
  const weights = range(S, () => [0.0, 0.0, 0.0, 0.0]);
  for (let k = 0; k < S; k++) {
    step(k, order[k], false).slice(1).forEach((w, i) => (weights[k][i] = w));
    if (k) {
      const correction = step(k - 1, order[k - 1], true), predictor = step(k - 1, order[k - 1], false);
      for (let i = 1; i < correction.length; i++) correction[i] -= predictor[i];
      correction.forEach((c, i) => (weights[k][i] += (sigma[k + 1] / sigma[k]) * c));
    }
  }
  return [range(S, (k) => sigma[k + 1] / sigma[k]), weights.map((w) => w[0]), weights.map((w) => w.slice(1)),
    new Array(S).fill(0.0)];
}

// PlanOptions of plan.py, checked: {sampler, steps, eta, spacing, clip, corrector_steps, snr}.
export function planOptions(fields = {}) {
  const o = { sampler: "ancestral", steps: null, eta: 0.0, spacing: null, clip: null, corrector_steps: 0, snr: 0.16 };
  for (const [k, v] of Object.entries(fields)) {
    if (!(k in o)) throw new Error(`unknown plan option '${k}'`);
    if (v !== undefined) o[k] = v;
  }
  checkOption("sampler", o.sampler, SAMPLERS);
  if (o.spacing !== null) checkOption("spacing", o.spacing, SPACINGS);
  if (o.steps !== null && !(Number.isInteger(o.steps) && o.steps >= 1))
    throw new Error(`steps must be a whole number >= 1, got ${o.steps}`);
  if (!(o.eta >= 0.0 && o.eta <= 1.0)) throw new Error(`eta must be in [0, 1], got ${o.eta}`);
  if (o.eta && o.sampler !== "ddim") throw new Error(`eta applies to the ddim sampler only, not ${o.sampler}`);
  const K = o.corrector_steps;
  if (!Number.isInteger(K) || K < 0 || !(o.snr > 0))
    throw new Error(`corrector_steps must be a whole number >= 0 and snr > 0, got ${K}, ${o.snr}`);
  if (K && o.sampler in MULTISTEP)
    throw new Error("the Langevin corrector runs with the one-step samplers (ancestral, ddim): a corrector row " +
      `would replace the x0s that ${o.sampler} keeps from its previous steps`);
  return o;
}

// plan.model_options: where no sampler is given, the model's own sampler, steps and spacing (`own`, checked
// options); where no clip is given, the model's clip. Fields given as null or undefined count as not given.
export function modelOptions(own, fields = {}) {
  const given = Object.fromEntries(Object.entries(fields).filter(([, v]) => v !== null && v !== undefined));
  if (!("sampler" in given)) return planOptions({ ...own, ...given });
  const o = planOptions(given);
  return o.clip === null ? { ...o, clip: own.clip } : o;
}

export function makePlan(ab, parameterization = "eps", variance = "fixed_small", options = {}) {
  const o = planOptions(options);
  checkOption("parameterization", parameterization, PARAMETERIZATIONS);
  checkOption("variance", variance, VARIANCES);
  const spacing = o.spacing || defaultSpacing(ab);
  const T = o.sampler in MULTISTEP ? ab.filter((a) => logSnr(a) >= LAMBDA_MIN).length : ab.length;
  const ts = spaceTimesteps(T, o.steps || (o.sampler === "ancestral" ? T : Math.min(50, T)), spacing, ab);
  const abTs = ts.map((t) => ab[t]);
  if (o.sampler in MULTISTEP && abTs.some((a, i) => i > 0 && !(logSnr(a) < logSnr(abTs[i - 1]))))
    throw new Error(`the kept timesteps' lambdas are not strictly decreasing (${spacing}, ${ts.length} steps): ` +
      "DPM-Solver's step h would be 0; use fewer steps or another spacing");
  let rows = predictorColumns(ts, abTs, parameterization, variance, o).map(reversed);
  if (o.corrector_steps) rows = withCorrector(rows, reversed(abTs), parameterization, o.corrector_steps, o.snr);
  const [t, x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, log_var_max, add_noise, learned, mean_x0_prev] = rows;
  return { t, x0_x, x0_o, mean_x0, mean_xt, sigma, log_var_min, log_var_max, add_noise, learned, mean_x0_prev,
    clip: o.clip !== false, sampler: o.sampler, memory: MULTISTEP[o.sampler] || 0 };
}

// The columns of a plan (ascending t) of the predictor o.sampler over the kept timesteps ts, ab = alpha_bar[ts].
function predictorColumns(ts, ab, parameterization, variance, o) {
  const steps = ts.length, abPrev = [1.0, ...ab.slice(0, -1)];
  const x0 = ab.map((a) => x0Coefficients(a, parameterization));
  const post = ab.map((a, i) => posteriorCoefficients(a, abPrev[i]));
  const beta = post.map((p) => p[0]), postVar = post.map((p) => p[1]);
  const logVarMin = range(steps, (i) => Math.log(i > 0 ? postVar[i] : steps > 1 ? postVar[1] : beta[0]));
  let meanX0, meanXt, sigma, prev = range(steps, () => []);
  if (o.sampler === "ancestral") {
    [meanX0, meanXt] = [post.map((p) => p[2]), post.map((p) => p[3])];
    sigma = (variance === "fixed_large" ? beta : postVar).map(Math.sqrt);
  } else if (o.sampler === "ddim") {
    sigma = ab.map((a, i) => ddimSigma(a, abPrev[i], o.eta));
    const c = ab.map((a, i) => ddimCoefficients(a, abPrev[i], sigma[i]));
    [meanX0, meanXt] = [c.map((v) => v[0]), c.map((v) => v[1])];
  } else {
    [meanXt, meanX0, prev, sigma] = (o.sampler === "unipc" ? unipcRows(ab) : dpmppRows(ab, o.sampler)).map(reversed);
  }
  const noisy = o.sampler === "ancestral" || o.sampler === "dpmpp2m-sde" || o.eta > 0;
  return [ts, x0.map((c) => c[0]), x0.map((c) => c[1]), meanX0, meanXt, sigma, logVarMin, beta.map(Math.log),
    range(steps, (i) => i > 0 && noisy), range(steps, () => variance === "learned_range" && o.sampler === "ancestral"),
    prev];
}

// The predictor rows (sampling order, ab per row) with K Langevin rows at each row's timestep before it, from the
// second row on.
function withCorrector(rows, ab, parameterization, K, snr) {
  const M = rows[10][0].length;
  const corrector = (k) => {
    const [x0x, x0o] = x0Coefficients(ab[k], parameterization), [meanXt, meanX0, sigma] = langevinCoefficients(ab[k], snr);
    return [rows[0][k], x0x, x0o, meanX0, meanXt, sigma, 2 * Math.log(sigma), 2 * Math.log(sigma), true, false,
      new Array(M).fill(0.0)];
  };
  const out = rows.map((column) => [column[0]]);
  for (let k = 1; k < ab.length; k++) {
    const c = corrector(k);
    for (let j = 0; j < K; j++) out.forEach((column, i) => column.push(c[i]));
    out.forEach((column, i) => column.push(rows[i][k]));
  }
  return out;
}

// plan.balanced_labels: n labels over `classes` in equal blocks.
export function balancedLabels(classes, n) {
  const per = Math.ceil(n / classes.length);
  return range(n, (i) => classes[Math.floor(i / per)]);
}
