"""Stage 2: the looped model, its conversion from a base model or the official format, and running it.

Importing this package registers :class:`LoopusConfig` / :class:`LoopusForCausalLM` (model_type ``loopus``)
with ``AutoConfig`` and ``AutoModelForCausalLM``, so a looped checkpoint loads without remote code.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from loopus_convert.configuration_loopus import LoopusConfig
from loopus_convert.modeling_loopus import LoopusCache, LoopusForCausalLM

AutoConfig.register("loopus", LoopusConfig, exist_ok=True)
AutoModelForCausalLM.register(LoopusConfig, LoopusForCausalLM, exist_ok=True)
# save_pretrained (e.g. by the trainer) then copies the two model files and writes auto_map as well
LoopusConfig.register_for_auto_class()
LoopusForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def __getattr__(name: str):
    # convert.py imports loopus_analyze; keep `import loopus_convert` light and import it on first use
    if name in ("convert_model", "load_looped", "loop_base_model", "import_official", "ConvertResult"):
        from loopus_convert import convert

        return getattr(convert, name)
    raise AttributeError(name)


__all__ = [
    "LoopusCache",
    "LoopusConfig",
    "LoopusForCausalLM",
    "convert_model",
    "load_looped",
    "loop_base_model",
    "import_official",
]
