"""Exploratory: the default analysis with the race at a 90% t level and a work cap of 1/4 (rounds 0 and 1)."""
import json
import time

from loopus_analyze import race
from loopus_analyze.analyze import run_analysis

race._Intervals.bounds.__defaults__ = (0.9,)
race._Intervals.difference_low.__defaults__ = (0.9,)
race.ELIMINATION_LEVEL = 0.9
race.RACE_SHARE = 1 / 4
out = []
for seed in range(5):
    t = time.perf_counter()
    r = run_analysis(None, out=f"/work/scratch/lvl90/seed{seed}", seed=seed)
    a = json.load(open(r.json_path))
    rounds = a["repeat_map"]["race"]["rounds"]
    rec = {"seed": seed, "split": r.split, "confidence": r.confidence,
           "wall": round(time.perf_counter() - t, 1),
           "rounds": [(x["entered"], x["survivors"], x["windows"]) for x in rounds],
           "stop": a["repeat_map"]["race"]["stop"], "steps": r.wall_time_s}
    print(json.dumps(rec), flush=True)
    out.append(rec)
# wrapped, with the command, into benchmarks/results/analyze_seeds_level90.json
json.dump(out, open("/work/scratch/lvl90/results.json", "w"), indent=1)
