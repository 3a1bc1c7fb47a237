"""A tiny stand-in with the looped-model API (prepare / encode / loop_step / decode / confidence_logit).

It lets the trainer's mechanics (step skipping, passes, detaching, gradient accumulation) be tested in
milliseconds and with exact call counts; the acceptance tests use real converted checkpoints.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from loopus_convert.modeling_loopus import LoopusContext


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, h):
        return h + self.down(F.gelu(self.up(self.norm(h))))


class Gate(nn.Module):
    def __init__(self, dim: int, rank: int = 4) -> None:
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(dim))
        self.dt_input_proj = nn.Linear(dim, rank, bias=False)
        self.delta_proj = nn.Linear(rank, dim)

    def forward(self, u, h_old):
        delta = F.softplus(self.delta_proj(self.dt_input_proj(u - h_old)))
        a_bar = torch.exp(-delta * torch.exp(self.A_log))
        return a_bar * u + (1 - a_bar) * h_old


class StandInLooped(nn.Module):
    def __init__(self, vocab: int = 48, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.encoder = nn.ModuleList([Block(dim)])
        self.loop = nn.ModuleList([Block(dim), Block(dim)])
        self.gate = Gate(dim)
        self.decoder = nn.ModuleList([Block(dim)])
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.confidence_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))
        self.loop_calls = 0

    def encoder_modules(self):
        return [self.embed_tokens, self.encoder]

    def loop_modules(self):
        return [self.loop]

    def decoder_modules(self):
        return [self.decoder, self.norm, self.lm_head]

    def prepare(self, input_ids, attention_mask=None, position_ids=None):
        embeds = self.embed_tokens(input_ids)
        return LoopusContext(embeds, attention_mask, [], {}, batch=embeds.shape[0])  # the real model's type

    def encode(self, ctx):
        h = ctx.inputs_embeds
        for block in self.encoder:
            h = block(h)
        return h

    def loop_step(self, h, ctx):
        self.loop_calls += 1
        u = h
        for block in self.loop:
            u = block(u)
        return self.gate(u, h)

    def decode(self, h, ctx):
        return self.head(self.decoder_states(h, ctx))

    def decoder_states(self, h, ctx):
        for block in self.decoder:
            h = block(h)
        return h

    def head(self, h):
        return self.lm_head(self.norm(h))

    def confidence_logit(self, h, ctx):
        return self.confidence_head(h[:, -1]).squeeze(-1)

    def forward(self, input_ids, num_loops=4, exit_strategy="none", exit_threshold=0.9, **_):
        ctx = self.prepare(input_ids)
        h = self.encode(ctx)
        used = torch.full((input_ids.shape[0],), num_loops)
        for _k in range(num_loops):
            h = self.loop_step(h, ctx)
        return SimpleNamespace(logits=self.decode(h, ctx), loops_used=used)
