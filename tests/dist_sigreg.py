"""Worker of tests/test_sigreg.py (run under torchrun, 2 gloo processes): a ViT encoder sharded with FSDP2, each
rank encoding half of a batch, SIGReg of the pooled outputs; saves every rank's loss and the gathered gradients.
``sigreg_loss_and_grads`` is the one-process computation on the whole batch."""

import sys
from pathlib import Path

import torch

from fastjepa.models import VisionTransformer
from fastjepa.modules.sigreg import SIGReg

SEED = 17


def encoder() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(16, 4, 3, 32, 2, 4)


def sigreg_loss(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return SIGReg(slices=64)(model(images).mean(1), seed=SEED)


def sigreg_loss_and_grads(images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = encoder()
    loss = sigreg_loss(model, images)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def main(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = encoder()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    loss = sigreg_loss(model, images.chunk(world)[rank])
    loss.backward()
    losses = [None] * world
    dist.all_gather_object(losses, float(loss))
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save({"losses": losses, "grads": grads}, out)
        torch.save(images, out.with_suffix(".images.pt"))
    dist.barrier()  # a rank tearing gloo down while another still writes aborts (exit -6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
