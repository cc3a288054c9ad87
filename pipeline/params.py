"""Typed params: one dataclass per params.yaml section, validated up front.

Unknown keys and impossible values raise ConfigError naming the key (`train.lr: must be > 0`)
before any work starts. Modules never see these objects' parents: the stage layer passes a
section (or plain values from it) to the library.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.labels import DATASETS
from pipeline.data.shards import IMAGE_FORMATS
from pipeline.errors import ConfigError
from pipeline.models.catalog import ARCHS, OUTPUT_STRIDES

AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DataParams:
    dataset: str = "cityscapes"  # cityscapes | voc | vkitti2 | camvid
    root: str = "data/synthetic"  # dataset root: synth.out (the demo) or e.g. /data/cityscapes
    train_split: str = "train"
    val_split: str = "val"
    shards: str = "data/shards"  # shards go to {shards}/{split} (a local folder: what DVC tracks)
    # an object store for the shard bytes (s3://bucket/prefix): they go to {store}/{split}/
    # {content id}/, written once, and {shards}/{split} holds a pointer to them. None: local
    store: str | None = None
    outputs: str = "outputs"  # checkpoints in {outputs}/train, metrics in {outputs}/eval
    folds: int = 0  # grouped k-fold over train_split: 0 = off, K >= 2 (outputs in {outputs}/kfold)
    fold_ids: list[int] = field(default_factory=list)  # [0, ..., K-1]: dvc.yaml's foreach list


@dataclass
class SynthParams:
    out: str = "data/synthetic"  # where the synth stage writes its Cityscapes-layout root
    train: int = 64
    val: int = 16
    height: int = 128
    width: int = 256
    seed: int = 0


@dataclass
class PreprocessParams:
    samples_per_shard: int = 16
    image_format: str = "png"
    workers: int = 0  # 0: all cores


@dataclass
class ModelParams:
    arch: str = "deeplabv3plus"
    backbone: str = "resnet50"
    output_stride: int = 16
    pretrained_backbone: str | None = None  # None | "imagenet" | path to a weights file
    aux_head: bool = False
    separable_head: bool = False  # depthwise-separable 3x3 convs in ASPP and decoder (paper's SC)
    # unit rates of ResNet's layer4 (DeepLabV3 paper, Sec. 3.2, 4.1); other backbones have none
    resnet_multi_grid: list[int] = field(default_factory=lambda: [1, 2, 4])


@dataclass
class TrainParams:
    model: ModelParams = field(default_factory=ModelParams)
    seed: int = 0
    iterations: int = 80000  # mmseg 80k schedule
    batch_size: int = 8  # mmseg: 2 per GPU x 4 GPUs
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    photometric: bool = True
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0005
    schedule: str = "poly"  # poly | cosine
    poly_power: float = 0.9
    min_lr: float = 0.0001
    warmup_iters: int = 0
    loss: dict[str, float] = field(default_factory=lambda: {"ce": 1.0})  # ce | dice weights
    class_weights: str | None = None  # None | "inverse_log" (from the manifest's pixel counts)
    label_smoothing: float = 0.0
    ohem: bool = False
    ohem_thresh: float = 0.7  # mmseg OHEMPixelSampler
    ohem_min_kept: int = 100000
    aux_weight: float = 0.4  # mmseg auxiliary FCN head weight
    amp: str = "auto"  # auto | bf16 | fp16 | off; auto follows the hardware (engine/device.py)
    channels_last: bool = True  # GPU only: on CPU it is slower
    compile: bool | str = "auto"  # auto: on CUDA without SyncBN across processes | true | false
    grad_accum: int = 1
    freeze_bn: bool = False
    os8_from: int | None = None  # DeepLabV3 protocol: switch to OS8 with BN frozen at this step
    val_interval: int = 8000
    checkpoint_interval: int = 2000
    keep_best: int = 3  # best-k checkpoints by val mIoU kept for `seg average`
    log_every: int = 50  # mmseg's interval; reading the loss waits for the GPU, so not every step
    workers: int = 4
    shuffle_buffer: int = 64
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class EvalParams:
    mode: str = "whole"  # whole | slide
    crop_size: list[int] = field(default_factory=lambda: [1024, 1024])  # slide window (h, w)
    stride: list[int] = field(default_factory=lambda: [768, 768])  # mmseg Cityscapes slide
    scales: list[float] = field(
        default_factory=lambda: [1.0]
    )  # e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    flip: bool = False
    output_stride: int | None = None  # evaluate at another OS than training
    batch_size: int = 1
    amp: str = "auto"  # auto | bf16 | fp16 | off; auto follows the hardware (engine/device.py)
    workers: int = 4  # DataLoader processes that read, verify and decode the shards
    device: str = "auto"


@dataclass
class RegistryParams:
    """The promotion gate (`seg promote`, stages/registry.py). In mIoU points (0.5 = half a
    point), as the gate's lines print them."""

    min_gain: float = 0.0  # promote when ΔmIoU's interval lies above this (its lower bound)
    max_drop: float = 1.0  # a candidate whose ΔmIoU interval lies below -max_drop regressed
    resamples: int = 2000  # paired bootstrap resamples of the val frames
    seed: int = 0  # the resamples' seed: the same comparison gives the same interval
    level: float = 0.95  # the interval's confidence level


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    synth: SynthParams = field(default_factory=SynthParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvalParams = field(default_factory=EvalParams)
    registry: RegistryParams = field(default_factory=RegistryParams)

    def validate(self) -> Params:
        _check(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, data: dict | None, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where or 'top level'}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1 and any(_is(value, a) for a in inner):  # e.g. `bool | str`
            return value
        return _coerce(inner[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(args[0], v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _is(value, tp) -> bool:
    """isinstance, where a bool is not an int (YAML's true is not 1)."""
    return isinstance(value, tp) and (tp is bool) == isinstance(value, bool)


def _choice(where: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, valid))}")


def _check_store(d: DataParams) -> None:
    from pipeline import store

    if d.store is not None and not store.is_url(d.store):
        raise ConfigError(
            f"data.store: expected an object-store URL (s3://bucket/prefix) or null, got {d.store!r}"
        )
    if d.store is not None and store.is_url(d.shards):
        raise ConfigError(
            f"data.shards: with data.store it is the local folder DVC tracks (the pointers to "
            f"the shards in {store.display(d.store)}), not a URL: {store.display(d.shards)}"
        )


def _positive(where: str, value, strict: bool = True) -> None:
    if value < 0 or (strict and value == 0):
        raise ConfigError(f"{where}: must be {'> 0' if strict else '>= 0'}, got {value}")


def _check(p: Params) -> None:
    _choice("data.dataset", p.data.dataset, DATASETS)
    _check_store(p.data)
    _check_folds(p.data)
    for name in ("train", "val", "height", "width"):
        _positive(f"synth.{name}", getattr(p.synth, name), strict=name in ("height", "width"))
    _positive("preprocess.samples_per_shard", p.preprocess.samples_per_shard)
    _choice("preprocess.image_format", p.preprocess.image_format, IMAGE_FORMATS)
    t = p.train
    _choice("train.model.arch", t.model.arch, ARCHS)
    _choice("train.model.output_stride", t.model.output_stride, OUTPUT_STRIDES)
    _choice("train.optimizer", t.optimizer, ("sgd", "adam", "adamw"))
    _choice("train.schedule", t.schedule, ("poly", "cosine"))
    _choice("train.amp", t.amp, AMP_MODES)
    _choice("train.compile", t.compile, ("auto", True, False))
    _choice("train.device", t.device, DEVICES)
    _choice("train.class_weights", t.class_weights, (None, "inverse_log"))
    for name in (
        "iterations",
        "batch_size",
        "lr",
        "grad_accum",
        "val_interval",
        "checkpoint_interval",
        "keep_best",
        "shuffle_buffer",
        "log_every",
    ):
        _positive(f"train.{name}", getattr(t, name))
    for name in (
        "weight_decay",
        "momentum",
        "warmup_iters",
        "label_smoothing",
        "min_lr",
        "workers",
        "seed",
        "poly_power",
        "aux_weight",
    ):
        _positive(f"train.{name}", getattr(t, name), strict=False)
    _positive("synth.seed", p.synth.seed, strict=False)
    _positive("preprocess.workers", p.preprocess.workers, strict=False)
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr {t.min_lr} is above train.lr {t.lr}")
    if t.os8_from is not None and not 0 <= t.os8_from < t.iterations:
        raise ConfigError(f"train.os8_from: a step in [0, {t.iterations}), got {t.os8_from}")
    if not 0 <= t.ohem_thresh <= 1:
        raise ConfigError(f"train.ohem_thresh: a probability in [0, 1], got {t.ohem_thresh}")
    if len(t.crop_size) != 2 or min(t.crop_size) < 1:
        raise ConfigError(f"train.crop_size: expected [height, width] > 0, got {t.crop_size}")
    lo, hi = (t.scale_range + [0, 0])[:2]
    if len(t.scale_range) != 2 or not 0 < lo <= hi:
        raise ConfigError(
            f"train.scale_range: expected [min, max] with 0 < min <= max, got {t.scale_range}"
        )
    if not t.loss or any(k not in ("ce", "dice") or w < 0 for k, w in t.loss.items()):
        raise ConfigError(f"train.loss: weights >= 0 for ce and/or dice, got {t.loss}")
    e = p.evaluate
    _choice("evaluate.mode", e.mode, ("whole", "slide"))
    _choice("evaluate.output_stride", e.output_stride, (None, *OUTPUT_STRIDES))
    _choice("evaluate.device", e.device, DEVICES)
    _choice("evaluate.amp", e.amp, AMP_MODES)
    _positive("evaluate.workers", e.workers, strict=False)
    check_inference(e.crop_size, e.stride, e.scales, e.batch_size, "evaluate.")
    r = p.registry
    _positive("registry.max_drop", r.max_drop, strict=False)
    _positive("registry.seed", r.seed, strict=False)
    if r.resamples < 100:
        raise ConfigError(f"registry.resamples: at least 100, got {r.resamples}")
    if not 0.5 <= r.level < 1:
        raise ConfigError(f"registry.level: a confidence level in [0.5, 1), got {r.level}")


def _check_folds(d: DataParams) -> None:
    if d.folds < 0 or d.folds == 1:
        raise ConfigError(f"data.folds: 0 (k-fold off) or a number of folds K >= 2, got {d.folds}")
    # DVC templating cannot count to K, so dvc.yaml's foreach runs over this list instead
    if d.fold_ids != list(range(d.folds)):
        raise ConfigError(
            f"data.fold_ids: must be {list(range(d.folds))} for data.folds: {d.folds} "
            f"(one kfold_train/kfold_eval stage per id in dvc.yaml), got {d.fold_ids}"
        )


def check_inference(crop, stride, scales, batch_size: int, prefix: str = "--") -> None:
    """Sliding-window and test-time options that would give NaNs, a crash or one huge batch."""
    if len(crop) != 2 or len(stride) != 2 or min(crop) < 1 or min(stride) < 1:
        raise ConfigError(
            f"{prefix}crop_size {list(crop)} / {prefix}stride {list(stride)}: two positive ints each"
        )
    if any(s > c for s, c in zip(stride, crop, strict=True)):
        raise ConfigError(
            f"{prefix}stride {list(stride)} must not exceed {prefix}crop_size {list(crop)} (gaps)"
        )
    if not scales or min(scales) <= 0:
        raise ConfigError(f"{prefix}scales: positive factors, got {list(scales)}")
    if batch_size < 1:
        raise ConfigError(f"{prefix}batch_size: must be >= 1, got {batch_size}")


def yaml_load(text: str):
    """YAML as DVC reads params.yaml: YAML 1.2, where only true/false are booleans and 1e-06
    is a float.

    PyYAML follows YAML 1.1, which also reads yes/no/on/off as booleans, so `amp: off` would
    arrive as False ("expected str, got False") while `dvc exp run -S train.amp=off` and DVC's
    own parser see the string "off"; and it reads 1e-06 (Python's repr of 0.000001) and 1.0e6
    as strings."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    bool_tag = "tag:yaml.org,2002:bool"
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    # after YAML 1.1's int and float resolvers: the 1.2 core schema's floats they miss
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
        list("-+.0123456789"),
    )
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader subclass)


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; ConfigError names the file and the bad key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return _build(Params, raw, "").validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def params_from_dict(raw: dict) -> Params:
    return _build(Params, raw, "").validate()


def params_hash(section) -> str:
    """sha256 of a params section's canonical JSON."""
    data = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
