"""FSDP2 (`train.data_parallel=fsdp` under torchrun): the weights, gradients, optimizer state and EMA
sharded over the ranks, for models whose training state does not fit on one GPU.

Shard units: the attention and the MLP of every block (2/3 of a block's weights), each gathered just
before it runs and freed after.  What remains (patch and timestep embeddings, the AdaLN projections,
the final layer, the encoder's head) stays with the root: the model reads every block's AdaLN
projection as one stacked GEMM before any block runs, so those weights cannot be gathered block by
block; the root gathers them once per forward and once per backward.  Gradients are reduce-scattered,
so each rank's optimizer and EMA update only its own shard.

Checkpoints keep the layout of one process: `full_state` gathers the whole state dicts onto rank 0's
CPU, and `load_optimizer_state` hands every rank its shard of a whole one, so a run resumes on any
number of ranks, sharded or not.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from ..nn.layers import Attention, Mlp
from .distributed import World

_WHOLE_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: nn.Module, ema: nn.Module, world: World, device: torch.device) -> None:
    """Shard the model (per attention and MLP, then the root) and its EMA (same layout, one group:
    it is never run in training) over all ranks, in place."""
    mesh = init_device_mesh(device.type, (world.size,))
    # nn.Linear returns a view of its 2-D product for a contiguous 3-D input, and newer torch warns
    # that an in-place op on a shard unit's view output would skip the backward all-gather.  Our
    # blocks consume sublayer outputs only out of place (the fused residual ops); the FSDP tests,
    # which compare the gradients with one process, would catch an in-place one.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP(Attention|Mlp)\) returned a view",
                            category=UserWarning)
    for m in model.modules():
        if isinstance(m, (Attention, Mlp)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "loss")  # the train step calls model.loss, not forward
    fully_shard(ema, mesh=mesh)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a plain tensor is its own)."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (e.g. clip_grad_norm_'s total norm) as a plain tensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(model: nn.Module) -> dict:
    """The model's whole state dict on rank 0's CPU (empty elsewhere); every rank must call it."""
    return get_model_state_dict(model, options=_WHOLE_ON_RANK0)


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state dict on rank 0's CPU in `opt.state_dict()`'s layout (parameters
    numbered in the optimizer's order), so one process can resume it; every rank must call it."""
    state = get_optimizer_state_dict(model, opt, options=_WHOLE_ON_RANK0)
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_names(model, opt))}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[name] for name in g["params"]]} for g in state["param_groups"]]}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a whole `opt.state_dict()` (from any number of ranks) into the sharded optimizer."""
    names = _names(model, opt)
    if len(names) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError(f"the optimizer state holds {sum(len(g['params']) for g in state['param_groups'])} "
                         f"parameters, this model trains {len(names)}")
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, opt, by_name, options=StateDictOptions(full_state_dict=True))


def _names(model: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names, in its order."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in opt.param_groups for p in g["params"]]
