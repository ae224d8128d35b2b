"""A tiny GPT (nanoGPT-shaped) whose activations are named hook points, as in TransformerLens.

Every observable activation passes through a :class:`HookPoint`, an identity module whose name is its path in the
module tree: ``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_pattern``,
``blocks.{l}.attn.hook_z``, ``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_resid_mid``, ``blocks.{l}.hook_mlp_out``,
``blocks.{l}.hook_resid_post`` and ``ln_final.hook_normalized`` (:func:`hook_names`). A forward hook on a hook point
reads the activation (returns None) or replaces it (returns a tensor): ``forward(idx, capture={names})`` reads them
(detached CPU copies), :mod:`lab.interp.interventions` replaces them. Training uses the fused
``scaled_dot_product_attention``; a layer whose ``hook_pattern`` has a hook runs the eager (explicit softmax) path.
Under bf16 autocast (``lab.train.pretraining``) the matmuls run in bf16 while the loss and, on cpu, the fused
attention stay in float32 (that kernel's bf16 backward is several times slower than its float32 one on cpu).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.errors import LabError
from lab.interp.names import EMBED_NAME, FINAL_NAME, HEAD_KIND, PATTERN_KIND, POS_EMBED_NAME
from lab.interp.names import hook_names as layer_hook_names

# The per-layer hook points in forward order.
LAYER_KINDS = (
    "hook_resid_pre",
    PATTERN_KIND,
    HEAD_KIND,
    "hook_attn_out",
    "hook_resid_mid",
    "hook_mlp_out",
    "hook_resid_post",
)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    pos_emb: str = "learned"  # "learned" (GPT-2/nanoGPT absolute) or "rope" (rotary, applied to q and k)


def hook_names(n_layer: int) -> list[str]:
    """Every hook point of a GPT with ``n_layer`` blocks, in forward order (= ``list(GPT(cfg).hook_points())``)."""
    return [EMBED_NAME, POS_EMBED_NAME, *layer_hook_names(n_layer, LAYER_KINDS), FINAL_NAME]


class HookPoint(nn.Module):
    """An identity at a named activation (TransformerLens's ``HookPoint``): forward hooks registered on it read or
    replace the activation; with none registered it is a plain pass-through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def hooked(self) -> bool:
        """Whether a forward hook is registered (the attention then materialises its pattern)."""
        return bool(self._forward_hooks)


def rope_tables(T: int, hs: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, hs/2) of rotary position embeddings (Su et al. 2021, base 10000)."""
    inv = 1.0 / (10000 ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs))
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None, :]  # (T, hs/2)
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate feature pairs (first half, second half) of x (B, nh, T, hs) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.dropout, self.rope = cfg.n_head, cfg.dropout, cfg.pos_emb == "rope"
        if self.rope:  # tables for the longest sequence, computed once (not saved in state_dict)
            cos, sin = rope_tables(cfg.block_size, cfg.d_model // cfg.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.hook_pattern = HookPoint()  # [B, nh, T, T]
        self.hook_z = HookPoint()  # [B, T, nh, hs]
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.rope:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        if self.hook_pattern.hooked():  # eager path: the softmax is materialised so it can be observed
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = self.hook_pattern(att.masked_fill(~mask, float("-inf")).softmax(dim=-1))
            y = F.dropout(att, drop, self.training) @ v  # (B, nh, T, hs)
        elif q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # float32 under bf16 autocast on cpu: this kernel's bf16 backward is ~4x slower there (B12 T64 hs32)
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=drop, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        y = self.hook_z(y.transpose(1, 2)).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [B, T, d]
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.hook_attn_out = HookPoint()  # [B, T, d]
        self.hook_resid_mid = HookPoint()  # [B, T, d]
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()  # [B, T, d]
        self.hook_resid_post = HookPoint()  # [B, T, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(self.ln1(x))))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(x))))


class LayerNorm(nn.LayerNorm):
    """LayerNorm without bias whose output is the hook point ``hook_normalized``."""

    def __init__(self, d_model: int):
        super().__init__(d_model, bias=False)
        self.hook_normalized = HookPoint()  # [B, T, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(super().forward(x))


class GPT(nn.Module):
    """Pre-LayerNorm decoder; token embedding tied to the unembedding; returns logits for every position."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()  # [B, T, d]
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.hook_pos_embed = HookPoint()  # [T, d]; never reached with rotary embeddings
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))
        self.register_load_state_dict_pre_hook(_rename_old_keys)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def n_params(self) -> int:
        """Parameters excluding position embeddings (nanoGPT's convention)."""
        return sum(p.numel() for p in self.parameters()) - (self.wpe.weight.numel() if self.wpe is not None else 0)

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point by its name in the module tree (``blocks.0.hook_resid_pre``), in forward order."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, capture: Collection[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """idx (B, T) -> (logits (B, T, V), mean cross-entropy or None, the activations named in ``capture``)."""
        if capture:  # one plain forward pass with a reading hook on each named hook point
            return self._run_with_cache(idx, targets, capture)
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise LabError(f"sequence of {T} tokens is longer than the model's block size {self.cfg.block_size}")
        x = self.hook_embed(self.wte(idx))  # (B, T, C)
        if self.wpe is not None:
            x = x + self.hook_pos_embed(self.wpe(torch.arange(T, device=idx.device)))  # (T, C) broadcast
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))  # fp32 under autocast
        return logits, loss, {}

    def _run_with_cache(
        self, idx: torch.Tensor, targets: torch.Tensor | None, names: Collection[str]
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        points = self.hook_points()
        unknown = set(names) - set(points)
        if unknown:
            raise LabError(
                f"unknown activation names {sorted(unknown)}: see lab.models.gpt.hook_names({self.cfg.n_layer})"
            )
        cache: dict[str, torch.Tensor] = {}  # filled in forward order
        handles = [points[name].register_forward_hook(partial(_keep, cache, name)) for name in set(names)]
        try:
            logits, loss, _ = self(idx, targets)
        finally:
            for h in handles:
                h.remove()
        return logits, loss, cache

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, n_new: int, temperature: float = 0.8, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Sample ``n_new`` tokens after ``idx`` (B, T); a seeded ``generator`` makes it reproducible."""
        for _ in range(n_new):
            ctx = idx[:, -self.cfg.block_size :]
            logits, _, _ = self(ctx)
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)  # (B, V)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx


def _keep(cache: dict[str, torch.Tensor], name: str, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
    cache[name] = output.detach().cpu()


def _rename_old_keys(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the final norm became ``ln_final`` (TransformerLens's name) call it ``ln_f``."""
    old = prefix + "ln_f.weight"
    if old in state_dict:
        state_dict[prefix + "ln_final.weight"] = state_dict.pop(old)
