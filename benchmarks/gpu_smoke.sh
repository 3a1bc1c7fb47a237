#!/usr/bin/env bash
# GPU smoke test of the trainer, under 5 minutes on one GPU (written without a GPU at hand: see README.md).
#
#   1. bench_train.py on the GPU, bf16 autocast: tokens/s of the default recipe (20 loop steps, 5 supervised)
#      next to a plain transformers forward+backward of the same layers, and the peak memory of a training
#      step at 2 and 16 loop steps (RDS, and full backpropagation beside it);
#   2. `loopus finetune` for 2 updates on one GPU (bf16, SDPA, --compile of the loop block);
#   3. with more than one GPU: the same 2 updates under torchrun on 2 GPUs (FSDP2, NCCL).
#
# The base model is BASE (a Hugging Face model directory), else the embedded default model (SmolLM2-135M),
# else a randomly initialised model of SmolLM2-135M's shape (speed and memory do not depend on the weights).
# DEVICE=cpu BLOCK=32 BATCH=1 NPROC=2 runs the same steps on a CPU (to check the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
BLOCK=${BLOCK:-1024}
BATCH=${BATCH:-8}
WORK=${WORK:-/tmp/loopus-gpu-smoke}
export LOOPUS_DATA_CACHE="$WORK/shards"
mkdir -p "$WORK"
start=$(date +%s)

if [ "$DEVICE" = cuda ]; then
  GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
  [ "$GPUS" -ge 1 ] || { echo "gpu_smoke: no CUDA device" >&2; exit 1; }
  PRECISION=bf16
else
  GPUS=0
  PRECISION=fp32
fi
NPROC=${NPROC:-$([ "$GPUS" -gt 1 ] && echo 2 || echo 1)}
$PY -c "import torch; print('torch', torch.__version__, '| devices:', torch.cuda.device_count(), \
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

BASE=${BASE:-$($PY - "$WORK" <<'PY'
import sys
from pathlib import Path

from loopus_core.errors import LoopusError
from loopus_core.models import default_model_dir

try:
    print(default_model_dir())
except LoopusError:  # no embedded model on this machine: a random model of the same shape
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(sys.argv[1]) / "random-smollm2-135m"
    if not (out / "config.json").is_file():
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                             tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(out)
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        from loopus_core.texts import load_texts

        tok = Tokenizer(models.BPE())  # byte-level BPE learnt from the built-in corpus
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(load_texts(None), trainers.BpeTrainer(
            vocab_size=8192, special_tokens=["<pad>", "<bos>", "<eos>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                pad_token="<pad>").save_pretrained(out)
    print(out)
PY
)}
echo "base model: $BASE"

echo "== 1. bench_train.py on $DEVICE ($PRECISION), block $BLOCK x batch $BATCH"
$PY benchmarks/bench_train.py --device "$DEVICE" --precision "$PRECISION" --base "$BASE" \
  --block-size "$BLOCK" --batch-size "$BATCH" --repeats 3 --work "$WORK"

CKPT="$WORK/$(basename "$BASE")-4-26"
[ -d "$CKPT" ] || CKPT="$WORK/smol-4-26"
RUN=(finetune "$CKPT" --steps 2 --block-size "$BLOCK" --batch-size "$((2 * NPROC))" --loop-steps 20
     --supervised 5 --eval-every 2 --eval-blocks 4 --eval-loops 1,20 --save-every 2 --device "$DEVICE"
     --precision "$PRECISION")

echo "== 2. loopus finetune, 2 updates on one device (--compile)"
rm -rf "$WORK/run-1"
$PY -m loopus "${RUN[@]}" --out "$WORK/run-1" $([ "$DEVICE" = cuda ] && echo --compile)
tail -n 3 "$WORK/run-1/metrics.jsonl" | cut -c1-240

if [ "$NPROC" -gt 1 ]; then
  echo "== 3. loopus finetune, 2 updates under torchrun on $NPROC processes (FSDP2)"
  rm -rf "$WORK/run-$NPROC"
  $PY -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m loopus "${RUN[@]}" --out "$WORK/run-$NPROC"
  tail -n 3 "$WORK/run-$NPROC/metrics.jsonl" | cut -c1-240
else
  echo "== 3. skipped: one GPU (the FSDP run needs two)"
fi
echo "gpu_smoke: done in $(( $(date +%s) - start )) s"
