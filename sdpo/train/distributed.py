"""torchrun's environment (rank, world size, device, collectives) and FSDP2 sharding of the UNet.

Every rank reaches every collective; rank 0 writes. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn


class Distributed:
    """torchrun's environment: rank, world size, device. NCCL on GPUs, gloo on CPUs."""

    def __init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# The block lists of the diffusers transformers: SD3 and FLUX ``transformer_blocks``, FLUX also
# ``single_transformer_blocks``, Wan ``blocks``.
TRANSFORMER_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: a UNet's down/mid/up blocks, or each block of a
    transformer's block lists (see ``TRANSFORMER_BLOCK_LISTS``)."""
    if hasattr(model, "down_blocks"):
        units = [*model.down_blocks, *model.up_blocks]
        if model.mid_block is not None:
            units.append(model.mid_block)
        return units
    units = []
    for name in TRANSFORMER_BLOCK_LISTS:
        units.extend(getattr(model, name, None) or [])
    if not units:
        raise ValueError(
            f"fsdp: {type(model).__name__} has none of down_blocks, "
            f"{', '.join(TRANSFORMER_BLOCK_LISTS)} to shard"
        )
    return units


def shard_unet(unet: nn.Module, device: torch.device) -> None:
    """FSDP2: each block its own unit (its weights gathered just for its forward and backward),
    then the rest (embeddings, conv_in/out, a transformer's norm_out/proj_out) at the root. The
    blocks: see ``shard_units``; the name stays for the UNet it was written for."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in shard_units(unet):
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(unet: nn.Module) -> dict[str, Tensor]:
    """The sharded UNet's full weights on rank 0's CPU (a collective: every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(unet, options=_full_options())


def full_optimizer_state(unet: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(unet, optimizer, options=_full_options())


def load_full_optimizer_state(
    unet: nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(unet, optimizer, state, options=StateDictOptions(full_state_dict=True))
