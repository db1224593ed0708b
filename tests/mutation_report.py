"""Scores per module from ``make mutate``'s results (``mutants/**/*.meta``), as docs/mutation.md's table.

    .venv/bin/python tests/mutation_report.py            # the table
    .venv/bin/python tests/mutation_report.py --list     # plus every survivor / untested mutant

Statuses are mutmut's (``mutmut.stats.status_by_exit_code``): a failing test kills a mutant; a timeout
or a crash under the mutant counts as killed too (the mutant broke the program); "no tests" means no
test in the mutation tier calls the mutated function; "pending" = not run yet.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def classify(code: int | None) -> str:
    """mutmut's own status names; a timeout or a crash under the mutant counts as killed."""
    from mutmut.stats import status_by_exit_code

    status = status_by_exit_code[code]
    if status in ("timeout", "segfault"):
        return "killed"
    return "pending" if status == "not checked" else status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", default="mutants", help="mutmut's working folder")
    parser.add_argument("--list", action="store_true", help="also list survivors and untested mutants")
    args = parser.parse_args()
    rows, missed = [], []
    for meta in sorted(Path(args.mutants).glob("raydb/**/*.meta")):
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        counts = Counter(classify(c) for c in codes.values())
        run = len(codes) - counts["pending"]
        score = counts["killed"] / run if run else 0.0
        rows.append((str(meta.relative_to(args.mutants))[: -len(".meta")], len(codes), run, counts, score))
        missed += [(name, classify(code)) for name, code in sorted(codes.items())
                   if classify(code) in ("survived", "no tests")]
    print("| module | mutants | run | killed | survived | no tests | score |")
    print("|---|---|---|---|---|---|---|")
    for path, total, run, c, score in rows:
        print(f"| `{path}` | {total} | {run} | {c['killed']} | {c['survived']} | {c['no tests']} | "
              f"{100 * score:.1f} % |")
    if args.list:
        print()
        for name, what in missed:
            print(f"{what:9s} {name}")


if __name__ == "__main__":
    main()
