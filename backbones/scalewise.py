"""Pieces shared by the scale-wise backbones (Infinity, Switti): KV cache, attention with hooks, RoPE.

* :class:`KVCache`: preallocated post-RoPE keys/values of every block, filled scale by scale.
* :class:`AttentionContext`: how the self-attention layers of one forward pass attend (cached
  generation, block-causal teacher forcing or attention within the current scale only) and where
  the :class:`~cstoolkit.backbone.AttentionHook` s of the interface are called.
* :func:`apply_rope`: rotation of interleaved channel pairs by precomputed angles.
* :class:`GenerationOutput`, :func:`per_scale`: what a sampling loop returns, per-scale options.
* :func:`resolve_checkpointing`, :func:`run_block`: gradient checkpointing of the transformer blocks
  (``backbone.gradient_checkpointing: auto | on | off``) and the ``auto`` rule.
* :class:`DeviceCache`: small per-device cache of tensors that depend only on the schedule (RoPE
  tables, masks), so a training step makes no host-to-device copy for them.
* :func:`linear`, :func:`linear_fp32`, :class:`RMSNorm`, :class:`FFN`, :func:`build_module`: layers and
  the build step both transformers use (module names are the caller's, so checkpoint keys are unchanged).
* :func:`weight_dtype`, :func:`gradient_checkpointing_field`, :func:`keep_attention_field`,
  :func:`checkpointing_default`, :func:`configure_checkpointing`: the config fields and build steps
  the two wrappers share.
* :class:`SampleRows`, :func:`step_context`, :func:`run_step_hooks`, :func:`progress_steps`,
  :func:`fit_images`, :func:`split_scales`: the bookkeeping of a sampling loop (rows, seeds, CFG halves, step hooks,
  dropped paths) and of teacher forcing; each backbone keeps its own sampler, guidance and loss.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cstoolkit.backbone import AttentionCall, AttentionHook, StepCall, StepHook
from cstoolkit.config import field_
from cstoolkit.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

log = logging.getLogger(__name__)

#: ``backbone.gradient_checkpointing`` of the scale-wise backbones (YAML 1.1 reads ``on``/``off`` as booleans)
CheckpointMode = Literal["auto", "on", "off"] | bool
#: ``auto`` turns checkpointing on above this activation volume of one teacher-forcing pass
#: (tokens of all scales x width x depth). Calibration (one H200, bf16, frozen forward+backward without
#: checkpointing, docs/benchmarks.md): switti-ar 512² = 2,240 x 1920 x 30 = 1.29e8 peaked at 18.7 GiB,
#: infinity-2b 1024² = 10,521 x 2048 x 32 = 6.89e8 at 53.2 GiB; the line through both (about 10.8 GiB
#: + 6.2 GiB per 1e8) crosses 22 GiB (a 24 GB card with headroom) at 1.8e8.
AUTO_CHECKPOINT_VOLUME = 1.8e8


def activation_volume(tokens: int, width: int, depth: int) -> float:
    """Tokens x width x depth of one teacher-forcing pass: what the saved activations scale with."""
    return float(tokens) * width * depth


def resolve_checkpointing(mode: "CheckpointMode", tokens: int, width: int, depth: int,
                          where: str = "backbone.gradient_checkpointing") -> bool:
    """Whether the transformer blocks are checkpointed: ``on``/``off`` as given (``true``/``false`` too),
    ``auto`` when the activation volume of the backbone's own schedule exceeds
    :data:`AUTO_CHECKPOINT_VOLUME` (infinity-2b 1024², switti-1024: on; switti-ar 512², tiny, world: off)."""
    if isinstance(mode, bool):
        return mode
    if mode == "on":
        return True
    if mode == "off":
        return False
    if mode != "auto":
        raise UserError(where, f"got {mode!r}", "expected auto, on or off")
    return activation_volume(tokens, width, depth) > AUTO_CHECKPOINT_VOLUME


def gradient_checkpointing_field(auto_on: str) -> Any:
    """The ``gradient_checkpointing`` field of a scale-wise backbone config; ``auto_on`` names the preset
    that ``auto`` checkpoints (for the help text)."""
    return field_("auto", help="recompute each transformer block's activations in the backward pass (training "
                               "only): auto = on where the teacher-forcing pass would not fit a 24 GB card "
                               f"({auto_on}), on, off")


def keep_attention_field() -> Any:
    """The ``checkpoint_keep_attention`` field of a scale-wise backbone config."""
    return field_(True, help="with gradient checkpointing: keep each block's self-attention output (L x C), so "
                             "the recomputation skips the attention; false = recompute every op (least memory)")


def checkpointing_default(config: Any, transformer: Any, schedule: Sequence[Sequence[int]]) -> bool:
    """``config.gradient_checkpointing`` resolved for a transformer config (``width``, ``depth``) and the
    backbone's schedule (the ``auto`` rule of :func:`resolve_checkpointing`); builds nothing."""
    tokens = sum(h * w for h, w in schedule)
    return resolve_checkpointing(config.gradient_checkpointing, tokens, transformer.width, transformer.depth)


