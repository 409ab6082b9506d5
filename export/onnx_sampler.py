# SPDX-License-Identifier: MIT
# Copyright (c) 2026 The DDPM reference authors
"""Sample from a DDPM exported by `ddpm export`, with numpy and onnxruntime only (no torch, no onnx).

This file is meant to be copied into an application as it is, with plan.py (the sampling plan, numpy) and
images.py (the image writer) beside it. It reads the schedule from the ONNX file's metadata, builds the plan of
plan.py (the one the torch executor and the C++ runner build; docs/internals.md, "The sampling plan and the ONNX
file") and executes it:

    sampler = OnnxSampler("model.onnx")               # provider "auto": CUDA if it loads, else CPU
    x = sampler.sample(64, "ddim", 50, seed=0)        # float32 [64, C, H, W] in about [-1, 1]
    save_images(x, "samples.png")

Each step runs the network, then a tiny second ONNX graph (built here, byte by byte, once per sampler and kind of
row) that applies the plan's update to x. Both run on the same execution provider with IO binding, so on CUDA x
never leaves the device between steps, and on the CPU the update costs a small fraction of the network's time
(BENCHMARKS.md). The CUDA path relies on onnxruntime synchronising the provider at the end of each run (its
default), which also makes network_s the real network time. The noise is numpy.random.RandomState(seed).
standard_normal, the stream the torch sampler (ddpm.numpy_noise) and the C++ runner draw: on CUDA each step's z
is drawn on the host and copied to the device, one host->device copy per step, the price of bit-exact noise.

An application that manages onnxruntime itself passes its own providers and session options:

    providers = [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    sampler = OnnxSampler("model.onnx", providers=providers, session_options=my_options)  # .provider: the one used

The update graphs run on the network's providers (those of the list that loaded, with their options) and
take the threads, thread-pool, spinning and log settings of its session options, nothing else (an
optimized_model_filepath or profiling there is about the network). The sampler never changes onnxruntime's
global state (its default logger's level belongs to the application).

On a CPU the network can run on OpenVINO instead, in bfloat16 where the CPU has AVX512-BF16 or AMX (copy
openvino_engine.py beside this file; it needs the openvino package), with the same plan, noise and update graphs:

    sampler = OnnxSampler("model.onnx", engine="openvino")    # precision "auto": bf16 where fast; .why says why
"""
from __future__ import annotations

import _ctypes
import ctypes
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import onnxruntime as ort

if __package__:
    from .. import images, plan as plans
else:  # this file copied into an application, with plan.py and images.py beside it
    import images
    import plan as plans

# The plan's and the image writer's names, importable from here as before they had modules of their own.
Plan, PlanOptions, make_plan, ddim_inversion_plan = (plans.Plan, plans.PlanOptions, plans.make_plan,
                                                     plans.ddim_inversion_plan)
SAMPLERS, SPACINGS, MULTISTEP = plans.SAMPLERS, plans.SPACINGS, plans.MULTISTEP
PARAMETERIZATIONS, VARIANCES, DEFAULT_GUIDANCE = plans.PARAMETERIZATIONS, plans.VARIANCES, plans.DEFAULT_GUIDANCE
default_spacing, balanced_labels, slerp = plans.default_spacing, plans.balanced_labels, plans.slerp
save_images, image_grid, to_uint8, write_atomically = (images.save_images, images.image_grid, images.to_uint8,
                                                       images.write_atomically)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
ENGINES = ("onnxruntime", "openvino")  # what runs the network (openvino: openvino_engine.py, the openvino package)
PRECISIONS = ("fp32", "fp16", "int8")  # how an exported network computes (ddpm.precision); its inputs and output are float32
FORMAT = "1"


class ModelError(ValueError):
    """The file is not a DDPM model this sampler can run, or the requested provider cannot run it."""


# ------------------------------------------------------------------- the per-step update as ONNX

def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _field(number: int, value) -> bytes:
    """One protobuf field: int -> varint, str/bytes -> length-delimited, list -> repeated."""
    if isinstance(value, list):
        return b"".join(_field(number, v) for v in value)
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    value = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(value)) + value


