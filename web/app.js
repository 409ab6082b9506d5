// SPDX-License-Identifier: MIT
// Copyright (c) 2026 The DDPM reference authors
// The page: controls -> plan options, the model loaded into onnxruntime-web, the grid drawn as it forms. Every
// control can be set from the URL's query (?model=...&sampler=ddim&steps=10&...); with run=1 the page samples once
// the model is loaded, and with report=1 it posts what it sampled (or the error it shows) to /result, which is how
// `ddpm web --headless` reads it.
import { balancedLabels } from "./plan.js";
import { Model, sampleLabels, toUint8 } from "./sampler.js";

const $ = (id) => document.getElementById(id);
const query = new URLSearchParams(location.search);
const FIELDS = ["sampler", "steps", "eta", "spacing", "clip", "corrector_steps", "snr", "seed", "num_samples",
  "batch_size", "classes", "guidance", "threads", "provider"];
let model = null, running = false, ort = null;

function showError(error) {
  const text = String(error && error.message ? error.message : error);
  $("error").textContent = text;
  report({ ok: false, error: $("error").textContent });
}

function report(result) {
  if (query.get("report") === "1") fetch("result", { method: "POST", body: JSON.stringify(result) });
}

const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));

function classIndices(text, names) {
  if (text.trim() === "") return null;
  return text.split(",").map((c) => {
    c = c.trim();
    const index = names.includes(c) ? names.indexOf(c) : /^-?\d+$/.test(c) ? Number(c) : null;
    if (index === null || index < 0 || index >= names.length)
      throw new Error(`class ${c}: not a class of this model (${names.join(", ")}; or 0..${names.length - 1})`);
    return index;
  });
}

async function loadModel() {
  $("error").textContent = "";
  $("sample").disabled = true;
  const file = $("model-file").files[0], url = $("model-url").value.trim();
  const name = file ? file.name : url;
  $("status").textContent = `loading ${name} ...`;
  const bytes = file ? new Uint8Array(await file.arrayBuffer()) : await fetch(url).then((r) => {
    if (!r.ok) throw new Error(`${url}: ${r.status} ${r.statusText}`);
    return r.arrayBuffer().then((b) => new Uint8Array(b));
  });
  const provider = $("provider").value;
  if (provider === "webgpu" && !navigator.gpu) throw new Error("this browser has no WebGPU: use the wasm provider");
  if (!ort) {  // the build of the provider (wasm alone: its CPU kernels run faster than those of the WebGPU build)
    ort = await import(provider === "webgpu" ? "./ort/ort.webgpu.min.mjs" : "./ort/ort.wasm.min.mjs");
    const threads = number("threads") || navigator.hardwareConcurrency || 1;
    ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1;  // read by onnxruntime-web when it first starts
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
  }
  let adapter = "";  // the GPU WebGPU runs on, as the browser names it
  if (provider === "webgpu") {
    const info = (await navigator.gpu.requestAdapter())?.info;
    if (!info) throw new Error("WebGPU found no adapter: use the wasm provider");
    adapter = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ");
  }
  model = await Model.load(ort, bytes, name, { executionProviders: [provider] });
  model.provider = adapter ? `webgpu (${adapter})` : provider;
  const info = model.info, own = info.defaultOptions;
  for (const element of document.querySelectorAll(".conditional")) element.hidden = !info.numClasses;
  $("about").textContent = `${name}: images ${info.imageShape.join("x")}, T = ${info.T}, ${info.parameterization} ` +
    `prediction, ${info.variance} variance, ${info.precision}` +
    (info.numClasses ? `, classes ${info.classNames.join(", ")}` : "") +
    `; its own plan: ${own.sampler}${own.steps ? `, ${own.steps} steps` : ""}${own.spacing ? `, ${own.spacing}` : ""}` +
    `; onnxruntime-web ${ort.env.versions?.web ?? ""} ${model.provider}, ${ort.env.wasm.numThreads} thread(s)` +
    (crossOriginIsolated ? "" : " (not cross-origin isolated: one thread)");
  $("status").textContent = "loaded";
  $("sample").disabled = false;
}