def configure_checkpointing(model: nn.Module, config: Any, transformer: Any,
                            schedule: Sequence[Sequence[int]]) -> None:
    """Set a built transformer's ``checkpoint_keep_attention`` and ``gradient_checkpointing`` from the
    backbone ``config`` (see :func:`checkpointing_default`)."""
    model.checkpoint_keep_attention = config.checkpoint_keep_attention
    model.gradient_checkpointing = checkpointing_default(config, transformer, schedule)


#: ``backbone.dtype`` -> torch dtype (``auto``: the runtime's choice, see :func:`weight_dtype`)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def weight_dtype(config: Any, dtype: torch.dtype | None) -> torch.dtype:
    """The frozen weights' dtype: ``config.dtype``, or with ``auto`` the runtime's ``dtype`` (default fp32)."""
    return (dtype or torch.float32) if config.dtype == "auto" else DTYPES[config.dtype]


def _attention_ops() -> set[Any]:
    """The fused attention kernels whose outputs a selective checkpoint keeps (those this torch has)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_efficient_attention_forward", "_flash_attention_forward")
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _keep_attention() -> Any:
    """``context_fn`` of a selective checkpoint that keeps the attention kernels' outputs (None where
    this torch has no selective checkpointing: every op is recomputed)."""
    try:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    except ImportError:  # pragma: no cover - torch < 2.5
        return None
    ops = _attention_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE

    return lambda: create_selective_checkpoint_contexts(policy)


def run_block(block: Callable[..., torch.Tensor], enabled: bool, *args: Any, keep_attention: bool = True,
              ) -> torch.Tensor:
    """``block(*args)``, under ``torch.utils.checkpoint`` (non-reentrant) when ``enabled`` and autograd is
    recording: the block's activations are recomputed in the backward pass instead of kept.

    ``keep_attention`` (selective checkpointing): the outputs of the self-attention kernel are kept
    (L x C per block), so the recomputation skips the attention, the costliest op at 10k tokens;
    everything else (linear layers, norms, RoPE) is recomputed. Attention hooks run again in the
    recomputation (they must be pure functions of their call, as the
    :class:`~cstoolkit.backbone.AttentionHook` s of the training methods are); LoRA layers and learned
    tensors that the hooks read receive the same gradients (tests/test_checkpointing.py).

    No RNG state is saved for the recomputation (``preserve_rng_state=False``): the blocks and hooks draw no
    random numbers, and reading the CUDA generator's state is refused inside a CUDA graph capture
    (pytorch/pytorch#83148), so a checkpointed training step can still be captured."""
    if enabled and torch.is_grad_enabled():
        context_fn = _keep_attention() if keep_attention else None
        if context_fn is None:
            return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False, context_fn=context_fn)
    return block(*args)


