"""Data benchmarks: token-shard preparation memory flat in the corpus size, and loader throughput.

1. Peak memory of preparing a generated corpus (JSONL) of S MB and of 10 x S MB (default 12 and 120 MB of
   text), each in a fresh subprocess with a fresh cache: the peak RSS of the main process (Linux VmHWM) and
   of the largest tokenising worker (``RUSAGE_CHILDREN``), their sum, and the ratio 10x / 1x; tokens/s and
   the shard sizes.
2. Loader throughput: tokens/s of reading random training blocks (``PackedBlocks[indices]``, the trainer's
   access pattern) from the 10x corpus's shards, next to the tokens/s the default training recipe consumes
   on this machine (``--train-tokens-per-s``, measured by ``bench_train.py``).

Tokenizer: the embedded default model's (SmolLM2, 49,152 ids: uint16 shards).

Usage: HF_HUB_OFFLINE=1 python benchmarks/bench_data.py [--mb 12] [--workers 2] [--train-tokens-per-s 5.7]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no what up out into can "
    "loop block state gate layer model token train data shard memory map document held out split seed "
    "river mountain window garden letter number market winter summer morning evening question answer"
).split()


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL file of about ``megabytes`` MB of word-salad documents (50 to 2,000 words each)."""
    rng = random.Random(seed)
    target, written, documents = int(megabytes * 2**20), 0, 0
    with path.open("w") as fh:
        while written < target:
            words = rng.choices(WORDS, k=rng.randint(50, 2000))
            line = json.dumps({"text": " ".join(words).capitalize() + "."}) + "\n"
            fh.write(line)
            written += len(line)
            documents += 1
    return documents


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM")


def child_prepare(corpus: Path, cache: Path, workers: int) -> dict:
    """Prepare ``corpus`` into ``cache`` in this fresh process; peak memories and throughput."""
    os.environ["LOOPUS_DATA_CACHE"] = str(cache)
    from transformers import AutoTokenizer

    from loopus_core.models import default_model_dir
    from loopus_train.shards import open_data

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the preparation alone
    began = time.perf_counter()
    shards = open_data(tokenizer, str(corpus), workers=workers)
    seconds = time.perf_counter() - began
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "text_mb": corpus.stat().st_size / 2**20,
        "documents": shards.num_documents,
        "tokens": shards.num_tokens,
        "shard_mib": [round(n / 2**20, 1) for n in shards.shard_sizes()],
        "seconds": seconds,
        "tokens_per_s": shards.num_tokens / seconds,
        "main_peak_mib": _hwm() / 2**20,
        "worker_peak_mib": worker_peak / 2**20,
        "shards": str(shards.path),
    }


def loader_throughput(shards_path: Path, block: int, batch: int, seconds: float) -> dict:
    """Random training batches read from the shards for ``seconds``: tokens/s."""
    import numpy as np

    from loopus_train.data import PackedBlocks, split_documents
    from loopus_train.shards import TokenShards

    shards = TokenShards.open(shards_path, "bench")
    train_ids, _ = split_documents(shards.num_documents, 0.05, 0, "bench")
    blocks = PackedBlocks(shards, train_ids, block)
    rng = np.random.default_rng(0)
    read, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        blocks[rng.integers(0, len(blocks), batch).tolist()]
        read += batch * block
    return {"tokens_per_s": read / (time.perf_counter() - began), "block": block, "batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("CORPUS", "CACHE", "WORKERS"))
    parser.add_argument("--mb", type=float, default=12.0, help="the 1x corpus in MB of text (10x: ten times)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--train-tokens-per-s", type=float, default=5.7, help="bench_train.py's default recipe"
    )
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "loopus-bench-data"))
    args = parser.parse_args()
    if args.child:
        corpus, cache, workers = args.child
        print(json.dumps(child_prepare(Path(corpus), Path(cache), int(workers))))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for scale in (1, 10):
        corpus = work / f"corpus-{scale}x.jsonl"
        if not corpus.is_file():
            generate_corpus(corpus, args.mb * scale, seed=scale)
        cache = Path(tempfile.mkdtemp(dir=work, prefix=f"cache-{scale}x-"))
        cmd = [sys.executable, __file__, "--child", str(corpus), str(cache), str(args.workers)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        results[f"{scale}x"] = json.loads(out.strip().splitlines()[-1])
    one, ten = results["1x"], results["10x"]
    loader = loader_throughput(Path(ten["shards"]), block=256, batch=8, seconds=10.0)
    report = {
        "machine": f"{os.cpu_count()} CPUs, {args.workers} tokenising workers",
        "prepare": results,
        "main_peak_ratio_10x_over_1x": ten["main_peak_mib"] / one["main_peak_mib"],
        "worker_peak_ratio_10x_over_1x": ten["worker_peak_mib"] / one["worker_peak_mib"],
        "sum_peak_ratio_10x_over_1x": (ten["main_peak_mib"] + args.workers * ten["worker_peak_mib"])
        / (one["main_peak_mib"] + args.workers * one["worker_peak_mib"]),
        "loader": loader,
        "loader_over_training": loader["tokens_per_s"] / args.train_tokens_per_s,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