// The grid of images.image_grid: `columns` columns (default ceil(sqrt(N))), 2-pixel black gutters, images under 32
// pixels enlarged by an integer factor.
function drawGrid(pixels, [N, C, H, W], columns) {
  const s = Math.max(1, Math.floor(32 / Math.max(H, W))), pad = 2, cols = columns || Math.ceil(Math.sqrt(N));
  const rows = Math.ceil(N / cols), width = cols * (W * s + pad) + pad, height = rows * (H * s + pad) + pad;
  const canvas = $("grid");
  if (canvas.width !== width || canvas.height !== height) [canvas.width, canvas.height] = [width, height];
  canvas.style.width = `${Math.min(2 * width, 864)}px`;
  const image = new ImageData(width, height);
  image.data.fill(0);
  for (let i = 0; i < N; i++) {
    const top = pad + Math.floor(i / cols) * (H * s + pad), left = pad + (i % cols) * (W * s + pad);
    for (let y = 0; y < H * s; y++)
      for (let x = 0; x < W * s; x++) {
        const p = ((top + y) * width + left + x) * 4, src = (i * C * H + Math.floor(y / s)) * W + Math.floor(x / s);
        for (let c = 0; c < 3; c++) image.data[p + c] = pixels[src + (C === 3 ? c : 0) * H * W];
        image.data[p + 3] = 255;
      }
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function base64(array) {
  const bytes = new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// A task's turn for the rest of the page (painting, input): a timeout, queued behind them.
const nextFrame = () => new Promise((resolve) => setTimeout(resolve));

async function sample() {
  if (running) return;
  $("error").textContent = "";
  const info = model.info, n = number("num_samples"), seed = number("seed") ?? 0;
  const clip = $("clip").value === "" ? null : $("clip").value === "true";
  const plan = model.plan({ sampler: $("sampler").value || null, steps: number("steps"), eta: number("eta") ?? 0,
    spacing: $("spacing").value || null, clip, corrector_steps: number("corrector_steps") ?? 0,
    snr: number("snr") ?? 0.16 });
  const batch = number("batch_size") ?? n;
  for (const [what, value] of [["images", n], ["batch size", batch]])
    if (!(Number.isInteger(value) && value >= 1)) throw new Error(`${what} must be a whole number >= 1, got ${value}`);
  const classes = info.numClasses ? classIndices($("classes").value, info.classNames) : null;
  const guidance = info.numClasses ? number("guidance") : null;
  if (guidance !== null && !Number.isFinite(guidance)) throw new Error(`guidance must be a number, got ${guidance}`);
  const wanted = info.numClasses ? classes ?? [...info.classNames.keys()] : null;  // default: every class, a row each
  const [labels, scale] = sampleLabels(info, wanted, n, guidance);
  const columns = wanted && Math.ceil(n / new Set(balancedLabels(wanted, n)).size);
  const [C, H, W] = info.imageShape, size = C * H * W, shown = new Float32Array(n * size).fill(-1);
  running = true;
  $("sample").disabled = true;
  const start = performance.now();
  let painted = 0;
  try {
    const result = await model.sample(plan, n, { seed, batch, labels: info.numClasses ? labels : null, guidance: scale,
      onRow: async ({ row, rows, x, batchStart }) => {
        const seconds = (performance.now() - start) / 1000;
        $("progress").value = row / rows;
        $("status").textContent = `network call ${row} of ${rows}, ${(row / seconds).toFixed(1)} calls/s ` +
          `(${model.provider}, ${ort.env.wasm.numThreads} thread(s))`;
        if (performance.now() - painted > 100 || row === rows) {
          shown.set(x, batchStart * size);
          drawGrid(toUint8(shown), [n, C, H, W], columns);
          painted = performance.now();
          if (query.get("report") === "1") fetch("progress", { method: "POST", body: JSON.stringify({ row }) });
          await nextFrame();
        }
      } });
    const seconds = (performance.now() - start) / 1000;
    drawGrid(toUint8(result.samples), [n, C, H, W], columns);
    const summary = { calls: result.calls, seconds, network_seconds: result.networkSeconds, provider: model.provider,
      threads: ort.env.wasm.numThreads, isolated: crossOriginIsolated };
    $("status").textContent = `${n} images, ${result.calls} network calls in ${seconds.toFixed(2)} s: ` +
      `${(result.calls / seconds).toFixed(1)} calls/s, ${(n / seconds).toFixed(1)} images/s (${model.provider}, ` +
      `${summary.threads} thread(s)${crossOriginIsolated ? ", cross-origin isolated" : ""})`;
    report({ ok: true, ...summary, shape: [n, C, H, W], samples: base64(result.samples) });
  } finally {
    running = false;
    $("sample").disabled = false;
  }
}

// The controls given in the query; a value a select does not offer is an error on the page.
function applyQuery() {
  for (const field of FIELDS.filter((f) => query.has(f))) {
    $(field).value = query.get(field);
    if ($(field).value !== query.get(field)) {
      const valid = [...$(field).options].map((o) => o.value).filter(Boolean);
      throw new Error(`${field} must be one of ${valid.join(", ")}, got '${query.get(field)}'`);
    }
  }
  if (query.has("model")) $("model-url").value = query.get("model");
}
$("load").addEventListener("click", () => loadModel().catch(showError));
for (const field of ["provider", "threads"])  // onnxruntime-web takes them once, when it starts: a new page
  $(field).addEventListener("change", () => {
    const changed = new URLSearchParams(location.search);
    changed.set(field, $(field).value);
    location.search = changed;
  });
$("model-file").addEventListener("change", () => loadModel().catch(showError));
$("controls").addEventListener("submit", (event) => {
  event.preventDefault();
  sample().catch(showError);
});
Promise.resolve().then(applyQuery).then(loadModel).then(() => (query.get("run") === "1" ? sample() : null))
  .catch(showError);
