"""The named choices of fastjepa, defined once (no torch import: the config validates against them before anything
heavy is imported). Every module that accepts one of these names imports its tuple from here."""

# name: (embed_dim, depth, num_heads, mlp_ratio); the official sizes plus two small ones for CPU demos and tests.
VIT_SIZES = {
    "vit_micro": (64, 4, 4, 4.0),  # not an official size: fast tests
    "vit_mini": (192, 4, 4, 4.0),  # not an official size: vit_tiny's width at depth 4, the MNIST CPU demo encoder
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}

# Mask sampler: "parity" reproduces the official sampler, quirks included; "fixed" corrects them.
MASK_MODES = ("parity", "fixed")

# ViT attention (fastjepa.modules.attention_backends): "auto" times the available ones on a GPU.
ATTENTION_BACKENDS = ("auto", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "flash_attn",
                      "flash_attn3", "xformers", "math")
# Packed (variable-length) sequences.
VARLEN_ATTENTION_BACKENDS = ("auto", "flash_attn", "flex", "sdpa", "math")
# The shared-context predictor's block-structured attention (fastjepa.kernels.block_attention).
BLOCK_ATTENTION_BACKENDS = ("auto", "triton", "flex", "reference")
# The fused ops of fastjepa.kernels: "auto" runs, on CUDA tensors, the implementation that measured faster on a GPU
# (fastjepa.kernels.MEASURED_WINNERS) and Triton under TRITON_INTERPRET=1; "triton" every Triton kernel where it can
# run; "reference" always the PyTorch reference.
KERNEL_BACKENDS = ("auto", "triton", "reference")
# The memory-bound half of each ViT block (fastjepa.modules.block): "compile" the PyTorch ops (fused by
# torch.compile when the blocks are compiled), "fused" fastjepa's kernels; "auto" times both at the run's shapes on
# the GPU ("compile" on CPU).
BLOCK_IMPLS = ("auto", "compile", "fused")
# The parameter update: "separate" fused AdamW then the EMA (two passes over the parameters), "fused" AdamW, the EMA
# and the bf16 replica in one pass (fastjepa.kernels.adamw_ema_step); "auto" times both on the GPU ("separate" on CPU).
UPDATE_IMPLS = ("auto", "separate", "fused")
# The EMA's fused kernel: Triton, or the CUDA C++ twin from csrc/ (built with FASTJEPA_BUILD_CUDA=1).
EMA_BACKENDS = ("triton", "cuda")

# Which matmuls run in FP8 (e4m3, row-wise dynamic scales; fastjepa.modules.fp8): none, the target encoder's forward,
# or all (also the context encoder's and the predictor's forward and backward, through torchao.float8).
FP8_SCOPES = ("none", "target", "all")
# The former setting of the target forward's precision, kept as an alias: fp8 means fastjepa.fp8=target.
TARGET_PRECISIONS = ("bf16", "fp8")

# Where the targets come from: "ema" (the official momentum target encoder) or "online" (the context encoder itself
# under no_grad: no target copy, no EMA).
TARGET_ENCODERS = ("ema", "online")
# What SIGReg (fastjepa.sigreg) regularises: the context encoder's output averaged per image, or every token.
SIGREG_SAMPLES = ("pooled", "tokens")

# How the predictor lays out its mask-token attention (fastjepa.models.predictor): "repeat" computes the official
# result with a cheaper last block, "official" runs every block on every token, "shared" (opt-in) computes the
# context once.
PREDICTOR_LAYOUTS = ("repeat", "official", "shared")

DATA_SOURCES = ("imagefolder", "webdataset", "synthetic", "mnist")
PARALLEL_STRATEGIES = ("auto", "none", "ddp", "fsdp", "hsdp")
SHARDED_STRATEGIES = ("fsdp", "hsdp")
PROGRESS_STYLES = ("auto", "bar", "lines")
