"""Export a trained checkpoint for deployment: ONNX, TorchScript or a torch.export program.

The exported model is the eval-mode network (no auxiliary head) at the checkpoint's output
stride (or the one asked for):

    input   "image"   float32 (B, 3, H, W), RGB, normalised as `pipeline.data.transforms.normalize`
                      does: (pixel - mean) / std on 0..255 pixels, ImageNet mean
                      (123.675, 116.28, 103.53) and std (58.395, 57.12, 57.375)
    output  "logits"  float32 (B, K, H, W) at the input size; argmax over K is the train id

Batch, height and width are dynamic (H, W > output stride: torch.export assumes the deepest
feature map is larger than 1x1). DeepLab upsamples its logits to the input size; each
format is checked at a second, odd size, so a size baked in at export time fails the check.

Each file carries its metadata (num_classes, dataset, output stride, model config, the source
checkpoint's sha256) as JSON: ONNX `metadata_props["deeplab_pipeline"]`, the TorchScript and
torch.export archives' extra file `deeplab_pipeline.json`. `load_exported` reads any of the
three back into an `ExportedModel` that `predict_files` runs like the PyTorch model.

    export_checkpoint("outputs/train/best.pt", "onnx", "best.onnx")   # written only if it matches
    model = load_exported("best.onnx"); model(x)["out"]                # (B, K, H, W)
"""

from __future__ import annotations

import json
import logging
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.atomic import atomic_path
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize
from pipeline.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported-program": ".pt2"}
METADATA_KEY = "deeplab_pipeline"  # ONNX metadata_props key; archives: f"{METADATA_KEY}.json"
EXTRA_FILE = f"{METADATA_KEY}.json"
# Opset 18 is the one the dynamo exporter's op library (onnxscript torchlib) is written in, so
# the graph needs no version conversion; onnxruntime >= 1.14 and TensorRT >= 8.6 run it.
ONNX_OPSET = 18
# Logits may differ by fp32 rounding only: |exported - eager| <= RTOL * max |eager| + ATOL.
# Runtimes reorder fp32 sums (MLAS/oneDNN conv kernels, conv+BN folding in onnxruntime); a
# wrong resize, stride or normalisation moves logits by a large part of their range instead.
# Measured at 1024x2048 (docs/how-to/export.md): onnxruntime 6e-7 (MobileNetV3) and 3.3e-5
# (ResNet-50) of the largest logit, TorchScript and torch.export exactly 0; RTOL leaves 30x
# room over ResNet-50 for deeper backbones and other CPUs. ATOL only covers all-zero logits.
RTOL = 1e-3
ATOL = 1e-5
MIN_ARGMAX_AGREEMENT = 0.999  # near-ties (top-2 logits within rounding) may flip
CHECK_SIZE = (512, 1024)  # the random check image: the Cityscapes training crop (mmseg)
DYNAMIC_CHECK_SIZE = (2, 97, 161)  # batch 2 at an odd size: dynamic batch and H, W


class _Logits(nn.Module):
    """The model's {"out": logits} as a plain tensor: one named output in every format."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)["out"]  # (B, K, H, W)


def metadata_for(ckpt: dict, checkpoint: Path, sha256: str, output_stride: int, fmt: str) -> dict:
    cfg = dict(ckpt.get("model_config") or {})
    return {
        "producer": "deeplab-pipeline seg export",
        "version": 1,
        "format": fmt,
        "num_classes": cfg.get("num_classes"),
        "dataset": ckpt.get("dataset"),  # None in checkpoints older than this field
        "output_stride": output_stride,
        "model_config": cfg,
        "checkpoint": {"name": checkpoint.name, "sha256": sha256, "step": ckpt.get("step")},
        "input": {
            "name": "image",
            "shape": ["batch", 3, "height", "width"],
            "dtype": "float32",
            "channels": "RGB",
            "normalisation": "(pixel - mean) / std on 0..255 pixels",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "min_size": output_stride + 1,
        },
        "output": {"name": "logits", "shape": ["batch", "num_classes", "height", "width"]},
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------- writing


def _require(module: str):
    """Import an optional dependency (the `export` extra) or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"ONNX needs {module}: pip install 'deeplab-pipeline[export]' (onnx, onnxruntime, "
            "onnxscript)"
        ) from None


def _export_onnx(net: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    onnx = _require("onnx")
    _require("onnxscript")  # the dynamo exporter's op library

    # The dynamo exporter (torch.export underneath, torch's default since 2.9) rather than the
    # deprecated TorchScript one: both keep H and W dynamic for this model (checked), and this
    # one is maintained. One file: the weights stay inside (< 2 GB for every backbone here).
    dim = torch.export.Dim.DYNAMIC
    torch.onnx.export(
        net, (example,), str(path), input_names=["image"], output_names=["logits"],
        opset_version=ONNX_OPSET, dynamo=True, external_data=False, verbose=False,
        dynamic_shapes=({0: dim, 2: dim, 3: dim},),
    )  # fmt: skip
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    onnx.save(proto, str(path))


def _export_torchscript(net: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    # Tracing: torch.jit.script rejects the model's Python (tuple[int, ...] annotations,
    # properties). A trace records x.shape as size ops, so the upsampling follows the input
    # size (checked at a second size). torch.jit is deprecated in favour of torch.export but
    # still what libtorch C++ and older serving stacks load.
    with warnings.catch_warnings():  # torch.jit's FutureWarnings; TracerWarnings stay
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def _export_program(net: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    dim = torch.export.Dim.DYNAMIC
    program = torch.export.export(net, (example,), dynamic_shapes=({0: dim, 2: dim, 3: dim},))
    torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps(meta)})


_WRITERS = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "exported-program": _export_program,
}


