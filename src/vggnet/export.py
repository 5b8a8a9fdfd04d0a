"""Export a net for serving without vggnet: ONNX (onnxruntime, TensorRT, ...) or TorchScript.

Two forms:
- the net itself: input (N, 3, S, S) at its training crop S, output (N, classes) logits; the batch
  dimension is dynamic;
- `dense=True`, the fully-convolutional form of section 3.2: input (N, 3, H, W) of any size the
  dense form takes (>= 224 px for the paper's head, >= 32 px for the compact one), batch, height
  and width all dynamic; outputs the class scores averaged over space (N, classes) and the
  class-score map itself (N, classes, H/32 - k + 1, W/32 - k + 1), the map a detector or a
  heat-map would use.

Inputs are normalised images (minus the mean, over the std). The mean, std, crop size, test scale
and class names travel inside the file (ONNX metadata_props; a TorchScript extra file "meta.json"),
so a server needs nothing else.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import atomic_write
from .errors import UserError
from .nets import Net

__all__ = ["FORMATS", "DenseScores", "ExportReport", "export", "export_onnx", "export_torchscript",
           "check_onnx", "check_torchscript", "export_meta"]

FORMATS = ("onnx", "torchscript", "safetensors")
ONNX_OPSET = 18


class DenseScores(nn.Module):
    """The dense form with the paper's spatial averaging built in: image -> (scores, score map)."""

    def __init__(self, dense: nn.Module) -> None:
        super().__init__()
        self.dense = dense

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        score_map = self.dense(x)                       # (N, classes, h, w)
        return score_map.mean(dim=(2, 3)), score_map   # (N, classes), (N, classes, h, w)


@dataclass(kw_only=True)
class ExportReport:
    """What was written, and how far the exported file's output is from PyTorch's on a test input."""

    path: Path
    format: str
    dense: bool
    input_shape: str        # e.g. "N x 3 x 224 x 224" or "N x 3 x H x W (H, W >= 224)"
    outputs: list[str]
    max_abs_diff: float | None  # None when the check's runtime (onnxruntime) is not installed
    check_input: tuple[int, ...]

    def __str__(self) -> str:
        check = "not checked" if self.max_abs_diff is None else \
            f"max |difference| from PyTorch {self.max_abs_diff:.2e} on a {'x'.join(map(str, self.check_input))} input"
        return (f"wrote {self.path} ({self.format}{', dense' if self.dense else ''}): input {self.input_shape}, "
                f"outputs {', '.join(self.outputs)}; {check}")


def export_meta(net: Net, *, dense: bool) -> dict[str, str]:
    """Plain strings a server needs to feed the exported net: preprocessing and class names."""
    m = net.meta
    return {"vggnet.model_args": json.dumps(net.model.constructor_args), "vggnet.dense": json.dumps(dense),
            "vggnet.mean": json.dumps(list(m["mean"])), "vggnet.std": json.dumps(list(m["std"])),
            "vggnet.image_size": str(net.image_size), "vggnet.eval_scale": str(net.eval_scale),
            "vggnet.class_names": json.dumps(net.class_names)}


def _module(net: Net, dense: bool) -> nn.Module:
    return (DenseScores(net.model.to_fully_conv()) if dense else net.model).cpu().float().eval()


def export_onnx(net: Net, path: str | os.PathLike, *, dense: bool = False, opset: int = ONNX_OPSET) -> Path:
    """Write an ONNX file with a dynamic batch (and, for the dense form, dynamic height and width).

    Uses torch.export-based ONNX export (`dynamo=True`): the batch, height and width become
    symbolic `Dim`s whose lower bounds are the sizes the net accepts, so the model's own input
    check holds for every shape the file admits.
    """
    path = Path(path)
    module = _module(net, dense)
    batch = torch.export.Dim("batch", min=1)
    if dense:
        side = net.dense_min_size
        example = torch.randn(2, 3, side + 32, side + 64)
        dims = {0: batch, 2: torch.export.Dim("height", min=side), 3: torch.export.Dim("width", min=side)}
        outputs = ["scores", "score_map"]
    else:
        example = torch.randn(2, 3, net.image_size, net.image_size)
        dims = {0: batch}
        outputs = ["logits"]
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["image"], output_names=outputs,
                                    dynamic_shapes={"x": dims}, opset_version=opset, verbose=False)
    for key, value in export_meta(net, dense=dense).items():
        program.model.metadata_props[key] = value
    # Serialised in memory, then written atomically: a failed export never tears an existing file.
    return atomic_write(path, program.model_proto.SerializeToString())


