"""Worker of tests/test_block.py (run under torchrun, 2 gloo processes): each rank "times" a different winner at
every call site; after ``agree_on_choices`` every rank's blocks run rank 0's choices. Saves each rank's blocks'
(attention backend, implementation) per call site."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from fastjepa import config
from fastjepa.ijepa import build_ijepa
from fastjepa.parallel import agree_on_choices, call_sites
from fastjepa.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = config.load(ROOT / "configs/test_tiny.yaml", ["meta.model_name=vit_micro", "meta.pred_emb_dim=32"])
    spec = ModelSpec.from_config(cfg)
    model = build_ijepa(spec)
    backend, impl = ("sdpa", "compile") if rank == 0 else ("math", "fused")
    sites = [site for site, *_ in call_sites(model, spec)]
    choices = {"attention": {s: (backend, {backend: float(rank)}) for s in sites},
               "block_impl": {s: (impl, {impl: float(rank)}) for s in sites}}
    agreed = agree_on_choices(model, spec, choices)
    ran = {site: sorted({(b.attn.backend, b.impl) for b in blocks}) for site, blocks, *_ in call_sites(model, spec)}
    torch.save({"agreed": agreed, "ran": ran}, out.with_suffix(f".rank{rank}.pt"))
    dist.barrier()  # a rank tearing gloo down while another still writes aborts (exit -6)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
