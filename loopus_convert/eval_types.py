"""What ``loopus eval`` is asked (:class:`EvalConfig`, one copy of each default) and what it measured on text
(:class:`PerplexityResult`, small typed objects with ``to_json``).

The route from the command to the numbers::

    loopus/commands/evaluate.py     flags -> EvalConfig; prints the typed results, writes their to_json()
    loopus_convert/eval_types.py    EvalConfig, PerplexityResult (this file)
    loopus_train/evaluate.py        perplexity on text: which blocks (a run's held-out split, --data)
    loopus_convert/measure.py       the numbers: loss per loop count, calibration, early exit, KV strategies
    loopus_convert/harness.py       with --tasks: lm-evaluation-harness per loop setting (TaskResult)

Training-time evaluation (:func:`loopus_train.evaluate.run_eval`) reads the same defaults through
``loopus_train.config.TrainConfig``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

EXIT_THRESHOLDS = (0.6, 0.8, 0.9)  # early-exit thresholds of perplexity on text and of training evaluation
DEFAULT_BLOCK_SIZE = 256  # tokens per block on text that no training run split


@dataclass(frozen=True)
class EvalConfig:
    """Every setting of ``loopus eval``; the CLI's defaults are these. Checked where they are used (one-line
    errors naming the flag)."""

    loops: tuple[int, ...] = (1, 2, 4, 8)
    thresholds: tuple[float, ...] | None = None  # None: EXIT_THRESHOLDS on text, none with tasks
    max_loops: int | None = None  # the early-exit limit; None: the largest of loops
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    # perplexity on text
    data: str | None = None  # None: the run's held-out split, else the built-in corpus
    block_size: int | None = None  # None: the run's, else DEFAULT_BLOCK_SIZE
    max_blocks: int = 64
    kv_strategies: tuple[str, ...] = ()
    # lm-evaluation-harness tasks
    tasks: str | None = None
    limit: float | None = None
    num_fewshot: int | None = None
    base: str | None = None
    exit_strategy: str = "threshold"
    min_loops: int = 1

    def text_thresholds(self) -> tuple[float, ...]:
        """The early-exit thresholds of perplexity on text (given, or :data:`EXIT_THRESHOLDS`)."""
        return EXIT_THRESHOLDS if self.thresholds is None else tuple(self.thresholds)

    def task_thresholds(self) -> tuple[float, ...]:
        """The early-exit rows of a task run (given, or none)."""
        return tuple(self.thresholds or ())


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class LossRow:
    """Held-out loss after K loops: next-token CE (nats), perplexity, token accuracy."""

    loss: float
    ppl: float
    accuracy: float


@dataclass(frozen=True)
class Calibration:
    """The confidence head against its training target: ECE, Brier, the two means."""

    ece: float
    brier: float
    mean_confidence: float
    mean_correct: float


@dataclass(frozen=True)
class ExitRow:
    """One early-exit setting (``full``: no exit, at the loop limit)."""

    loss: float
    ppl: float
    mean_loops: float
    max_loops_used: int
    ppl_change: float


@dataclass(frozen=True)
class EarlyExit:
    """Early exit at each threshold against running ``max_loops`` without exit (``thresholds["full"]``)."""

    max_loops: int
    thresholds: dict[str, ExitRow]

    @classmethod
    def of(cls, stats: dict) -> EarlyExit:
        """From :func:`loopus_convert.measure.early_exit_stats`'s dict."""
        rows = {key: ExitRow(**row) for key, row in stats["thresholds"].items()}
        return cls(max_loops=stats["max_loops"], thresholds=rows)


@dataclass(frozen=True)
class KVRow:
    """One KV strategy at one loop count, decoded token by token."""

    loss: float
    ppl: float
    agreement: float
    cache_bytes: int
    vs_base: float


@dataclass(frozen=True)
class KVStats:
    """Every KV strategy (``full`` first) at every loop count: ``strategies[name][str(K)]``."""

    prompt_tokens: int
    decoded_tokens: int
    strategies: dict[str, dict[str, KVRow]]

    @classmethod
    def of(cls, stats: dict) -> KVStats:
        """From :func:`loopus_convert.measure.kv_strategy_stats`'s dict."""
        strategies = {
            name: {k: KVRow(**row) for k, row in per_k.items()} for name, per_k in stats["strategies"].items()
        }
        return cls(stats["prompt_tokens"], stats["decoded_tokens"], strategies)


@dataclass(frozen=True)
class PerplexityResult:
    """``loopus eval`` on text: where the blocks came from, loss per loop count, calibration, early exit
    (None without thresholds) and KV strategies (None without ``--kv-strategy``)."""

    checkpoint: str
    data: str
    blocks: int
    documents: int
    block_size: int
    loops: dict[str, LossRow]
    calibration: Calibration
    tokens: int
    early_exit: EarlyExit | None
    kv_strategies: KVStats | None

    @classmethod
    def of(cls, source: dict, per_loops: dict, exits: dict | None, kv: dict | None) -> PerplexityResult:
        """``source``: checkpoint, data, blocks, documents, block_size; the rest: the measurements' dicts
        (:func:`~loopus_convert.measure.loss_per_loops`, ``early_exit_stats``, ``kv_strategy_stats``)."""
        return cls(
            **source,
            loops={k: LossRow(**row) for k, row in per_loops["loops"].items()},
            calibration=Calibration(**per_loops["calibration"]),
            tokens=per_loops["tokens"],
            early_exit=None if exits is None else EarlyExit.of(exits),
            kv_strategies=None if kv is None else KVStats.of(kv),
        )

    def to_json(self) -> dict:
        """Plain dicts and numbers, the keys in this order (``eval --json``)."""
        return asdict(self)
