"""The registered ``switti`` backbone: transformer + multi-scale VQ-VAE + two CLIP text encoders,
behind :class:`~cstoolkit.backbone.ScaleWiseBackbone`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cstoolkit.backbone import (
    AttentionHook,
    BackboneConfig,
    HiddenEdit,
    ScaleTargets,
    ScaleWiseBackbone,
    StepHook,
    TextContext,
)
from cstoolkit.config import field_
from cstoolkit.errors import UserError
from cstoolkit.registry import register_backbone

from .. import scalewise
from ..scalewise import (
    CheckpointMode,
    GenerationOutput,
    KVCache,
    checkpointing_default,  # noqa: F401 (this module's name for it, kept)
    per_scale,
)
from . import loading
from .presets import DESCRIPTIONS, PresetRow, preset_row
from .text import DualCLIPText
from .transformer import PATCH_NUMS, SwittiTransformer, build_transformer
from .vqvae import VQVAE, build_vqvae

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

Schedule = list[tuple[int, int]]


@dataclass
class SwittiConfig(BackboneConfig):
    """``backbone:`` section for Switti. ``preset`` picks the architecture and the default weights
    (see ``cstoolkit list-backbones``); ``transformer`` / ``vae`` / ``text_encoder`` /
    ``text_encoder_2`` override single parts, ``pretrained`` the transformer (a hub repo such as
    ``yresearch/Switti-AR`` or a local folder with ``model.safetensors`` + ``config.json``, which may
    also hold ``vqvae/``, ``text_encoder/`` and ``text_encoder_2/``).
    """

    name: str = "switti"
    pretrained: str | None = field_(None, path=True, hub_id=True,
                                    help="transformer: hub repo (yresearch/Switti-AR) or folder with model.safetensors")
    transformer: str | None = field_(None, path=True, hub_id=True,
                                     help="transformer weights: folder/file with model.safetensors, or org/repo")
    vae: str | None = field_(None, path=True, hub_id=True,
                             help="VQ-VAE weights: folder/file with model.safetensors, or yresearch/VQVAE-Switti")
    text_encoder: str | None = field_(None, path=True, hub_id=True,
                                      help="CLIP ViT-L/14 text encoder: hub id or save_pretrained folder")
    text_encoder_2: str | None = field_(None, path=True, hub_id=True,
                                        help="OpenCLIP bigG text encoder: hub id or save_pretrained folder")
    aspect_ratio: float = field_(1.0, min=1.0, max=1.0, help="Switti generates square images only")
    seed: int = field_(0, help="seed of the random weights of parts without a weights file")
    gradient_checkpointing: CheckpointMode = scalewise.gradient_checkpointing_field("switti-1024")
    checkpoint_keep_attention: bool = scalewise.keep_attention_field()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering of logits (..., V) (the official ``sample_with_top_k_top_p_``):
    removed entries become -inf; the most likely entry always stays."""
    logits = logits.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1, largest=True, sorted=False)[0].amin(-1, keepdim=True)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -math.inf)
    return logits


def _weight_sources(config: SwittiConfig, row: PresetRow) -> dict[str, str | None]:
    """Where each part comes from (None = random from the seed)."""
    w = row.weights
    if getattr(config, "random_weights", False):  # every part random from config.seed, no file read
        return dict.fromkeys(("transformer", "vae", "text_encoder", "text_encoder_2"))
    sources: dict[str, str | None] = {
        "transformer": config.transformer or config.pretrained or w.transformer,
        "vae": config.vae or w.vqvae,
        "text_encoder": config.text_encoder or w.clip_l,
        "text_encoder_2": config.text_encoder_2 or w.clip_g,
    }
    root = config.pretrained
    if root is not None and Path(root).expanduser().is_dir():  # optional parts beside the transformer
        for key, sub in (("vae", "vqvae"), ("text_encoder", "text_encoder"), ("text_encoder_2", "text_encoder_2")):
            if getattr(config, key) is None and (Path(root).expanduser() / sub).is_dir():
                sources[key] = str(Path(root).expanduser() / sub)
    return sources