# The update of docs/internals.md's "Executing the plan", in the torch sampler's order of operations. c holds
# the row's coefficients as float32 (COEFFICIENTS, then the M weights of the earlier x0s); z is all zeros
# on rows that add no noise.
COEFFICIENTS = ("x0_x", "x0_o", "mean_x0", "mean_xt", "sigma", "log_var_min", "log_var_max", "lo", "hi", "one", "half")
_UPDATE = """Mul x0_x x -> a; Mul x0_o o -> b; Add a b -> x0u; Max x0u lo -> x0l; Min x0l hi -> x0
             Mul mean_x0 x0 -> m1; Mul mean_xt x -> m2; Add m1 m2 -> mean0"""
_LEARNED = """Add v one -> f1; Mul f1 half -> frac; Mul frac log_var_max -> p1; Sub one frac -> q
              Mul q log_var_min -> p2; Add p1 p2 -> p; Mul half p -> ph; Exp ph -> s"""


def step_graph(learned: bool, split_output: bool, memory: int = 0, guided: bool = False) -> bytes:
    """A serialised ONNX model (opset 17) of one plan row, x_next = update(x, out, z, c, x0_1..x0_M):
    x0 = clip(x0_x x + x0_o o), x_next = mean_x0 x0 + mean_xt x + w_1 x0_1 + ... + w_M x0_M + s z, with
    s = sigma, or Nichol & Dhariwal's Eq. (15) from the variance channels v when learned; o, v = the two
    halves of out when split_output, else o = out. With memory M > 0 it also outputs x0, the next row's x0_1.
    guided: out is [2B] (the conditional, then the unconditional half), o = o_u + scale (o_c - o_u) and v the
    conditional half's; it also outputs x_pair = [x_next; x_next], the network's next input."""
    weights = [f"w{j}" for j in range(1, memory + 1)]
    text = f"Split c -> {' '.join(COEFFICIENTS + tuple(weights))}; "
    if guided:
        text += "Halve out -> cond uncond; " + ("Split cond -> oc v; Split uncond -> ou vu; " if split_output else
                                                 "Identity cond -> oc; Identity uncond -> ou; ")
        text += "Sub oc ou -> gd; Mul scale gd -> gsd; Add ou gsd -> o; " + _UPDATE + ";"
    else:
        text += ("Split out -> o v; " if split_output else "Identity out -> o; ") + _UPDATE + ";"
    text += "".join(f"Mul {w} x0_{j} -> q{j}; Add mean{j - 1} q{j} -> mean{j};" for j, w in enumerate(weights, 1))
    text += (_LEARNED if learned else "Identity sigma -> s") + f"; Mul s z -> n; Add mean{memory} n -> x_next"
    text += "; Concat x_next x_next -> x_pair" if guided else ""
    nodes = []
    for statement in text.replace("\n", ";").split(";"):
        op, *inputs = statement.split("->")[0].split()
        outputs = statement.split("->")[1].split()
        # Split of a network output: channels (axis 1); Halve: the batch's two halves; Concat: along the batch
        axis = {"Halve": 0, "Concat": 0}.get(op, 1 if op == "Split" and inputs != ["c"] else None)
        op = "Split" if op == "Halve" else op
        attribute = [_field(1, "axis") + _field(3, axis) + _field(20, 2)] if axis is not None else []
        nodes.append(_field(1, inputs) + _field(2, outputs) + _field(4, op) + _field(5, attribute))

    def tensor(name, dims):  # ValueInfoProto of a float tensor; str dims are symbolic
        shape = _field(1, [_field(2 if isinstance(d, str) else 1, d) for d in dims])
        return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))
    image, output = ["B", "C", "H", "W"], ["B2" if guided else "B", "C_out", "H", "W"]
    inputs = [tensor("x", image), tensor("out", output), tensor("z", image),
              tensor("c", [len(COEFFICIENTS) + memory])] + [tensor(f"x0_{j}", image) for j in range(1, memory + 1)]
    inputs += [tensor("scale", [1])] if guided else []
    outputs = [tensor("x_next", image)] + ([tensor("x0", image)] if memory else [])
    outputs += [tensor("x_pair", ["B2", "C", "H", "W"])] if guided else []
    graph = _field(1, nodes) + _field(2, "ddpm_step") + _field(11, inputs) + _field(12, outputs)
    return _field(1, 8) + _field(8, _field(1, "") + _field(2, 17)) + _field(7, graph)


