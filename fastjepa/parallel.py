"""Processes, devices and parallelism, applied to an ``IJEPA`` model from outside (the model code knows none of it).

- ``init_distributed``: reads torchrun's environment (single- or multi-node, no SLURM assumptions), picks the
  device and backend (NCCL on CUDA, gloo on CPU) and sets collective timeouts so a dead rank makes the others
  fail instead of hanging.
- ``parallelize``: activation checkpointing and ``torch.compile`` per block, then DDP or FSDP2. Every forward
  path of the models runs its blocks through their modules, so these wrap every block of the encoder, the target
  encoder and the predictor in every layout. Under FSDP2 the encoder and the target encoder are sharded
  identically (same mesh, one unit per block plus one per model), so each rank's target shard is the EMA of its
  own encoder shard and the EMA needs no communication. The target encoder has ``requires_grad=False``: DDP gives
  it no reducer buckets and FSDP2 no reduce-scatter.
"""

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastjepa.choices import PARALLEL_STRATEGIES as STRATEGIES
from fastjepa.ijepa import IJEPA
from fastjepa.modules.fp8 import release_fp8_weights
from fastjepa.spec import ModelSpec


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(timeout_s: float, device: str) -> DistEnv:
    """Join the torchrun process group when launched by torchrun (``WORLD_SIZE`` > 1), else run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"train.device={device} but no CUDA GPU is visible here (torch.cuda.is_available() is "
                         "False; torch " + torch.__version__ + "): use train.device=auto or cpu, or a CUDA build of "
                         "torch on a GPU machine")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        # NCCL watchdog: a collective that does not complete within the timeout aborts the process (and torchrun
        # then stops the other workers) instead of waiting forever on a rank that died.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
    return DistEnv(rank, world_size, local_rank, dev, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def destroy_distributed(finished: bool = False) -> None:
    """Tear the process group down; after a run every rank ``finished``, wait for all of them first: a rank that
    tears gloo down while another is still exporting aborts ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def resolve_strategy(strategy: str, world_size: int) -> str:
    """The concrete strategy; ``ddp`` and ``fsdp`` need several processes (torchrun)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"train.parallel={strategy!r} is not one of {STRATEGIES}")
    if strategy == "auto":
        return "fsdp" if world_size > 1 else "none"
    if strategy in ("ddp", "fsdp", "hsdp") and world_size == 1:
        raise ValueError(f"train.parallel={strategy} needs several processes: launch with torchrun "
                         "--nproc_per_node=N, or use train.parallel=none (or auto)")
    return strategy


def _block_lists(model: IJEPA) -> list[nn.ModuleList]:
    """The blocks that run in a step: the encoder's, the target forward's (the replica's when there is one) and
    the predictor's."""
    return [model.encoder.blocks, model.target_forward_encoder.blocks, model.predictor.predictor_blocks]


def call_sites(model: IJEPA, spec: ModelSpec) -> list[tuple[str, nn.ModuleList, int, int, bool]]:
    """Where a step runs blocks: ``(name, blocks, sequences, tokens per sequence, with backward)`` for the context
    encoder, the target forward (the replica when there is one) and the predictor, at the expected token counts of
    the spec's masks."""
    context, target = spec.expected_tokens()
    pred_rows, pred_len = spec.predictor_sequences(context, target)
    return [("context", model.encoder.blocks, spec.batch_size * spec.num_enc_masks, context, True),
            ("target", model.target_forward_encoder.blocks, spec.batch_size, model.encoder.num_patches, False),
            ("predictor", model.predictor.predictor_blocks, pred_rows, pred_len, True)]


def resolve_attention(model: IJEPA, spec: ModelSpec, dtype: torch.dtype) -> dict[str, tuple[str, dict]]:
    """Every ``auto`` attention of the step resolved to a concrete backend at its call site's shapes, before
    anything is compiled; returns ``{call site: (backend, timings)}``."""
    device = next(model.parameters()).device
    choices = {}
    for site, blocks, rows, seq_len, grad in call_sites(model, spec):
        for block in blocks:
            choices[site] = block.attn.resolve_backend(rows, seq_len, device, dtype, grad)
    return choices


def resolve_block_impl(model: IJEPA, spec: ModelSpec, impl: str, dtype: torch.dtype,
                       compile_backend: str | None) -> dict[str, tuple]:
    """``impl`` (``fastjepa.block_impl``) set on every block, ``auto`` timed once per call site (its first block's
    weights, at its shapes; the ``compile`` candidate through the blocks' compile backend); returns ``{call site:
    (impl, timings)}``. A ``fused`` that cannot run here (no triton, no GPU) was refused by the trainer's set-up."""
    compiler = EagerOnCompileFailure(compile_backend) if compile_backend is not None else None
    choices = {}
    for site, blocks, rows, seq_len, grad in call_sites(model, spec):
        if not len(blocks):
            continue
        impl_here, times = blocks[0].resolve_impl(impl, rows, seq_len, dtype, grad, compiler)
        for block in blocks:
            block.impl = impl_here
        choices[site] = (impl_here, times)
    return choices


Choices = dict[str, dict[str, tuple]]  # {setting: {call site: (name, timings)}}


def agree_on_choices(model: IJEPA, spec: ModelSpec, choices: Choices) -> Choices:
    """Every rank adopts rank 0's timed choices (``{"attention" | "block_impl": {call site: (name, timings)}}``):
    timings differ between GPUs by noise, and all ranks must run the same numerics."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choices
    box = [choices]
    dist.broadcast_object_list(box, src=0)
    choices = box[0]
    for site, blocks, *_ in call_sites(model, spec):
        for block in blocks:
            if site in choices.get("attention", {}):
                block.attn.backend = choices["attention"][site][0]
            if site in choices.get("block_impl", {}):
                block.impl = choices["block_impl"][site][0]
    return choices


def apply_activation_checkpointing(model: IJEPA) -> None:
    """Recompute each trained block's activations in the backward (encoder and predictor; the target encoder
    runs without autograd, so it has nothing to save). The wrapper keeps parameter names unchanged in
    state dicts."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    for blocks in (model.encoder.blocks, model.predictor.predictor_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


