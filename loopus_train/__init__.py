"""Stage 3: the minimal LoopUS trainer, a consumer of looped checkpoints.

``config`` (TrainConfig, one copy of each default), ``data`` (token blocks, held-out split, sampler),
``rds`` (random deep supervision of one micro-batch), ``optim`` (trainable parts, AdamW groups, schedule),
``state`` (TrainState: all a resume needs; checkpoints), ``rundir`` (run.json, metrics.jsonl, --resume),
``distributed`` (torchrun), ``evaluate`` (held-out evaluation) and ``train`` (the loop, top to bottom).
Entry point: :func:`loopus_train.train.train` (``loopus finetune``).
"""