def step_coefficients(plan: Plan, k: int) -> np.ndarray:
    """The float32 vector c of row k, in COEFFICIENTS order (lo, hi = -1, 1 when clipping, else +-inf), then
    the row's M weights of the earlier x0 predictions."""
    lim = 1.0 if plan.clip else np.inf
    values = [getattr(plan, key)[k] for key in COEFFICIENTS[:7]] + [-lim, lim, 1.0, 0.5, *plan.mean_x0_prev[k]]
    return np.array(values, dtype=np.float32)


# ---------------------------------------------------------------------------------- the sampler

# The update graphs share the network's threads, thread pools and log levels; the rest of an app's session
# options concerns its network, and some would be wrong for a second graph (optimized_model_filepath would
# overwrite that file). Providers whose tensors live on a CUDA device take x as CUDA OrtValues.
_STEP_OPTIONS = ("intra_op_num_threads", "inter_op_num_threads", "use_per_session_threads", "log_severity_level",
                 "log_verbosity_level")
_STEP_CONFIG = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
_CUDA_DEVICE = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _cuda_loads() -> bool:
    """Whether onnxruntime's CUDA provider library loads (CUDA, cuBLAS, the driver found), found out without a
    word on stderr. onnxruntime reports a provider library that fails to load on its global logger, which
    SessionOptions.log_severity_level does not reach (onnxruntime 1.31: the error and warning still print), and
    the global level has no getter to restore it from: it is the application's. So on Linux this repeats the
    two dlopen calls onnxruntime makes (the provider bridge with global symbols, then the provider; both
    RTLD_NOW, from the same folder) and closes them again. Elsewhere, or where the library is not where it
    looks, it answers True and onnxruntime's own attempt decides (and may print why it failed)."""
    folder = os.path.dirname(os.path.abspath(ort.capi.__file__))
    library = os.path.join(folder, "libonnxruntime_providers_cuda.so")
    if not sys.platform.startswith("linux") or not os.path.isfile(library) or "cuda-plugin-ep=" in ort.get_build_info():
        return True
    handles = []
    try:
        for path, mode in ((os.path.join(folder, "libonnxruntime_providers_shared.so"), os.RTLD_GLOBAL),
                           (library, os.RTLD_LOCAL)):
            handles.append(ctypes.CDLL(path, mode=mode)._handle)
        return True
    except OSError:
        return False
    finally:
        for handle in reversed(handles):
            _ctypes.dlclose(handle)  # POSIX only, as is this path


