"""Stage 2: the looped model, its checkpoint, conversion from a base model or the official format, running it.

Importing this package registers :class:`LoopusConfig` / :class:`LoopusForCausalLM` (model_type ``loopus``)
with ``AutoConfig`` and ``AutoModelForCausalLM``, so a looped checkpoint loads without remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from loopus_convert.build import loop_base_model
from loopus_convert.checkpoint import load_looped, load_with_tokenizer, save_looped
from loopus_convert.configuration_loopus import LoopusConfig
from loopus_convert.convert import ConvertResult, convert_model
from loopus_convert.modeling_loopus import LoopusCache, LoopusForCausalLM
from loopus_convert.official import import_official

AutoConfig.register("loopus", LoopusConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopusConfig, LoopusForCausalLM, exist_ok=True)
# save_pretrained (e.g. by the trainer) then copies the two model files and writes auto_map as well
LoopusConfig.register_for_auto_class()
LoopusForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "ConvertResult",
    "LoopusCache",
    "LoopusConfig",
    "LoopusForCausalLM",
    "convert_model",
    "import_official",
    "load_looped",
    "load_with_tokenizer",
    "loop_base_model",
    "save_looped",
]
