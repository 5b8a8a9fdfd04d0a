"""How a loaded net runs its test-time forward passes: eager PyTorch, torch.compile, onnxruntime, int8.

vggnet.evaluate runs every forward pass of the section 3.2 protocols through `Net.engine` when it
is set: `engine(key, module, x)` with key "crop" (the net on crops), "dense" (the fully-
convolutional form) or "dense:<layer>" (the dense form cut at a layer), `x` a normalised chunk
on the runtime's device and memory format, fp32 logits or maps out. `attach_engine` picks one:

- "eager": None, PyTorch as it stands (autocast for bf16, the runtime's memory format);
- "compile": torch.compile (inductor) with freezing, so weights become constants and each conv +
  ReLU one fused oneDNN call; tens of seconds of compilation per module and shape on 2 cores;
- "onnxruntime": the module exported with `torch.onnx.export(dynamo=True)` (dynamic batch; dynamic
  height and width for dense keys), run by an onnxruntime session with torch's thread count;
- precision "int8": the same ONNX file quantised by onnxruntime's post-training static
  quantisation (QDQ, per-channel int8 weights, int8 activations), calibrated on a few hundred of
  the net's training images.

ONNX files are cached on disk (default $XDG_CACHE_HOME/vggnet or ~/.cache/vggnet), named by a
hash of the weights, the key, the precision, the shape class and the library versions, so a
changed weight makes a new file and a second call skips the export (and the calibration, whose
images are stored next to the int8 file).

"auto" takes, per hardware class (vggnet.runtime.hardware_class), the engine measured fastest on
that class where it pays for its start-up cost; `AUTO_CHOICE` holds the decision and its reason.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import atomic_save, atomic_write
from .errors import UserError
from .nets import Net
from .runtime import ENGINES, Runtime, hardware_class

__all__ = ["ENGINES", "AUTO_CHOICE", "ORT_MIN_IMAGES", "CALIBRATION_IMAGES", "attach_engine", "choose_engine",
           "calibration_images", "default_cache_dir", "weights_digest", "export_int8_onnx", "OnnxEngine",
           "CastEngine", "CompiledEngine"]

# The engine "auto" takes for (hardware class, precision), and why: measured with `vggnet bench`
# (BENCHMARKS.md). "onnxruntime?" means onnxruntime when it pays for its export (see ORT_MIN_IMAGES).
AUTO_CHOICE: dict[tuple[str, str], tuple[str, str]] = {
    ("cpu", "fp32"): ("onnxruntime?", "onnxruntime fp32 runs VGG-16 1.4x faster than eager channels_last "
                                      "on CPUs without bf16 units (AVX2)"),
    ("cpu", "bf16"): ("eager", "bf16 is emulated on this CPU; no engine makes it fast"),
    ("cpu-bf16", "fp32"): ("eager", "eager channels_last (oneDNN, AVX-512) is faster than onnxruntime fp32 here"),
    ("cpu-bf16", "bf16"): ("eager", "eager bf16 on AMX with channels_last, weights cast to bf16 once (VGG-16: 1.3x faster "
                                    "than autocast, which casts every weight on every pass)"),
    ("cuda", "fp32"): ("eager", "cuDNN eager; compilation costs more than it saves for a test run"),
    ("cuda", "bf16"): ("eager", "cuDNN eager; compilation costs more than it saves for a test run"),
    ("cuda", "fp16"): ("eager", "cuDNN eager; compilation costs more than it saves for a test run"),
}
# Exporting VGG-16 takes about 10 s and pays for itself (at 1.4x) after about this many images at 224 px.
ORT_MIN_IMAGES = 200
CALIBRATION_IMAGES = 256  # "a few hundred training images" for int8 calibration
_CACHE_FORMAT = "vggnet-onnx-1"
_log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/vggnet, else ~/.cache/vggnet: where exported and quantised nets are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vggnet"


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes and bytes): changes whenever one weight does."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d: BN's counter
    return h.hexdigest()


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("engine onnxruntime and precision int8 need the onnxruntime package (pip install onnxruntime)") from None
    return onnxruntime


def calibration_images(net: Net, *, source: str | None = None, n: int = CALIBRATION_IMAGES, seed: int = 0) -> Tensor:
    """`n` training images of the net's data (or of `source`, a data spec as `vggnet train --data` takes),
    rescaled to the net's crop size and centre-cropped: (n, 3, S, S) pixels in [0, 1] for int8 calibration."""
    from torchvision.transforms.v2 import functional as F

    from .data import eval_images

    if source is None:
        if "data" not in net.meta:
            raise UserError(f"int8 needs calibration images and {net.name} does not say what data it was trained on; "
                            "give a folder of training images (--calibration DIR)")
        source = net.meta["data"]
    dataset, _ = eval_images(source, "train", seed=int(net.meta.get("seed", seed)))
    if len(dataset) == 0:
        raise UserError(f"no training images found in {source!r} for int8 calibration")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(dataset), generator=g)[:n].tolist()
    s = net.image_size
    return torch.stack([F.center_crop(F.resize(_pixels(dataset[i][0]), [s], antialias=True), [s, s]) for i in pick])


