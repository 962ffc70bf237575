"""A CUDA rehearsal on a machine without a GPU: the real code on fake tensors placed on device `cuda`.

Under torch's `FakeTensorMode` a tensor has a shape, dtype and device but no data, and no driver is
needed for device `cuda`. Code run there on modules and inputs placed on `cuda` fails where a first
GPU run would: an op mixing a CPU tensor with a CUDA one (a mask or index built without a device)
raises `FakeTensorDeviceMismatchError`. The memory plan counts its bytes this way, and the tests
rehearse the training step, validation sampling and generation with it.

What the mode alone does not give, and what this module adds:

* autocast: `torch.autocast("cuda")` switches itself off without a driver, so `cuda_autocast` sets
  the CUDA autocast state directly (the same state the real context manager sets on a GPU);
* modules: `module.to("cuda")` cannot swap a real CPU weight for a fake CUDA one, so `place`
  replaces a module's tensors instead (build under `with torch.device(CUDA)` to create them there);
* data: a fake tensor has no values, so code that reads one (`.item()`, `.tolist()`, `nonzero`)
  cannot run in the mode: a rehearsal stops where tensors become numbers or images, and a diffusers
  scheduler keeps its bookkeeping on real CPU numbers (`scheduler_on_host`).

Not rehearsed: the backward pass (torch's autograd engine asks the CUDA driver for its streams
before it runs a CUDA graph, fake or not); a CPU `torch.Generator` drawing directly on a CUDA device
(a GPU refuses it; CUDA generators need a driver, which is why pair noise is drawn on the CPU and
then moved, `base_models.unet_family.DDPMObjective.draw`); and where autocast is on or off inside the
code under test, since its own `torch.autocast("cuda", ...)` switches itself off here.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

CUDA = torch.device("cuda")


def fake_mode() -> FakeTensorMode:
    """A fake-tensor mode in which real tensors (read from disk, made before the mode) take part as fake ones on their own device."""
    return FakeTensorMode(allow_non_fake_inputs=True)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None) -> Iterator[None]:
    """CUDA autocast to `dtype` (None or float32: off), also where no driver is present; nestable like `torch.autocast`."""
    enabled = dtype is not None and dtype != torch.float32
    previous = torch.is_autocast_enabled(CUDA.type), torch.get_autocast_dtype(CUDA.type)
    torch.set_autocast_enabled(CUDA.type, enabled)
    if enabled:
        torch.set_autocast_dtype(CUDA.type, dtype)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(CUDA.type, previous[0])
        torch.set_autocast_dtype(CUDA.type, previous[1])


def place(
    module: torch.nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None, skip: frozenset[int] = frozenset()
) -> torch.nn.Module:
    """`module.to(device, dtype)` by replacing its tensors, which works on fake tensors (and real ones turned fake in the mode).

    `dtype` applies to floating tensors only, as in `nn.Module.to`; tensors whose `id` is in `skip` keep their dtype.
    """
    from torch._guards import detect_fake_mode

    faking = detect_fake_mode() is not None
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if tensor is None:
                    continue
                cast = dtype if dtype is not None and tensor.is_floating_point() and id(tensor) not in skip else None
                if faking and not isinstance(tensor, FakeTensor):  # a fake copy keeps no values: skip converting the real ones
                    moved = torch.empty(tensor.shape, dtype=cast or tensor.dtype, device=device or tensor.device)
                else:
                    moved = tensor.detach().to(device=device, dtype=cast)
                table[name] = torch.nn.Parameter(moved, requires_grad=tensor.requires_grad) if table is owner._parameters else moved
    return module


@contextlib.contextmanager
def scheduler_on_host(scheduler: object) -> Iterator[None]:
    """Run a diffusers scheduler's own bookkeeping on real CPU numbers while the samples it steps stay fake.

    A scheduler computes its tables with numpy, compares sigmas in Python and indexes its tables by
    timestep: host-side work a fake tensor cannot do (it has no values). Its `set_timesteps`,
    `scale_model_input` and `step` therefore run with the fake mode suspended on its real timesteps,
    kept on the CPU (`set_timesteps`' device is dropped). The denoising loop iterates fake copies on
    the device instead, as on a GPU (FLUX's pipeline expands each timestep to the batch: a CPU one
    would meet CUDA tensors there), so `scale_model_input` and `step` are given the real one back by
    position: diffusers' loops step once per timestep, in order. The samples and noise predictions
    the scheduler receives are fake CUDA tensors whatever the mode.
    """
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    position, real = [0], {}

    @contextlib.contextmanager
    def own_timesteps() -> Iterator[None]:
        """The scheduler's own methods run on its real timesteps, off the fake mode; the loop keeps the device ones."""
        on_device, scheduler.timesteps = scheduler.timesteps, real["timesteps"]
        try:
            with unset_fake_temporarily():
                yield
        finally:
            scheduler.timesteps = on_device

    def set_timesteps(*args, **kwargs):
        kwargs.pop("device", None)
        position[0] = 0
        with unset_fake_temporarily():
            result = original["set_timesteps"](*args, **kwargs)
        real["timesteps"] = scheduler.timesteps
        # what the loop iterates: on the device, as `set_timesteps(device="cuda")` leaves them on a GPU
        scheduler.timesteps = torch.empty(real["timesteps"].shape, dtype=real["timesteps"].dtype, device=CUDA)
        return result

    def scale_model_input(sample, timestep, *args, **kwargs):
        with own_timesteps():
            return original["scale_model_input"](sample, real["timesteps"][position[0]], *args, **kwargs)

    def step(model_output, timestep, *args, **kwargs):
        with own_timesteps():
            result = original["step"](model_output, real["timesteps"][position[0]], *args, **kwargs)
        position[0] += 1
        return result

    wrappers = {"set_timesteps": set_timesteps, "scale_model_input": scale_model_input, "step": step}
    original = {name: getattr(scheduler, name) for name in wrappers if hasattr(scheduler, name)}  # flow matching has no scaling
    for name in original:  # with the original's signature: diffusers inspects it (`retrieve_timesteps` looks for `sigmas`)
        setattr(scheduler, name, functools.wraps(original[name])(wrappers[name]))
    try:
        yield
    finally:
        for name in original:
            delattr(scheduler, name)
