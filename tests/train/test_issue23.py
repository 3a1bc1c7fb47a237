"""The trainer's items of issue 23: a LoRA run pins its base checkpoint (item 3), a signal inside the
optimizer-state save is a clean exit (7), the final evaluation is proportionate and shows progress (25), the
tied-embedding warning says what is trained (26), and a checkpoint's size is its arithmetic (25's README
figures)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

from loopus_train.state import STATE_JSON, list_checkpoints
from tests.train.conftest import REPO, run_subprocess, start_blocked, tiny_args

OPTIMIZER_WRITE = "torch.distributed.checkpoint.filesystem:_write_files_from_queue:2"  # checkpoint 4's dcp


# ------------------------------------------------------------------- 7: a signal inside dcp's save


@pytest.mark.parametrize(
    ("signum", "status", "word"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_item07_a_signal_in_the_optimizer_state_save_is_a_clean_exit(
    looped_tiny, train_text, tmp_path, signum, status, word
):
    """dcp wraps every exception of a save step (KeyboardInterrupt too) in a CheckpointException: the
    trainer unwraps the interrupt, so the CLI's clean exit applies."""
    out = tmp_path / "run"
    process = start_blocked(tiny_args(looped_tiny, train_text, out), OPTIMIZER_WRITE, tmp_path / "ready")
    root = out / "checkpoints"
    assert any(p.name.startswith(".tmp-step-00000004-") for p in root.iterdir())  # really inside the save
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and "CheckpointException" not in stderr, stderr
    assert f"{word}; nothing half-written was left behind" in stderr
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


# ------------------------------------------------------------------- 3: a LoRA run pins its base checkpoint


def _copy_base(looped_tiny, target):
    shutil.copytree(looped_tiny, target)
    return target


