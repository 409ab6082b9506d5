"""Speed: sampling per backend and precision (torch, torch.compile, onnxruntime, the C++ runner, the web page) and training
throughput, each beside the matmul peak of the same precision and library measured in the same run."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from typing import get_args

import numpy as np
import torch

from . import unet, web
from .data import calibration_images, load_digits_data
from .ddpm import (Diffusion, Trainer, TrainConfig, UserError, beta_schedule,
                   load_model, make_plan, preset_config, resolve_device,
                   sample, torch_noise)
from .export import onnx_sampler
from .export.onnx_export import noisy_inputs
from .precision import AUTOCAST_DTYPE, AtPrecision, Precision, SamplePrecision, compile_for_sampling, resolve_precision
from .fd import fd_of_samples



def matmul_peak(dtype=torch.float32, device="cpu", n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n x n matrix product in dtype on the device (the best of `repeats` after a warm-up): the
    dense peak of this machine and precision, against which a network's achieved FLOP/s is read."""
    a = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    return 2 * n ** 3 / min(_timed(lambda: a @ a, repeats, sync))


def _median_spread(times):
    return {"median_s": float(np.median(times)), "min_s": float(min(times)), "max_s": float(max(times))}


def _timed(fn, repeats: int, sync=lambda: None, bare=None):
    """Seconds of `repeats` calls of fn after one warm-up call. With `bare`, each repeat also times bare()
    right after fn(), and the pairs are returned: a shared machine drifts less within a pair."""
    fn()  # warm-up, excluded
    sync()
    times, bare_times = [], []
    for _ in range(repeats):
        for f, out in ((fn, times), (bare, bare_times))[:2 if bare else 1]:
            t0 = time.perf_counter()
            f()
            sync()
            out.append(time.perf_counter() - t0)
    return (times, bare_times) if bare else times


def onnx_matmul_peak(precision: str = "fp32", n: int = 2048, repeats: int = 3, threads: int | None = None,
                     engine: str = "onnxruntime") -> float:
    """Operations/s of an n x n product in onnxruntime's CPU provider (the best of `repeats` after a warm-up):
    MatMul in float32 (fp16: float16), MatMulInteger (uint8 x int8 -> int32, the kernel under quantized
    Conv and MatMul) for int8. The peak an exported file's achieved FLOP/s is read against. engine "openvino":
    the float32 MatMul compiled by OpenVINO for the CPU at `precision` fp32 or bf16 (its inference precision), and
    for int8 the MatMul between QuantizeLinear/DequantizeLinear pairs (uint8 x int8, the QDQ form of an int8
    export), which OpenVINO runs as an int8 product."""
    from onnx import TensorProto as TP, helper
    import onnxruntime as ort
    kind = {"fp32": (TP.FLOAT, TP.FLOAT, TP.FLOAT, "MatMul", np.float32, np.float32),
            "bf16": (TP.FLOAT, TP.FLOAT, TP.FLOAT, "MatMul", np.float32, np.float32),
            "fp16": (TP.FLOAT16, TP.FLOAT16, TP.FLOAT16, "MatMul", np.float16, np.float16),
            "int8": (TP.UINT8, TP.INT8, TP.INT32, "MatMulInteger", np.uint8, np.int8)}[precision]
    a, b, c = (helper.make_tensor_value_info(name, kind[i], [n, n]) for i, name in enumerate("abc"))
    graph = helper.make_graph([helper.make_node(kind[3], ["a", "b"], ["c"])], "matmul", [a, b], [c])
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # what onnxruntime reads
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 100, (n, n)).astype(kind[4]), "b": rng.integers(-100, 100, (n, n)).astype(kind[5])}
    if engine == "openvino":
        import io
        import openvino as ov
        if precision == "int8":
            a, b, c = (helper.make_tensor_value_info(name, TP.FLOAT, [n, n]) for name in "abc")
            qdq = [helper.make_tensor("scale", TP.FLOAT, [], [1.0]), helper.make_tensor("a_zero", TP.UINT8, [], [0]),
                   helper.make_tensor("b_zero", TP.INT8, [], [0])]
            nodes = [node for v in "ab" for node in (
                helper.make_node("QuantizeLinear", [v, "scale", f"{v}_zero"], [f"{v}_q"]),
                helper.make_node("DequantizeLinear", [f"{v}_q", "scale", f"{v}_zero"], [f"{v}_dq"]))]
            graph = helper.make_graph(nodes + [helper.make_node("MatMul", ["a_dq", "b_dq"], ["c"])], "matmul", [a, b],
                                      [c], initializer=qdq)
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
            feed = {k: v.astype(np.float32) for k, v in feed.items()}
        config = {"INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16", "int8": "f32"}[precision],
                  "PERFORMANCE_HINT": "LATENCY",
                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        core = ov.Core()
        request = core.compile_model(core.read_model(io.BytesIO(model.SerializeToString())), "CPU",
                                     config).create_infer_request()
        return 2 * n ** 3 / min(_timed(lambda: request.infer(feed), repeats))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return 2 * n ** 3 / min(_timed(lambda: session.run(None, feed), repeats))


