"""Subject embeddings: a query MLP makes K tokens per subject, the SE-Refiner adds image detail to them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QueryMLP(nn.Module):
    """One embedding (CLIP CLS, or ArcFace for portraits) -> ``num_tokens`` tokens of width ``dim``."""

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.net = nn.Sequential(nn.Linear(in_dim, in_dim * 2), nn.GELU(), nn.Linear(in_dim * 2, dim * num_tokens))
        self.norm = nn.LayerNorm(dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(embeds).reshape(*embeds.shape[:-1], self.num_tokens, self.dim))


class PerceiverAttention(nn.Module):
    """Queries attend to [patch tokens ; queries] (Perceiver resampler attention)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.norm_patches = nn.LayerNorm(dim)
        self.norm_queries = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, patches: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        patches, queries = self.norm_patches(patches), self.norm_queries(queries)
        q = self.to_q(queries)
        k, v = self.to_kv(torch.cat([patches, queries], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * 2, bias=False), nn.GELU(),
                         nn.Linear(dim * 2, dim, bias=False))


class SERefiner(nn.Module):
    """Refines K subject queries with the crop's patch tokens; the output is added to the queries."""

    def __init__(self, dim: int, patch_dim: int, depth: int, heads: int, dim_head: int):
        super().__init__()
        self.proj_in = nn.Linear(patch_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        patches = self.proj_in(patches.to(queries.dtype))
        latents = queries
        for attention, feed_forward in self.layers:
            latents = attention(patches, latents) + latents
            latents = feed_forward(latents) + latents
        return queries + self.norm_out(self.proj_out(latents))
