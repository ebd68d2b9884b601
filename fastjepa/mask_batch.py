"""The masks of one batch as one value (``Masks``), and the packed variable-length context (``PackedContext``):
what the models, the fused ops and the step read. Built by the sampler (``fastjepa.masks.MultiBlockMaskCollator``)
or, from the official lists of ``[B, K]`` tensors, by ``Masks.from_lists`` at the API boundary. Torch only: the
models import it without the sampler's numpy and multiprocessing."""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PackedContext:
    """Variable-length context, packed (fixed mode, opt-in): every image keeps its whole context block.

    Context sequence ``s = e*B + b`` is context block e of image b; the encoder runs all of them as one packed
    ``[T, D]`` sequence delimited by ``cu_seqlens``. The predictor's sequence ``m*nenc*B + s`` is
    ``[context s; the mask tokens of target block m for image b]``: ``predictor_index`` picks its rows from
    ``cat([context tokens (T), mask tokens (M*B*Kt, ordered m, b, k)])`` and ``target_index`` finds the mask
    tokens again, in the predictions' order ``[M*nenc*B, Kt]``. Everything is computed on the CPU when the batch is
    handed off, so the step needs no host synchronisation."""

    index: torch.Tensor  # [T] int64: patch index b*N + n of every packed context token, sequence by sequence
    cu_seqlens: torch.Tensor  # [nenc*B + 1] int64 cumulative context lengths
    max_seqlen: int
    predictor_index: torch.Tensor  # [M*(T + nenc*B*Kt)] int64
    predictor_cu_seqlens: torch.Tensor  # [M*nenc*B + 1] int64
    predictor_max_seqlen: int
    target_index: torch.Tensor  # [M*nenc*B, Kt] int64
    batch: int
    num_patches: int

    @classmethod
    def from_padded(cls, enc: torch.Tensor, num_target_blocks: int, target_len: int, num_patches: int):
        """From the collator's untruncated context indices ``[nenc, B, K]`` (-1 padded, ``truncate_context=False``)."""
        enc = enc.cpu()
        if int(enc.min()) < -1 or int(enc.max()) >= num_patches:
            raise IndexError(f"packed context: context indices must lie in [0, {num_patches}) (-1 pads), got "
                             f"[{int(enc.min())}, {int(enc.max())}]")
        valid = enc >= 0
        lengths = valid.sum(-1).reshape(-1)  # [S], S = nenc * B
        if int(lengths.min()) < 1:
            raise ValueError("packed context: a context block has no token; the collator keeps more than min_keep")
        num_seqs, batch = len(lengths), enc.shape[1]
        image = torch.arange(batch).view(1, batch, 1)
        index = (image * num_patches + enc)[valid]
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0))
        total = int(cu_seqlens[-1])

        seq_len = lengths.repeat(num_target_blocks) + target_len  # predictor sequence m*S + s
        pred_cu = F.pad(seq_len.cumsum(0), (1, 0))
        seq = torch.repeat_interleave(torch.arange(len(seq_len)), seq_len)
        pos_in = torch.arange(len(seq)) - pred_cu[seq]
        block, ctx_seq = seq // num_seqs, seq % num_seqs
        ctx_len = lengths[ctx_seq]
        mask_row = total + (block * batch + ctx_seq % batch) * target_len + pos_in - ctx_len
        predictor_index = torch.where(pos_in < ctx_len, cu_seqlens[ctx_seq] + pos_in, mask_row)
        target_index = (pred_cu[:-1] + lengths.repeat(num_target_blocks))[:, None] + torch.arange(target_len)
        return cls(index, cu_seqlens, int(lengths.max()), predictor_index, pred_cu, int(seq_len.max()), target_index,
                   batch, num_patches)

    @property
    def num_context_blocks(self) -> int:
        return (len(self.cu_seqlens) - 1) // self.batch

    def segment_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Packed ``[T, D]`` -> ``[nenc*B, D]``: each context sequence's mean (no host synchronisation)."""
        lengths = self.cu_seqlens.diff()
        seq = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths, output_size=x.shape[0])
        sums = torch.zeros(len(lengths), x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, seq, x)
        return sums / lengths.unsqueeze(1).to(x.dtype)


@dataclass(frozen=True)
class Masks:
    """The masks of one batch as one value: built once where the loader hands the batch off, moved to the device
    once, then read by every op and model of the step.

    ``enc``: ``[nenc, B, Kc]`` int64 context indices (with ``packed``, the untruncated lists, -1 padded);
    ``pred``: ``[M, B, Kt]`` int64 target indices; ``packed``: the variable-length context, or None.
    """

    enc: torch.Tensor
    pred: torch.Tensor
    packed: PackedContext | None = None
    # what the sampler's cut to the batch minimum hides (tests and statistics): [nenc, B] context tokens before
    # the cut, and the batch's target and context block sizes (height, width); None where not sampled here
    context_counts: torch.Tensor | None = None
    pred_size: tuple[int, int] | None = None
    enc_size: tuple[int, int] | None = None

    @classmethod
    def from_lists(cls, masks_enc, masks_pred, packed_num_patches: int | None = None) -> "Masks":
        """From the official lists of ``[B, K]`` tensors, the one converter (the collator builds ``Masks``
        itself). With ``packed_num_patches`` (the patch grid size), the context lists are the untruncated ones
        (-1 padded) and get packed (variable-length context)."""
        enc, pred = _stack(masks_enc, "masks_enc"), _stack(masks_pred, "masks_pred")
        packed = None
        if packed_num_patches is not None:
            packed = PackedContext.from_padded(enc, pred.shape[0], pred.shape[2], packed_num_patches)
        return cls(enc, pred, packed)

    @property
    def num_context_blocks(self) -> int:
        return self.enc.shape[0]

    @property
    def num_target_blocks(self) -> int:
        return self.pred.shape[0]

    def _map(self, fn) -> "Masks":
        packed = self.packed
        if packed is not None:
            packed = dataclasses.replace(packed, **{f.name: fn(getattr(packed, f.name)) for f in
                                                    dataclasses.fields(packed)
                                                    if isinstance(getattr(packed, f.name), torch.Tensor)})
        return dataclasses.replace(self, enc=fn(self.enc), pred=fn(self.pred), packed=packed)

    def to(self, device, non_blocking: bool = False) -> "Masks":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Masks":
        return self._map(torch.Tensor.pin_memory)


def _stack(masks, name: str) -> torch.Tensor:
    """The official list of M ``[B, K]`` tensors -> ``[M, B, K]``, every shape checked."""
    if isinstance(masks, torch.Tensor) or len(masks) == 0:
        got = f"a tensor of shape {tuple(masks.shape)}" if isinstance(masks, torch.Tensor) else "an empty list"
        raise ValueError(f"{name}: pass the official non-empty list of [B, K] index tensors, got {got}")
    for i, m in enumerate(masks):
        if m.dim() != 2 or m.shape != masks[0].shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(m.shape)}, {name}[0] {tuple(masks[0].shape)}; every mask "
                             "must be [B, K] with the same B and K (the collator cuts every list to a common length)")
    return torch.stack(list(masks))
