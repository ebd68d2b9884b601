"""The roofline of one I-JEPA training step: every op (each GEMM with its shape, attention, each LayerNorm, GELU,
residual add, weight cast, the gathers, the optimizer and the EMA) with its FLOPs (the one FLOP model,
``fastjepa.metrics.block_matmuls``), its minimum DRAM bytes (each input read once, each output written once: bf16
activations and GEMM weights, fp32 master weights, gradients and AdamW moments) and its floor time
``max(FLOPs / matmul rate, bytes / bandwidth)``, summed by the categories of ``bench.profile_step``.

    python -m bench.roofline                                    # ViT-H/14, batch 128, the H200's measured ceilings
    python -m bench.roofline --model vit_base_16 --tflops 989 --tbps 4.8

``bench.profile_step`` prints the same floors beside the measured categories, so every GPU run shows the gap per
category. The step is the default one: ``repeat`` predictor layout (the last block computes the target tokens
only), flash-style attention (no score matrix in memory), the target forward reading its bf16 replica, bf16
autocast casting the trained fp32 weights once per forward, fused AdamW and the fused EMA writing the replica.
"""

import argparse
from collections import defaultdict
from dataclasses import dataclass

from fastjepa.metrics import block_matmuls
from fastjepa.spec import ModelSpec

from .bench_step import SETUPS

ACT = 2  # bytes per bf16 activation or GEMM weight element
FP32 = 4  # bytes per master weight, gradient or AdamW moment element
# measured on one H200 (bench/results/nvidia-h200/: bf16 8192^3 matmul, device-to-device copy)
H200_TFLOPS, H200_TBPS = 804.0, 4.1


@dataclass(frozen=True)
class Op:
    """One op of the step, ``count`` times (a model's depth): FLOPs and minimum bytes of one execution."""

    name: str
    category: str
    flops: float
    bytes: float
    count: int = 1
    shape: str = ""  # a GEMM's [m x k] @ [k x n]

    def floor_ms(self, flops_per_s: float, bytes_per_s: float) -> float:
        return self.count * max(self.flops / flops_per_s, self.bytes / bytes_per_s) * 1e3


def gemm(name: str, m: float, k: float, n: float, flops: float, count: int, grad: bool,
         dgrad: bool = True) -> list[Op]:
    """``[m, k] @ [k, n]``: its forward and, with ``grad``, the input gradient (unless ``dgrad`` is False: the
    images need none) and the weight gradient (accumulated in fp32)."""
    shape = f"[{m:.0f}x{k:.0f}] @ [{k:.0f}x{n:.0f}]"
    ops = [Op(name, "GEMM", flops, (m * k + k * n + m * n) * ACT, count, shape)]
    if grad:
        if dgrad:
            ops.append(Op(f"{name} dgrad", "GEMM", flops, (m * n + k * n + m * k) * ACT, count, shape))
        ops.append(Op(f"{name} wgrad", "GEMM", flops, (m * k + m * n) * ACT + k * n * FP32, count, shape))
    return ops


def pointwise(name: str, elements: float, reads: int, writes: int, count: int, grad: bool,
              grad_reads: int = 2, grad_writes: int = 1, category: str = "elementwise/norm") -> list[Op]:
    """An elementwise or row-wise op (LayerNorm, GELU, residual add) over ``elements``: ``reads`` inputs and
    ``writes`` outputs of that size; its backward reads the saved input and the output gradient by default."""
    ops = [Op(name, category, 0.0, elements * (reads + writes) * ACT, count)]
    if grad:
        ops.append(Op(f"{name} backward", category, 0.0, elements * (grad_reads + grad_writes) * ACT, count))
    return ops


def block_ops(name: str, rows: float, tokens: float, dim: int, hidden: int, count: int, grad: bool,
              queries: float | None = None) -> list[Op]:
    """One pre-norm ViT block on ``rows`` sequences of ``tokens`` tokens, ``queries`` of them computing outputs
    (all by default), ``count`` times."""
    q = tokens if queries is None else queries
    t_all, q_all = rows * tokens, rows * q
    mm = {k: rows * v for k, v in block_matmuls(tokens, q * tokens, dim, hidden, q).items()}
    # the scores need no memory (flash); the backward is twice the forward's FLOPs (the one FLOP model's count)
    attn_bytes = (2 * q_all + 2 * t_all) * dim * ACT
    ops = [*pointwise(f"{name} norm1", t_all * dim, 1, 1, count, grad),
           *gemm(f"{name} qkv", t_all, dim, dim * (2 + q / tokens), mm["qkv"],
                 count, grad),
           Op(f"{name} attention", "attention", mm["attention"], attn_bytes, count)]
    if grad:
        ops.append(Op(f"{name} attention backward", "attention", 2 * mm["attention"],
                      (3 * q_all + 4 * t_all) * dim * ACT, count))
    ops += [*gemm(f"{name} proj", q_all, dim, dim, mm["proj"], count, grad),
            *pointwise(f"{name} residual1", q_all * dim, 2, 1, count, grad, 1, 1),
            *pointwise(f"{name} norm2", q_all * dim, 1, 1, count, grad),
            *gemm(f"{name} fc1", q_all, dim, hidden, mm["fc1"], count, grad),
            *pointwise(f"{name} gelu", q_all * hidden, 1, 1, count, grad),
            *gemm(f"{name} fc2", q_all, hidden, dim, mm["fc2"], count, grad),
            *pointwise(f"{name} residual2", q_all * dim, 2, 1, count, grad, 1, 1)]
    return ops