def _provider_name(entry) -> str | None:
    """The name in an entry of a providers list (a name, or a (name, options dict) pair); None if it is neither."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], dict):
        entry = entry[0]
    return entry if isinstance(entry, str) else None


def _providers(provider: str, providers) -> list:
    """The providers list for InferenceSession: an app's `providers`, checked, or the one `provider` names
    ("auto": CUDA then CPU where CUDA's library loads, else CPU alone)."""
    available = ort.get_available_providers()
    if providers is not None:
        if provider != "auto":
            raise ValueError(f"give provider or providers, not both (provider={provider!r}, providers={providers!r})")
        names = [_provider_name(p) for p in providers] if isinstance(providers, (list, tuple)) else []
        if not names or not all(name in available for name in names):
            raise ValueError("providers must be a non-empty list of provider names or (name, options dict) pairs, "
                             f"from those this onnxruntime has: {', '.join(available)}; got {providers!r}")
        return list(providers)
    plans.check_option("provider", provider, ("auto", *PROVIDERS))
    cuda = PROVIDERS["cuda"] in available
    if provider == "cuda" and not cuda:
        raise ModelError("provider 'cuda' needs onnxruntime-gpu: this onnxruntime has no CUDAExecutionProvider "
                         "(use provider='cpu')")
    if provider == "cpu" or not cuda or (provider == "auto" and not _cuda_loads()):
        return [PROVIDERS["cpu"]]
    return [PROVIDERS["cuda"], PROVIDERS["cpu"]]


def _session_options(provider: str, threads: int | None, session_options):
    """An app's SessionOptions as given, or the sampler's: `threads` intra-op threads; errors only in the
    session's log under "auto", where a node left to the CPU (shape arithmetic) is the sampler's business."""
    if session_options is not None:
        if threads is not None:
            raise ValueError("give threads or session_options, not both: "
                             "set intra_op_num_threads on the SessionOptions")
        if not isinstance(session_options, ort.SessionOptions):
            raise ValueError("session_options must be an onnxruntime.SessionOptions, "
                             f"got {type(session_options).__name__}")
        return session_options
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if provider == "auto":
        options.log_severity_level = 3
    return options


def _step_options(options):
    """The update graphs' SessionOptions: the network's threads, thread pools and log levels (_STEP_OPTIONS)."""
    step = ort.SessionOptions()
    for name in _STEP_OPTIONS:
        setattr(step, name, getattr(options, name))
    for key in _STEP_CONFIG:
        try:
            step.add_session_config_entry(key, options.get_session_config_entry(key))
        except RuntimeError:  # not set there
            pass
    return step


class OnnxSampler:
    """A DDPM in an ONNX file written by `ddpm export`, ready to sample.

    provider: "auto" (CUDA if its library loads, else CPU; its sessions log errors only), "cpu" or "cuda"
    (ModelError if CUDA cannot be used). threads: onnxruntime's intra-op threads (None: its default).
    providers: an onnxruntime providers list as InferenceSession takes it (names, or (name, options dict) pairs,
    in order of preference), instead of `provider` (giving both is a ValueError); a provider that fails to load
    is skipped, as onnxruntime does, and one that raises is an error, never a silent fall back.
    session_options: an onnxruntime.SessionOptions for the network, used as given (with threads: a ValueError;
    set intra_op_num_threads on it). The per-step update graphs run on the same providers (see the module's
    docstring). engine: "onnxruntime", or "openvino" (the network on OpenVINO's CPU plugin, see openvino_engine.py;
    the update graphs on onnxruntime's CPU provider). precision: how the network computes; "auto" is the file's own
    (ddpm.precision) under onnxruntime, and bf16 under OpenVINO where the CPU has AVX512-BF16 or AMX, else fp32;
    "fp32" or "bf16" ask OpenVINO for that (a ModelError where the CPU cannot); OpenVINO runs an int8 file's
    quantized operations in int8 and reports precision "int8", the others at the precision asked. Attributes:
    provider (the one in use), precision and why (the reason for it), betas and alphas_cumprod (float64), T,
    parameterization, variance, image_shape (C, H, W), clip_denoised, metadata, and default_options: the plan
    the file samples with when no sampler is named (ddpm.sampler, ddpm.steps, ddpm.spacing: a distilled student's;
    ancestral otherwise) and its clip (ddpm.clip_denoised).
    """

    def __init__(self, path, provider: str = "auto", threads: int | None = None, *, providers=None,
                 session_options=None, engine: str = "onnxruntime", precision: str = "auto"):
        self.path = os.fspath(path)
        plans.check_option("engine", engine, ENGINES)
        openvino = engine == "openvino"
        if openvino and (provider not in ("auto", "cpu") or providers is not None):
            raise ModelError("the openvino engine runs the network on the CPU: give provider 'auto' or 'cpu' and no "
                             "providers list")
        provider = "cpu" if openvino else provider
        options = _session_options(provider, threads, session_options)
        carried = providers is None and provider == "auto" and session_options is not None and \
            getattr(session_options, "has_providers", lambda: False)()  # chosen there by add_provider_for_devices
        wanted = None if carried else _providers(provider, providers)
        if not os.path.isfile(self.path):
            raise ModelError(f"{self.path}: no such file")
        if openvino:
            self._load_openvino(options, precision, threads)
        else:
            self._load(options, wanted, provider == "cuda", providers is not None or session_options is not None)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self._read_metadata()
        self._check_signature()
        own = self.metadata.get("ddpm.precision", "fp32")
        if openvino and own == "int8":  # OpenVINO runs the quantized operations in int8, the others at its precision
            self.why = f"the file's ddpm.precision; its other operations {self.precision} ({self.why})"
            self.precision = "int8"
        elif not openvino:
            if precision not in ("auto", own):
                raise ModelError(f"precision {precision!r}: onnxruntime computes in the file's own precision ({own}); "
                                 "export the model at another precision, or use the openvino engine for bf16")
            self.precision, self.why = own, "the file's ddpm.precision"
        self._steps = {}  # (learned, memory, guided) -> the session of that row update, built once when first needed

    def _load_openvino(self, options, precision: str, threads: int | None) -> None:
        """The network on OpenVINO (openvino_engine.py, which needs the openvino package; ModelError without it),
        the update graphs on onnxruntime's CPU provider with the network's threads."""
        try:
            if __package__:
                from .openvino_engine import OpenVinoError, OpenVinoSession
            else:  # this file copied into an application, with openvino_engine.py beside it
                from openvino_engine import OpenVinoError, OpenVinoSession
        except ModuleNotFoundError as e:
            if e.name != "openvino":
                raise
            raise ModelError("the openvino engine needs the openvino package: pip install 'ddpm-reference[openvino]' "
                             "(or pip install openvino)") from None
        try:
            self.session = OpenVinoSession(self.path, precision, threads)
        except OpenVinoError as e:
            raise ModelError(str(e)) from None
        self.precision, self.why, self.provider = self.session.precision, self.session.why, self.session.provider
        self._providers, self._step_options = [PROVIDERS["cpu"]], _step_options(options)
        self._device, self._device_id = "cpu", 0

    def _load(self, options, wanted: list | None, cuda: bool, given: bool) -> None:
        """The network's session on the `wanted` providers (None: those of the options), ModelError where the
        file cannot be loaded or `cuda` was asked for and did not load; then what the update graphs run on:
        the entries of `wanted` that loaded (with their options), and the device of x."""
        try:
            # enable_fallback=0: onnxruntime's Python fallback would print to stdout and retry on the CPU alone
            self.session = ort.InferenceSession(self.path, options, providers=wanted, enable_fallback=0)
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            what = ("cannot be loaded with these providers or session options" if given
                    else "is not a readable ONNX model")
            raise ModelError(f"{self.path} {what} ({reason[:200]})") from None
        used = self.session.get_providers()
        if cuda and used[0] != PROVIDERS["cuda"]:
            raise ModelError("provider 'cuda' requested but CUDAExecutionProvider failed to load (CUDA, cuDNN or a GPU "
                             "is missing; onnxruntime's message above says which); use provider='cpu'")
        self.provider = used[0]
        self._providers = [p for p in wanted if _provider_name(p) in used] if wanted else used
        self._step_options = _step_options(options)
        self._device = "cuda" if self.provider in _CUDA_DEVICE else "cpu"
        device_id = self.session.get_provider_options().get(self.provider, {}).get("device_id", "0")
        self._device_id = int(device_id) if self._device == "cuda" else 0

    def _meta(self, key: str) -> str:
        if key not in self.metadata:
            raise ModelError(f"{self.path} is not a DDPM model: missing metadata '{key}' "
                             "(export it with `ddpm export`)")
        return self.metadata[key]

    def _read_metadata(self) -> None:
        if self._meta("ddpm.format") != FORMAT:
            raise ModelError(f"{self.path}: ddpm.format {self.metadata['ddpm.format']!r} is not supported "
                             f"(this sampler reads format {FORMAT}; re-export the model)")
        try:
            self.betas = np.array([float(b) for b in self._meta("ddpm.betas").split(",")], dtype=np.float64)
            self.T = int(self._meta("ddpm.num_timesteps"))
            self.image_shape = tuple(int(s) for s in self._meta("ddpm.image_shape").split(","))
            self.num_classes = int(self.metadata.get("ddpm.num_classes", "0"))
            self.null_label = int(self.metadata.get("ddpm.null_label", str(self.num_classes)))
            self.class_names = [str(c) for c in json.loads(self.metadata.get("ddpm.class_names", "[]"))]
        except (ValueError, TypeError) as e:
            raise ModelError(f"{self.path}: malformed DDPM metadata ({e})") from None
        self.parameterization, self.variance = self._meta("ddpm.parameterization"), self._meta("ddpm.variance")
        clip, timestep = self._meta("ddpm.clip_denoised"), self.metadata.get("ddpm.timestep_dtype", "int64")
        checks = [
            (self.T == len(self.betas), f"ddpm.num_timesteps is {self.T} but there are {len(self.betas)} betas"),
            (((self.betas > 0) & (self.betas <= 1)).all(), "ddpm.betas must lie in (0, 1]"),
            (self.parameterization in PARAMETERIZATIONS, f"ddpm.parameterization {self.parameterization!r} is unknown"),
            (self.variance in VARIANCES, f"ddpm.variance {self.variance!r} is unknown"),
            (len(self.image_shape) == 3, f"ddpm.image_shape must be C,H,W, got {self.metadata['ddpm.image_shape']!r}"),
            (clip in ("true", "false"), f"ddpm.clip_denoised must be true or false, got {clip!r}"),
            (timestep == "int64", f"ddpm.timestep_dtype must be int64, got {timestep!r}"),
            (self.num_classes >= 0 and self.null_label == self.num_classes and len(self.class_names) == self.num_classes,
             "ddpm.num_classes K, ddpm.null_label K and K ddpm.class_names must agree"),
        ]
        for ok, problem in checks:
            if not ok:
                raise ModelError(f"{self.path}: bad DDPM metadata: {problem}")
        self.clip_denoised = clip == "true"
        self.default_options = self._default_options()
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        if self.parameterization == "eps" and self.alphas_cumprod[-1] == 0.0:
            raise ModelError(f"{self.path}: zero terminal SNR needs the v or x0 parameterization, not eps")

    def _default_options(self) -> PlanOptions:
        """The file's own plan (see the class): ddpm.sampler, ddpm.steps and ddpm.spacing, each checked."""
        sampler, steps = self.metadata.get("ddpm.sampler", "ancestral"), self.metadata.get("ddpm.steps")
        spacing = self.metadata.get("ddpm.spacing")
        for ok, problem in ((sampler in plans.SAMPLERS, f"ddpm.sampler {sampler!r} is unknown"),
                            (steps is None or steps.isdigit() and 1 <= int(steps) <= self.T,
                             f"ddpm.steps must be a whole number in 1..{self.T}, got {steps!r}"),
                            (spacing in (None, *plans.SPACINGS), f"ddpm.spacing {spacing!r} is unknown")):
            if not ok:
                raise ModelError(f"{self.path}: bad DDPM metadata: {problem}")
        return PlanOptions(sampler, int(steps) if steps else None, spacing=spacing, clip=self.clip_denoised)

    def _check_signature(self) -> None:
        """The graph must be eps_theta as docs/internals.md specifies: x float32 [B,C,H,W], t int64 [B] (and y int64 [B]
        for a class-conditional model) -> model_output."""
        C, H, W = self.image_shape
        self.out_channels = 2 * C if self.variance == "learned_range" else C
        want = {"x": ("tensor(float)", [C, H, W]), "t": ("tensor(int64)", []),
                "model_output": ("tensor(float)", [self.out_channels, H, W])}
        if self.num_classes:
            want["y"] = ("tensor(int64)", [])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        have = {a.name: (a.type, a.shape[1:]) for a in inputs + outputs}

        def fits(name):
            dtype, dims = have.get(name, (None, None))
            return dtype == want[name][0] and len(dims) == len(want[name][1]) and all(
                not isinstance(d, int) or d == w for d, w in zip(dims, want[name][1]))

        names = (sorted(a.name for a in inputs), [a.name for a in outputs])
        expected = ["t", "x", "y"] if self.num_classes else ["t", "x"]
        if names != (expected, ["model_output"]) or not all(map(fits, want)):
            found = ", ".join(f"{a.name} {a.type} {a.shape}" for a in inputs + outputs)
            raise ModelError(f"{self.path} is not a DDPM eps_theta graph: expected inputs x float32 [B,{C},{H},{W}], "
                             f"t int64 [B]{' and y int64 [B]' if self.num_classes else ''} and output model_output "
                             f"float32 [B,{self.out_channels},{H},{W}]; found {found}")

    def plan(self, options: PlanOptions | str | None = None, steps: int | None = None, **fields) -> Plan:
        """This model's plan for the options (plan.plan_options: a PlanOptions, or a sampler's name and steps, or
        the fields by name), with the file's own where none are given (plan.model_options, default_options)."""
        return make_plan(self.alphas_cumprod, self.parameterization, self.variance,
                         plans.model_options(self.default_options, options, steps, **fields))

    def inversion_plan(self, steps: int | None = None, spacing: str | None = None) -> Plan:
        """DDIM encoding x_0 -> x_T (see ddim_inversion_plan); decode with plan("ddim", steps, clip=False)."""
        return ddim_inversion_plan(self.alphas_cumprod, self.parameterization, steps, spacing)

    def sample(self, n: int, options: PlanOptions | str | None = None, steps: int | None = None, *, seed: int = 0,
               batch: int | None = None, progress: Callable[[int, int], None] | None = None,
               return_timing: bool = False, labels=None, guidance: float | None = None, **fields):
        """n samples of the plan of the options (see plan), float32 [n, C, H, W], drawn in batches of `batch`
        (default: all at once) from one RandomState(seed) stream: each batch in order draws x_T, then each noisy
        row's z. progress(k, K) is called after every network call (K = rows x number of batches). With return_timing,
        returns (x, {"total_s", "network_s", "steps", "provider", "precision", "precision_why"}); network_s is the
        time inside the network's runs.
        labels (n ints, a class-conditional model) and guidance: see run."""
        return self.run(self.plan(options, steps, **fields), n, seed, batch, progress, return_timing, labels, guidance)

    def run(self, plan: Plan, x: np.ndarray | int, seed: int = 0, batch: int | None = None,
            progress: Callable[[int, int], None] | None = None, return_timing: bool = False, labels=None,
            guidance: float | None = None):
        """Execute `plan` from x (float [n, C, H, W]: latents to decode, or images to encode), or from n
        draws of x_T when x is a number n; noise from RandomState(seed), batch by batch (see sample).
        A class-conditional model runs with the null label (unconditionally), or with n `labels` in
        0..K-1 and classifier-free guidance out_u + s (out_c - out_u) on the prediction channels (s =
        `guidance`, default DEFAULT_GUIDANCE; 1: one conditional call per row, 0: one unconditional call, else
        one call on 2B)."""
        start = time.perf_counter()
        given = not isinstance(x, (int, np.integer))
        n = len(x) if given else x
        batch = n if batch is None else batch
        if int(n) != n or n < 1 or int(batch) != batch or batch < 1:
            raise ValueError(f"n and batch must be positive integers, got n={n}, batch={batch}")
        if given and tuple(np.shape(x)[1:]) != self.image_shape:
            raise ValueError(f"x must be [n, {', '.join(map(str, self.image_shape))}], got {list(np.shape(x))}")
        labels, guidance = self._check_labels(labels, guidance, n)
        rng = np.random.RandomState(seed)
        coefficients = [self._ortvalue(step_coefficients(plan, k)) for k in range(len(plan))]
        result = np.empty((n, *self.image_shape), dtype=np.float32)
        network_s, done, total = 0.0, 0, len(plan) * -(-n // batch)
        for i in range(0, n, batch):
            b = min(batch, n - i)
            first = np.asarray(x[i:i + b], np.float32) if given else rng.standard_normal((b, *self.image_shape))
            y = None if labels is None else labels[i:i + b]
            result[i:i + b], seconds = self._run_batch(plan, coefficients, first.astype(np.float32), rng,
                                                       progress and (lambda k: progress(done + k, total)), y, guidance)
            network_s, done = network_s + seconds, done + len(plan)
        if not return_timing:
            return result
        return result, {"total_s": time.perf_counter() - start, "network_s": network_s, "steps": len(plan),
                        "provider": self.provider, "precision": self.precision, "precision_why": self.why}

    def _check_labels(self, labels, guidance: float | None, n: int):
        """(the labels as int64 [n] (the null label for a conditional model given none), the guidance scale), or
        ValueError."""
        if labels is None:
            if guidance not in (None, 1.0):
                raise ValueError("a guidance scale needs labels (the classes to guide to)")
            return (np.full(n, self.null_label, dtype=np.int64) if self.num_classes else None), 1.0
        if not self.num_classes:
            raise ValueError(f"{self.path} is an unconditional model: it takes no labels")
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu" or not ((labels >= 0) & (labels < self.num_classes)).all():
            raise ValueError(f"labels must be {n} whole numbers in 0..{self.num_classes - 1} (the classes "
                             f"{', '.join(self.class_names)}), got {labels.tolist()[:10]}")
        guidance = DEFAULT_GUIDANCE if guidance is None else guidance
        return (labels.astype(np.int64) if guidance != 0 else np.full(n, self.null_label, dtype=np.int64)), guidance

    def _ortvalue(self, array: np.ndarray):
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self._device, self._device_id)

    def _step_session(self, learned: bool, memory: int, guided: bool):
        key = (learned, memory, guided)
        if key not in self._steps:
            graph = step_graph(learned, self.out_channels == 2 * self.image_shape[0], memory, guided)
            self._steps[key] = ort.InferenceSession(graph, self._step_options, providers=self._providers,
                                                   enable_fallback=0)
        return self._steps[key]

    def _run_batch(self, plan: Plan, coefficients: list, x_first: np.ndarray, rng, tick, y=None, guidance=1.0):
        """One batch of the plan from x_first: x and the last M x0 predictions stay in OrtValues on the
        provider's device; returns (x, network seconds). Guided (labels y, guidance not 0 or 1): the network
        runs on [x; x] with labels [y; null], and the update combines the two halves and writes the next [x; x]."""
        b = _DeviceBatch(self, plan.memory, x_first, y, guided=y is not None and guidance not in (0.0, 1.0))
        timesteps = [self._ortvalue(np.full(b.net_batch, t, dtype=np.int64)) for t in plan.t]
        scale = self._ortvalue(np.array([guidance], dtype=np.float32))
        updates, network_s, M = {}, 0.0, plan.memory
        for k in range(len(timesteps)):
            b.net.bind_ortvalue_input("x", b.net_x)
            b.net.bind_ortvalue_input("t", timesteps[k])
            t0 = time.perf_counter()
            self.session.run_with_iobinding(b.net)
            network_s += time.perf_counter() - t0
            if plan.add_noise[k]:
                b.z.update_inplace(rng.standard_normal(x_first.shape).astype(np.float32))
            step = self._step_session(bool(plan.learned[k]), M, b.guided)
            if step not in updates:
                updates[step] = step.io_binding()
                updates[step].bind_ortvalue_input("out", b.out)
                if b.guided:
                    updates[step].bind_ortvalue_input("scale", scale)
            update = updates[step]
            update.bind_ortvalue_input("x", b.x)
            update.bind_ortvalue_input("z", b.z if plan.add_noise[k] else b.zeros)
            update.bind_ortvalue_input("c", coefficients[k])
            for j in range(1, M + 1):
                update.bind_ortvalue_input(f"x0_{j}", b.x0s[(k - j) % (M + 1)])
            if M:
                update.bind_ortvalue_output("x0", b.x0s[k % (M + 1)])
            update.bind_ortvalue_output("x_next", b.x_next)
            if b.guided:
                update.bind_ortvalue_output("x_pair", b.pair_next)
            step.run_with_iobinding(update)
            b.swap()
            if tick:
                tick(k + 1)
        return b.x.numpy(), network_s


class _DeviceBatch:
    """The OrtValues of one batch on the sampler's device: x and the next x (swapped after each row), the noise z
    and zeros, the network's output, the ring of the last M x0 predictions (zeros first), and, guided, [x; x] and
    the next one; the network's IO binding with its output and labels bound."""

    def __init__(self, sampler: OnnxSampler, memory: int, x_first: np.ndarray, y, guided: bool):
        shape = x_first.shape
        self.guided, self.net_batch = guided, 2 * shape[0] if guided else shape[0]
        net_shape, (_, H, W) = (self.net_batch, *shape[1:]), sampler.image_shape
        new = lambda shape: ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, sampler._device,  # noqa: E731
                                                                       sampler._device_id)
        self.x, self.x_next, self.z = new(shape), new(shape), new(shape)
        self.out = new((self.net_batch, sampler.out_channels, H, W))
        self.x.update_inplace(x_first)  # a copy: ortvalue_from_numpy would alias x_first, which the loop overwrites
        self.pair, self.pair_next = (new(net_shape), new(net_shape)) if guided else (None, None)
        if guided:
            self.pair.update_inplace(np.concatenate([x_first, x_first]))
            y = np.concatenate([y, np.full(len(y), sampler.null_label, dtype=np.int64)])
        self.zeros = sampler._ortvalue(np.zeros(shape, dtype=np.float32))
        self.x0s = [sampler._ortvalue(np.zeros(shape, dtype=np.float32)) for _ in range(memory + 1 if memory else 0)]
        self.net = sampler.session.io_binding()
        self.net.bind_ortvalue_output("model_output", self.out)
        self.labels = None if y is None else sampler._ortvalue(np.ascontiguousarray(y, dtype=np.int64))  # held: bound
        if self.labels is not None:
            self.net.bind_ortvalue_input("y", self.labels)

    @property
    def net_x(self):
        """The network's input: x, or [x; x] when guided."""
        return self.pair if self.guided else self.x

    def swap(self) -> None:
        """After a row: its x_next (and [x; x]) become the next row's input."""
        self.x, self.x_next = self.x_next, self.x
        if self.guided:
            self.pair, self.pair_next = self.pair_next, self.pair
