"""GPU-side speed settings of the SDXL UNet, shared by inference, training and the benchmarks.

What cannot change results is on by default where it helps (a channels-last UNet on CUDA, where
cuDNN's NHWC convolutions are faster; on a CPU it measured no gain and is left off); what can change
results is behind a flag:
`--allow_tf32` (TF32 matmuls on Ampere and newer) and `--compile` (`torch.compile` of the UNet's
forward with our IP-Adapter processors installed). The compiled forward is traced with
`fullgraph=True`, so a graph break is an error at the first call instead of a silent slowdown; the
IP-Adapter scale is a tensor the graph reads (see `IPAttnProcessor`), so changing it, or the
subject, never recompiles. Only a new input shape (e.g. a smaller last batch) does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


def set_tf32(allow: bool) -> None:
    """TF32 for float32 matmuls on CUDA (changes float32 results at the 1e-3 level, hence a flag).

    cuDNN convolutions keep PyTorch's default; fp16/bf16 runs are unaffected either way.
    """
    torch.backends.cuda.matmul.allow_tf32 = allow


@dataclass
class CompiledForward:
    """The compiled UNet forward; `first_call_s` is the wall time of its first call (compile + one run)."""

    first_call_s: float | None = None


def _time_first_call(compiled: Callable, report: CompiledForward, announce: Callable[[str], None]) -> Callable:
    def forward(*args, **kwargs):
        if report.first_call_s is not None:
            return compiled(*args, **kwargs)
        started = time.perf_counter()
        output = compiled(*args, **kwargs)
        report.first_call_s = time.perf_counter() - started
        announce(f"torch.compile: UNet compiled in {report.first_call_s:.1f} s (first call, compile + one forward)")
        return output

    return forward


def speed_up_unet(
    unet: nn.Module,
    *,
    compile: bool = False,
    channels_last: bool = True,
    backend: str = "inductor",
    announce: Callable[[str], None] = print,
) -> CompiledForward | None:
    """Channels-last weights and, with `compile`, a compiled forward; returns the compile report.

    The forward is replaced on the instance (not `torch.compile(unet)`): the module, its state-dict
    keys and the processors stay where checkpoints, the pipeline and the optimizer expect them.
    The compile time is announced once (`announce`, e.g. `accelerator.print`).
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if not compile:
        return None
    report = CompiledForward()
    compiled = torch.compile(unet.forward, fullgraph=True, backend=backend)
    unet.forward = _time_first_call(compiled, report, announce)
    return report


def apply_speed_settings(
    unet: nn.Module, *, compile: bool, allow_tf32: bool, announce: Callable[[str], None] = print
) -> CompiledForward | None:
    """Apply the speed settings (`--compile`, `--allow_tf32`; channels-last where the UNet sits on CUDA) to `unet`."""
    set_tf32(allow_tf32)
    return speed_up_unet(unet, compile=compile, channels_last=channels_last_helps(next(unet.parameters()).device), announce=announce)


def channels_last_helps(device: torch.device) -> bool:
    """Channels-last is the default on CUDA only (NHWC cuDNN kernels); CPU convolutions gained nothing from it here."""
    return device.type == "cuda"