def _ort_bench(onnx_path: str, provider: str, threads, batch: int, sampler: str, steps: int, repeats: int,
               precision: str, out: str, engine: str = "onnxruntime", row_precision: str | None = None) -> dict:
    """The onnxruntime and OpenVINO rows' measurement, run by bench_sample in a process of its own: `repeats`
    timings (after a warm-up, which also compiles OpenVINO's model for the batch) of OnnxSampler.sample with the
    engine at `precision`, the last samples saved to `out` (.npy), and the matmul peak of the row's precision
    (row_precision, default `precision`) and engine."""
    from .export.onnx_sampler import OnnxSampler
    openvino = engine == "openvino"
    s = OnnxSampler(onnx_path, "cpu" if openvino else provider, threads, engine=engine,
                    precision=precision if openvino else "auto")
    runs = [s.sample(batch, sampler, steps, return_timing=True) for _ in range(repeats + 1)][1:]
    np.save(out, runs[-1][0])
    return {"timings": [timing for _, timing in runs],
            "peak": onnx_matmul_peak(row_precision or precision, threads=threads, engine=engine)}


# torch eager, torch.compile, onnxruntime, OpenVINO (the float32 file at fp32 or bf16, or the int8 file), the C++ runner
# on onnxruntime and on OpenVINO (ddpm_runner --engine openvino)
BACKENDS = ("torch", "compile", "ort", "openvino", "cpp", "cpp-openvino", "web")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpp_runner", "build", "ddpm_runner")  # `make cpp`
OPENVINO_PRECISIONS = ("fp32", "bf16", "int8")
PRECISIONS = tuple(dict.fromkeys(get_args(SamplePrecision) + onnx_sampler.PRECISIONS))  # what bench sample runs


