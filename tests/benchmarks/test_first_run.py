"""benchmarks/first_run.py times the README's own first-run commands, read from the README (one copy)."""

from __future__ import annotations

from benchmarks.first_run import readme_commands


def test_the_first_run_benchmark_reads_the_readme_commands_in_order():
    commands = readme_commands()
    assert [c[1] for c in commands] == ["analyze", "convert", "generate", "finetune", "eval"]
    convert, finetune, evaluate = commands[1], commands[3], commands[4]
    assert convert[convert.index("--from") + 1].startswith("reports/")  # analyze's default --out
    assert finetune[2] == convert[convert.index("--out") + 1]
    assert evaluate[2] == finetune[finetune.index("--out") + 1]


def test_the_machine_record_names_the_cpu_and_measures_a_matmul_rate():
    from benchmarks.first_run import VECTOR_FLAGS, machine

    host = machine()
    assert host["cpus"] >= 1 and host["torch_threads"] >= 1
    assert host["matmul_gflops"] > 0
    assert set(host["vector"]) <= VECTOR_FLAGS
