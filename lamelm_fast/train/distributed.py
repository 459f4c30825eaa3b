"""Multi-process training under ``torchrun``: process group, DDP or FSDP2 wrapping, per-rank data, reductions.

One process per GPU, started by ``torchrun`` (no launcher of our own). Every rank loads the same data and takes its
share of each global micro-batch; metrics are summed across ranks at logging steps only; rank 0 alone writes files
and the console. A single process takes the same code paths with every collective a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lamelm_fast import patching
from lamelm_fast.train.config import ConfigError, TrainConfig

# auto picks FSDP when weights, gradients and AdamW state would take more than this share of one GPU under DDP:
# the rest is left for activations.
DDP_MEMORY_SHARE = 0.5


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


@dataclass
class Distributed:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    strategy: str = "none"  # "ddp" or "fsdp" once wrap() has chosen; "none" in a single process
    cpu_group: Any = None  # gloo group for host-side votes and objects (the default group may be NCCL)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global micro-batch: every world_size-th item, so shares differ by at most one.

        A share may be empty (a short last batch): the rank then runs an empty batch, since DDP and FSDP need every
        rank in every forward and backward.
        """
        return items[self.rank::self.world_size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum across ranks, in place (a collective: call it at logging steps, not in the step)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one: a host-side vote, so it costs no device sync."""
        if self.world_size == 1:
            return flag
        vote = torch.tensor([int(flag)])
        dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(vote.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=self.cpu_group)
        return values

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def gradient_sync(self, model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """DDP skips its all-reduce on all but the last micro-batch of a window. FSDP reduce-scatters every
        micro-batch: skipping would keep whole unsharded gradients, the memory FSDP is there to save."""
        if self.strategy == "ddp" and not sync:
            return model.no_sync()
        return contextlib.nullcontext()

    # -- wrapping
    def wrap(self, module: nn.Module, config: TrainConfig) -> tuple[nn.Module, str | None]:
        """DDP or FSDP2 around ``module`` (the model and its loss); returns it and a note for the banner."""
        if self.world_size == 1:
            note = None if config.distributed == "auto" else (
                f"--distributed {config.distributed} has no effect in one process: launch with torchrun "
                "--nproc-per-node N")
            return module, note
        self.strategy, why = _choose_strategy(config, module, self.device)
        if config.finetune == "qlora" and self.strategy == "fsdp":
            raise ConfigError("--distributed fsdp cannot shard bitsandbytes 4-bit weights: use --distributed ddp "
                              "with --finetune qlora, or --finetune lora with fsdp")
        backend = dist.get_backend()
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(module, device_ids=device_ids)
        else:
            wrapped = _fully_shard(module, self.device, self.world_size)
        return wrapped, f"{self.strategy} over {self.world_size} processes ({backend}){why}"

    # -- checkpoints: whole tensors out (world-size independent), this rank's shards back in
    def full_model_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole state dict on rank 0 under FSDP (a collective); None where parameters are already whole."""
        if self.strategy != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state dict with whole tensors (a collective under FSDP; complete on rank 0 only)."""
        state = optimizer.state_dict()
        if self.strategy != "fsdp":
            return state
        whole: dict[int, dict[str, Any]] = {}
        for param_id, param_state in state["state"].items():
            whole[param_id] = {}
            for key, value in param_state.items():
                if _is_dtensor(value):
                    # Every rank joins the gather; one whole tensor at a time, kept on rank 0 only.
                    value = value.full_tensor()
                    value = value.cpu() if self.is_main else None
                whole[param_id][key] = value
        return {**state, "state": whole}

    def shard_optimizer_state(self, state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Cut a whole-tensor optimizer state dict (saved by any world size) into this rank's FSDP shards."""
        if self.strategy != "fsdp":
            return state
        from torch.distributed.tensor import distribute_tensor

        params = [param for group in optimizer.param_groups for param in group["params"]]
        saved_ids = [param_id for group in state["param_groups"] for param_id in group["params"]]
        sharded = {}
        for param_id, param in zip(saved_ids, params, strict=True):
            if param_id not in state["state"]:
                continue
            sharded[param_id] = {
                key: distribute_tensor(value.to(self.device), param.device_mesh, param.placements, src_data_rank=None)
                if _is_dtensor(param) and value.shape == param.shape and value.ndim > 0 else value
                for key, value in state["state"][param_id].items()}
        return {**state, "state": sharded}


def _choose_strategy(config: TrainConfig, module: nn.Module, device: torch.device) -> tuple[str, str]:
    if config.distributed != "auto":
        return config.distributed, ""
    if device.type != "cuda" or config.finetune == "qlora":
        return "ddp", ""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    needed = weights + trainable * 12  # fp32 gradient + two fp32 AdamW moments per trainable weight
    capacity = torch.cuda.get_device_properties(device).total_memory
    if needed > DDP_MEMORY_SHARE * capacity:
        return "fsdp", (f"; auto: weights, gradients and optimizer state need {needed / 1e9:.1f} GB per GPU under "
                        f"DDP, over half of {capacity / 1e9:.0f} GB")
    return "ddp", ""


def _fully_shard(module: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    """FSDP2: each transformer block its own unit, the rest (embeddings, final norm, LM head) in the root unit.

    The root unit's forward is the loss module's forward, so the LM head weight is whole (unsharded) while the fused
    cross-entropy reads it, and its gradient is reduce-scattered back to the shards in backward.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(patching.causal_lm(module.model), "_no_split_modules", None) or [])
    if not blocks:
        raise ConfigError("--distributed fsdp: the model does not name its transformer block class "
                          "(_no_split_modules), so it cannot be sharded block by block: use --distributed ddp")
    mesh = init_device_mesh(device.type, (world_size,))
    for sub in list(module.modules()):
        if type(sub).__name__ in blocks:
            fully_shard(sub, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


@contextlib.contextmanager
def setup() -> Iterator[Distributed]:
    """Join torchrun's process group (or a caller's); a single process without torchrun."""
    from lamelm_fast.train.model import pick_device

    owned = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            yield Distributed(pick_device())
            return
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        owned = True
    try:
        world_size = dist.get_world_size()
        if world_size == 1:
            yield Distributed(pick_device())
            return
        device = pick_device()
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        cpu_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        yield Distributed(device, dist.get_rank(), world_size, cpu_group=cpu_group)
    finally:
        if owned:
            dist.destroy_process_group()