def _die_with_parent():
    """A preexec_fn for the child processes of bench sample (Linux): the kernel sends the child SIGKILL when this
    process dies, so an interrupted or killed bench leaves no sampler running. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def arm():
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_DEATHSIG
        if os.getppid() != parent:  # the parent died before the call
            os._exit(1)
    return arm


def bench_sample(preset: str = "digits", batch: int = 64, backends=("torch", "ort", "cpp"), repeats: int = 3,
                 runs=(("ancestral", 1000), ("ddim", 50)), device: str = "auto", threads: int | None = None,
                 precisions=("auto",), checkpoint: str | None = None, rows: list | None = None):
    """Images/s and network evaluations/s of each backend and precision for each (sampler, steps), the loop
    overhead (the loop's time / the time of the same number of bare network calls), and the achieved FLOP/s
    beside the matmul peak of the row's precision and library. torch runs fp32|bf16|fp16 (auto: see
    resolve_precision), onnxruntime and C++ an exported fp32|fp16|int8 file (auto: fp32), OpenVINO (in Python
    and in C++) the fp32 file at fp32|bf16 (auto: bf16 where the CPU has it) and the int8 file, the web page
    (`ddpm web`, onnxruntime-web's wasm in headless Chromium) the fp32 file, its FLOP/s beside onnxruntime's peak.

    Without a checkpoint the weights are the preset's initialisation with small random weights in its
    zero-initialised layers (speed does not depend on them) and int8 is calibrated on uniform noise images.
    With an (unconditional) checkpoint its EMA weights are timed, int8 is calibrated on its training images,
    and for 8x8 digits each row also gives the FD (see `ddpm fd`) of the `batch` (> 1) images it sampled last: no
    speed without its quality. Each row is appended to `rows` (a new list if None) as it is measured, so that a
    caller keeps the rows finished before an error; what the backends need is checked before any is timed."""
    dev = resolve_device(device)
    check_backends(backends, precisions, dev)
    bench = _SampleBench(*_bench_model(checkpoint, preset), dev, batch, repeats, runs, threads)
    rows = [] if rows is None else rows
    for backend in backends:
        for precision in _backend_precisions(backend, precisions, dev):
            timed = bench.torch_rows if backend in ("torch", "compile") else \
                bench.onnx_rows if backend in ("ort", "openvino") else bench.web_rows if backend == "web" else \
                bench.cpp_rows
            for row in timed(backend, precision):
                rows.append(row)
    return rows


def _bench_model(checkpoint: str | None, preset: str) -> tuple:
    """(model, diffusion, image shape, calibration images (a function), whether rows get an FD) that bench sample
    times: a checkpoint's EMA weights, or the preset's initialisation with small random weights in its
    zero-initialised layers (OpenVINO cannot compile an int8 convolution of zeros; speed does not depend on them)."""
    if checkpoint:
        model, diffusion, cfg, image_shape = load_model(checkpoint, True)
        if model.class_names:
            raise UserError(f"{checkpoint} is class-conditional: bench sample times unconditional models")
        calibration = lambda: calibration_images(cfg)  # noqa: E731 (int8 only: imported weights name no data)
        return model, diffusion, image_shape, calibration, tuple(image_shape) == (1, 8, 8)
    model = unet.build_unet(preset)
    with torch.no_grad():  # each residual branch's last convolution, attention's output, conv_out
        for weight in model.parameters():
            if weight.dim() > 1 and not weight.any():
                torch.nn.init.normal_(weight, std=0.01)
    image_shape = (model.config["in_channels"], model.config["image_size"], model.config["image_size"])
    calibration = lambda: np.random.default_rng(0).uniform(-1, 1, (256, *image_shape)).astype(np.float32)  # noqa: E731
    return model, Diffusion(beta_schedule("linear", 1000)), image_shape, calibration, False


class _SampleBench:
    """The rows of bench sample for one model: each backend's timings of every (sampler, steps) run, at a precision."""

    def __init__(self, model, diffusion, image_shape, calibration, with_fd: bool, dev, batch, repeats, runs, threads):
        import tempfile
        self.model, self.diffusion, self.image_shape, self.calibration = model.to(dev).eval(), diffusion, image_shape, \
            calibration
        self.dev, self.batch, self.repeats, self.runs, self.threads = dev, batch, repeats, runs, threads
        self.quality = fd_of_samples() if with_fd and batch > 1 else None  # an FD needs a covariance
        self.flops = unet.flops_per_forward(model)  # per image and network call
        self.provider = "cuda" if dev.type == "cuda" else "cpu"
        self.tmp, self.onnx_files = tempfile.mkdtemp(), {}
        self.out = os.path.join(self.tmp, "x.npy")

    def onnx_file(self, precision: str) -> str:
        """The model exported at `precision`, once."""
        if precision not in self.onnx_files:
            from .export.onnx_export import export_onnx
            self.onnx_files[precision] = os.path.join(self.tmp, f"model-{precision}.onnx")
            export_onnx(self.model.cpu(), self.diffusion, self.image_shape, self.onnx_files[precision],
                        precision=precision, calibration_images=self.calibration() if precision == "int8" else None,
                        check=False)
            self.model.to(self.dev)
        return self.onnx_files[precision]

    def row(self, backend, precision, sampler, steps, times, bare, where, peak, samples) -> dict:
        r = _bench_row(backend, precision, sampler, steps, self.batch, times, bare, where, (self.flops, peak))
        return {**r, "fd": self.quality(samples)} if self.quality else r

    def torch_rows(self, backend: str, precision: str):
        inputs = noisy_inputs(self.calibration(), self.diffusion.betas, 0) if precision == "int8" else None
        net = AtPrecision(self.model, precision, inputs)
        net = compile_for_sampling(net) if backend == "compile" else net
        dev, shape = self.dev, (self.batch, *self.image_shape)
        x, t = torch.randn(shape, device=dev), torch.full((self.batch,), 500, device=dev, dtype=torch.long)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        peak, last = matmul_peak(AUTOCAST_DTYPE.get(precision, torch.float32), dev), []
        for sampler, steps in self.runs:
            plan = make_plan(self.diffusion, sampler, steps)
            gen = torch.Generator(dev).manual_seed(0)
            times, bare = _timed(lambda: last.append(sample(net, plan, shape, torch_noise(gen, dev))), self.repeats,
                                 sync, bare=torch.no_grad()(lambda: [net(x, t) for _ in range(steps)]))
            yield self.row(backend, precision, sampler, steps, times, bare, str(dev), peak, last[-1])

    def onnx_rows(self, backend: str, precision: str):
        # In a process of its own, as the C++ runner: after torch has run, its OpenMP threads keep spinning in this
        # process and slow onnxruntime's, which is not the sampler's cost.
        probe = ("import json, sys; from ddpm_reference import bench; "
                 "print(json.dumps(bench._ort_bench(*json.loads(sys.argv[1]))))")
        engine = "openvino" if backend == "openvino" else "onnxruntime"
        file, engine_precision = _file_and_engine_precision(backend, precision)
        for sampler, steps in self.runs:  # the network's time inside the same loop (as the C++ runner reports it)
            args = [self.onnx_file(file), self.provider, self.threads, self.batch, sampler, steps, self.repeats,
                    engine_precision, self.out, engine, precision]
            res = _child_json([sys.executable, "-c", probe, json.dumps(args)], backend)
            times, bare = [r["total_s"] for r in res["timings"]], [r["network_s"] for r in res["timings"]]
            yield self.row(backend, precision, sampler, steps, times, bare, res["timings"][0]["provider"], res["peak"],
                           np.load(self.out))

    def cpp_rows(self, backend: str, precision: str):
        openvino = backend == "cpp-openvino"
        peak = onnx_matmul_peak(precision, threads=self.threads, engine="openvino" if openvino else "onnxruntime")
        file, engine_precision = _file_and_engine_precision(backend, precision)
        for sampler, steps in self.runs:
            cmd = [RUNNER, "--model", self.onnx_file(file), "--num-samples", str(self.batch), "--batch-size",
                   str(self.batch), "--sampler", sampler, "--steps", str(steps), "--json", "--out", self.out]
            cmd += ["--engine", "openvino", "--precision", engine_precision] if openvino else ["--provider",
                                                                                             self.provider]
            cmd += ["--threads", str(self.threads)] if self.threads else []
            runs_json = [_child_json(cmd, backend) for _ in range(self.repeats + 1)][1:]
            times, bare = [r["total_s"] for r in runs_json], [r["network_s"] for r in runs_json]
            yield self.row(backend, precision, sampler, steps, times, bare, runs_json[0]["provider"], peak,
                           np.load(self.out))


    def web_rows(self, backend: str, precision: str):
        """The page in a headless Chromium of its own for every repeat (and a first one left out, as the C++
        runner's): the loop's time and the network's inside it, as the page measures them."""
        peak = onnx_matmul_peak(precision, threads=self.threads)
        for sampler, steps in self.runs:
            runs = []
            for _ in range(self.repeats + 1):
                try:
                    runs.append(web.run_headless(self.onnx_file(precision), 3600, sampler=sampler, steps=steps,
                                                 num_samples=self.batch, batch_size=self.batch, threads=self.threads))
                except web.WebError as e:
                    raise UserError(f"backend web: {e}") from None
                if not runs[-1]["ok"]:
                    raise UserError(f"backend web: the page: {runs[-1]['error']}")
            times, bare = [r["seconds"] for r in runs[1:]], [r["network_seconds"] for r in runs[1:]]
            where = f"Chromium, onnxruntime-web {runs[-1]['provider']} ({runs[-1]['threads']} threads)"
            yield self.row(backend, precision, sampler, steps, times, bare, where, peak, runs[-1]["samples"])


def check_backends(backends, precisions, device: torch.device) -> None:
    """A UserError, before anything is timed, for a backend this machine cannot run: an unknown name, a C++ runner
    that is not built, OpenVINO or torchao (int8) not installed, a precision the CPU lacks."""
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"backends must be among {', '.join(BACKENDS)}, got {backend!r}")
        if backend.startswith("cpp") and not os.path.exists(RUNNER):
            raise UserError(f"{RUNNER} not built: run `make cpp` (or drop {backend} from --backends)")
        if backend == "web":
            try:
                web.check_installed(), web.browser()
            except web.WebError as e:
                raise UserError(f"backend web: {e}") from None
        chosen = _backend_precisions(backend, precisions, device)
        if backend == "compile" and "int8" in chosen and importlib.util.find_spec("torchao") is None:
            raise UserError("the int8 rows of the compile backend need torchao: pip install 'ddpm-reference[int8]'")