class DeviceCache:
    """At most ``size`` tensors (or tuples of them) by key, most recent kept: per-schedule tables built
    once (on the CPU if need be) and kept on their device. Values are read-only by convention."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved channel pairs of ``x`` (..., L, D) by the angles of (cos, sin) (L, D/2)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


class KVCache:
    """Preallocated keys and values of every block, (B, H, L_max, Dh) each, filled scale by scale."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (batch, heads, max_len, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.length = 0

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch ``rows`` (a dropped row frees its share of the cache).

        Only the filled part is copied, block by block, so the old and new caches coexist for one
        block at a time.
        """
        n = self.length
        for cache in (self.k, self.v):
            for i, t in enumerate(cache):
                new = t.new_empty((rows.numel(), *t.shape[1:]))
                new[:, :, :n] = t[:, :, :n].index_select(0, rows)
                cache[i] = new
                del t


@dataclass
class AttentionContext:
    """How the self-attention layers of one forward pass attend.

    Generation with a cache (``cache`` set): the step's k, v are written to the cache after RoPE
    and the queries attend to everything cached so far. Teacher forcing (``mask`` set): one pass
    over all scales with a (Lq, Lk) mask. Neither: the queries attend to this call's keys only (a
    non-autoregressive scale). ``hooks`` see every call (after RoPE and the cache write) and may
    replace q, k, v for this call or append extra keys/values, which are never cached.
    ``scale`` is the SDPA scale (1 for Infinity's pre-scaled cosine attention, 1/sqrt(Dh) for Switti).
    """

    step: int = -1
    cache: KVCache | None = None
    mask: torch.Tensor | None = None  # (Lq, Lk) bool, True = visible
    hooks: Sequence[AttentionHook] = ()
    paths: list[str] = field(default_factory=list)
    cfg_half: list[str] = field(default_factory=list)
    token_scales: torch.Tensor | None = None
    scale: float = 1.0

    def attend(self, block: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            start, stop = self.cache.length, self.cache.length + k.shape[2]
            self.cache.k[block][:, :, start:stop] = k
            self.cache.v[block][:, :, start:stop] = v
            k, v = self.cache.k[block][:, :, :stop], self.cache.v[block][:, :, :stop]
        mask = self.mask
        if self.hooks:
            call_q, call_k, call_v = q, k, v
            extra_k: list[torch.Tensor] = []
            extra_v: list[torch.Tensor] = []
            extra_m: list[torch.Tensor] = []
            for hook in self.hooks:
                edit = hook(AttentionCall(step=self.step, block=block, q=call_q, k=call_k, v=call_v,
                                          paths=self.paths, cfg_half=self.cfg_half, token_scales=self.token_scales))
                if edit is None:
                    continue
                call_q = call_q if edit.q is None else edit.q.to(q.dtype)
                call_k = call_k if edit.k is None else edit.k.to(k.dtype)
                call_v = call_v if edit.v is None else edit.v.to(v.dtype)
                if edit.extra_k is not None:
                    if edit.extra_v is None or edit.extra_v.shape[2] != edit.extra_k.shape[2]:
                        raise ValueError("an attention hook appended extra_k without matching extra_v")
                    extra_k.append(edit.extra_k.to(k.dtype))
                    extra_v.append(edit.extra_v.to(v.dtype))
                    em = edit.extra_mask
                    if em is None:
                        em = torch.ones(q.shape[0], 1, edit.extra_k.shape[2], dtype=torch.bool, device=q.device)
                    elif em.dim() == 2:
                        em = em[:, None, :]
                    extra_m.append(em.to(device=q.device, dtype=torch.bool).expand(q.shape[0], q.shape[2], -1))
            q, k, v = call_q, call_k, call_v
            if extra_k:
                lk = k.shape[2]
                base = (torch.ones(q.shape[2], lk, dtype=torch.bool, device=q.device) if mask is None else mask)
                mask = torch.cat([base.expand(q.shape[0], -1, -1)] + extra_m, dim=-1)[:, None]
                k = torch.cat([k] + extra_k, dim=2)
                v = torch.cat([v] + extra_v, dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


@dataclass
class GenerationOutput:
    """Accumulated codes of the rows still in the batch after generation."""

    codes: torch.Tensor  # (B_alive, d, H, W) fp32
    rows: list[int]  # original row index of each code map
    paths: list[str]  # path of every original row
    labels: list[torch.Tensor]  # per step: labels of the rows alive at that step

    def images(self, decode: Callable[[torch.Tensor], torch.Tensor],
               output_paths: Sequence[str] | None = None) -> list["Image.Image | None"]:
        """One image per original row: ``decode(codes)`` of the rows alive whose path is in
        ``output_paths`` (default: all), ``None`` for the others."""
        from cstoolkit.io import tensor_to_images

        wanted = [i for i, r in enumerate(self.rows) if output_paths is None or self.paths[r] in output_paths]
        images: list[Image.Image | None] = [None] * len(self.paths)
        if wanted:
            decoded = tensor_to_images(decode(self.codes[wanted]))
            for i, im in zip(wanted, decoded):
                images[self.rows[i]] = im
        return images


def per_scale(value: float | Sequence[float], n: int, where: str) -> list[float]:
    """One number per scale from a number or a list (at least ``n`` long)."""
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(v) for v in value]
    if len(values) < n:
        raise UserError(where, f"{len(values)} values for {n} scales", f"expected one number or {n}")
    return values


# ---------------------------------------------------------------------------------------------
# layers and build step of both transformers
# ---------------------------------------------------------------------------------------------
def linear(layer: nn.Linear, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``layer(x)`` computed in the layer's dtype (the input is cast); ``bias`` replaces the layer's.

    A wrapped layer (a LoRA layer of cstoolkit or PEFT in place of the ``nn.Linear``) runs its own
    forward, the bias added after it."""
    if type(layer) is not nn.Linear:
        y = layer(x.to(layer.weight.dtype))
        return y if bias is None else y + bias.to(y.dtype)
    w = layer.weight
    b = layer.bias if bias is None else bias
    return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype))


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in fp32 whatever the layer's dtype."""
    b = layer.bias
    return F.linear(x.float(), layer.weight.float(), None if b is None else b.float())


class RMSNorm(nn.Module):
    """RMS norm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class FFN(nn.Module):
    """GELU(tanh) MLP ``fc2(gelu(fc1(x)))`` in the layers' dtype."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.fc2, F.gelu(linear(self.fc1, x), approximate="tanh"))


M = TypeVar("M", bound=nn.Module)


