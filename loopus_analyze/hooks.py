"""Forward hooks on the decoder layers: read every state of one forward, or start a forward at a given state.

States: for a model with L decoder layers there are L+1 states per token. State 0 is the input of layer 0
(the embeddings, with learned positions or embedding scaling where the family has them), state i is the
OUTPUT of layer i-1, read by a forward hook on the decoder layer itself, so the last state is the last
layer's own output BEFORE the final norm (``hidden_states[-1]`` of Llama-family models has the norm
applied).

:func:`run_layers` runs any sequence of the model's own layers on any state: the backbone's forward with
its layer list replaced (:func:`loopus_core.models.layer_surgery`) and the input of the first layer call
replaced by the given state. Masks, positions (rotary or learned) and per-layer attention types are the
backbone's own, for every family; the embedding lookup it still does is negligible.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from loopus_core.models import ModelParts, layer_surgery


class StateHooks:
    """Forward hooks that keep the input of layer 0 and the output of every decoder layer of one forward."""

    def __init__(self, layers) -> None:
        self.states: list[torch.Tensor | None] = [None] * (len(layers) + 1)
        self.handles = [layers[0].register_forward_pre_hook(self._pre, with_kwargs=True)]
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._post(i + 1)))

    def _pre(self, module, args, kwargs):
        self.states[0] = args[0] if args else kwargs["hidden_states"]

    def _post(self, index: int):
        def hook(module, args, output):
            self.states[index] = _tensor(output)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tensor(output) -> torch.Tensor:
    """A decoder layer's hidden-state output, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


@contextlib.contextmanager
def _first_call_input(layer: torch.nn.Module, state: torch.Tensor) -> Iterator[None]:
    """Replace the hidden-state input of the FIRST call of ``layer`` by ``state`` (later calls untouched)."""
    fired = False

    def pre(module, args, kwargs):
        nonlocal fired
        if fired:
            return None
        fired = True
        if args:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": state}

    handle = layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _last_output(layer: torch.nn.Module, into: list) -> Iterator[None]:
    """Keep the output of the LAST call of ``layer`` in ``into[0]``."""

    def hook(module, args, output):
        into[0] = _tensor(output)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def run_layers(
    parts: ModelParts,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    state: torch.Tensor,
    order: Sequence[int],
    *,
    keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The base model's layers ``order`` applied to ``state`` (N, T, D), then its final norm.

    ``input_ids`` / ``attention_mask`` (N, T) give the masks and positions (padding as in the batch that
    ``state`` came from). Returns the final-normed output (N, T, D) and, with ``keep`` a layer index, the
    output of that layer's last call (e.g. the end of a loop block, what its next pass would read).
    No KV cache.
    """
    last: list = [None]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_first_call_input(parts.layers[order[0]], state))
        if keep is not None:
            stack.enter_context(_last_output(parts.layers[keep], last))
        stack.enter_context(layer_surgery(parts.model, list(order)))
        out = parts.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state, last[0]