def _pixels(x: Tensor) -> Tensor:
    """uint8 pixels (as vggnet.data holds them) or floats in [0, 1] -> floats in [0, 1]."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _shape_class(key: str, x: Tensor) -> str:
    """Crops have one size per net (static height and width); dense inputs take any size."""
    return f"{x.shape[-2]}x{x.shape[-1]}" if key == "crop" else "any-hw"


def _artefact_name(digest: str, key: str, precision: str, shape: str, calibration: str) -> str:
    ort = _ort()
    parts = [_CACHE_FORMAT, digest, key, precision, shape, calibration, torch.__version__, ort.__version__]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _export_onnx(module: nn.Module, x: Tensor, key: str) -> bytes:
    """The module as ONNX bytes (opset from torch.onnx's dynamo exporter), batch dynamic; H, W too for dense keys."""
    from torch.export import Dim

    example = x[:1].detach().float().clone().contiguous().repeat(2, 1, 1, 1)  # batch 2: a batch of 1 would specialise
    dims = {0: Dim.AUTO} if key == "crop" else {0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example.clone(),), dynamo=True, dynamic_shapes=(dims,), verbose=False,
                                    input_names=["x"], output_names=["y"])
    return program.model_proto.SerializeToString()


def _quantize(fp32: bytes, calib: Tensor, tmp: Path) -> bytes:
    """onnxruntime static quantisation: QDQ, per-channel int8 weights, int8 activations (MinMax calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"x": c.numpy()} for c in calib.split(16)])

        def get_next(self):
            return next(self._it, None)

    (tmp / "fp32.onnx").write_bytes(fp32)
    quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"), skip_symbolic_shape=True)
    quantize_static(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), _Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    return (tmp / "int8.onnx").read_bytes()


class OnnxEngine:
    """Runs each key's module with onnxruntime from a cached ONNX file (fp32, or int8 when `precision` is)."""

    def __init__(self, net: Net, *, precision: str = "fp32", cache_dir: str | os.PathLike | None = None,
                 calibration: Tensor | None = None, digest: str | None = None) -> None:
        if precision not in ("fp32", "int8"):
            raise UserError(f"engine onnxruntime runs fp32 or int8, got precision {precision!r}; use eager for bf16")
        self.net, self.precision = net, precision
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.calibration = calibration
        self.digest = digest or weights_digest(net.model)
        self._sessions: dict[tuple[str, str], object] = {}

    def _calibration_tag(self) -> str:
        if self.precision != "int8":
            return "-"
        if self.calibration is None:
            return f"train-data:{self.net.meta.get('data')}:{CALIBRATION_IMAGES}"
        return "images:" + hashlib.sha256(_pixels(self.calibration).contiguous().numpy().tobytes()).hexdigest()

    def path(self, key: str, x: Tensor) -> Path:
        """Where the ONNX file for `key` at x's shape class lives (whether or not it exists yet)."""
        name = _artefact_name(self.digest, key, self.precision, _shape_class(key, x), self._calibration_tag())
        return self.cache_dir / f"{name}.onnx"

    def artefact(self, key: str, module: nn.Module, x: Tensor) -> Path:
        """The cached ONNX file for `key`, exported (and quantised) now if it is not there yet."""
        path = self.path(key, x)
        if path.exists():
            return path
        if self.precision == "int8":  # quantise the cached fp32 file (exported first if need be)
            fp32 = OnnxEngine(self.net, precision="fp32", cache_dir=self.cache_dir, digest=self.digest)
            onnx_bytes = fp32.artefact(key, module, x).read_bytes()
        else:
            onnx_bytes = _export_onnx(module, x, key)
        if self.precision == "int8":
            calib = self.calibration if self.calibration is not None else calibration_images(self.net)
            calib = _pixels(calib)
            inputs = self.net.normalise(calib)
            atomic_save({"pixels": (calib * 255).round().to(torch.uint8), "key": key}, path.with_suffix(".calib.pt"))
            with tempfile.TemporaryDirectory(prefix="vggnet-int8-") as tmp:
                onnx_bytes = _quantize(onnx_bytes, inputs, Path(tmp))
        atomic_write(path, onnx_bytes)
        return path

    def _session(self, key: str, module: nn.Module, x: Tensor):
        ort = _ort()
        found = self._sessions.get((key, _shape_class(key, x)))
        if found is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            options.log_severity_level = 3  # errors only
            found = ort.InferenceSession(str(self.artefact(key, module, x)), options,
                                         providers=["CPUExecutionProvider"])
            self._sessions[(key, _shape_class(key, x))] = found
        return found

    def __call__(self, key: str, module: nn.Module, x: Tensor) -> Tensor:
        session = self._session(key, module, x)
        out = session.run(None, {"x": x.detach().float().contiguous().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


class CastEngine:
    """Eager PyTorch in bf16 with the weights cast once, not on every pass.

    Under autocast each forward re-casts every fp32 weight to bf16 (for VGG-16, 138M values: about
    30% of a bf16 pass on a 2-core AMX CPU, by profile); here each module gets one bf16 copy (keyed
    like the other engines), rebuilt only when its parameters change in place. Inputs are cast to
    bf16, outputs come back as fp32.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._copies: dict[str, tuple[int, nn.Module]] = {}

    def __call__(self, key: str, module: nn.Module, x: Tensor) -> Tensor:
        try:
            version = sum(p._version for p in module.parameters())
        except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference)
            version = -1
        found = self._copies.get(key)
        if found is None or found[0] != version:
            copy_ = copy.deepcopy(module).to(dtype=self.runtime.dtype).eval()
            found = self._copies[key] = (version, copy_)
        with torch.inference_mode():
            return found[1](x.to(self.runtime.dtype)).float()


class CompiledEngine:
    """torch.compile (inductor) with freezing: weights as constants, conv + ReLU fused; one compilation per key."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._compiled: dict[str, Callable[[Tensor], Tensor]] = {}

    def __call__(self, key: str, module: nn.Module, x: Tensor) -> Tensor:
        import torch._inductor.config as inductor_config

        fn = self._compiled.get(key)
        if fn is None:
            # Crops keep one size (static shapes); dense inputs change size with Q: let dynamo go dynamic.
            fn = self._compiled[key] = torch.compile(module, dynamic=None if key != "crop" else False)
        # torch.compile(options={"freezing": True}) leaves convs unfused in torch 2.14; the config patch does not.
        with inductor_config.patch(freezing=self.runtime.device.type == "cpu"), self.runtime.autocast():
            return fn(x).float()


def choose_engine(runtime: Runtime, precision: str, *, cached: bool = False, images: int | None = None) -> tuple[str, str]:
    """The engine "auto" takes for this runtime and precision, and why (a phrase for the log)."""
    if precision == "int8":
        return "onnxruntime", "int8 runs on onnxruntime's quantised kernels (VNNI / AMX int8)"
    cls = hardware_class(runtime.device)
    engine, why = AUTO_CHOICE.get((cls, precision), ("eager", "no faster engine measured for this hardware"))
    if engine != "onnxruntime?":
        return engine, f"{why} ({cls})"
    if cached:
        return "onnxruntime", f"{why}; its exported file is cached ({cls})"
    if images is not None and images >= ORT_MIN_IMAGES:
        return "onnxruntime", f"{why}; {images} images pay for the export ({cls})"
    return "eager", (f"{why}, but the export (about 10 s for VGG-16) pays only above {ORT_MIN_IMAGES} images "
                     f"and none is cached ({cls})")


def attach_engine(net: Net, runtime: Runtime, *, engine: str = "auto", precision: str | None = None,
                  calibration: Tensor | None = None, cache_dir: str | os.PathLike | None = None,
                  images: int | None = None) -> str:
    """Set `net.engine` for testing on `runtime`; returns one line saying what was chosen and why.

    `precision` None means the runtime's ("fp32", "bf16", "fp16"); "int8" quantises (CPU only), calibrated
    on `calibration` ((N, 3, S, S) pixels in [0, 1]) or on CALIBRATION_IMAGES of the net's training data.
    `images`: how many images the caller will test, so "auto" knows whether an export pays for itself.
    """
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    precision = precision or runtime.precision
    if precision == "int8" and runtime.device.type != "cpu":
        raise UserError(f"precision int8 runs on the CPU (onnxruntime), got device {runtime.device}")
    if precision == "int8" and engine in ("eager", "compile"):
        raise UserError(f"precision int8 needs engine onnxruntime or auto, got {engine}")
    if precision != "int8" and precision != runtime.precision:
        raise UserError(f"precision {precision} differs from the runtime's {runtime.precision}; resolve the runtime "
                        "with that precision")
    why = "chosen by hand"
    if engine == "auto":
        cached = False
        if precision == "fp32" and AUTO_CHOICE.get((hardware_class(runtime.device), "fp32"), ("",))[0] == "onnxruntime?":
            probe = OnnxEngine(net, precision="fp32", cache_dir=cache_dir)
            cached = probe.path("crop", torch.empty(1, 3, net.image_size, net.image_size)).exists()
        engine, why = choose_engine(runtime, precision, cached=cached, images=images)
    if engine == "eager":
        # On the CPU, bf16 weights cast once beat autocast's per-pass casts; elsewhere plain eager.
        cast = runtime.device.type == "cpu" and runtime.precision == "bf16" and precision == "bf16"
        net.engine = CastEngine(runtime) if cast else None
    elif engine == "compile":
        net.engine = CompiledEngine(runtime)
    else:
        net.engine = OnnxEngine(net, precision=precision, cache_dir=cache_dir, calibration=calibration)
    return f"engine {engine}, precision {precision}: {why}"


def export_int8_onnx(net: Net, path: str | os.PathLike, calibration: Tensor | None = None, *,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the net (crops, dynamic batch) as an int8 ONNX file at `path` (`vggnet export --precision int8`).

    Input "x": normalised (N, 3, S, S) images, S the net's crop size; output "y": logits. Calibrated as
    `attach_engine` does, and the quantised file is cached the same way.
    """
    engine = OnnxEngine(net, precision="int8", cache_dir=cache_dir, calibration=calibration)
    example = torch.zeros(2, 3, net.image_size, net.image_size)
    source = engine.artefact("crop", net.model.eval(), example)
    return atomic_write(path, source.read_bytes())
