"""LoRA layers built for speed: stacked parameter banks, folded gates, a fused linear kernel.

A plain PEFT LoRA step costs more than the frozen network itself on SDXL although it adds < 2 %
of the FLOPs: per layer it casts the input to fp32, runs dropout and a scaling multiply over the
activations, and every fp32 adapter weight is cast on its own. Here instead

* the adapters of all linear layers of one shape live in one :class:`LoRABank` (``A``:
  (N, k*r, in), ``B``: (N, out, k*r) for k adapters, fp32). Once per step :meth:`LoRABank.prepare`
  folds scale and per-column gates (masks, mergers) into ``B`` and casts both to the compute dtype
  in a handful of kernels for the whole bank;
* :class:`LoRALinear` runs ``y = x W0ᵀ + b + (x Aᵀ) Bᵀ`` through :class:`FusedLoRAFunction`: three
  GEMMs forward (the LoRA term accumulated in place), five backward, no element-wise pass over
  activations;
* on GPUs, ``merge=True`` goes further: once per step each bank computes W = W0 + B A for all its
  layers in one batched GEMM; a layer is then one plain GEMM forward, as in the frozen model. Its
  backward (``merge_grad``): by default (``"dense"``) autograd through W0 + B A, i.e. the frozen dx
  GEMM plus one full-size dW = dyᵀ x per layer, then dA and dB from dW in small batched GEMMs for
  the whole bank; ``"lowrank"`` (:class:`MergedLoRAFunction`) replaces dW by four rank-r GEMMs per
  layer. Fewer FLOPs, but on an H200 (SDXL, 1024², rank 64, CUDA graphs) the skinny GEMMs, each
  re-reading the activations, were slower: DreamBooth-LoRA 1.159x vs 1.224x of the honest frozen
  reference, UnZipLoRA 1.186x vs 1.236x (docs/benchmarks.md). W is in the compute dtype, as in
  mixed-precision training; the fp32 masters keep the small updates;
* several adapters sharing an input are one rank-k*r LoRA; in a split-input bank each adapter
  reads its own input (``lora_input``, the inputs concatenated; A is made block-diagonal once per
  step), as UnZipLoRA's prompt separation needs in cross-attention k/v — still one fused call;
* gates may also vary with the token: adapter a's gate at token t is ``g_a + w_a(t) e_a`` with
  per-token weights ``w`` (:attr:`LoRABank.token_weights`) and extra gates ``e`` (``prepare``'s
  ``extra_gates``), as ``(x Aᵀ ‖ w ⊙ x Aᵀ) [B g ‖ B e]ᵀ``: one rank-2kr product in one autograd node
  (:class:`TokenGatedLoRAFunction`: the kernels of the plain expression, bitwise its results, without its
  per-layer dispatch), e.g. a column mask relaxed on the tokens of some scales of a scale-wise model. Merged
  (``merge=True``), where the token weights are constant over contiguous runs of tokens (a scale-wise model's
  scale groups), such a bank merges one weight per distinct weight row instead, ``W_d = W0 + B_d A`` with
  ``B_d`` = B gated by ``g + w_d e`` (one batched GEMM per row for the whole bank), and each layer runs one GEMM
  per run of tokens (:class:`SegmentLinearFunction`; two backward per run: dx and the full dW, autograd
  then reaches A, B and the gates through the merged weights, as ``merge_grad="dense"``).

Nothing here names a backbone: layers are found by module name and ``nn.Linear`` type.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FusedLoRAFunction(torch.autograd.Function):
    """``y = x W0ᵀ + b + (xl Aᵀ) Bᵀ`` with W0, b frozen; ``xl`` is the LoRA's input (default ``x``).

    Gradients for x, A and B only; a separate LoRA input ``xl`` is treated as a constant.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, xl=None):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        xl2 = x2 if xl is None else xl.reshape(x2.shape[0], -1)
        h = xl2 @ lora_a.t()
        y.addmm_(h, lora_b.t())
        ctx.shared = xl is None
        ctx.save_for_backward(xl2, h, weight, lora_a, lora_b)
        ctx.in_shape = shape
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xl2, h, weight, lora_a, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dh = dy2 @ lora_b
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ weight
            if ctx.shared:
                dx.addmm_(dh, lora_a)
            dx = dx.view(ctx.in_shape)
        da = dh.t() @ xl2 if ctx.needs_input_grad[3] else None
        db = dy2.t() @ h if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db, None