@register_backbone
class SwittiBackbone(ScaleWiseBackbone):
    """Switti / Switti-AR (next-scale prediction over VQ codes) with VAR's VQ-VAE and CLIP-L + bigG.

    Generation follows the official sampler: CFG on the logits with a linear ramp over scales,
    top-k / top-p sampling (optional Gumbel smoothing), guidance off from ``turn_off_cfg_start_si``
    on. The batch is ``[cond rows; uncond rows]`` (uncond rows read the empty prompt); attention
    hooks, step hooks and path dropping work as for Infinity (see :meth:`generate`).
    """

    name: ClassVar[str] = "switti"
    Config: ClassVar[type[BackboneConfig]] = SwittiConfig
    presets: ClassVar[dict[str, str]] = DESCRIPTIONS

    def __init__(self, config: SwittiConfig, transformer: SwittiTransformer, vqvae: VQVAE, text: DualCLIPText | None,
                 *, resolution: int, weight_dtype: torch.dtype):
        """Assemble a backbone from built parts (``text=None``: text only as :class:`TextContext`)."""
        super().__init__()
        self.config = config
        self.transformer = transformer
        self.vae = vqvae
        self.text_encoder = text
        self.resolution = resolution
        self.weight_dtype = weight_dtype
        self._null: TextContext | None = None

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_config(cls, config: BackboneConfig, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> "SwittiBackbone":
        if not isinstance(config, SwittiConfig):
            raise TypeError("SwittiBackbone.from_config needs a SwittiConfig")
        spec = None if config.random_weights else (config.transformer or config.pretrained)
        preset = config.preset or (loading.infer_preset(spec, "backbone.transformer") if spec else "tiny")
        row = preset_row(preset)
        device = torch.device(device)
        wdtype = scalewise.weight_dtype(config, dtype)
        sources = _weight_sources(config, row)

        transformer = build_transformer(row.transformer, device=device,
                                        seed=None if sources["transformer"] else config.seed)
        if sources["transformer"]:
            loading.load_transformer(transformer, sources["transformer"], "backbone.transformer", preset)
        transformer.set_dtype(wdtype)
        vqvae = build_vqvae(row.vqvae, device=device, seed=None if sources["vae"] else config.seed)
        if sources["vae"]:
            loading.load_vqvae(vqvae, sources["vae"], "backbone.vae")
        tdtype = wdtype if device.type == "cuda" else torch.float32
        if sources["text_encoder"] or sources["text_encoder_2"]:
            if not (sources["text_encoder"] and sources["text_encoder_2"]):
                raise UserError("backbone.text_encoder", "only one of the two text encoders is named",
                                "expected both text_encoder (CLIP-L) and text_encoder_2 (bigG), or neither")
            try:
                text = DualCLIPText.from_pretrained(sources["text_encoder"], sources["text_encoder_2"], dtype=tdtype,
                                                    max_length=row.text.max_length)
            except OSError as exc:
                raise UserError("backbone.text_encoder", f"cannot load a CLIP text encoder ({str(exc)[:150]})",
                                "expected hub ids or folders written by save_pretrained") from None
        else:
            text = DualCLIPText.random(row.text.clip_l_config, row.text.clip_g_config, config.seed,
                                       row.text.max_length, device=device).to(tdtype)
        text = text.to(device)
        widths = text.widths
        cfg = transformer.cfg
        if widths["clip_l"] + widths["clip_g"] != cfg.context_dim or widths["clip_g"] != cfg.pooled_dim:
            got = f"the text encoders give {widths['clip_l']} + {widths['clip_g']}-d tokens"
            raise UserError("backbone.text_encoder", got,
                            f"expected {cfg.context_dim}-d context and {cfg.pooled_dim}-d pooled for {preset}")
        resolution = config.resolution or row.resolution
        backbone = cls(config, transformer.eval(), vqvae.eval(), text.eval(), resolution=resolution,
                       weight_dtype=wdtype)
        schedule = backbone.scale_schedule()  # checks the resolution
        scalewise.configure_checkpointing(transformer, config, row.transformer, schedule)
        return backbone

    # ------------------------------------------------------------------------------ schedule
    @property
    def device(self) -> torch.device:
        return self.transformer.pos_start.device

    @property
    def patch_size(self) -> int:
        return self.vae.stride

    def scale_schedule(self, resolution: int | None = None, aspect_ratio: float | None = None) -> Schedule:
        """(pn, pn) of every scale: the model's own ``patch_nums`` at its resolution, else the official
        table for the grid ``resolution / stride`` (16, 32 or 64), at most as many scales as the model has."""
        res = resolution or self.resolution
        if aspect_ratio not in (None, 1.0):
            raise UserError("aspect_ratio", f"{aspect_ratio}", "Switti generates square images (1.0)")
        own = self.transformer.cfg.patch_nums
        last = res // self.patch_size
        if res % self.patch_size == 0 and last == own[-1]:
            return [(pn, pn) for pn in own]
        pns = next((pn for pn in PATCH_NUMS.values() if pn[-1] == last and res % self.patch_size == 0), None)
        if pns is None or len(pns) > len(own):
            known = sorted({pn[-1] * self.patch_size for pn in PATCH_NUMS.values()} | {own[-1] * self.patch_size})
            raise UserError("backbone.resolution", f"{res} px has no Switti scale schedule",
                            f"expected one of {known}")
        return [(pn, pn) for pn in pns]

    # ------------------------------------------------------------------------------ text
    @property
    def text(self) -> DualCLIPText:
        if self.text_encoder is None:
            raise RuntimeError("this backbone was built without text encoders; pass a TextContext")
        return self.text_encoder

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """bigG token ids and attention mask, (B, 77) each."""
        return self.text.tokenize(prompts)

    def token_embeddings(self) -> nn.Embedding:
        """bigG's input embedding table (CLIP-L's is ``text_encoder.clip_l.get_input_embeddings()``)."""
        return self.text.clip_g.get_input_embeddings()

    def text_encoders(self) -> dict[str, int]:
        """``{"clip_l": 768, "clip_g": 1280}`` (tiny widths on ``tiny``)."""
        return self.text.widths

    def word_embeddings(self, text: str) -> dict[str, torch.Tensor]:
        """Per encoder, the frozen input embeddings (n_tokens, width) of ``text`` (no BOS/EOS/padding)."""
        return self.text.word_embeddings(text)

    def encode_text(self, prompts: Sequence[str] | None = None, *,
                    input_embeds: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None,
                    learned: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                    hidden_edit: HiddenEdit | None = None) -> TextContext:
        """Context (B, 77, Cl + Cg), mask and pooled bigG vector of prompts.

        Plain prompts run without grad. ``learned`` splices learned vectors (placeholder ->
        ``{"clip_l": (n, Cl), "clip_g": (n, Cg)}``) into both encoders' input embeddings, and
        ``input_embeds`` (``{"clip_l": (B, 77, Cl), "clip_g": (B, 77, Cg)}``, with ``prompts`` giving
        the token ids for EOS pooling) replaces them; on both paths gradients flow, encoders frozen.
        """
        if prompts is None:
            raise ValueError("Switti's encode_text needs prompts (also with input_embeds: they give EOS)")
        if input_embeds is not None and not isinstance(input_embeds, Mapping):
            raise ValueError('Switti has two text encoders: pass input_embeds as {"clip_l": ..., "clip_g": ...}')
        if learned or input_embeds is not None:
            context, mask, pooled = self.text(prompts, learned=learned, input_embeds=input_embeds,
                                              attention_mask=attention_mask, hidden_edit=hidden_edit)
        else:
            with torch.no_grad():
                context, mask, pooled = self.text(prompts)
        return TextContext(context, mask, pooled)

    def text_features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"clip_l": (B, Cl), "clip_g": (B, Cg)}``: each CLIP's pooled (EOS) last hidden state."""
        return self.text.features(prompts)

    def null_text(self, rows: int) -> TextContext:
        """The encoded empty prompt (CFG's unconditional text), repeated ``rows`` times (cached)."""
        if self._null is None or self._null.tokens.device != self.device:
            self._null = self.encode_text([""])
        n = self._null
        return TextContext(n.tokens.expand(rows, -1, -1), n.mask.expand(rows, -1), n.pooled.expand(rows, -1))

    def _condition(self, text: TextContext) -> Any:
        dev = self.device
        if text.pooled is None:
            raise ValueError("Switti needs the pooled text vector (TextContext.pooled)")
        return self.transformer.condition(text.tokens.to(dev), text.mask.to(dev), text.pooled.to(dev))

    # ------------------------------------------------------------------------------ training
    @torch.no_grad()
    def image_to_targets(self, images: torch.Tensor, schedule: Schedule | None = None) -> ScaleTargets:
        """Images (B, 3, H, W) in [-1, 1] -> per-scale code indices (B, pn*pn) and teacher-forcing
        inputs (B, L - 1, Cvae). Images of another size are resized (bicubic, antialiased) first."""
        schedule = list(schedule or self.scale_schedule())
        pns = [h for h, _ in schedule]
        idx = self.vae.img_to_idx(scalewise.fit_images(images, self.image_size(schedule), self.device), pns)
        _, inputs = self.vae.idx_to_inputs(idx, pns)
        return ScaleTargets(targets=idx, inputs=inputs, schedule=schedule)

    # ------------------------------------------------------------------------------ LoRA targets
    def lora_model(self) -> nn.Module:
        return self.transformer

    def adapter_targets(self, ffn: bool = False) -> list[str]:
        """``blocks.{i}.`` + ``attn.to_qkv``, ``attn.proj``, ``cross_attn.to_q``, ``cross_attn.to_kv``,
        ``cross_attn.proj`` (and the FFN's linear layers): the official module names."""
        leaves = ["attn.to_qkv", "attn.proj", "cross_attn.to_q", "cross_attn.to_kv", "cross_attn.proj"]
        if ffn:
            leaves += (["ffn.up_proj", "ffn.gate_proj", "ffn.down_proj"] if self.transformer.cfg.use_swiglu_ffn
                       else ["ffn.fc1", "ffn.fc2"])
        return [f"blocks.{i}.{leaf}" for i in range(len(self.transformer.blocks)) for leaf in leaves]

    def text_projections(self) -> list[str]:
        return [name for name in self.adapter_targets() if name.endswith(".cross_attn.to_kv")]

    def fused_projections(self) -> dict[str, int]:
        """``attn.to_qkv`` (q|k|v) and ``cross_attn.to_kv`` (k|v)."""
        return {name: 3 if name.endswith(".attn.to_qkv") else 2 for name in self.adapter_targets()
                if name.endswith((".attn.to_qkv", ".cross_attn.to_kv"))}

    def text_projection_inputs(self, text: TextContext) -> dict[str, torch.Tensor]:
        """Block ``i``'s ``cross_attn.to_kv`` reads the text after that block's ``attention_y_norm``."""
        context = text.tokens.to(self.device).float()
        return {f"blocks.{i}.cross_attn.to_kv": blk.attention_y_norm(context)
                for i, blk in enumerate(self.transformer.blocks)}

    def teacher_forcing_logits(self, text: TextContext, targets: ScaleTargets, *, hooks: Sequence[AttentionHook] = (),
                               paths: Sequence[str] | None = None,
                               cross_text: TextContext | None = None) -> list[torch.Tensor]:
        """fp32 logits per scale, (B, pn*pn, V), from one pass over all scales (block-causal for
        Switti-AR, within-scale for Switti). ``cross_text``: what the cross-attention reads (the
        first token and AdaLN still from ``text``'s pooled vector)."""
        if cross_text is not None:
            # the cross-attention reads cross_text in every row: build the condition from its tokens and
            # text's pooled vector directly (what with_text on the full condition gives, without projecting
            # text's tokens into every block's keys/values only to discard them)
            if text.pooled is None:
                raise ValueError("Switti needs the pooled text vector (TextContext.pooled)")
            dev = self.device
            cond = self.transformer.condition(cross_text.tokens.to(dev), cross_text.mask.to(dev), text.pooled.to(dev))
        else:
            cond = self._condition(text)
        pns = [h for h, _ in targets.schedule]
        logits = self.transformer.teacher_forcing(cond, targets.inputs.to(self.device), pns, hooks=hooks,
                                                  paths=list(paths) if paths is not None else None)
        return scalewise.split_scales(logits, targets.schedule)

    def teacher_forcing_loss(self, logits: list[torch.Tensor], targets: ScaleTargets,
                             scale_weights: Sequence[float] | None = None) -> torch.Tensor:
        """The official loss: cross-entropy over the V codes, mean over all tokens of all scales
        (then over the batch); ``scale_weights[i]`` multiplies the terms of scale ``i``."""
        n = len(logits)
        ce = torch.cat([F.cross_entropy(lg.float().flatten(0, 1), t.to(lg.device).flatten(), reduction="none")
                        .view(t.shape[0], -1) for lg, t in zip(logits, targets.targets[:n])], dim=1)  # (B, L)
        if scale_weights is not None:
            if len(scale_weights) < n:
                raise ValueError(f"{len(scale_weights)} scale weights for {n} scales")
            w = torch.cat([torch.full((h * w_,), float(s)) for (h, w_), s in zip(targets.schedule, scale_weights[:n])])
            ce = ce * w.to(ce.device)
        return ce.mean()

    def teacher_forcing_losses(self, logits: list[torch.Tensor], targets: ScaleTargets, scales: Sequence[int],
                               ) -> dict[int, torch.Tensor]:
        """ℓ_k of every scale ``k`` in ``scales``: what :meth:`teacher_forcing_loss` gives for scale ``k``
        alone (the token mean of its cross-entropy), from one cross-entropy over the scales."""
        scales = list(scales)
        dev = logits[scales[0]].device
        flat = torch.cat([logits[k] for k in scales], dim=1)  # (B, n, V)
        codes = torch.cat([targets.targets[k] for k in scales], dim=1).to(dev)  # (B, n)
        ce = F.cross_entropy(flat.float().flatten(0, 1), codes.flatten(), reduction="none").view(codes.shape[0], -1)
        return {k: part.mean() for k, part in zip(scales, ce.split([logits[k].shape[1] for k in scales], dim=1))}

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_codes(
        self,
        prompts: Sequence[str] | TextContext,
        *,
        cfg: float | Sequence[float] = 6.0,
        tau: float | Sequence[float] = 1.0,
        top_k: int = 400,
        top_p: float = 0.95,
        seed: int | Sequence[int] = 0,
        schedule: Schedule | None = None,
        hooks: Sequence[AttentionHook] = (),
        step_hooks: Sequence[StepHook] = (),
        paths: Sequence[str] | None = None,
        progress: bool = False,
        more_smooth: bool = False,
        smooth_start_si: int = 0,
        turn_on_cfg_start_si: int = 0,
        turn_off_cfg_start_si: int | None = None,
        last_scale_temp: float | None = None,
        null_text: TextContext | None = None,
        cross_text: Sequence[tuple[int, TextContext]] = (),
    ) -> GenerationOutput:
        """The sampling loop of :meth:`generate`, returning ``f_hat`` (B, Cvae, H, W) instead of images.

        ``labels`` of the output: per step (B_alive, pn*pn) code indices. ``cross_text``: pairs
        (scale, text): from that scale on the cross-attention of the cond rows reads ``text`` (one
        row per original row; the uncond rows, the first token and AdaLN keep theirs).
        """
        tr = self.transformer
        schedule = list(schedule or self.scale_schedule())
        pns = [h for h, _ in schedule]
        n_scales = len(pns)
        text = prompts if isinstance(prompts, TextContext) else self.encode_text(prompts)
        b = text.tokens.shape[0]
        dev = self.device
        rows = scalewise.SampleRows(b, paths, seed, dev)
        cfgs, taus = per_scale(cfg, n_scales, "cfg"), per_scale(tau, n_scales, "tau")
        off = n_scales if turn_off_cfg_start_si is None else turn_off_cfg_start_si
        # Eq. (official): t = cfg * si / (S - 1); logits = (1 + t) c - t u, for turn_on <= si < turn_off
        ts = [cfgs[si] * si / max(n_scales - 1, 1) for si in range(n_scales)]
        guided = any(ts[si] != 0 for si in range(turn_on_cfg_start_si, off))

        if guided:
            null = null_text or self.null_text(b)
            text = TextContext(torch.cat([text.tokens.to(dev), null.tokens.to(dev)]),
                               torch.cat([text.mask.to(dev), null.mask.to(dev)]),
                               torch.cat([text.pooled.to(dev), null.pooled.to(dev)]))
        cond = self._condition(text)
        rope = tr.rope(pns, dev)
        cache = None
        if tr.cfg.use_ar:
            cache = KVCache(tr.cfg.depth, text.tokens.shape[0], tr.cfg.heads, sum(pn * pn for pn in pns),
                            tr.cfg.head_dim, tr.compute_dtype, dev)
        f_hat = torch.zeros(b, tr.cfg.codebook_dim, pns[-1], pns[-1], device=dev)
        labels: list[torch.Tensor] = []
        x = tr.sos(cond)
        start = 0
        switches = {int(at): t for at, t in cross_text}
        for si in scalewise.progress_steps(n_scales, progress, "switti"):
            pn = pns[si]
            n = pn * pn
            cur = rows.current()
            if si in switches:  # the cond rows' cross-attention reads another text from this scale on
                idx = torch.tensor(rows.alive, dtype=torch.long, device=dev)
                sw = switches[si]
                cond = tr.with_text(cond, sw.tokens.to(dev).index_select(0, idx), sw.mask.to(dev).index_select(0, idx),
                                    rows=slice(0, len(cur)))
            if guided and si >= off:  # guidance turned off: the uncond half leaves the batch
                guided = False
                idx = torch.arange(len(cur), device=dev)
                x, cond = x.index_select(0, idx), cond.index(idx)
                if cache is not None:
                    cache.keep(idx)
            ctx = scalewise.step_context(si, cache, hooks, cur, guided, scale=tr.cfg.head_dim**-0.5)
            r = None if rope is None else (rope[0][start:start + n], rope[1][start:start + n])
            hidden = tr.run_blocks(x + tr.level(si, start, start + n), cond, r, ctx)
            if cache is not None:
                cache.length += n
            start += n
            logits = tr.logits(hidden, cond)  # (B or 2B, n, V)
            nb = len(cur)
            if guided:
                if si >= turn_on_cfg_start_si:
                    logits = (1 + ts[si]) * logits[:nb] - ts[si] * logits[nb:]
                else:
                    logits = logits[:nb]
            elif si >= off and last_scale_temp is not None:
                logits = logits / last_scale_temp
            logits = logits / taus[si]
            ratio = si / max(n_scales - 1, 1)
            if more_smooth and si >= smooth_start_si and si < off:
                # Gumbel-softmax smoothing (official, visualisation only): soft codes, argmax as labels
                gum_t = max(0.27 * (1 - ratio * 0.95), 0.005)
                g_noise = torch.stack([-torch.empty(n, logits.shape[-1], device=dev).exponential_(generator=g).log()
                                       for g in rows.gens])
                soft = ((logits * (1 + ratio) + g_noise) / gum_t).softmax(-1)
                idx_bl = soft.argmax(-1)
                codes = soft @ self.vae.quantize.embedding.weight.float()  # (B, n, Cvae)
            else:
                probs = filter_logits(logits, top_k, top_p).softmax(-1)
                idx_bl = torch.stack([torch.multinomial(probs[i], 1, generator=g)[:, 0]
                                      for i, g in enumerate(rows.gens)])
                codes = None
            idx_bl, drop, replaced = scalewise.run_step_hooks(step_hooks, si, schedule, idx_bl, cur, logits)
            if replaced:  # a hook's labels replace the soft codes too
                codes = None
            labels.append(idx_bl)
            h_bchw = (self.vae.embed(idx_bl, pn) if codes is None
                      else codes.transpose(1, 2).reshape(nb, -1, pn, pn))
            f_hat, nxt = self.vae.next_input(si, pns, f_hat, h_bchw)
            if nxt is not None:
                x = tr.embed_codes(nxt)
                if guided:
                    x = torch.cat([x, x])
            kept = rows.drop(drop, guided) if drop and nxt is not None else None
            if kept is not None:
                idx, full = kept
                f_hat, x = f_hat.index_select(0, idx), x.index_select(0, full)
                cond = cond.index(full)
                if cache is not None:
                    cache.keep(full)
                if not rows.alive:
                    break
        return rows.output(f_hat, labels)

    def decode(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Accumulated codes (B, Cvae, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        dev = self.device
        half = self.weight_dtype != torch.float32 and dev.type == "cuda"
        with torch.no_grad(), torch.autocast(dev.type, dtype=self.weight_dtype, enabled=half):
            return self.vae.fhat_to_img(f_hat.to(dev)).float()

    def generate(
        self,
        prompts: Sequence[str] | TextContext,
        *,
        cfg: float | Sequence[float] = 6.0,
        tau: float | Sequence[float] = 1.0,
        top_k: int = 400,
        top_p: float = 0.95,
        seed: int | Sequence[int] = 0,
        schedule: Schedule | None = None,
        hooks: Sequence[AttentionHook] = (),
        step_hooks: Sequence[StepHook] = (),
        paths: Sequence[str] | None = None,
        output_paths: Sequence[str] | None = None,
        progress: bool = True,
        more_smooth: bool = False,
        smooth_start_si: int = 0,
        turn_on_cfg_start_si: int = 0,
        turn_off_cfg_start_si: int | None = None,
        last_scale_temp: float | None = None,
        null_text: TextContext | None = None,
        cross_text: Sequence[tuple[int, TextContext]] = (),
    ) -> list["Image.Image | None"]:
        """Sample one image per row (prompt); see :meth:`ScaleWiseBackbone.generate`.

        Official sampler options: ``more_smooth`` (Gumbel-softmax soft codes from scale
        ``smooth_start_si`` on), CFG only on scales ``turn_on_cfg_start_si <= si <
        turn_off_cfg_start_si`` (default: all), ``last_scale_temp`` (temperature of the unguided
        scales after the turn-off); README settings: cfg 6, top_k 400, top_p 0.95, smoothing from
        scale 2, turn-off 11 and temperature 0.1 at 1024. ``tau`` divides the logits of every scale
        (1 = the official sampler); ``null_text`` replaces the encoded empty prompt of CFG;
        ``cross_text`` switches the cross-attention text at given scales (see :meth:`generate_codes`).
        Row ``i`` draws from ``seed + i``; dropped rows and rows whose path is not in
        ``output_paths`` give ``None``.
        """
        out = self.generate_codes(prompts, cfg=cfg, tau=tau, top_k=top_k, top_p=top_p, seed=seed, schedule=schedule,
                                  hooks=hooks, step_hooks=step_hooks, paths=paths, progress=progress,
                                  more_smooth=more_smooth, smooth_start_si=smooth_start_si,
                                  turn_on_cfg_start_si=turn_on_cfg_start_si,
                                  turn_off_cfg_start_si=turn_off_cfg_start_si,
                                  last_scale_temp=last_scale_temp, null_text=null_text, cross_text=cross_text)
        return out.images(self.decode, output_paths)
