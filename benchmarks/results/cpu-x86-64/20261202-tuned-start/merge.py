"""The full tuned quality table from three runs of benchmarks/quality_tuned.py (same teacher,
tuning noise seed 1000, evaluation seed 0, 500 samples, guidance 1.5):
  ../20261202-tuned        karras, ays, tuned (L2, from sigma_max) at NFE 3, 4, 5
  ../20261202-tuned-nfe6-10 the same at NFE 6, 8, 10 (--max-evals 40)
  .                        tuned+start+features at NFE 3..10 (--tune-start --distance features
                           --max-evals 40), mixture.json (tune_start, start_levels=(), as
                           quality_tuned.py now runs it; run.log/quality_tuned.md mixture rows
                           used the lowered starts: Euler 0.230, misses)

    PYTHONPATH=. python benchmarks/results/cpu-x86-64/20261202-tuned-start/merge.py
"""
import importlib.util
import json
from pathlib import Path

here = Path(__file__).parent
spec = importlib.util.spec_from_file_location(
    "qt", here.parents[2] / "quality_tuned.py")
qt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qt)
rows = []
for d in ("20261202-tuned", "20261202-tuned-nfe6-10"):
    rows += json.loads((here.parent / d / "quality_tuned.json").read_text())["rows"]
new = json.loads((here / "quality_tuned.json").read_text())["rows"]
rows += new
order = {k: i for i, k in enumerate(("karras", "ays", "tuned", "tuned+start+features"))}
rows.sort(key=lambda r: (qt.SOLVERS.index(r["solver"]), order[r["schedule"]]))
mixture = json.loads((here / "mixture.json").read_text())
caption = ("FD-digits (recognised) of 500 samples, guidance 1.5, evaluation seed 0; tuned rows:"
           " 100 tuning samples from seed 1000 (disjoint), teacher dpmpp_2m 100 Karras steps,"
           " Nelder-Mead. `tuned`: L2, first level sigma_max (NFE 3-5: 80 runs dpmpp_2m, 40"
           " others; NFE 6-10: 40). `tuned+start+features`: first level tuned too, distance in"
           " the digit classifier's features, 40 runs. 1 torch thread. Real held-out digits:"
           " FD ~10.7.")
(here / "quality_tuned_all.md").write_text(qt.markdown(rows, qt.NFES, mixture, caption))
print((here / "quality_tuned_all.md").read_text())
