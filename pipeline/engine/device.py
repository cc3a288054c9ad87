"""Where and in which precision the engine runs: `device: auto|cpu|cuda`, `amp: auto|bf16|fp16|off`.

The one rule for train, eval, predict and the benchmarks. `amp: auto` follows the hardware:

- CUDA: bf16 autocast where the GPU computes bf16 natively (Ampere and newer); fp16 with a
  GradScaler on older GPUs (V100, T4), which only emulate bf16, slowly.
- CPU: bf16 autocast only where the CPU has native bf16 (AVX512-BF16 or AMX; ARM's BF16);
  else fp32. On an AVX2-only CPU bf16 autocast measured 10-100x slower than fp32 (issue 16:
  a DeepLabV3+ MobileNetV3 step of batch 8 at 128x128, 1.24 s fp32 vs 13.7-155 s bf16).

An explicit `bf16` on a CPU without native bf16 runs, after a one-line warning saying what it
costs. What resolved, and why, is `working_point()`: stamped on every result's provenance.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import ConfigError
from pipeline.params import AMP_MODES

log = logging.getLogger(__name__)

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which oneDNN computes bf16 natively
_ONEDNN_BF16_ISAS = {
    "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
    "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
    "AVX10_2_512_AMX_2", "ALL", "DEFAULT",
}  # fmt: skip


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: no CUDA device here; use auto or cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- the CPU


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", ARM "Features"); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def cpu_info() -> dict:
    """What the CPU offers the engine: model, cores, the instruction sets that matter (AVX2,
    AVX-512, native bf16), torch's kernel level (ATEN_CPU_CAPABILITY caps it) and whether bf16
    is native here, with the reason."""
    flags = _cpu_flags()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    isa_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if platform.machine() in ("arm64", "aarch64"):
        bf16 = "bf16" in flags or platform.system() == "Darwin"
        why = "ARM CPU with BF16" if bf16 else "ARM CPU without the BF16 extension"
    elif not native:
        bf16, why = False, "no avx512_bf16 or amx_bf16 in the CPU flags"
    elif isa_cap and isa_cap not in _ONEDNN_BF16_ISAS:
        bf16, why = False, f"ONEDNN_MAX_CPU_ISA={isa_cap} keeps oneDNN below AVX512_CORE_BF16"
    elif not capability.startswith("AVX512"):
        bf16, why = False, f"torch's CPU kernels run at {capability} (ATEN_CPU_CAPABILITY)"
    else:
        bf16, why = True, f"the CPU has {' and '.join(native)}"
    return {
        "model": model,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "capability": capability,
        "avx2": "avx2" in flags,
        "avx512": "avx512f" in flags,
        "native_bf16": bf16,
        "bf16_why": why,
    }


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class Precision:
    """What `amp` resolved to on one device: the autocast dtype (None: fp32), whether a
    GradScaler runs (fp16), and why."""

    name: str  # "bf16" | "fp16" | "fp32"
    dtype: torch.dtype | None
    scaler: bool
    why: str


_FP32 = "fp32"


def _cuda_native_bf16(device: torch.device) -> bool:
    try:
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no including_emulation: compute capability 8.0+
        return torch.cuda.get_device_capability(device) >= (8, 0)


def precision(mode: str, device: torch.device, warn: bool = True) -> Precision:
    """`amp` (auto | bf16 | fp16 | off) on `device` -> Precision. See the module docstring."""
    if mode not in AMP_MODES:
        raise ConfigError(f"amp: {mode!r} is not one of {', '.join(AMP_MODES)}")
    cuda = device.type == "cuda"
    if mode == "off":
        return Precision(_FP32, None, False, "amp: off")
    if mode == "fp16":
        if not cuda:
            raise ConfigError("amp: fp16 needs a CUDA device; use bf16 or off on CPU")
        return Precision("fp16", torch.float16, True, "amp: fp16 (with a GradScaler)")
    if cuda:
        name = torch.cuda.get_device_name(device)
        if _cuda_native_bf16(device):
            why = f"{name} computes bf16 natively"
            return Precision("bf16", torch.bfloat16, False, f"amp: {mode}; {why}")
        if mode == "auto":
            why = f"amp: auto; {name} has no native bf16: fp16 with a GradScaler"
            return Precision("fp16", torch.float16, True, why)
        if warn:
            log.warning("amp: bf16 on %s, which only emulates bf16 (slow); amp: auto "
                        "would use fp16 with a GradScaler", name)  # fmt: skip
        return Precision("bf16", torch.bfloat16, False, f"amp: bf16; {name} emulates bf16")
    cpu = cpu_info()
    if mode == "auto":
        if cpu["native_bf16"]:
            return Precision("bf16", torch.bfloat16, False, f"amp: auto; {cpu['bf16_why']}")
        return Precision(_FP32, None, False, f"amp: auto; fp32 on CPU: {cpu['bf16_why']}")
    if not cpu["native_bf16"] and warn:
        log.warning("amp: bf16 on a CPU without native bf16 (%s): autocast runs 10-100x slower "
                    "than fp32 here; amp: auto or off runs fp32", cpu["bf16_why"])  # fmt: skip
    return Precision("bf16", torch.bfloat16, False, f"amp: bf16; {cpu['bf16_why']}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or nothing when it is None (full precision)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ----------------------------------------------------------------------------- the working point


def versions() -> dict:
    """torch, CUDA and cuDNN versions (None where absent)."""
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda, "cudnn": cudnn}


def compile_enabled(setting, device: torch.device, distributed_sync_bn: bool = False) -> bool:
    """`compile: auto | true | false` on `device`: auto compiles on CUDA, not on CPU (compiling
    costs minutes there and measured no faster), and not with SyncBatchNorm across processes
    (Dynamo breaks its graph at every SyncBN layer: ~110 small graphs on R-101 V3+)."""
    if setting is True or setting is False:
        return setting
    return device.type == "cuda" and not distributed_sync_bn


def channels_last_enabled(setting: bool, device: torch.device) -> bool:
    """`channels_last: true` takes effect on CUDA only: on CPU it measured slower."""
    return bool(setting) and device.type == "cuda"


def working_point(device: torch.device, prec: Precision, **extra) -> dict:
    """What this run resolved to, for provenance: device (and GPU name), precision and why,
    the CPU's capability, torch / CUDA / cuDNN versions, plus `extra` (compile, channels_last,
    world_size, ...)."""
    cpu = cpu_info()
    point = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "precision": prec.name,
        "precision_why": prec.why,
        "cpu": {k: cpu[k] for k in ("model", "cores", "capability", "native_bf16")},
        "threads": torch.get_num_threads(),
        **versions(),
    }
    point.update(extra)
    return point


def decisive_point(
    device: str, amp: str, compile: bool | str | None = None, channels_last: bool | None = None
) -> dict:
    """What a stage's `device`, `amp` (and `compile`, `channels_last`) resolve to on this
    machine: the part of the working point that changes a result, without the reasons or the
    GPU's name (two cards that both compute bf16 natively train alike). The working_point
    stage writes it to a file the train and evaluate stages depend on: DVC hashes files, not
    what `amp: auto` will become (stages/working_point.py)."""
    dev = resolve_device(device)
    point = {"device": dev.type, "precision": precision(amp, dev, warn=False).name}
    if compile is not None:
        point["compile"] = compile_enabled(compile, dev)
    if channels_last is not None:
        point["channels_last"] = channels_last_enabled(channels_last, dev)
    return point


@contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """cuDNN's autotuner (torch.backends.cudnn.benchmark) on or off inside the block. Training
    turns it on (one crop size: the fastest kernels are found once); validation turns it off,
    where every new frame size (VOC) would autotune again."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