# ---------------------------------------------------------------- reading


class ExportedModel:
    """An exported file run like the PyTorch model: `model(x)["out"]` on a normalised float
    (B, 3, H, W) tensor gives (B, K, H, W) logits on x's device; `.eval()` is a no-op."""

    def __init__(self, path: Path, fmt: str, metadata: dict, run) -> None:
        self.path, self.format, self.metadata, self._run = path, fmt, metadata, run

    @property
    def num_classes(self) -> int:
        return int(self.metadata["num_classes"])

    @property
    def output_stride(self) -> int:
        return int(self.metadata["output_stride"])

    def eval(self) -> ExportedModel:
        return self

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self._run(x)}

    def __repr__(self) -> str:
        return f"ExportedModel({self.path}, format={self.format})"


def sniff_format(path: Path) -> str:
    """Which of FORMATS a file is, from its content (not its name)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model not found")
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable model archive ({exc})") from None
        if any(n.endswith("/archive_format") for n in names):
            return "exported-program"
        if any(n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") for n in names):
            raise CheckpointError(
                f"{path}: a PyTorch checkpoint, not an exported model (use --checkpoint, or "
                "`seg export` it first)"
            )
        raise CheckpointError(f"{path}: a zip archive, not a model exported by `seg export`")
    return "onnx"


def _parse_metadata(path: Path, text: str | bytes | None) -> dict:
    if not text:
        raise CheckpointError(
            f"{path}: no {METADATA_KEY} metadata; not a model exported by `seg export`"
        )
    try:
        meta = json.loads(text)
        ok = all(isinstance(meta.get(k), int) for k in ("num_classes", "output_stride"))
    except (ValueError, AttributeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: corrupt {METADATA_KEY} metadata")
    return meta


def _load_onnx(path: Path, device: torch.device):
    onnx, ort = _require("onnx"), _require("onnxruntime")

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CheckpointError(
            f"{path}: not an ONNX file or a model exported by `seg export` "
            f"({type(exc).__name__}: {exc})"
        ) from None
    props = {p.key: p.value for p in proto.metadata_props}
    meta = _parse_metadata(path, props.get(METADATA_KEY))
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(proto.SerializeToString(), providers=providers)
    except Exception as exc:  # onnxruntime's own exception types
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({exc})") from None
    del proto

    def run(x: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(["logits"], {"image": x.detach().float().cpu().numpy()})
        return torch.from_numpy(logits).to(x.device)

    return meta, run


def _load_torchscript(path: Path, device: torch.device):
    extra = {EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():  # the user asked for TorchScript: no deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # RuntimeError from the archive reader
        raise CheckpointError(f"{path}: not a readable TorchScript file ({exc})") from None
    meta = _parse_metadata(path, extra[EXTRA_FILE])
    module.eval()
    return meta, module


def _load_program(path: Path, device: torch.device):
    extra = {EXTRA_FILE: ""}
    try:
        # a file object: torch.export.load insists on a .pt2 name for paths
        with open(path, "rb") as f:
            program = torch.export.load(f, extra_files=extra)
    except Exception as exc:  # RuntimeError / deserialisation errors
        raise CheckpointError(f"{path}: not a readable torch.export program ({exc})") from None
    meta = _parse_metadata(path, extra[EXTRA_FILE])
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return meta, program.module()


_READERS = {
    "onnx": _load_onnx,
    "torchscript": _load_torchscript,
    "exported-program": _load_program,
}


def load_exported(path: Path | str, device: torch.device | str = "cpu") -> ExportedModel:
    """Load a file written by `export_checkpoint`; errors name the file."""
    path, device = Path(path), torch.device(device)
    fmt = sniff_format(path)
    meta, run = _READERS[fmt](path, device)
    return ExportedModel(path, fmt, meta, run)


# ---------------------------------------------------------------- checking


@dataclass
class Comparison:
    """Exported vs eager logits on one input."""

    shape: tuple[int, ...]
    max_abs_diff: float
    max_abs_logit: float
    argmax_agreement: float

    @property
    def tolerance(self) -> float:
        return RTOL * self.max_abs_logit + ATOL

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_agreement >= MIN_ARGMAX_AGREEMENT


@torch.inference_mode()
def compare(model: nn.Module, exported, images_uint8: torch.Tensor) -> Comparison:
    """Run eager `model` and `exported` (both `m(x)["out"]`) on uint8 (B, 3, H, W) images."""
    x = normalize(images_uint8)
    ref = model(x)["out"].float()
    out = exported(x)["out"].float()
    if out.shape != ref.shape:
        return Comparison(tuple(out.shape), float("inf"), float(ref.abs().max()), 0.0)
    agree = (out.argmax(1) == ref.argmax(1)).float().mean()
    return Comparison(
        tuple(out.shape), float((out - ref).abs().max()), float(ref.abs().max()), float(agree)
    )


def random_image(size: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Seeded uniform uint8 (B, 3, H, W) noise; size is (H, W) or (B, H, W)."""
    b, h, w = size if len(size) == 3 else (1, *size)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8)


