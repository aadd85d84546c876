"""Speed of IFEval scoring: the 541 prompts x 3 responses files, strict and loose, in a fresh process.

    python benchmarks/bench_ifeval.py [--files 3] [--repeats 3]

The responses are synthesised (`ifeval_corpus.py`: every instruction's pass and fail forms, chatty first and last
lines for loose scoring). Reported: the import of olmo_iv.evals.ifeval (which imports torch through olmo_iv), the
whole job (all files: read, match, score strict and loose, summarise) the first time, which also loads the Punkt
model and langdetect's profiles, and again `--repeats` times. Result JSON: benchmarks/results/ifeval-cpu.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

t_start = time.perf_counter()
from olmo_iv.evals import ifeval  # noqa: E402

t_import = time.perf_counter() - t_start

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save_result  # noqa: E402
from ifeval_corpus import write_response_files  # noqa: E402


def score_all(files: list[Path]) -> int:
    verdicts = 0
    for path in files:
        rows = ifeval.score_file(path)
        ifeval.summarize(rows)
        verdicts += 2 * sum(len(r.instruction_id_list) for r in rows)
    return verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "ifeval-cpu.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        files = write_response_files(Path(tmp), args.files)
        t = time.perf_counter()
        verdicts = score_all(files)  # cold: loads the Punkt model and langdetect's profiles on the way
        cold = time.perf_counter() - t
        warm = []
        for _ in range(args.repeats):
            ifeval.text.clear_caches()  # the per-text caches would make a repeat on the same files free
            t = time.perf_counter()
            score_all(files)
            warm.append(time.perf_counter() - t)
    payload = {"import_s": round(t_import, 3), "job_cold_s": round(cold, 3), "job_warm_s": [round(x, 3) for x in warm],
               "job_warm_median_s": round(statistics.median(warm), 3), "verdicts_per_job": verdicts,
               "import_plus_cold_job_s": round(t_import + cold, 3)}
    save_result(args.out, "ifeval", {"files": args.files, "prompts_per_file": 541, "repeats": args.repeats}, payload,
                "cpu")
    print(f"import {t_import:.2f} s; {args.files} files x 541 prompts ({verdicts} verdicts, strict + loose): "
          f"cold {cold:.2f} s (with model loading), warm median {statistics.median(warm):.2f} s; wrote {args.out}")

if __name__ == "__main__":
    main()
