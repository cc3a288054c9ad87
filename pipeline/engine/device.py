"""Where and in which precision the engine runs: `device: auto|cpu|cuda`, `amp: auto|bf16|fp16|off`."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name}: no CUDA device here; use auto or cpu")
    return torch.device(name)


def amp_setting(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler) for amp = auto | bf16 | fp16 | off:
    auto is bf16 where the GPU has it, fp16 (with a scaler) on older GPUs, off on CPU."""
    if mode == "auto":
        if device.type != "cuda":
            return None, False
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "off":
        return None, False
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs a CUDA device; use bf16 or off on CPU")
    if mode not in ("bf16", "fp16"):
        raise ConfigError(f"amp: {mode!r} is not one of auto, bf16, fp16, off")
    return (torch.bfloat16, False) if mode == "bf16" else (torch.float16, True)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or nothing when it is None (full precision)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