def build_module(make: Callable[[], M], *, device: torch.device | str, dtype: torch.dtype | None,
                 seed: int | None, uninitialised: Callable[[M], Any]) -> M:
    """``make()`` built on the meta device, then materialised on ``device``: weights from
    ``init_weights(generator seeded with seed)``, or with ``seed=None`` left for a checkpoint (then
    ``uninitialised(model)`` sets what a checkpoint does not hold); ``set_dtype(dtype)`` last.
    On ``device="meta"`` nothing is allocated."""
    with torch.device("meta"):
        model = make()
    if str(device) == "meta":
        return model.set_dtype(dtype) if dtype is not None else model
    model = model.to_empty(device=device)
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        model.init_weights(gen)
    else:
        uninitialised(model)
    if dtype is not None:
        model.set_dtype(dtype)
    return model


# ---------------------------------------------------------------------------------------------
# bookkeeping of the wrappers: teacher forcing and the sampling loop
# ---------------------------------------------------------------------------------------------
def fit_images(images: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Images (B, 3, H, W) as fp32 on ``device``, resized (bicubic, antialiased) to ``size`` if they differ."""
    images = images.to(device).float()
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)
    return images


def progress_steps(n: int, progress: bool, desc: str) -> Iterable[int]:
    """``range(n)``, under a tqdm bar named ``desc`` when ``progress``."""
    steps: Iterable[int] = range(n)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, leave=False)
    return steps


def split_scales(logits: torch.Tensor, schedule: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Logits of one pass over all scales (B, L, ...) -> one tensor per scale (B, h*w, ...)."""
    return list(logits.split([h * w for h, w in schedule], dim=1))


class SampleRows:
    """The rows of one sampling loop: the path of every original row, and the generator and original
    index of every row still in the batch (row ``i`` draws from ``seed + i`` or ``seed[i]``)."""

    def __init__(self, batch: int, paths: Sequence[str] | None, seed: int | Sequence[int],
                 device: torch.device):
        self.paths = list(paths) if paths is not None else [""] * batch
        if len(self.paths) != batch:
            raise ValueError(f"{len(self.paths)} paths for {batch} rows")
        seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} rows")
        self.device = device
        self.gens: list[torch.Generator] = []
        for s in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(s)
            self.gens.append(g)
        self.alive = list(range(batch))

    def current(self) -> list[str]:
        """The path of every row still in the batch."""
        return [self.paths[r] for r in self.alive]

    def drop(self, paths: set[str], guided: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Drop the rows whose path is in ``paths`` (and their generators): the rows kept, as indices
        into one half of the batch and into the whole batch (both CFG halves when ``guided``), or None
        when no row goes."""
        cur = self.current()
        keep = [i for i, p in enumerate(cur) if p not in paths]
        if len(keep) == len(cur):
            return None
        idx = torch.tensor(keep, device=self.device, dtype=torch.long)
        full = torch.cat([idx, idx + len(cur)]) if guided else idx
        self.gens = [self.gens[i] for i in keep]
        self.alive = [self.alive[i] for i in keep]
        return idx, full

    def output(self, codes: torch.Tensor, labels: list[torch.Tensor]) -> "GenerationOutput":
        """What the loop returns: ``codes`` of the rows still in the batch, ``labels`` per step."""
        return GenerationOutput(codes=codes, rows=self.alive, paths=self.paths, labels=labels)


def step_context(step: int, cache: KVCache | None, hooks: Sequence[AttentionHook], paths: list[str],
                 guided: bool, **kwargs: Any) -> AttentionContext:
    """The :class:`AttentionContext` of one generation step: rows ``paths``, doubled as ``[cond; uncond]``
    when ``guided``."""
    n = len(paths)
    return AttentionContext(step=step, cache=cache, hooks=hooks, paths=paths + paths if guided else paths,
                            cfg_half=["cond"] * n + (["uncond"] * n if guided else []), **kwargs)


def run_step_hooks(step_hooks: Sequence[StepHook], step: int, schedule: list[tuple[int, int]],
                   labels: torch.Tensor, paths: list[str], logits: torch.Tensor,
                   ) -> tuple[torch.Tensor, set[str], bool]:
    """Call every step hook in turn on the sampled ``labels``: (labels, possibly replaced by a hook;
    the paths to drop; whether a hook replaced the labels)."""
    drop: set[str] = set()
    replaced = False
    for hook in step_hooks:
        edit = hook(StepCall(step=step, schedule=schedule, labels=labels, paths=paths, logits=logits))
        if edit is None:
            continue
        if edit.labels is not None:
            if edit.labels.shape != labels.shape:
                raise ValueError(f"step hook labels {tuple(edit.labels.shape)}, expected {tuple(labels.shape)}")
            labels = edit.labels.to(device=labels.device, dtype=torch.long)
            replaced = True
        drop.update(edit.drop_paths)
    return labels, drop, replaced
