#!/usr/bin/env python
"""Plot run directories as PNG learning curves (accuracy, entropy, length, regime fractions).

    python tools/plot_run.py runs/dispo_s0 runs/dispo_s1 --out plots/
    python tools/plot_run.py dispo=runs/dispo_s0,runs/dispo_s1 cispo=runs/cispo_s0 --out plots/

A bare directory is its own series (label = folder name); ``label=dir1,dir2`` groups seeds into one series drawn as
mean with a min-max band.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_dispo.trainer.plotting import plot_runs


def parse_runs(specs: list[str]) -> dict[str, list[Path]]:
    runs: dict[str, list[Path]] = {}
    for spec in specs:
        label, _, dirs = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
        paths = [Path(d) for d in dirs.split(",") if d]
        for path in paths:
            if not (path / "metrics.jsonl").is_file():
                raise SystemExit(f"error: {path} has no metrics.jsonl; pass run directories (trainer.run_dir).")
        runs.setdefault(label, []).extend(paths)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run dirs, or label=dir1,dir2 to group seeds")
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    args = parser.parse_args(argv)
    for path in plot_runs(parse_runs(args.runs), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
