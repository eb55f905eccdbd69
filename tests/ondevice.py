"""A stand-in accelerator for the device tests (tests/test_device.py), so that a stray CPU tensor is
found on a machine without a GPU.

The model's parameters become OnDevice tensors: a tensor subclass that reports the `meta` device but
holds real CPU data underneath, so every op still computes real numbers (.item(), .tolist() and
backward work, which a plain meta model cannot do). Inside `on_device()`:
- tensors made with device=<the model's device> (torch.tensor, torch.zeros(..., device=...),
  x.to(device), ...) become OnDevice too;
- an op that mixes an OnDevice tensor with a plain CPU tensor of one element or more dimensions
  is a stray: on a GPU it is an error ("Expected all tensors to be on the same device") or, for an
  index, a hidden host-to-device copy. Strays are recorded with the repository line that made the op
  (a CUDA-style 0-dim CPU scalar is allowed, as CUDA allows it);
- a real meta tensor (no data) meeting an OnDevice one is an error: something was made on the
  device without going through this stand-in.
Results come back to the CPU with .cpu() / .tolist() / .item(), as they would from a GPU."""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

DEVICE = torch.device("meta")          # what the model's tensors report
ROOT = Path(__file__).resolve().parents[1]
STRAYS: list[str] = []                 # "file:line op shapes" of every stray, in order


class OnDevice(torch.Tensor):
    """Reports DEVICE; computes with the CPU tensor it wraps (self.elem)."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                   storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                   device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem):
        self.elem = elem

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})       # also reached in backward, outside the modes


def _is_device(d) -> bool:
    return d is not None and not isinstance(d, int) and torch.device(d) == DEVICE


def _where() -> str:
    # the innermost frame of the repository's own code (not tests/ondevice.py, not torch)
    for fr in reversed(traceback.extract_stack()):
        p = Path(fr.filename).resolve()
        if p.is_relative_to(ROOT) and p.name != "ondevice.py":
            return f"{p.relative_to(ROOT)}:{fr.lineno} {fr.line}"
    return "?"


def _run(func, args, kwargs):
    flat = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
    on = any(isinstance(a, OnDevice) for a in flat)
    to_device = _is_device(kwargs.get("device"))
    if on:
        for a in flat:
            if isinstance(a, OnDevice):
                continue
            if a.device.type == "meta":
                raise RuntimeError(f"{func}: a tensor with no data on the meta device met the model's "
                                   f"at {_where()}")
            if a.device.type == "cpu" and a.dim() > 0:
                STRAYS.append(f"{_where()}  [{func}, CPU tensor {tuple(a.shape)}]")
    if not on and not to_device:
        return func(*args, **kwargs)
    wrap = True
    if to_device:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    elif kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
        wrap = False                                   # .cpu() / .to("cpu"): back to a plain tensor
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is torch.ops.aten._local_scalar_dense.default or not wrap:     # .item(), .cpu()
        return out
    return tree_map(lambda o: OnDevice(o) if isinstance(o, torch.Tensor) else o, out)


def _unwrap(a):
    return a.elem if isinstance(a, OnDevice) else a


class _Factories(TorchFunctionMode):
    """torch.tensor(data, device=...) never reaches the dispatcher with its device; .tolist() and
    .numpy() refuse subclasses: both handled here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _is_device(kwargs.get("device")):
            return OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        if func is torch.Generator and _is_device(kwargs.get("device", args[0] if args else None)):
            return torch.Generator()
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and isinstance(args[0], OnDevice):
            return func(args[0].elem.detach(), *args[1:], **kwargs)
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def move(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module's parameters and buffers "on the device" (in place)."""
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is not None and not isinstance(p, OnDevice):
                m._parameters[n] = torch.nn.Parameter(OnDevice(p.data), requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is not None and not isinstance(b, OnDevice):
                m._buffers[n] = OnDevice(b)
    return module


@contextlib.contextmanager
def on_device():
    """-> the list STRAYS, emptied first, filled by the code run inside."""
    STRAYS.clear()
    with _Factories(), _Dispatch():
        yield STRAYS


def plain(x):
    """An OnDevice result (or a structure of them) back as plain CPU tensors."""
    return tree_map(lambda t: _unwrap(t).detach() if isinstance(t, torch.Tensor) else t, x)
