"""Gate benchmark, part 1: can the selective gate learn from the first update? Candidates side by side.

For each candidate parametrisation of the gate, on a tiny random Llama (split 2:6) and on the embedded default
model (SmolLM2-135M-Instruct, split 10:20), one first optimizer update of the trainer (its RDS micro-batch,
``loopus_convert.train.rds_micro_batch``: 4 loop steps, 2 supervised, beta 1, the confidence BCE) from the
converted model, and then:

* the gradient norm of the gate's parameters and of the loop-block layers' parameters, and their ratio;
* the largest |d Abar| after one AdamW step at lr 1e-4 (how far the gate moves on the first update);
* whether one loop still equals the base model at init (max |logits - base| at K = 1).

Candidates (``x = u - h_old``, ``pre = W_dt (W_in x) + b``; the mix is ``h = Abar * u + (1 - Abar) * h_old``):

    identity       Abar = exp(-softplus(pre) * exp(A_log)), b = softplus^-1(1e-8), W_dt = 0, A_log = 0
    official       the same form, S4D init (A_log = log(1..D), dt log-uniform in [1e-3, 1e-1])
    residual       Abar = 1 - tanh(exp(A_log) pre), i.e. h = u + lambda (h_old - u) with lambda =
                   tanh(exp(A_log) pre) in (-1, 1); W_dt = 0, b = 0, A_log = 0 (SelectiveGate's own)
  variants with the same zero init, not shipped:
    lambda-linear  Abar = 1 - pre (lambda = pre, unbounded)
    exp-linear     Abar = exp(-pre * exp(A_log)): the official form with delta = pre (no softplus), (0, inf)
    clamped        Abar = exp(-max(pre, 0) * exp(A_log)): in (0, 1], one-sided slope 1 at 0
    pass           residual plus a per-pass bias c_k (k = 1..8, the last one reused beyond)

Part 2 (``--part learn``): the overshoot task of ``tests/convert/test_gate.py`` with every candidate: a
tiny Llama whose loop block's residual branches are doubled, the gate trained alone to undo it.

Usage: HF_HUB_OFFLINE=1 python benchmarks/bench_gate.py [--models tiny,embedded] [--threads 2]
       HF_HUB_OFFLINE=1 python benchmarks/bench_gate.py --part learn
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from loopus_convert import loop_base_model  # noqa: E402
from loopus_convert.modeling_loopus import SelectiveGate  # noqa: E402

PASS_SLOTS = 8


class _Variant(SelectiveGate):
    """A candidate form that the model does not ship: the parameters and zero init of ``residual``, its own
    ``mix_weight`` (``pass`` adds a per-pass bias)."""

    form = "lambda-linear"
    pass_index = 1

    def mix_weight(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.delta_proj(self.dt_input_proj(x))  # (B, T, D)
        if self.form == "exp-linear":
            return torch.exp(-pre * torch.exp(self.A_log))
        if self.form == "clamped":
            return torch.exp(-pre.clamp(min=0.0) * torch.exp(self.A_log))
        if self.form == "pass":
            pre = pre + self.pass_bias[min(self.pass_index, PASS_SLOTS) - 1]
            return 1 - torch.tanh(pre * torch.exp(self.A_log))
        return 1 - pre  # lambda-linear


SHIPPED = ("identity", "official", "residual")  # SelectiveGate's own inits
VARIANTS = ("lambda-linear", "exp-linear", "clamped", "pass")
CANDIDATES = SHIPPED + VARIANTS


def install(model, name: str, seed: int = 0) -> SelectiveGate:
    """Replace ``model.gate`` by a freshly initialised candidate ``name``."""
    hidden, rank = model.config.hidden_size, model.config.gate_rank
    torch.manual_seed(seed)
    if name in SHIPPED:
        gate = SelectiveGate(hidden, rank, name)
    else:
        gate = type(f"Gate_{name}", (_Variant,), {"form": name})(hidden, rank, "residual")
        if name == "pass":
            gate.pass_bias = nn.Parameter(torch.zeros(PASS_SLOTS, hidden))
    gate.reset()
    model.gate = gate
    if not getattr(model, "_pass_hook", False):
        step = model.loop_step

        def loop_step(h, ctx):  # tell the gate which pass it is in (only the ``pass`` candidate reads it)
            model.gate.pass_index = ctx.passes_done + 1
            return step(h, ctx)

        model.loop_step = loop_step
        model._pass_hook = True
    return gate


def _norm(params) -> float:
    grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
    return float(torch.cat(grads).norm()) if grads else 0.0


@torch.no_grad()
def _abar_stats(model, ids: torch.Tensor, passes: int) -> list[tuple[float, float, float]]:
    """(min, mean, max) of Abar over tokens and channels at each pass."""
    ctx = model.prepare(ids)
    h = model.encode(ctx)
    out = []
    for k in range(1, passes + 1):
        model.gate.pass_index = k
        u = model._run_layers(h, ctx, model.loop_range)
        a = model.gate.mix_weight(u - h)
        out.append((float(a.min()), float(a.mean()), float(a.max())))
        h = a * u + (1 - a) * h
    return out


def first_update(model, ids: torch.Tensor, base_logits: torch.Tensor, name: str) -> dict:
    """One RDS micro-batch from the fresh candidate: gradient norms, and Abar before/after one AdamW step."""
    from loopus_train.optim import select_trainable
    from loopus_train.rds import draw_supervised_steps, rds_micro_batch

    gate = install(model, name)
    named = select_trainable(model, ("loop", "gate", "decoder", "head"))
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        one_loop = (model(ids, num_loops=1).logits - base_logits).abs().max().item()
    steps = draw_supervised_steps(0, 0, 0, 4, 2)
    rds_micro_batch(model, ids, steps)
    loop_params = [p for i in model.loop_range for p in model.layers[i].parameters()]
    gate_params = list(gate.parameters())
    g_gate, g_loop = _norm(gate_params), _norm(loop_params)
    before = _abar_stats(model, ids, 4)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-4, weight_decay=0.0)
    gate_before = [p.detach().clone() for p in gate_params]
    optimizer.step()
    after = _abar_stats(model, ids, 4)
    moved = max(abs(a[1] - b[1]) for a, b in zip(after, before, strict=True))
    pairs = zip(gate_params, gate_before, strict=True)
    param_moved = max(float((p.detach() - q).abs().max()) for p, q in pairs)
    return {
        "candidate": name,
        "one_loop_max_diff": one_loop,
        "grad_gate": g_gate,
        "grad_loop": g_loop,
        "ratio": g_gate / g_loop if g_loop else math.nan,
        "rms_gate": g_gate / math.sqrt(sum(p.numel() for p in gate_params)),
        "rms_loop": g_loop / math.sqrt(sum(p.numel() for p in loop_params)),
        "abar_mean_before": [round(s[1], 4) for s in before],
        "abar_mean_moved": moved,
        "gate_param_moved": param_moved,
        "supervised": steps,
    }


def tiny_setup():
    from transformers import AutoModelForCausalLM

    from loopus_convert.support import tiny_config

    torch.manual_seed(0)  # 8 layers, hidden 64, the tests' tiny Llama
    config = tiny_config("llama", num_hidden_layers=8, vocab_size=384, intermediate_size=128,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, 384, (2, 64), generator=torch.Generator().manual_seed(1))
    return base, "2:6", ids


def embedded_setup():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loopus_core.models import default_model_dir
    from loopus_train.data import load_blocks

    path = default_model_dir()
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    blocks = load_blocks(tokenizer, None, block_size=64, held_out=0.05, seed=0)
    return base, "10:20", blocks.train[:2]


def run(setup_name: str) -> list[dict]:
    base, split, ids = tiny_setup() if setup_name == "tiny" else embedded_setup()
    with torch.no_grad():
        base_logits = base(ids).logits
    rows = []
    for name in CANDIDATES:
        model = loop_base_model(copy.deepcopy(base), split)
        model.train()
        rows.append({"model": setup_name, **first_update(model, ids, base_logits, name)})
        del model
    return rows


def overshoot_task(base, split: str, gate_init: str, scale: float = 2.0):
    """A looped model whose loop block overshoots: every loop layer's residual branch (attention output and
    MLP down projections) scaled by ``scale``, so one undamped pass adds about ``scale`` times the base's
    update. The base model (one loop of the unscaled block) is the target; ``Abar ~ 1 / scale`` undoes it."""
    model = loop_base_model(copy.deepcopy(base), split, gate_init=gate_init)
    with torch.no_grad():
        for i in model.loop_range:
            model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.layers[i].mlp.down_proj.weight.mul_(scale)
    return model


def kl_to(model, ids: torch.Tensor, target: torch.Tensor, loops: int) -> torch.Tensor:
    """KL(target || model at ``loops`` passes), mean over tokens; ``target`` are log-probabilities."""
    logp = model(ids, num_loops=loops).logits.log_softmax(-1)
    return F.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean")


def learn(updates: tuple[int, ...] = (40, 200), scale: float = 2.0) -> None:
    """Part 2: the overshoot task of ``tests/convert/test_gate.py`` for every candidate (tiny Llama, loop
    block 2:6 with its residual branches x ``scale``, the gate trained alone with Adam lr 1e-2 to match the
    base model at one loop): KL at K = 1 and 2 before and after, and Abar at pass 1 (mean, min, max)."""
    base, split, _ = tiny_setup()
    ids = torch.randint(3, 384, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        target = base(ids).logits.log_softmax(-1)
    counts = " / ".join(map(str, updates))
    print(f"| candidate | KL K=1 at init | KL K=1 after {counts} | KL K=2 at init | KL K=2 after {counts} "
          f"| Abar pass 1 after {updates[-1]}: mean (min, max) |")
    print("|---|---:|---|---:|---|---|")
    for name in CANDIDATES:
        model = overshoot_task(base, split, "residual", scale)
        gate = install(model, name)
        model.requires_grad_(False)
        gate.requires_grad_(True)
        optimizer = torch.optim.Adam(gate.parameters(), lr=1e-2)
        with torch.no_grad():
            start = [float(kl_to(model, ids, target, k)) for k in (1, 2)]
        seen: dict[int, list[float]] = {}
        for step in range(1, updates[-1] + 1):
            optimizer.zero_grad()
            kl_to(model, ids, target, 1).backward()
            optimizer.step()
            if step in updates:
                with torch.no_grad():
                    seen[step] = [float(kl_to(model, ids, target, k)) for k in (1, 2)]
        low, mean, high = _abar_stats(model, ids, 1)[0]
        after = [" / ".join(f"{seen[n][k]:.4f}" for n in updates) for k in (0, 1)]
        print(f"| {name} | {start[0]:.4f} | {after[0]} | {start[1]:.4f} | {after[1]} "
              f"| {mean:.3f} ({low:.3f}, {high:.3f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,embedded")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=("grad", "learn"), default="grad")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "learn":
        learn()
        return
    print("| model | candidate | 1 loop vs base | grad gate | grad loop | gate / loop | RMS gate / RMS loop "
          "| mean Abar per pass at init | max change of a pass's mean Abar, 1 AdamW step "
          "| max gate param change |")
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|")
    for setup_name in args.models.split(","):
        for r in run(setup_name.strip()):
            abar = " / ".join(f"{a:.3f}" for a in r["abar_mean_before"])
            print(f"| {r['model']} | {r['candidate']} | {r['one_loop_max_diff']:.1e} | {r['grad_gate']:.3e} "
                  f"| {r['grad_loop']:.3e} | {r['ratio']:.2e} | {r['rms_gate'] / r['rms_loop']:.2e} | {abar} "
                  f"| {r['abar_mean_moved']:.2e} | {r['gate_param_moved']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
