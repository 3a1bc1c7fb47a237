"""Stage 1 of the LoopUS toolkit: open a causal LM, measure its layer dynamics, choose the split, report.

Entry point: :func:`loopus_analyze.analyze.run_analysis` (``loopus analyze`` on the command line).
"""
