"""Does looping help? The evidence benchmark of issue 11 (``python -m benchmarks.evidence.run``).

``task`` (variable-chain programs with a depth knob and a hash split), ``pretrain`` (a small Llama from
scratch), ``finetune`` (label-masked RDS and the plain fine-tune on the stage API), ``measure`` (accuracy per
depth x K, early-exit curves), ``damped`` (looping without training on the default model), ``real`` (the
default model fine-tuned with ``loopus finetune``), ``report`` (tables and plots), ``run`` (the command).
"""