def export_torchscript(net: Net, path: str | os.PathLike, *, dense: bool = False) -> Path:
    """Write a scripted (not traced) module, so any batch and, for the dense form, any image size work."""
    extra = {"meta.json": json.dumps(export_meta(net, dense=dense))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, but still what C++ and mobile load
        scripted = torch.jit.script(_module(net, dense))
        return atomic_write(path, lambda f: torch.jit.save(scripted, f, _extra_files=extra))


def _reference(net: Net, dense: bool, x: Tensor) -> Tensor:
    with torch.inference_mode():
        out = _module(net, dense)(x)
    return out[0] if dense else out


def check_onnx(path: str | os.PathLike, net: Net, x: Tensor, *, dense: bool = False) -> float | None:
    """Run the ONNX file in onnxruntime on `x`; max |difference| from PyTorch (None without onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((torch.from_numpy(got) - _reference(net, dense, x)).abs().max())


def check_torchscript(path: str | os.PathLike, net: Net, x: Tensor, *, dense: bool = False) -> float:
    """Reload the TorchScript file and compare its output on `x` with PyTorch's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        got = loaded(x)
    got = got[0] if dense else got
    return float((got - _reference(net, dense, x)).abs().max())


def export(net: Net, path: str | os.PathLike, *, format: str, dense: bool = False, check: bool = True,
           precision: str = "fp32", calibration: Tensor | None = None) -> ExportReport:
    """Export `net` as `format` ("onnx", "torchscript" or "safetensors"), then check the file against PyTorch.

    `precision="int8"` (ONNX only) writes a statically quantised file, calibrated on `calibration`
    (normalised training crops; vggnet.engines picks them when None). Every file is written atomically.
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    if precision not in ("fp32", "int8") or (precision == "int8" and (format != "onnx" or dense)):
        raise UserError(f"--precision {precision} cannot be exported as {format}{' (dense)' if dense else ''}; "
                        "expected fp32, or int8 with --format onnx and no --dense")
    if format == "safetensors":
        from .weights import write_safetensors

        path = write_safetensors(path, net.model.state_dict(), net.meta, model_args=net.model.constructor_args)
        return ExportReport(path=Path(path), format=format, dense=False, input_shape="(weights only)",
                            outputs=["state dict, model_args and meta"], max_abs_diff=None, check_input=())
    if format == "onnx":
        try:
            import onnx  # noqa: F401  (the exporter needs onnx and onnxscript)
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UserError(f"ONNX export needs the onnx extra (pip install 'vggnet[onnx]'): {e}") from None
        if precision == "int8":
            from .engines import export_int8_onnx

            path = export_int8_onnx(net, path, calibration)
        else:
            path = export_onnx(net, path, dense=dense)
    else:
        path = export_torchscript(net, path, dense=dense)
    side = net.dense_min_size if dense else net.image_size
    # A second batch size and, for the dense form, a non-square size other than the export example.
    x = torch.randn(3, 3, side + (40 if dense else 0), side + (72 if dense else 0), generator=torch.Generator().manual_seed(0))
    diff = None
    if check and precision == "fp32":
        diff = check_onnx(path, net, x, dense=dense) if format == "onnx" else check_torchscript(path, net, x, dense=dense)
    shape = f"N x 3 x H x W (H, W >= {side})" if dense else f"N x 3 x {side} x {side}"
    outputs = ["scores (N x classes)", "score_map (N x classes x h x w)"] if dense else ["logits (N x classes)"]
    return ExportReport(path=Path(path), format=format, dense=dense, input_shape=shape, outputs=outputs,
                        max_abs_diff=diff, check_input=tuple(x.shape))
