"""A tiny GPT (nanoGPT-shaped) whose residual stream and attention patterns are observable by name.

Activation names follow TransformerLens: ``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.hook_resid_pre``,
``blocks.{l}.hook_attn_out``, ``blocks.{l}.hook_resid_mid``, ``blocks.{l}.hook_mlp_out``,
``blocks.{l}.hook_resid_post``, ``blocks.{l}.attn.hook_pattern`` and ``ln_final.hook_normalized``.
Capture is opt-in: pass ``capture={names}``; values come back detached on the CPU. Training uses the fused
``scaled_dot_product_attention``; a layer whose pattern is requested runs the eager (explicit softmax) path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.errors import LabError


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
    """Every activation name a GPT with ``n_layer`` blocks can capture, in forward order."""
    names = ["hook_embed", "hook_pos_embed"]
    for l in range(n_layer):
        names += [f"blocks.{l}.{h}" for h in
                  ("hook_resid_pre", "attn.hook_pattern", "hook_attn_out", "hook_resid_mid", "hook_mlp_out",
                   "hook_resid_post")]
    return names + ["ln_final.hook_normalized"]


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
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, need_pattern: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.rope:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        drop = self.dropout if self.training else 0.0
        if need_pattern:  # eager path: the softmax is materialised so it can be observed
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            pattern = att
            y = F.dropout(att, drop, self.training) @ v  # (B, nh, T, hs)
        else:
            pattern = None
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y)), pattern


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
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)


class GPT(nn.Module):
    """Pre-LayerNorm decoder; token embedding tied to the unembedding; returns logits for every position."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def n_params(self) -> int:
        """Parameters excluding position embeddings (nanoGPT's convention)."""
        return sum(p.numel() for p in self.parameters()) - (self.wpe.weight.numel() if self.wpe is not None else 0)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, capture: Collection[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """idx (B, T) -> (logits (B, T, V), mean cross-entropy or None, cache of the requested activations)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise LabError(f"sequence of {T} tokens is longer than the model's block size {self.cfg.block_size}")
        want = set(capture or ())
        unknown = want - set(hook_names(self.cfg.n_layer))
        if unknown:
            raise LabError(f"unknown activation names {sorted(unknown)}: see lab.models.gpt.hook_names({self.cfg.n_layer})")
        cache: dict[str, torch.Tensor] = {}

        def keep(name: str, t: torch.Tensor | None) -> None:
            if name in want and t is not None:
                cache[name] = t.detach().cpu()

        tok = self.wte(idx)  # (B, T, C)
        keep("hook_embed", tok)
        if self.wpe is not None:
            pos = self.wpe(torch.arange(T, device=idx.device))  # (T, C)
            keep("hook_pos_embed", pos)
            tok = tok + pos
        x = self.drop(tok)
        for l, blk in enumerate(self.blocks):
            keep(f"blocks.{l}.hook_resid_pre", x)
            attn_out, pattern = blk.attn(blk.ln1(x), need_pattern=f"blocks.{l}.attn.hook_pattern" in want)
            keep(f"blocks.{l}.attn.hook_pattern", pattern)
            keep(f"blocks.{l}.hook_attn_out", attn_out)
            x = x + attn_out
            keep(f"blocks.{l}.hook_resid_mid", x)
            mlp_out = blk.mlp(blk.ln2(x))
            keep(f"blocks.{l}.hook_mlp_out", mlp_out)
            x = x + mlp_out
            keep(f"blocks.{l}.hook_resid_post", x)
        x = self.ln_f(x)
        keep("ln_final.hook_normalized", x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss, cache

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n_new: int, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample ``n_new`` tokens after ``idx`` (B, T); a seeded ``generator`` makes it reproducible."""
        for _ in range(n_new):
            ctx = idx[:, -self.cfg.block_size:]
            logits, _, _ = self(ctx)
            probs = F.softmax(logits[:, -1, :] / temperature, dim=-1)  # (B, V)
            idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
        return idx