def _change_base(base):
    """Another model at the same path: one loop-layer weight nudged (same files, same sizes)."""
    file = base / "model.safetensors"
    tensors = load_file(str(file))
    key = next(k for k in sorted(tensors) if ".layers.3." in k and k.endswith("q_proj.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] += 0.5
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_item03_the_fingerprint_is_of_the_weights(looped_tiny, tmp_path):
    from loopus_convert import load_looped
    from loopus_train.lora import weights_fingerprint

    base = _copy_base(looped_tiny, tmp_path / "base")
    first = weights_fingerprint(load_looped(base))
    assert first == weights_fingerprint(load_looped(looped_tiny)) and first.startswith("sha256:")
    _change_base(base)
    assert weights_fingerprint(load_looped(base)) != first


def test_item03_a_lora_resume_on_a_changed_base_is_refused_in_one_line(looped_tiny, train_text, tmp_path):
    base = _copy_base(looped_tiny, tmp_path / "base")
    out = tmp_path / "run"
    flags = dict(lora_rank=4, lr=3e-3, steps=4)
    killed = run_subprocess(tiny_args(base, train_text, out, **flags), {"LOOPUS_TEST_KILL": "after-save:2"})
    assert killed.returncode == -9
    recorded = json.loads((list_checkpoints(out)[-1][1] / STATE_JSON).read_text())["base_fingerprint"]
    assert recorded.startswith("sha256:")
    original = (base / "model.safetensors").read_bytes()
    _change_base(base)
    refused = run_subprocess(tiny_args(base, train_text, out, resume=True, **flags))
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is not the one this LoRA run trained on" in errors[0], refused.stderr
    assert [step for step, _ in list_checkpoints(out)] == [2]  # nothing trained, nothing written
    (base / "model.safetensors").write_bytes(original)  # the run's own base back: the resume goes on
    resumed = run_subprocess(tiny_args(base, train_text, out, resume=True, **flags))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [step for step, _ in list_checkpoints(out)][-1] == 4


def test_item03_the_final_merge_refuses_a_base_changed_during_the_run(looped_tiny, train_text, tmp_path):
    from loopus_core.errors import LoopusError
    from loopus_train.config import TrainConfig
    from loopus_train.train import train

    base = _copy_base(looped_tiny, tmp_path / "base")
    out = tmp_path / "run"
    cfg = TrainConfig(
        checkpoint=str(base), out=str(out), data=str(train_text), block_size=32, batch_size=4, steps=2,
        loop_steps=4, supervised=2, lr=3e-3, warmup=1, save_every=2, eval_every=100, eval_loops=(1,),
        eval_thresholds=(0.9,), eval_blocks=2, device="cpu", lora_rank=4,
    )  # fmt: skip

    def change_before_the_last_save(event):
        if event["event"] == "step" and event["step"] == 2:
            _change_base(base)

    with pytest.raises(LoopusError, match="the final LoRA merge: the base checkpoint .* is not the one"):
        train(cfg, callback=change_before_the_last_save)
    assert list_checkpoints(out) == []  # the refused checkpoint was never written
    root = out / "checkpoints"
    assert not root.exists() or not any(root.iterdir())  # no temporary directory left either


# ------------------------------------------------------------------- 25: a proportionate, visible evaluation


def test_item25_the_default_evaluation_stays_within_the_trained_depth_and_the_run_size():
    from loopus_train.config import TrainConfig

    first_run = TrainConfig(checkpoint="x", out="y", steps=20, batch_size=2, loop_steps=4, supervised=2)
    assert first_run.resolved_eval_loops() == [1, 2, 4]  # K = 8 was never trained
    assert first_run.resolved_eval_blocks() == 5  # one per 8 of the 40 blocks trained (was 32)
    assert TrainConfig(checkpoint="x", out="y", steps=2, batch_size=2).resolved_eval_blocks() == 4
    assert TrainConfig(checkpoint="x", out="y", steps=2000, grad_accum=4).resolved_eval_blocks() == 32
    given = TrainConfig(checkpoint="x", out="y", eval_blocks=7, eval_loops=(1, 8))
    assert (given.resolved_eval_blocks(), given.resolved_eval_loops()) == (7, [1, 8])


class _Recorder:
    """A Progress that records each task: (description, total, advanced)."""

    def __init__(self):
        self.tasks = []

    @contextlib.contextmanager
    def task(self, description, total):
        entry = [description, total, 0]
        self.tasks.append(entry)

        def advance(n=1):
            entry[2] += n

        yield advance


def test_item25_each_evaluation_says_what_it_measures_and_shows_progress(looped_tiny, train_text, tmp_path):
    from loopus_train.config import TrainConfig
    from loopus_train.train import train

    cfg = TrainConfig(
        checkpoint=str(looped_tiny), out=str(tmp_path / "run"), data=str(train_text), block_size=32,
        batch_size=2, steps=2, loop_steps=4, supervised=2, warmup=1, save_every=2, eval_every=100,
        eval_thresholds=(0.9,), device="cpu",
    )  # fmt: skip
    events, recorder = [], _Recorder()
    result = train(cfg, callback=events.append, progress=recorder)
    announced = [e for e in events if e["event"] == "evaluating"]
    assert announced == [
        {"event": "evaluating", "step": 2, "blocks": 3, "block_size": 32, "loops": [1, 2, 4],
         "thresholds": [0.9], "max_loops": 4}
    ]  # fmt: skip
    kinds = [e["event"] for e in events]
    assert kinds.index("evaluating") < kinds.index("eval")  # said before the work, not after
    measured = {description: (total, done) for description, total, done in recorder.tasks}
    assert measured["loss at 3 loop counts"] == (1, 1)  # the 3 held-out blocks (of 4 allowed) in one batch
    assert measured["early exit"] == (2, 2)  # no exit and threshold 0.9
    assert sorted(result.last_eval["loops"]) == ["1", "2", "4"]


def test_item25_the_cli_says_what_the_evaluation_measures(cli, looped_tiny, train_text, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = cli(
        *tiny_args(looped_tiny, train_text, out, steps=2, eval_loops=None, eval_blocks=None)
    )
    assert code == 0, stderr
    line = next(line for line in stdout.splitlines() if "evaluating" in line)
    assert line == (
        "step 2: evaluating 3 held-out blocks of 32 tokens: loss at K = 1, 2, 4; early exit at 0.9 "
        "(at most 4 loops); the gate over 4 passes"
    )


def test_item25_a_checkpoints_size_is_4_bytes_per_weight_and_8_per_trained_one(
    looped_tiny, train_text, tmp_path
):
    """What the README's disk figures are computed from: the model in fp32, AdamW's two fp32 moments per
    trained parameter (the 135M model at the first run's split: 538 MB converted, 1.5 GB per checkpoint)."""
    from loopus_convert import load_looped
    from loopus_train.optim import select_trainable

    out = tmp_path / "run"
    assert run_subprocess(tiny_args(looped_tiny, train_text, out, steps=2)).returncode == 0
    model = load_looped(looped_tiny)
    weights = sum(t.numel() for t in looped_state_tensors(model))
    params = [p for _, p in select_trainable(model, ("loop", "gate", "decoder", "head"))]
    trained = sum(p.numel() for p in params)
    checkpoint = list_checkpoints(out)[-1][1]
    model_bytes = (checkpoint / "model.safetensors").stat().st_size
    optimizer_bytes = sum(p.stat().st_size for p in (checkpoint / "optimizer").rglob("*") if p.is_file())
    assert 4 * weights <= model_bytes <= 4 * weights + 64 * 1024  # + the safetensors header
    overhead = 2 * len(params) * 4096 + 64 * 1024  # dcp: each tensor a torch.save record, and metadata
    assert 8 * trained <= optimizer_bytes <= 8 * trained + overhead


def looped_state_tensors(model):
    from loopus_convert.checkpoint import looped_state

    return looped_state(model).values()


# ------------------------------------------------------------------- 26: a tied embedding in training


def test_item26_a_tied_embedding_trains_with_the_decoder_and_the_warning_says_so(
    tiny_model_dirs, tmp_path, caplog
):
    """The decision: with tied embeddings the output head is the encoder's input embedding; it trains with
    the decoder (the encoder's layers stay frozen), and the warning and the README say exactly that."""
    from loopus_convert import convert_model, load_looped
    from loopus_train.config import DEFAULT_TRAIN_PARTS
    from loopus_train.optim import select_trainable

    out = tmp_path / "gemma"
    convert_model(str(tiny_model_dirs["gemma3_text"]), out, split="2:6")
    model = load_looped(out)
    embedding = model.get_input_embeddings().weight
    with caplog.at_level(logging.WARNING, logger="loopus_train.optim"):
        named = select_trainable(model, DEFAULT_TRAIN_PARTS)
    assert any(p is embedding for _, p in named)  # trained: it is the decoder's output head
    assert not any(p.requires_grad for p in model.layers[0].parameters())  # the encoder's layers: frozen
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.endswith(
        "tied weights of the encoder and the decoder; trained with the decoder, so the encoder's other "
        "weights stay frozen but this one changes (train without decoder to keep it fixed)"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loopus_train.optim"):
        named = select_trainable(model, ("loop", "gate", "head"))
    assert not any(p is embedding for _, p in named) and not caplog.records
    readme = (REPO / "README.md").read_text()
    assert "the encoder's layers stay frozen" in readme
    assert "the input embedding is also the decoder's output head, so it trains with the decoder" in readme


# ------------------------------------------------------------------- 28: the official recipe's warmup


def test_item28_the_official_recipe_warmup_is_300_scheduler_steps_in_our_updates():
    """The official code steps its scheduler once per supervised backward pass: --supervised per batch of
    16 sequences (2 per process on 8), so 300 of its warmup steps are 300 / (supervised x batches per
    update) of our updates."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("torchrun --standalone --nproc-per-node 8 -m loopus finetune looped/qwen3-1.7b")
    command = readme[start:]
    command = command[: command.index("```")].replace("\\\n", " ")
    flags = dict(re.findall(r"--([a-z-]+) (\S+)", command))
    batches = int(flags["batch-size"]) * int(flags["grad-accum"]) / 16  # official batches per update
    assert int(flags["warmup"]) == round(300 / (int(flags["supervised"]) * batches))  # 300 / 65 -> 5


# ------------------------------------------------------------------- 30: figures with their recorded output


UNRECORDED = (  # figures the README quoted from runs whose output was never committed (removed, item 30)
    "4 min 44 s", "11 min 39 s", "510 tests", "+0.079 nats", "-0.80 (no massive", "1.34x less CPU",
    "1.87x less", "within 0.027", "1.29x", "58 min", "24.45 / 23.44", "1.08x the peak", "0.5x of one process",
    "0.62x", "63% of them", "+0.19, +0.33, +3.11", "under 5 minutes", "tested to 1e-6",
)  # fmt: skip


def test_item30_the_readme_quotes_only_figures_with_a_committed_output():
    readme = (REPO / "README.md").read_text()
    assert [figure for figure in UNRECORDED if figure in readme] == []
    cited = set(re.findall(r"benchmarks/(?:evidence/)?results/[\w.-]+\.json", readme))
    assert cited and all((REPO / path).is_file() for path in cited), cited
    assert "unrecorded" in (REPO / "benchmarks" / "README.md").read_text()


def test_item25_the_readme_disk_figures_are_those_of_the_embedded_model(default_model_dir):
    """538 MB converted, 1.47 GB per training checkpoint at the first run's split (what `--split auto` takes:
    the default analysis' pick, seed 0 of the committed record) and parts: counted on the embedded model's
    config (meta device, no weights read) with the rule tested above."""
    import json

    from transformers import AutoConfig

    from loopus_convert.build import loopus_config
    from loopus_convert.checkpoint import looped_state
    from loopus_convert.modeling_loopus import LoopusForCausalLM
    from loopus_core.split import LayerSplit
    from loopus_train.config import DEFAULT_TRAIN_PARTS
    from loopus_train.optim import select_trainable

    record = json.loads((REPO / "benchmarks" / "results" / "analyze_seeds.json").read_text())
    split = next(run["split"] for run in record["runs"] if run["seed"] == 0)
    base = AutoConfig.from_pretrained(default_model_dir)
    with torch.device("meta"):
        model = LoopusForCausalLM(loopus_config(base, LayerSplit.parse(split, 30), 1, "residual"))
    weights = sum(t.numel() for t in looped_state(model).values())
    trained = sum(p.numel() for _, p in select_trainable(model, DEFAULT_TRAIN_PARTS))
    readme = (REPO / "README.md").read_text()
    assert f"**{4 * weights / 1e6:.0f} MB** ({weights / 1e6:.1f}M weights x 4 bytes)" in readme
    assert f"parameter ({trained / 1e6:.1f}M at the split `auto` takes here, {split}," in readme
    assert f"**{(4 * weights + 8 * trained) / 1e9:.2f} GB** per" in readme
