"""
Several processes through PyTorch's own stack: torchrun starts them, this module joins them.

    torchrun --nproc_per_node 8 distill.py ...                          # one node
    torchrun --nnodes 2 --node_rank R --rdzv_endpoint HOST:29500 --nproc_per_node 8 distill.py ...

Under torchrun (WORLD_SIZE set) `init` joins the process group: on CUDA, nccl for CUDA tensors
and gloo for the CPU ones, with LOCAL_RANK's GPU; gloo on CPU. Without it every helper here is the identity or a no-op, so each script runs
exactly as in one process, with no new flag. What the scripts do with several processes:

  - prune.py: each rank runs its share of the calibration windows; every matrix's statistics
    (float64 squared norms, SparseGPT's float32 Hessians) are summed over ranks, so every rank
    computes the same masks; rank 0 writes the checkpoint.
  - distill.py, full mode: the student and the teacher are sharded with FSDP2's fully_shard (each
    decoder layer, then the root); each rank takes its share of every global batch; rank 0
    writes the checkpoint, gathering one tensor at a time.
  - distill.py, per-expert mode: expert parallel, each rank distils every W-th expert.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import cli


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: str) -> str:
    """Join the process group when started by torchrun; returns the device this rank computes on."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or active():
        return device
    if device.startswith("cuda"):
        local, visible = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= visible:
            raise cli.UserError(f"LOCAL_RANK {local}, but torch sees {visible} CUDA device(s) on this node: start at "
                               f"most {visible} processes per node (torchrun --nproc_per_node) or use --device cpu")
        torch.cuda.set_device(local)
        # nccl reduces only CUDA tensors: the small CPU sums (token counts, error totals) go through gloo
        dist.init_process_group("cpu:gloo,cuda:nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def finish():
    if active():
        dist.destroy_process_group()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks, in place (every rank gets the same bits); t itself in one process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int) -> torch.Tensor:
    """t as rank src holds it, on every rank, in place."""
    if active():
        dist.broadcast(t, src)
    return t


def gather_lists(items: list) -> list:
    """Every rank's list, concatenated in rank order, on every rank."""
    if not active():
        return items
    out = [None] * world()
    dist.all_gather_object(out, items)
    return [x for part in out for x in part]


def share(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the rows of x (windows), as even as the count allows."""
    return torch.tensor_split(x, world())[rank()] if active() else x


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 over every rank on `device`'s type (the mesh follows --device, not the accelerator
    torch happens to see): every decoder layer, then the root; bf16 compute with float32 gradient
    reduction on CUDA."""
    cuda = device.type == "cuda"
    mesh = init_device_mesh(device.type, (world(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def sharded(t: torch.Tensor) -> bool:
    """Whether t is an FSDP2 shard (each rank holds a part of it)."""
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of a (possibly sharded) parameter or gradient this rank holds."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full tensor, sharded as `like` is (computed locally, no communication)."""
    if isinstance(like, DTensor):
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    return full


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather of a sharded parameter: a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t