def step_ops(s: ModelSpec, batch: int, context: int, target: int) -> list[Op]:
    """Every op of one default training step of ``s`` at ``context`` and ``target`` tokens per block."""
    dim, depth, ratio = s.embed_dim, s.depth, s.mlp_ratio
    hidden, pd, ph = int(dim * ratio), s.pred_dim, int(s.pred_dim * ratio)
    n, m, nenc, patch_dim = s.num_patches, s.num_pred_masks, s.num_enc_masks, s.in_chans * s.patch_size**2
    rows, pred_rows, pred_tokens = nenc * batch, m * nenc * batch, context + target
    patch_flops = 2.0 * batch * n * patch_dim * dim
    ops = [
        # target forward (no grad): all patches, bf16 replica weights
        *gemm("target patch_embed", batch * n, patch_dim, dim, patch_flops, 1, False),
        *block_ops("target block", batch, n, dim, hidden, depth, False),
        *pointwise("target final norm", batch * n * dim, 1, 1, 1, False),
        # context encoder: patch embedding on every patch (weight gradient only), gather of the context tokens
        *gemm("context patch_embed", batch * n, patch_dim, dim, patch_flops, 1, True, dgrad=False),
        *pointwise("masked_gather (+pos)", rows * context * dim, 1, 1, 1, True, 1, 1, "fastjepa kernels"),
        *block_ops("context block", rows, context, dim, hidden, depth, True),
        *pointwise("context final norm", rows * context * dim, 1, 1, 1, True),
        # predictor: embed, tokens, depth-1 full blocks, the target-only last block, norm, projection
        *gemm("predictor_embed", rows * context, dim, pd, 2.0 * rows * context * dim * pd, 1, True),
        *pointwise("predictor_tokens", pred_rows * pred_tokens * pd, 0, 1, 1, True, 1, 1, "fastjepa kernels"),
        *block_ops("predictor block", pred_rows, pred_tokens, pd, ph, s.pred_depth - 1, True),
        *block_ops("predictor last block", pred_rows, pred_tokens, pd, ph, 1, True, queries=target),
        *pointwise("predictor norm", pred_rows * target * pd, 1, 1, 1, True),
        *gemm("predictor_proj", pred_rows * target, pd, dim, 2.0 * pred_rows * target * pd * dim, 1, True),
        # target LayerNorm + gather + smooth-L1 (reads the targets' rows and the predictions, writes their grads)
        Op("target_norm_smooth_l1", "fastjepa kernels", 0.0, 3 * pred_rows * target * dim * ACT),
    ]
    trained, encoder = s.parameter_counts()
    ops += [
        # bf16 autocast casts each trained fp32 weight once per forward (the target reads its bf16 replica)
        Op("autocast weight casts", "elementwise/norm", 0.0, trained * (FP32 + ACT)),
        Op("gradient norm", "optimizer", 0.0, trained * FP32),
        # fused AdamW: reads weight, gradient and both moments, writes weight and moments
        Op("AdamW (fused)", "optimizer", 0.0, trained * 7 * FP32),
        # target <- m * target + (1 - m) * encoder, and its bf16 replica written in the same pass
        Op("EMA + bf16 replica", "EMA", 0.0, encoder * (3 * FP32 + ACT)),
    ]
    return ops


def floors(ops: list[Op], tflops: float, tbps: float) -> dict[str, float]:
    """Floor ms per category."""
    out = defaultdict(float)
    for op in ops:
        out[op.category] += op.floor_ms(tflops * 1e12, tbps * 1e12)
    return dict(out)


def report(s: ModelSpec, batch: int, tflops: float = H200_TFLOPS, tbps: float = H200_TBPS,
           measured: dict[str, float] | None = None) -> list[str]:
    """Markdown lines: the floors by category at these ceilings, beside ``measured`` ms per category if given."""
    context, target = s.expected_tokens()
    ops = step_ops(s, batch, context, target)
    cats = floors(ops, tflops, tbps)
    total_flops = sum(op.flops * op.count for op in ops)
    model = f"{s.model_name}/{s.patch_size} at {s.img_size} px"
    lines = [f"# Roofline of one step ({model}, batch {batch}, {context} context and {target} target tokens per "
             f"block; ceilings {tflops:g} TFLOP/s, {tbps:g} TB/s)", "",
             f"{total_flops / 1e12:.1f} TFLOP, floor {sum(cats.values()):.1f} ms", ""]
    head = "| category | floor ms |" + (" measured ms | measured / floor |" if measured is not None else "")
    lines += [head, "|---|---|" + ("---|---|" if measured is not None else "")]
    for cat in sorted(set(cats) | set(measured or {}), key=lambda c: -cats.get(c, 0.0)):
        floor = cats.get(cat, 0.0)
        row = f"| {cat} | {floor:.2f} |"
        if measured is not None:
            got = measured.get(cat, 0.0)
            row += f" {got:.2f} | {got / floor:.2f}x |" if floor else f" {got:.2f} | - |"
        lines.append(row)
    return lines


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_huge_14", choices=list(SETUPS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--tflops", type=float, default=H200_TFLOPS, help="matmul ceiling, TFLOP/s")
    ap.add_argument("--tbps", type=float, default=H200_TBPS, help="memory ceiling, TB/s")
    args = ap.parse_args(argv)
    lines = report(SETUPS[args.model], args.batch, args.tflops, args.tbps)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