class MergedLoRAFunction(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W = W0 + B A`` merged (no grad), gradients for x, A and B in low rank.

    Forward is one GEMM, as in the frozen model. Backward: ``dx = dy W`` (the frozen model's own), then
    ``dh = dy B``, ``dA = dhᵀ x``, ``h = x Aᵀ``, ``dB = dyᵀ h``: four GEMMs of width r instead of the
    full ``dW = dyᵀ x`` (out x in) that autograd through ``W0 + B A`` computes, which costs as much as
    the forward GEMM itself.
    """

    @staticmethod
    def forward(ctx, x, merged, bias, lora_a, lora_b):  # type: ignore[override]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.addmm(bias, x2, merged.t()) if bias is not None else x2 @ merged.t()
        ctx.save_for_backward(x2, merged, lora_a, lora_b)
        ctx.in_shape = shape
        return y.view(*shape[:-1], merged.shape[0])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, merged, lora_a, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ merged).view(ctx.in_shape) if ctx.needs_input_grad[0] else None
        da = (dy2 @ lora_b).t() @ x2 if ctx.needs_input_grad[3] else None
        db = dy2.t() @ (x2 @ lora_a.t()) if ctx.needs_input_grad[4] else None
        return dx, None, None, da, db


def _column_major(t: torch.Tensor) -> bool:
    """Whether a 2-d operand is column-major, the layout for which autograd's ``mm`` backward computes its
    gradient transposed (its general, row-major formula otherwise)."""
    st = t.stride()
    return st[0] == 1 and st[1] == t.shape[0]


def _mm_grad_mat1(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """∂L/∂mat1 of ``mat1 @ mat2`` computed as autograd's ``mm`` backward does (same GEMM, same operand
    layout, so the same bits): a column-major ``mat1`` gets its gradient column-major."""
    if _column_major(mat1):
        return mat2.mm(grad.t()).t()
    return grad.mm(mat2.t())


def _mm_grad_mat2(grad: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor) -> torch.Tensor:
    """∂L/∂mat2 of ``mat1 @ mat2`` as autograd's ``mm`` backward computes it (see :func:`_mm_grad_mat1`)."""
    if _column_major(mat2):
        return grad.t().mm(mat1).t()
    return mat1.t().mm(grad)


class TokenGatedLoRAFunction(torch.autograd.Function):
    """``y = linear(x, W0, b) + (h ‖ w ⊙ h) Bᵀ`` with ``h = x Aᵀ`` and per-token weights ``w``: the
    token-weighted gates of :class:`LoRALinear` (``g + w(t) e``, B = [B g ‖ B e]) in one autograd node.

    The same kernels as autograd through the plain expression (``F.linear``, ``x @ Aᵀ``, ``cat([h, h * w])
    @ Bᵀ``, then the add) on the same operands, in the same order, so forward and gradients are bitwise
    those of the expression (each GEMM's gradient as autograd's ``mm`` backward computes it, see
    :func:`_mm_grad_mat1`); what goes is the dispatch around them: per layer, the expansion of ``w`` (done
    once per bank: ``mult`` = [1 ‖ w] per token, (..., L, 2, k*r)), the cat, the views and transposes of
    three matmuls, and about ten autograd nodes. ``x`` is cast to ``dtype`` inside (as ``F.linear`` under
    autocast and ``x.to(dtype)`` did, each with its own cast back in backward: the two input gradients are
    cast to ``x``'s dtype before they are added, as autograd adds them). W0 and b are frozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, mult, dtype):  # type: ignore[override]
        xc = x.to(dtype)
        wc = weight.to(dtype)
        lead, fin, kr = xc.shape[:-1], xc.shape[-1], lora_a.shape[0]
        x2 = xc.reshape(-1, fin)
        if bias is not None and xc.dim() == 3 and xc.is_contiguous():  # F.linear's own path for this input
            y = torch.addmm(bias.to(dtype), x2, wc.t())
        else:
            y = F.linear(xc, wc, None if bias is None else bias.to(dtype)).reshape(x2.shape[0], -1)
        h = x2.mm(lora_a.t())
        hh = (h.view(*lead, 1, kr) * mult).view(-1, 2 * kr)  # [h ‖ h ⊙ w]: h * 1 is h, bit for bit
        y = (y + hh.mm(lora_b.t())).view(*lead, -1)
        ctx.save_for_backward(x2, wc, lora_a, lora_b, hh, mult)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x2, wc, lora_a, lora_b, hh, mult = ctx.saved_tensors
        lead, kr = dy.shape[:-1], lora_a.shape[0]
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        # autograd's mm backward, written out for the usual layouts (contiguous A and B: their transposes
        # are column-major; row-major x and [h ‖ w ⊙ h]), the general formulas otherwise
        rows = not _column_major(x2) and not _column_major(hh)
        db = da = dx = None
        if need_b:
            db = dy2.t().mm(hh) if lora_b.is_contiguous() else _mm_grad_mat2(dy2, hh, lora_b.t()).t()
        if need_a or need_x:
            dhh = dy2.mm(lora_b) if rows else _mm_grad_mat1(dy2, hh, lora_b.t())
            g0, g1 = dhh.view(*lead, 2, kr).unbind(-2)
            dh = (g0 + g1 * mult.select(-2, 1)).view(-1, kr)
            if need_a:
                da = dh.t().mm(x2) if lora_a.is_contiguous() else _mm_grad_mat2(dh, x2, lora_a.t()).t()
            if need_x:
                if rows:
                    dx_base, dx_lora = dy2.mm(wc), dh.mm(lora_a)
                else:
                    dx_base, dx_lora = _mm_grad_mat1(dy2, x2, wc.t()), _mm_grad_mat1(dh, x2, lora_a.t())
                dx = (dx_base.to(ctx.x_dtype) + dx_lora.to(ctx.x_dtype)).view(*lead, -1)
        return dx, None, None, da, db, None, None


class SegmentLinearFunction(torch.autograd.Function):
    """``y[..., t, :] = x[..., t, :] W_dᵀ + b`` for the tokens t of each run ``(start, stop, d)`` of
    ``segments`` (consecutive, covering every token): one GEMM per run, each with its own weight ``W_d``
    (a token-gated bank's merged weights, one per distinct gate row). The weights come twice: ``W_dᵀ``
    (views of the bank's transposed stack: what gets the gradient) and ``W_d`` (the same memory, for
    ``dx``), so no layer transposes anything. Backward: per run ``dx = dy W_d`` and ``∂L/∂W_dᵀ += xᵀ dy``,
    the full-size weight gradient as autograd through ``F.linear`` computes it, A and B are then reached
    through the bank's merge as with ``merge_grad="dense"``. ``b`` is frozen; one dtype for every operand.
    Static shapes and Python-int runs, no host sync: safe under CUDA graph capture.
    """

    @staticmethod
    def forward(ctx, x, bias, segments, *weights):  # type: ignore[override]
        n_w = len(weights) // 2
        wts, ws = weights[:n_w], weights[n_w:]
        lead, n_tok, fin, fout = x.shape[:-1], x.shape[-2], x.shape[-1], ws[0].shape[0]
        sizes = [stop - start for start, stop, _ in segments]
        ctx.segments, ctx.sizes, ctx.lead, ctx.n_w = segments, sizes, lead, n_w
        if x.numel() == n_tok * fin:  # one sequence: each run is a block of rows, written in place
            x2 = x.reshape(n_tok, fin)
            y2 = x2.new_empty(n_tok, fout)
            for (_, _, d), xs, ys in zip(segments, x2.split(sizes), y2.split(sizes)):
                if bias is not None:
                    torch.addmm(bias, xs, wts[d], out=ys)
                else:
                    torch.mm(xs, wts[d], out=ys)
            ctx.save_for_backward(x2, *ws)
            return y2.view(*lead, fout)
        x3 = x.reshape(-1, n_tok, fin)
        parts = [torch.matmul(xs, wts[d]) for (_, _, d), xs in zip(segments, x3.split(sizes, dim=1))]
        y3 = torch.cat(parts, dim=1)
        if bias is not None:
            y3 += bias
        ctx.save_for_backward(x3, *ws)
        return y3.view(*lead, fout)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xx, *ws = ctx.saved_tensors
        segments, sizes, n_w = ctx.segments, ctx.sizes, ctx.n_w
        fin, fout = xx.shape[-1], dy.shape[-1]
        dx = None
        dwts: list[torch.Tensor | None] = [None] * n_w
        if xx.dim() == 2:  # one sequence
            dy2 = dy.reshape(-1, fout)
            dys = dy2.split(sizes)
            if ctx.needs_input_grad[0]:
                dx2 = dy2.new_empty(xx.shape)
                for (_, _, d), g, out in zip(segments, dys, dx2.split(sizes)):
                    torch.mm(g, ws[d], out=out)
                dx = dx2.view(*ctx.lead, fin)
            xts = xx.t().split(sizes, dim=1)
        else:
            dy3 = dy.reshape(xx.shape[0], -1, fout)
            dys = [g.reshape(-1, fout) for g in dy3.split(sizes, dim=1)]
            if ctx.needs_input_grad[0]:
                dx = torch.cat([torch.matmul(g, ws[d]) for (_, _, d), g in zip(segments, dy3.split(sizes, dim=1))],
                               dim=1).view(*ctx.lead, fin)
            xts = [xs.reshape(-1, fin).t() for xs in xx.split(sizes, dim=1)]
        for (_, _, d), xt, g in zip(segments, xts, dys):
            if ctx.needs_input_grad[3 + d]:
                dwts[d] = xt.mm(g) if dwts[d] is None else dwts[d].addmm_(xt, g)  # type: ignore[union-attr]
        return (dx, None, None, *dwts, *([None] * n_w))


def token_segments(weights: torch.Tensor) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[float, ...], ...]]:
    """Runs of equal rows of per-token weights (1, L, k) (or (L, k)): ``((start, stop, d), ...)`` over the
    L tokens, ``d`` indexing the distinct rows (second value, in order of first appearance). Reads the
    weights on the host (once, where they are set; not inside a step)."""
    rows = weights.detach().reshape(-1, weights.shape[-1]).double().cpu().tolist()
    distinct: list[tuple[float, ...]] = []
    runs: list[tuple[int, int, int]] = []
    for t, row in enumerate(map(tuple, rows)):
        if runs and distinct[runs[-1][2]] == row:
            runs[-1] = (runs[-1][0], t + 1, runs[-1][2])
            continue
        if row not in distinct:
            distinct.append(row)
        runs.append((t, t + 1, distinct.index(row)))
    return tuple(runs), tuple(distinct)


def _with_trainable(p: torch.Tensor, trainable: bool | torch.Tensor) -> torch.Tensor:
    """``p`` whose gradient reaches only the ``trainable`` entries (same values)."""
    if trainable is True:
        return p
    if trainable is False:
        return p.detach()
    return torch.where(trainable, p, p.detach())


class LoRABank(nn.Module):
    """LoRA adapters (several names, one rank) of N linear layers of the same shape.

    ``lora_A[i, j*r:(j+1)*r]`` is the down projection of adapter ``adapters[j]`` in layer
    ``names[i]``; ``lora_B[i, :, j*r:(j+1)*r]`` its up projection. Gates (N, out) per adapter
    scale output columns (``None`` = 1); they are folded into B by :meth:`prepare`.
    """

    def __init__(self, names: Sequence[str], in_features: int, out_features: int, rank: int,
                 adapters: Sequence[str], *, alpha: float | None = None, init: str = "gaussian",
                 init_std: float | None = None, generator: torch.Generator | None = None,
                 split_input: bool = False, merge: bool = False, merge_grad: str = "dense",
                 merge_segments: bool = True):
        super().__init__()
        self.names = list(names)
        if merge_grad not in ("lowrank", "dense"):
            raise ValueError(f"unknown merge_grad '{merge_grad}'")
        #: in merge mode, how A and B get their gradients: ``dense`` (default: autograd through W0 + B A,
        #: the full dW, then dA, dB; faster on an H200) or ``lowrank`` (:class:`MergedLoRAFunction`, four
        #: rank-r GEMMs per layer)
        self.merge_grad = merge_grad
        #: fold the adapters into the frozen weights once per step (W = W0 + B A, one batched GEMM
        #: for the bank); each layer then runs a single GEMM forward and two backward
        self.merge = merge and not split_input
        #: in merge mode, token-weighted gates constant over runs of tokens are merged too: one weight per
        #: distinct weight row, one GEMM per run (:class:`SegmentLinearFunction`); off = such a bank runs
        #: unmerged (:class:`TokenGatedLoRAFunction`)
        self.merge_segments = merge_segments
        self.w0: torch.Tensor | None = None
        #: each adapter reads its own input: layers get the inputs concatenated on the last dim
        self.split_input = split_input
        #: a LoRA input shared by every layer of a split bank (e.g. the prompts of every cross-attention
        #: k/v): the LoRA outputs of all layers are then computed once per step in two batched GEMMs
        self.shared_input: torch.Tensor | None = None
        self._delta: tuple[torch.Tensor, ...] | None = None
        self.adapters = tuple(adapters)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = (alpha if alpha is not None else rank) / rank
        n, k = len(self.names), len(self.adapters)
        a = torch.empty(n, k * rank, in_features)
        b = torch.empty(n, out_features, k * rank)
        std = init_std if init_std is not None else 1.0 / rank
        if init == "gaussian":  # both matrices random (UnZipLoRA's official init)
            a.normal_(0.0, std, generator=generator)
            b.normal_(0.0, std, generator=generator)
        elif init == "kaiming":  # standard LoRA: A kaiming-uniform, B zero -> starts as the base model
            bound = 1.0 / math.sqrt(in_features)
            a.uniform_(-bound, bound, generator=generator)
            b.zero_()
        elif init == "gaussian_a":  # A ~ N(0, std), B zero: PEFT's "gaussian", diffusers' LoRALinearLayer
            a.normal_(0.0, std, generator=generator)
            b.zero_()
        elif init == "zeros":  # the caller sets the weights (e.g. Break-for-Make's partly learnable projections)
            a.zero_()
            b.zero_()
        else:
            raise ValueError(f"unknown LoRA init '{init}'")
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(b)
        #: which entries of ``lora_A`` / ``lora_B`` get gradients: True (all), False (none: the fused
        #: kernel then skips that GEMM) or a bool mask broadcastable to the tensor (False = frozen)
        self.trainable_A: bool | torch.Tensor = True
        self.trainable_B: bool | torch.Tensor = True
        self._a: tuple[torch.Tensor, ...] | None = None
        self._b: tuple[torch.Tensor, ...] | None = None
        self._w: tuple[torch.Tensor, ...] | None = None
        #: record what :meth:`delta_gradients` reads: ΔW and ∂L/∂ΔW of every layer and adapter
        self.record_delta = False
        self._deltas: dict[int, list[torch.Tensor]] = {}  # per layer (unmerged banks): each adapter's ΔW
        self._recorded: torch.Tensor | None = None  # merged W (N, out, in) or shared LoRA output (N, T, out)
        self._token_weights: torch.Tensor | None = None
        self._token_mult: dict[torch.dtype, torch.Tensor] = {}
        #: runs (start, stop, row) of equal token-weight rows and the distinct rows, where merged per run
        self._segments: tuple[tuple[int, int, int], ...] | None = None
        self._segment_rows: tuple[tuple[float, ...], ...] | None = None
        #: per distinct token-weight row: (W_dᵀ per layer, autograd reaches A and B through it; W_d per layer)
        self._seg_w: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]] | None = None
        self._extra = False  # this step's B holds [B g ‖ B e] (token-weighted extra gates)

    @property
    def token_weights(self) -> torch.Tensor | None:
        """Per-token weights (..., L, k) of each adapter's extra gates (see ``prepare``); None = off."""
        return self._token_weights

    @token_weights.setter
    def token_weights(self, weights: torch.Tensor | None) -> None:
        self._token_weights = weights
        self._token_mult = {}
        self._segments = self._segment_rows = None
        # merged per run of tokens: weights the same for every sequence of the batch (read once, here)
        if weights is not None and self.merge and self.merge_segments and weights.dim() >= 2 \
                and weights[..., 0, 0].numel() == 1:
            self._segments, self._segment_rows = token_segments(weights)

    def token_mult(self, dtype: torch.dtype) -> torch.Tensor:
        """(..., L, 2, k*r): per token, 1 on the rank of every adapter, then its token weight repeated over
        its rank; what multiplies ``h = x Aᵀ`` into ``[h ‖ w ⊙ h]`` (built once per dtype, not per layer)."""
        mult = self._token_mult.get(dtype)
        if mult is None:
            assert self._token_weights is not None
            w = self._token_weights.to(dtype).repeat_interleave(self.rank, dim=-1)
            mult = self._token_mult[dtype] = torch.stack([torch.ones_like(w), w], dim=-2)
        return mult

    def adapter_slice(self, adapter: str) -> slice:
        j = self.adapters.index(adapter)
        return slice(j * self.rank, (j + 1) * self.rank)

    def effective_b(self, gates: dict[str, torch.Tensor | None] | None = None) -> torch.Tensor:
        """B with scale and per-column gates folded in, (N, out, k*r) — differentiable."""
        gates = gates or {}
        lora_b = _with_trainable(self.lora_B, self.trainable_B)
        if all(gates.get(a) is None for a in self.adapters):
            return lora_b * self.scale
        cols = []
        for a in self.adapters:
            g = gates.get(a)
            g = torch.ones(1, 1, 1, device=self.lora_B.device) if g is None else g.unsqueeze(-1)
            cols.append((g * self.scale).expand(len(self.names), self.out_features, self.rank))
        return lora_b * torch.cat(cols, dim=-1)

    def effective_a(self) -> torch.Tensor:
        """A as applied to the layer's LoRA input: block-diagonal over adapters for split inputs."""
        lora_a = _with_trainable(self.lora_A, self.trainable_A)
        if not self.split_input:
            return lora_a
        k, r, fin = len(self.adapters), self.rank, self.in_features
        blocks = lora_a.new_zeros(len(self.names), k, r, k, fin)
        idx = torch.arange(k, device=blocks.device)
        blocks[:, idx, :, idx, :] = lora_a.view(len(self.names), k, r, fin).transpose(0, 1)
        return blocks.view(len(self.names), k * r, k * fin)

    def attach_base(self, weights: list[torch.Tensor]) -> None:
        """Stack the layers' frozen weights into one (N, out, in) buffer (merge mode).

        The layers' own weights become views of it, so nothing is duplicated.
        """
        if not self.merge:
            return
        with torch.no_grad():
            self.w0 = torch.stack([w.detach() for w in weights])
            for i, w in enumerate(weights):
                w.data = self.w0[i]

    def prepare(self, dtype: torch.dtype, gates: dict[str, torch.Tensor | None] | None = None,
                extra_gates: dict[str, torch.Tensor] | None = None) -> None:
        """Fold gates into B and cast to ``dtype`` once for the whole bank (call every step).

        ``extra_gates`` (a tensor (N, out) for every adapter), with :attr:`token_weights` set: adapter a's
        gate at token t is ``gates[a] + token_weights[..., t, a] * extra_gates[a]`` (unsplit banks; merged, with
        :attr:`merge_segments`, as one merged weight per distinct token-weight row, else unmerged).
        """
        a = self.effective_a().to(dtype)
        self._deltas = {}
        self._delta = self._recorded = self._seg_w = None
        self._extra = extra_gates is not None and self.token_weights is not None and not self.split_input
        if self._extra and self._segment_rows is not None and self.w0 is not None:
            # one merged weight per distinct token-weight row d: gates g + w_d e folded into B, W_d = W0 + B_d A
            assert extra_gates is not None
            gates = gates or {}
            w0 = self.w0.to(dtype)
            self._seg_w = []
            for row in self._segment_rows:
                gates_d: dict[str, torch.Tensor | None] = {}
                for j, adapter in enumerate(self.adapters):
                    g, e, wt = gates.get(adapter), extra_gates[adapter], row[j]
                    term = e if wt == 1 else e * wt
                    gates_d[adapter] = g if wt == 0 else (term + 1 if g is None else g + term)
                w = torch.baddbmm(w0, self.effective_b(gates_d).to(dtype), a)
                self._seg_w.append((w.transpose(1, 2).unbind(0), w.detach().unbind(0)))
            self._w = self._a = self._b = None
            return
        if self._extra:
            assert extra_gates is not None
            b = torch.cat([self.effective_b(gates), self.effective_b(dict(extra_gates))], dim=-1).to(dtype)
            self._w = None
            self._a, self._b = a.unbind(0), b.unbind(0)
            return
        b = self.effective_b(gates).to(dtype)
        if self.shared_input is not None:
            # (x_l Aᵀ) Bᵀ for every layer of the bank at once: (N, T, k*r) then (N, T, out)
            xl = self.shared_input.to(dtype).reshape(1, -1, a.shape[-1])
            delta = torch.bmm(torch.matmul(xl, a.transpose(1, 2)), b.transpose(1, 2))
            if self.record_delta:  # its gradient gives every adapter's ∂L/∂ΔW (delta_gradients)
                delta.retain_grad()
                self._recorded = delta
            self._delta = delta.unbind(0)
            self._a = self._b = self._w = None
            return
        if self.merge and self.w0 is not None:
            # W = W0 + B A for every layer of the bank in one batched GEMM
            if self.merge_grad == "dense" or self.record_delta:
                w = torch.baddbmm(self.w0.to(dtype), b, a)
                if self.record_delta:  # ∂L/∂W = ∂L/∂ΔW of every adapter (delta_gradients)
                    w.retain_grad()
                    self._recorded = w
                self._w = w.unbind(0)
                self._a = self._b = None
                return
            with torch.no_grad():
                self._w = torch.baddbmm(self.w0.to(dtype), b.detach(), a.detach()).unbind(0)
            self._a, self._b = a.unbind(0), b.unbind(0)  # gradients in low rank (MergedLoRAFunction)
            return
        self._w = None
        self._a, self._b = a.unbind(0), b.unbind(0)

    def release(self) -> None:
        """Drop the per-step tensors (layers then act as their frozen base)."""
        self._a = self._b = self._w = self._delta = self._recorded = self._seg_w = None
        self._deltas = {}

    @torch.no_grad()
    def delta_gradients(self, max_elements: int = 1 << 26
                        ) -> Iterator[tuple[slice, str, torch.Tensor, torch.Tensor]]:
        """After a backward with :attr:`record_delta`: ``(layers, adapter, ΔW, ∂L/∂ΔW)`` with ΔW the adapter's
        ``B A`` (scale folded in, no gates) and both (n, out, in) float32, for consecutive runs of layers of
        at most ``max_elements`` entries each (memory stays bounded).

        Merged banks read ∂L/∂ΔW from the merged weight's gradient (the same for every adapter, as
        ``W = W0 + Σ ΔW``), shared-input banks from their LoRA output's: ``gᵀ x_a`` with ``x_a`` the
        adapter's part of the shared input; other banks from each layer's ΔW recorded in the forward.
        """
        n, fin, out = len(self.names), self.in_features, self.out_features
        step = max(1, max_elements // (out * fin))
        rec = self._recorded
        if rec is not None and rec.grad is not None:
            x = self.shared_input.reshape(-1, self.shared_input.shape[-1]).float() if self._delta is not None else None
            for i in range(0, n, step):
                rows = slice(i, min(n, i + step))
                for j, adapter in enumerate(self.adapters):
                    s = self.adapter_slice(adapter)
                    delta = torch.bmm(self.lora_B[rows, :, s].float() * self.scale, self.lora_A[rows, s, :].float())
                    if x is None:  # merged W: ∂L/∂ΔW_a = ∂L/∂W
                        grad = rec.grad[rows].float()
                    else:  # shared input: ∂L/∂ΔW_a = gᵀ x_a, g = ∂L/∂(LoRA output), (n, T, out)
                        grad = torch.matmul(rec.grad[rows].float().transpose(1, 2), x[:, j * fin:(j + 1) * fin])
                    yield rows, adapter, delta, grad
            return
        for i, deltas in sorted(self._deltas.items()):
            for adapter, delta in zip(self.adapters, deltas):
                if delta.grad is not None:
                    yield slice(i, i + 1), adapter, delta.float().unsqueeze(0), delta.grad.float().unsqueeze(0)

    def layer_weights(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._a is None or self._b is None:
            return None
        return self._a[i], self._b[i]

    def merged_weight(self, i: int) -> torch.Tensor | None:
        return None if self._w is None else self._w[i]

    def segment_weights(self, i: int) -> tuple[torch.Tensor, ...] | None:
        """Layer ``i``'s merged weights, one per distinct token-weight row (merged token-gated banks): the
        transposed ones (differentiable), then the same untransposed (constant); None if not merged so."""
        if self._seg_w is None:
            return None
        return (*(wt[i] for wt, _ in self._seg_w), *(w[i] for _, w in self._seg_w))

    def export(self, adapter: str, gates: dict[str, torch.Tensor | None] | None = None
               ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer name: (A (r, in), B (out, r))} of one adapter with scale and gate folded into B."""
        with torch.no_grad():
            s = self.adapter_slice(adapter)
            b = self.effective_b(gates)[:, :, s].detach().float()
            a = self.lora_A[:, s].detach().float()
            return {name: (a[i].clone(), b[i].clone()) for i, name in enumerate(self.names)}

    def load(self, adapter: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set one adapter's A and B (scale 1) from ``export``-style weights. A layer missing from ``weights``
        gets zeros (no update); a lower rank than the bank's is zero-padded (the extra rows of A and columns
        of B are zero, so B A is unchanged)."""
        s = self.adapter_slice(adapter)
        with torch.no_grad():
            for i, name in enumerate(self.names):
                self.lora_A[i, s].zero_()
                self.lora_B[i, :, s].zero_()
                if name not in weights:
                    continue
                a, b = weights[name]
                k = a.shape[0]
                if k > self.rank:
                    raise ValueError(f"{name}: a rank-{k} LoRA does not fit a rank-{self.rank} bank")
                self.lora_A[i, s.start:s.start + k].copy_(a)
                self.lora_B[i, :, s.start:s.start + k].copy_(b / self.scale)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus layer ``index`` of a :class:`LoRABank`."""

    def __init__(self, base: nn.Linear, bank: LoRABank, index: int):
        super().__init__()
        self.base = base
        self._bank = [bank]  # a list keeps the bank out of this module's parameters
        self.index = index
        #: for split-input banks: every adapter's input concatenated on the last dim, e.g.
        #: [content prompt; style prompt] embeddings (UnZipLoRA's prompt separation)
        self.lora_input: torch.Tensor | None = None

    @property
    def bank(self) -> LoRABank:
        return self._bank[0]

    @property
    def weight(self) -> torch.Tensor:  # diffusers reads .weight.dtype of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bank = self.bank
        seg = bank.segment_weights(self.index)
        merged = bank.merged_weight(self.index)
        if seg is not None or merged is not None:
            # merged weights compute in the frozen weight's dtype (or autocast's), whatever dtype the bank
            # was prepared in
            dtype = _compute_dtype(x, self.base.weight)
            bias = None if self.base.bias is None else self.base.bias.to(dtype)
            if seg is not None:  # token-gated, merged per run of tokens: one GEMM per run
                assert bank._segments is not None
                if x.shape[-2] != bank._segments[-1][1]:
                    raise ValueError(f"{bank.names[self.index]}: {x.shape[-2]} tokens, the token weights have "
                                     f"{bank._segments[-1][1]}")
                return _apply_without_autocast(SegmentLinearFunction, x.device.type, x.to(dtype), bias,
                                               bank._segments, *(w.to(dtype) for w in seg))
            assert merged is not None
            ab = bank.layer_weights(self.index)
            if ab is None:  # merge_grad="dense" (autograd reaches A and B through W = W0 + B A) or no grad
                return F.linear(x.to(dtype), merged.to(dtype), bias)
            args = (x.to(dtype), merged.to(dtype), bias, ab[0].to(dtype), ab[1].to(dtype))
            return _apply_without_autocast(MergedLoRAFunction, x.device.type, *args)
        if bank._delta is not None:  # LoRA output precomputed for the bank's shared input
            y = self.base(x)
            return y + bank._delta[self.index].view(*bank.shared_input.shape[:-1], -1).to(y.dtype)
        ab = bank.layer_weights(self.index)
        if ab is None:
            return self.base(x)
        a, b = ab
        if bank._extra and bank.token_weights is not None:  # gates g + w(t) e: (x Aᵀ ‖ w ⊙ x Aᵀ) [B g ‖ B e]ᵀ
            dtype = _compute_dtype(x, self.base.weight)
            args = (x, self.base.weight, self.base.bias, a.to(dtype), b.to(dtype), bank.token_mult(dtype), dtype)
            return _apply_without_autocast(TokenGatedLoRAFunction, x.device.type, *args)
        w, bias = self.base.weight, self.base.bias
        dtype = _compute_dtype(x, w)
        if w.dtype != dtype:  # autocast to a lower precision than the frozen weights (e.g. bf16 on a CPU)
            w = w.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if x.dtype != dtype:
            x = x.to(dtype)
        xl = None
        if bank.split_input:
            xl = self.lora_input if self.lora_input is not None else torch.cat([x] * len(bank.adapters), -1)
            xl = xl.to(dtype).expand(*x.shape[:-1], xl.shape[-1])
        if not bank.record_delta:
            a, b = a.to(dtype), b.to(dtype)
            return _apply_without_autocast(FusedLoRAFunction, x.device.type, x, w, bias, a, b, xl)
        y = self.base(x)  # materialise ΔW so its gradient (importance scores) can be read
        fin = self.in_features
        for j, adapter in enumerate(bank.adapters):
            s = bank.adapter_slice(adapter)
            xa = xl[..., j * fin:(j + 1) * fin] if xl is not None else x
            a_j = a[s, j * fin:(j + 1) * fin] if xl is not None else a[s]
            delta = b[:, s] @ a_j
            delta.retain_grad()
            bank._deltas.setdefault(self.index, []).append(delta)
            y = y + xa @ delta.t()
        return y


def _apply_without_autocast(fn: type[torch.autograd.Function], device_type: str, *args: Any) -> torch.Tensor:
    """``fn.apply(*args)`` with autocast off for ``device_type`` where it is on: the caller has already cast
    every operand to one dtype, and the functions' in-place ops (``addmm_``, ``out=``) are not autocast."""
    if not torch.is_autocast_enabled(device_type):
        return fn.apply(*args)
    with torch.autocast(device_type, enabled=False):
        return fn.apply(*args)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """dtype a linear layer computes in: autocast's where it is on for ``x``'s device (as ``F.linear``
    would), else the frozen weight's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and weight.is_floating_point():
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _get_parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


class LoRASet(nn.Module):
    """All banks of one model: inject, prepare every step, export to diffusers, remove."""

    def __init__(self, model: nn.Module, names: Iterable[str], rank: int, adapters: Sequence[str], *,
                 alpha: float | None = None, init: str = "gaussian", init_std: float | None = None,
                 generator: torch.Generator | None = None, prefix: str = "unet",
                 split_input: Iterable[str] = (), merge: bool = False, merge_grad: str = "dense",
                 apart: Iterable[str] = (), merge_segments: bool = True):
        """``apart``: layers kept in banks of their own (e.g. those reading text, which per-token
        weights of image tokens must not reach); split-input layers are always apart. ``merge_segments``:
        see :attr:`LoRABank.merge_segments`."""
        super().__init__()
        self.model_ref = [model]
        self.prefix = prefix
        self.rank = rank
        self.adapters = tuple(adapters)
        split, own = set(split_input), set(apart)
        groups: dict[tuple[int, int, bool, bool], list[str]] = {}
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise TypeError(f"{name} is not an nn.Linear")
            groups.setdefault((module.in_features, module.out_features, name in split,
                               name in own and name not in split), []).append(name)
        self.banks = nn.ModuleDict()
        self.where: dict[str, tuple[str, int]] = {}
        for (fin, fout, is_split, is_apart), group in sorted(groups.items()):
            key = f"{fin}x{fout}" + ("_split" if is_split else "") + ("_apart" if is_apart else "")
            self.banks[key] = LoRABank(group, fin, fout, rank, adapters, alpha=alpha, init=init,
                                       init_std=init_std, generator=generator, split_input=is_split,
                                       merge=merge, merge_grad=merge_grad, merge_segments=merge_segments)
            for i, name in enumerate(group):
                self.where[name] = (key, i)
        self.layers: dict[str, LoRALinear] = {}
        self.to(next(model.parameters()).device)

    @property
    def names(self) -> list[str]:
        return list(self.where)

    def inject(self) -> "LoRASet":
        """Replace each target ``nn.Linear`` in the model by a :class:`LoRALinear`."""
        model = self.model_ref[0]
        for name, (key, i) in self.where.items():
            parent, child = _get_parent(model, name)
            base = getattr(parent, child)
            layer = LoRALinear(base, self.banks[key], i)
            setattr(parent, child, layer)
            self.layers[name] = layer
        for bank in self.banks.values():
            bank.attach_base([self.layers[n].base.weight for n in bank.names])
        return self

    def set_shared_input(self, names: Iterable[str], lora_input: torch.Tensor) -> None:
        """Give the split-input layers ``names`` one LoRA input; banks whose layers all read it
        compute their LoRA outputs once per step (see :attr:`LoRABank.shared_input`)."""
        names = set(names)
        for name in names:
            self.layers[name].lora_input = lora_input
        for bank in self.banks.values():
            if bank.split_input and set(bank.names) <= names:
                bank.shared_input = lora_input

    def remove(self) -> None:
        """Put the original linear layers back (the model is then exactly the base model)."""
        model = self.model_ref[0]
        for name, layer in self.layers.items():
            parent, child = _get_parent(model, name)
            setattr(parent, child, layer.base)
        self.layers = {}
        self.release()

    def prepare(self, dtype: torch.dtype,
                gates: Callable[[str, LoRABank], dict[str, torch.Tensor | None]] | None = None,
                extra_gates: Callable[[str, LoRABank], dict[str, torch.Tensor] | None] | None = None) -> None:
        """Fold gates (``gates(bank_key, bank)``, ``extra_gates(bank_key, bank)``: see
        :meth:`LoRABank.prepare`) and cast every bank for this step."""
        for key, bank in self.banks.items():
            bank.prepare(dtype, gates(key, bank) if gates is not None else None,
                         extra_gates(key, bank) if extra_gates is not None else None)

    def set_token_weights(self, weights: torch.Tensor | None, names: Iterable[str] | None = None) -> None:
        """Per-token weights (..., L, k) of the extra gates for the banks whose layers are all in ``names``
        (default: every bank that is not split-input); ``None`` turns them off everywhere."""
        chosen = set(names) if names is not None else None
        for bank in self.banks.values():
            on = weights is not None and not bank.split_input and (chosen is None or set(bank.names) <= chosen)
            bank.token_weights = weights if on else None

    def release(self) -> None:
        for bank in self.banks.values():
            bank.release()

    def set_record_delta(self, on: bool) -> None:
        for bank in self.banks.values():
            bank.record_delta = on

    def export(self, adapter: str, gates: Callable[[str, LoRABank], dict[str, torch.Tensor | None]] | None = None
               ) -> dict[str, torch.Tensor]:
        """One adapter as a diffusers LoRA state dict (``unet.<module>.lora_A/B.weight``)."""
        out: dict[str, torch.Tensor] = {}
        for key, bank in self.banks.items():
            for name, (a, b) in bank.export(adapter, gates(key, bank) if gates is not None else None).items():
                out[f"{self.prefix}.{name}.lora_A.weight"] = a
                out[f"{self.prefix}.{name}.lora_B.weight"] = b
        return out

    def diffusers_metadata(self) -> dict[str, str]:
        """safetensors metadata diffusers reads to configure the adapter (rank, alpha = rank)."""
        meta = {f"{self.prefix}.r": self.rank, f"{self.prefix}.lora_alpha": self.rank,
                f"{self.prefix}.target_modules": sorted(self.names)}
        return {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True)}


def lora_state_dict_to_layers(state: dict[str, torch.Tensor], prefix: str = "unet"
                              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Inverse of :meth:`LoRASet.export`: {module name: (A, B)}; accepts lora_A/B and lora.down/up keys."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
        for a_key, b_key in ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight")):
            if name.endswith(a_key):
                layers.setdefault(name[: -len(a_key)], {})["A"] = value
            elif name.endswith(b_key):
                layers.setdefault(name[: -len(b_key)], {})["B"] = value
    return {n: (d["A"], d["B"]) for n, d in layers.items() if "A" in d and "B" in d}


#: key endings of a LoRA state dict in the diffusers / PEFT layout (down, up)
LORA_KEY_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"))


def is_lora_state_dict(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a LoRA in the diffusers layout: every key a down or up weight of some module
    (``unet.<module>.lora_A.weight`` / ``.lora_B.weight``), every module with both."""
    if not state:
        return False
    endings = tuple(e for pair in LORA_KEY_PAIRS for e in pair)
    if not all(k.endswith(endings) for k in state):
        return False
    prefixes = {k.split(".", 1)[0] for k in state}
    layers = {p: lora_state_dict_to_layers({k: v for k, v in state.items() if k.startswith(p + ".")}, p)
              for p in prefixes}
    return 2 * sum(len(v) for v in layers.values()) == len(state)


def cast_lora_files(files: dict[str, dict[str, torch.Tensor]], dtype: torch.dtype
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """``files`` (relative path -> tensors) with every LoRA file (:func:`is_lora_state_dict`) in ``dtype``;
    other files as they are."""
    return {rel: ({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
                  if is_lora_state_dict(tensors) else tensors)
            for rel, tensors in files.items()}