# Inductor's memory-coalescing analysis for tilings asserts while generating code for the dynamic-shape graph of the
# predictor's last block (torch 2.11 on an H200: ``get_pw_red_splits`` called from ``analyze_memory_coalescing``;
# bench/results/nvidia-h200/inductor_crash.log). Token counts change with every mask draw, so after the first steps
# every block graph has dynamic shapes, for which inductor's own config says the analysis "does not yet apply"; it
# only chooses tilings of pointwise kernels. Turned off for these blocks alone (not process-wide), as in the H200
# measurements of the default step, on every torch that has it (the assertion is unchanged up to 2.13).
BLOCK_INDUCTOR_OPTIONS = {"triton.coalesce_tiling_analysis": False}


def block_inductor_options() -> dict:
    """The inductor options for the blocks that this torch knows (older ones lack the analysis)."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    return {k: v for k, v in BLOCK_INDUCTOR_OPTIONS.items() if k in known}


class EagerOnCompileFailure:
    """A ``torch.compile`` backend that compiles each graph with ``backend`` and, where that raises, runs the graph
    eagerly (the same results, slower) after one warning naming what failed, the torch version and the error: a
    compiler bug must cost speed, never a multi-day run. The backward is compiled with the forward, so its failures
    surface here too, not inside ``loss.backward()``. One instance for all blocks: dynamo guards on the backend,
    and a backend per block would recompile the shared block graph for every block."""

    def __init__(self, backend="inductor", what: str = "a ViT block (fastjepa.modules.block.Block)"):
        self.backend, self.what = backend, what  # backend: a name or a dynamo backend function
        self.failures: list[str] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list):
        from torch._functorch import config as functorch_config

        # a torch without the setting compiles the backward lazily: its failures then surface in loss.backward()
        eager_backward = ({"force_non_lazy_backward_lowering": True}
                          if hasattr(functorch_config, "force_non_lazy_backward_lowering") else {})
        try:
            with functorch_config.patch(eager_backward):
                return self._compile(gm, example_inputs)
        except (torch._dynamo.exc.RestartAnalysis, torch._dynamo.exc.SkipFrame):
            raise  # dynamo's own control flow (e.g. re-tracing with a scalar as a tensor), not a failure
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the graph itself is still correct
            tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
            shape = tuple(max(tensors, key=torch.Tensor.dim).shape) if tensors else ()  # the activations
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else '(no message)'}"
            self.failures.append(error)
            name = getattr(self.backend, "__name__", self.backend)
            warnings.warn(f"torch.compile ({name}) of {self.what}, graph with input {list(shape)}, failed on "
                          f"torch {torch.__version__}: {error}. That graph runs eager from now on (same results, "
                          "slower); train.compile=false turns compilation off", RuntimeWarning, stacklevel=2)
            return gm.forward

    def _compile(self, gm: torch.fx.GraphModule, example_inputs: list):
        if self.backend == "inductor":
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(gm, example_inputs, config_patches=block_inductor_options())
        return torch._dynamo.lookup_backend(self.backend)(gm, example_inputs)


def apply_compile(model: IJEPA, backend: str = "inductor") -> EagerOnCompileFailure:
    """``torch.compile`` each block of the three models in place (names unchanged; one graph reused by every block
    of a width), a graph whose compilation fails running eager; returns the backend (its ``failures``)."""
    compiler = EagerOnCompileFailure(backend)
    for blocks in _block_lists(model):
        for block in blocks:
            block.compile(backend=compiler)
    return compiler


def shard_group_size(requested: int, env: DistEnv) -> int:
    """HSDP's shard group: ``train.shard_size``, or by default the processes of one node; it must divide the
    world size."""
    size = requested or env.local_world_size
    if size < 1 or env.world_size % size:
        raise ValueError(f"train.shard_size={size} must divide the {env.world_size} processes into equal shard "
                         "groups; set it to the GPUs of one node (the default, from torchrun's LOCAL_WORLD_SIZE)")
    return size


def apply_fsdp(model: IJEPA, device: torch.device, bf16: bool, reshard_after_forward: bool = True,
               shard_size: int | None = None) -> IJEPA:
    """One FSDP2 unit per block (encoder, target encoder, predictor) plus one per model. With ``shard_size``
    smaller than the world, HSDP: a 2-D mesh that shards within groups of ``shard_size`` processes (a node) and
    replicates across the groups, so all-gathers and reduce-scatters stay on the node's links and only the
    gradient all-reduce crosses nodes. The models' explicit forward methods (``forward_packed``) are registered
    so that they gather and free parameters as ``forward``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    world = dist.get_world_size()
    if shard_size is None or shard_size >= world:
        mesh = init_device_mesh(device.type, (world,))
    else:
        mesh = init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    mp = mp or MixedPrecisionPolicy()
    shard = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    nets = [model.encoder, model.predictor] + ([] if model.online_target else [model.target_encoder])
    if model.target_replica is not None:  # sharded as the target, so the EMA pairs up local shards
        nets.append(model.target_replica)
        release_fp8_weights(model.target_replica)  # sharded rows: the forward quantises gathered weights
    for net in nets:
        for block in net.predictor_blocks if net is model.predictor else net.blocks:
            fully_shard(block, **shard)
        fully_shard(net, **shard)
        register_fsdp_forward_method(net, "forward_packed")
    fully_shard(model, **shard)
    return model


def parallelize(model: IJEPA, env: DistEnv, strategy: str = "auto", *, bf16: bool = False,
                activation_checkpointing: bool = False, compile: str | None = None,
                shard_size: int = 0) -> nn.Module:
    """Wrap ``model`` (already on ``env.device``) for training; returns the module whose ``forward`` gives the
    loss. ``compile``: the ``torch.compile`` backend for every block, or None. ``model`` itself stays the handle
    for ``update_target`` and checkpoints (its parameters are the ones the optimizer must be built over, after
    this call)."""
    strategy = resolve_strategy(strategy, env.world_size)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile is not None:
        apply_compile(model, compile)
    if strategy in ("fsdp", "hsdp"):
        return apply_fsdp(model, env.device, bf16,
                          shard_size=shard_group_size(shard_size, env) if strategy == "hsdp" else None)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model