def _file_and_engine_precision(backend: str, precision: str) -> tuple[str, str]:
    """(the precision of the exported file a row runs, the precision its engine is asked for): onnxruntime runs the
    file of the row's precision in that precision; OpenVINO runs the float32 file at fp32 or bf16, and the int8 file
    with its other operations at auto (bf16 where the CPU has it)."""
    if backend not in ("openvino", "cpp-openvino"):
        return precision, precision
    return ("int8", "auto") if precision == "int8" else ("fp32", precision)


def _child_json(cmd: list[str], backend: str) -> dict:
    """The JSON object on the last line of a measuring child process's output, or a UserError with the last line of
    its errors (a C++ runner built without OpenVINO, a file the engine cannot read)."""
    done = subprocess.run(cmd, preexec_fn=_die_with_parent(), capture_output=True, text=True)
    if done.returncode:
        said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise UserError(f"backend {backend}: {said}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _backend_precisions(backend: str, precisions, device: torch.device) -> list[str]:
    """The precisions of `precisions` that `backend` runs, auto resolved (torch: resolve_precision; OpenVINO:
    openvino_engine.resolve_precision, which also refuses bf16 on a CPU without it; an ONNX file: fp32), in
    order, once each."""
    torch_side = backend in ("torch", "compile")
    openvino = backend in ("openvino", "cpp-openvino")
    runs = (get_args(SamplePrecision)[1:] if backend == "compile" else get_args(Precision)[1:]) if torch_side else \
        OPENVINO_PRECISIONS if openvino else ("fp32",) if backend == "web" else \
        onnx_sampler.PRECISIONS  # int8 in torch: compiled only
    for p in precisions:
        if p not in PRECISIONS:
            raise ValueError(f"precision must be among {', '.join(PRECISIONS)}, got {p!r}")
    if openvino:
        return list(dict.fromkeys(p if p == "int8" else _openvino_precision(p) for p in precisions
                                  if p in (*runs, "auto")))
    chosen = [(resolve_precision(p, device)[0] if torch_side else "fp32") if p == "auto" else p for p in precisions]
    return list(dict.fromkeys(p for p in chosen if p in runs))


def _openvino_precision(precision: str) -> str:
    """OpenVINO's precision for `precision` on this CPU (auto: bf16 where the CPU has it), or a UserError without
    the openvino package or, for bf16, without a CPU that has it."""
    try:
        import openvino as ov
        from .export.openvino_engine import OpenVinoError, resolve_precision as openvino_precision
    except ModuleNotFoundError as e:
        raise UserError(f"the openvino backend needs the openvino package ({e}): pip install "
                        "'ddpm-reference[openvino]', or drop openvino from --backends") from None
    try:
        return openvino_precision(precision, ov.Core())[0]
    except OpenVinoError as e:
        raise UserError(f"openvino: {e}") from None


def _bench_row(backend, precision, sampler, steps, batch, times, network_times, where, cost):
    """One report row; overhead is the median over repeats of loop time / network time of that repeat;
    cost = (FLOP per network call and image, the matmul peak FLOP/s of the row's precision) gives the
    achieved GFLOP/s and its share of that peak."""
    med = float(np.median(times))
    evals_per_s = batch * steps / med
    return {"backend": backend, "precision": precision, "sampler": sampler, "steps": steps, "batch": batch,
            "device": where,
            **_median_spread(times), "images_per_s": batch / med, "net_evals_per_s": evals_per_s,
            "network_s": float(np.median(network_times)),
            "overhead": float(np.median(np.array(times) / np.array(network_times))),
            "achieved_gflops": evals_per_s * cost[0] / 1e9, "of_matmul_peak": evals_per_s * cost[0] / cost[1]}


def bench_train(preset: str = "digits", batch: int = 64, precision: str = "auto", compile: bool = False,
                channels_last: bool = False, synthetic: bool = True, steps: int = 20, repeats: int = 3,
                device: str = "auto"):
    """Training images/s after warm-up (median of `repeats` timings of `steps` steps of Trainer.train_step,
    the step `ddpm train` runs, with the default TrainConfig otherwise), peak memory and the achieved
    FLOP/s, counting a training step as 3 forward passes (forward + backward), beside the matmul peak of the
    same precision on the same device (matmul_peak)."""
    import resource
    cfg = TrainConfig(preset=preset, batch_size=batch, precision=precision, compile=compile,
                      channels_last=channels_last, device=device)
    cfg.validate()
    dev = resolve_device(device)
    C, S = preset_config(preset)["in_channels"], preset_config(preset)["image_size"]
    if synthetic or preset != "digits":
        data = torch.randint(0, 256, (max(batch, 256), C, S, S), dtype=torch.uint8, device=dev)
    else:
        data = torch.from_numpy(load_digits_data()[0]).to(dev)
    trainer = Trainer(cfg, data.shape[1:], dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = _timed(lambda: [trainer.train_step(data) for _ in range(steps)], repeats, sync)
    images_per_s = batch * steps / float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    flops = 3 * unet.flops_per_forward(trainer.model) * images_per_s
    dense = matmul_peak(AUTOCAST_DTYPE.get(trainer.precision, torch.float32), dev)
    return {"preset": preset, "batch": batch, "precision": trainer.precision, "compile": compile, "device": str(dev),
            **_median_spread([t / steps for t in times]), "images_per_s": images_per_s, "peak_memory_bytes": int(peak),
            "achieved_tflops": flops / 1e12, "matmul_peak_tflops": dense / 1e12, "of_matmul_peak": flops / dense}

