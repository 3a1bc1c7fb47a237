"""The vocabulary every stage of the LoopUS toolkit speaks.

``errors`` (the one user-facing error type), ``checks`` (number validation with the allowed range in the
message), ``progress`` (how library code reports long work), ``split`` (the ``A:B`` contract),
``runtime`` (device, dtype, autocast), ``outputs`` (locked atomic outputs), ``jsonio`` (strict JSON),
``models`` (opening a causal LM and reaching its parts) and ``texts`` (documents from the built-in corpus,
files, folders and dataset names). It imports torch, transformers, numpy and the standard library only,
never a stage.
"""
