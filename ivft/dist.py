"""Devices and processes: torchrun setup, the collectives the loop needs, DDP / FSDP2 wrapping. Without torchrun everything here is a one-process no-op."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ivft.engine import autocast


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_flag: str) -> Dist:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_flag == "auto" else device_flag.startswith("cuda")
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    else:
        device = torch.device("cuda" if use_cuda else "cpu") if device_flag == "auto" else torch.device(device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return Dist(rank, world, local, device)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


def all_reduce_floats(values: dict, d: Dist) -> dict:
    """{name: tensor} summed over ranks -> {name: float} (one all-reduce for all of them)."""
    keys = sorted(values)
    summed = all_reduce_sum(torch.stack([values[k] for k in keys]).double(), d) if keys else []
    return dict(zip(keys, [float(v) for v in summed]))


def barrier(d: Dist):
    if d.world > 1:
        dist.barrier()


def gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (e.g. each rank's RNG state)."""
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def wrap_for_parallel(loss_module, d: Dist, compile: bool = False, fsdp: bool = False):
    """The module the loop calls: compiled (--compile), DDP, or sharded in place with FSDP2."""
    if compile:
        # dynamic: sequence lengths change from batch to batch; without it the first few steps
        # would each recompile
        loss_module = torch.compile(loss_module, dynamic=True)
    if d.world == 1:
        return loss_module
    if fsdp:
        from torch.distributed.fsdp import fully_shard   # lazily: FSDP runs only (a slower import)
        if not getattr(loss_module, "_sharded", False):
            # one unit per block, and the model itself as the root unit holding the embedding, final
            # norm and LM head. It keeps those gathered after its forward (reshard_after_forward
            # False): the loss calls lm_head after Transformer.forward returns, and so do
            # evaluate.py and the adapters-off reference
            for block in loss_module.model.model.layers:
                fully_shard(block)
            fully_shard(loss_module.model, reshard_after_forward=False)
            loss_module._sharded = True
        return loss_module
    kw = {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
    return DDP(loss_module, **kw)


def full_state_dict(model, fsdp: bool) -> dict:
    """The whole model's state dict; under FSDP gathered from the shards (every rank takes part)."""
    if fsdp:
        # lazily: torch.distributed.checkpoint is slow to import and only FSDP runs need it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def no_sync(wrapped, last: bool):
    """Around one micro-batch's forward and backward: DDP all-reduces the gradients in every backward
    unless told not to, so all but the last micro-batch of a step run under its no_sync()."""
    return contextlib.nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()


def grad_shares(loss_module, batch, norms, params, amp_dtype=None) -> dict:
    """{term: ‖∇ term‖ / ‖∇ ce‖} over `params` on one micro-batch, for every term but ce: whether a
    regulariser acts at all (a small term can still steer the update; a large one can do nothing).
    Costs one more forward and a backward per term; the RNG (dropout) is put back, so a run gives the
    same numbers with or without it. amp_dtype: the backward runs under the same autocast as the
    forward (which is how train.py has always measured them, so the shares of runs compare)."""
    devices = [batch["idx"].device] if batch["idx"].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast(amp_dtype, batch["idx"].device.type):
        _, parts = loss_module(batch, norms, keep_graph=True)
        norm = {}
        for k, v in parts.items():
            grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
            norm[k] = float(sum(((g.float() ** 2).sum() for g in grads if g is not None), 0.0)) ** 0.5
    return {k: n / max(norm["ce"], 1e-12) for k, n in norm.items() if k != "ce"}