def read_image(path: Path | str) -> torch.Tensor:
    """An image file as uint8 (1, 3, H, W)."""
    from pipeline.data.pngio import read_png

    return torch.from_numpy(read_png(path, "RGB")).permute(2, 0, 1)[None].contiguous()


# ---------------------------------------------------------------- the export


@dataclass
class ExportReport:
    format: str
    path: str
    output_stride: int
    num_classes: int
    export_seconds: float
    check_seconds: float
    checks: dict  # name -> Comparison as dict

    def summary(self) -> str:
        return "; ".join(
            f"{name} {'x'.join(map(str, c['shape']))}: max |logit diff| {c['max_abs_diff']:.2e}"
            f" (tolerance {c['tolerance']:.2e}), argmax agreement "
            f"{100 * c['argmax_agreement']:.4f} %"
            for name, c in self.checks.items()
        )


def export_checkpoint(
    checkpoint: Path | str,
    fmt: str,
    out: Path | str,
    output_stride: int | None = None,
    check_image: Path | str | None = None,
    check_size: tuple[int, int] | None = None,
    registry: dict | None = None,
) -> ExportReport:
    """Export `checkpoint` to `out` as `fmt`; the file appears only once its logits match
    PyTorch's on the check image (`check_image`, resized to `check_size` if given; else seeded
    noise at `check_size` or CHECK_SIZE) and on a batch of 2 at an odd size
    (DYNAMIC_CHECK_SIZE). Raises CheckpointError otherwise. `registry`: the registry version
    the checkpoint is, kept in the metadata."""
    from pipeline.data.transforms import resize_image
    from pipeline.engine.checkpoint import build_from_checkpoint, sha256_file

    checkpoint, out = Path(checkpoint), Path(out)
    if fmt not in FORMATS:
        raise ConfigError(
            f"{checkpoint}: unknown export format {fmt!r}; valid: {', '.join(FORMATS)}"
        )
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise ConfigError(f"{out}: the output would overwrite the checkpoint")
    if check_image is not None:
        image = read_image(check_image)
        if check_size is not None:
            image = resize_image(image[0], tuple(check_size))[None]
    else:
        image = random_image(tuple(check_size or CHECK_SIZE))
    model, ckpt = build_from_checkpoint(checkpoint, "cpu", output_stride=output_stride)
    meta = metadata_for(ckpt, checkpoint, sha256_file(checkpoint), model.output_stride, fmt)
    if registry is not None:  # the registry version the checkpoint is (name, version, commit)
        meta["registry"] = registry
    min_size = model.output_stride + 1
    if min(image.shape[-2:]) < min_size:
        raise ConfigError(
            f"{check_image or 'check image'}: {tuple(image.shape[-2:])} is too small; the "
            f"exported model takes H, W >= {min_size}"
        )
    net = _Logits(model).eval()
    # batch 2: torch.export specialises a batch of 1 to a constant 1 (its 0/1 rule)
    example = normalize(random_image((2, 64, 128), seed=1))
    # the temporary keeps the suffix: torch.export.save only writes to *.pt2 paths
    with atomic_path(out, suffix=SUFFIXES[fmt]) as tmp:
        t0 = time.perf_counter()
        with torch.no_grad():
            _WRITERS[fmt](net, example, tmp, meta)
        export_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        exported = load_exported(tmp)
        checks = {
            "image": compare(model, exported, image),
            "dynamic": compare(model, exported, random_image(DYNAMIC_CHECK_SIZE, seed=2)),
        }
        check_seconds = time.perf_counter() - t0
        for name, c in checks.items():
            log.info("%s check %s: %s", fmt, name, c)
            if not c.ok:
                raise CheckpointError(
                    f"{out}: the exported {fmt} model does not match PyTorch on the {name} "
                    f"check {c.shape}: max |logit diff| {c.max_abs_diff:.3g} (tolerance "
                    f"{c.tolerance:.3g}), argmax agreement {100 * c.argmax_agreement:.3f} %; "
                    "nothing written"
                )
    return ExportReport(
        fmt, str(out), model.output_stride, meta["num_classes"], export_seconds, check_seconds,
        {k: {**asdict(c), "tolerance": c.tolerance} for k, c in checks.items()},
    )  # fmt: skip
