"""Numbers and figures of the replication study, computed from the kept metrics JSONL files only.

    .venv/bin/python examples/replication/summarize.py [--results examples/replication/results]

Per run, a few scalars that the paper's claims are about (held-out accuracy, token entropy, response length,
repetition and truncation rates, regime fractions); per arm their mean, standard deviation, min and max over seeds.
docs/replication.md quotes these numbers; re-running this script on the committed metrics reproduces them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402
from megatron_dispo.trainer.plotting import DEFAULT_PANELS, Panel, plot_runs, series  # noqa: E402

LAST = 5
"""Steps averaged at the end of a run ("last-5" figures): single steps of a tiny model are noisy."""

STUDY_PANELS: tuple[Panel, ...] = tuple(panel for panel in DEFAULT_PANELS if panel.title != "Rollout accuracy")
"""The paper's Figs. 5-8 panels (accuracy, entropy, length, regime fractions) plus the two failure signals."""


def _values(records: Sequence[Mapping], key: str) -> np.ndarray:
    return series(records, key)[1]


def _reduced(values: np.ndarray, reduce: Callable[[np.ndarray], float]) -> float:
    """NaN when the run never logged the key (e.g. no step had a mixed group, so no update and no train/ keys)."""
    return float(reduce(values)) if values.size else float("nan")


def _last(key: str) -> Callable[[Sequence[Mapping]], float]:
    return lambda records: _reduced(_values(records, key)[-LAST:], np.mean)


def _first(key: str) -> Callable[[Sequence[Mapping]], float]:
    return lambda records: _reduced(_values(records, key)[:3], np.mean)


def _over_run(key: str, reduce: Callable[[np.ndarray], float]) -> Callable[[Sequence[Mapping]], float]:
    return lambda records: _reduced(_values(records, key), reduce)


def _heldout(records: Sequence[Mapping], which: str) -> float:
    steps, values = series(records, "eval/heldout/accuracy")
    if which == "start":
        return float(values[steps == 0][0])
    if which == "final":
        return float(values[-1])
    return float(values[steps > 0].mean())  # "mean_after": every eval after step 0


RUN_SCALARS: dict[str, Callable[[Sequence[Mapping]], float]] = {
    "heldout_start": lambda r: _heldout(r, "start"),
    "heldout_final": lambda r: _heldout(r, "final"),
    "heldout_gain": lambda r: _heldout(r, "final") - _heldout(r, "start"),
    "heldout_mean_after_start": lambda r: _heldout(r, "mean_after"),
    "rollout_accuracy_last5": _last("rollout/accuracy"),
    "entropy_first3": _first("train/entropy"),
    "entropy_last5": _last("train/entropy"),
    "entropy_mean": _over_run("train/entropy", np.mean),
    "length_first3": _first("rollout/response/len_mean"),
    "length_last5": _last("rollout/response/len_mean"),
    "length_max": _over_run("rollout/response/len_mean", np.max),
    "length_min": _over_run("rollout/response/len_mean", np.min),
    "repetition_frac_mean": _over_run("rollout/finish/repetition_frac", np.mean),
    "repetition_frac_max": _over_run("rollout/finish/repetition_frac", np.max),
    "length_trunc_frac_mean": _over_run("rollout/finish/length_frac", np.mean),
    "length_trunc_frac_max": _over_run("rollout/finish/length_frac", np.max),
    "log_ratio_abs_mean": _over_run("train/log_ratio_abs_mean", np.mean),
    "clip_frac_mean": _over_run("train/clip_frac", np.mean),
    **{f"regime{k}_token_frac": _over_run(f"train/regime{k}/token_frac", np.mean) for k in range(1, 5)},
    **{f"regime{k}_is_weight_mean": _over_run(f"train/regime{k}/is_weight_mean", np.mean) for k in range(1, 5)},
    "empty_steps": lambda r: float(sum(1 for x in r if x.get("rollout/dynamic_sampling/empty_batch") == 1.0)),
}
"""Scalar per run -> what the claims are judged on. Steps without an update (no mixed group) have no train/ keys."""


def run_scalars(records: Sequence[Mapping]) -> dict[str, float]:
    return {name: fn(records) for name, fn in RUN_SCALARS.items()}


def summarize_study(results: Path, arms: Mapping[str, object], seeds: Sequence[int]) -> dict:
    """{"arms": {arm: {scalar: {mean, sd, min, max, per_seed}}}} over the seeds present under ``results``."""
    out: dict[str, dict] = {"arms": {}}
    for arm in arms:
        per_seed = {}
        for seed in seeds:
            run_dir = results / arm / f"seed{seed}"
            if (run_dir / "metrics.jsonl").is_file():
                per_seed[seed] = run_scalars(read_metrics(run_dir))
        if not per_seed:
            continue
        stats = {}
        for name in RUN_SCALARS:
            values = [per_seed[s][name] for s in per_seed]
            stats[name] = {
                "mean": statistics.fmean(values),
                "sd": statistics.pstdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "per_seed": {str(s): per_seed[s][name] for s in per_seed},
            }
        out["arms"][arm] = stats
    return out


TABLE_COLUMNS = (
    "heldout_start", "heldout_final", "heldout_gain", "heldout_mean_after_start", "entropy_first3", "entropy_last5",
    "length_first3", "length_last5", "length_max", "repetition_frac_max", "length_trunc_frac_max",
    "log_ratio_abs_mean", "regime1_token_frac", "regime2_token_frac", "regime3_token_frac", "regime4_token_frac",
)  # fmt: skip


def paired_claims(summary: Mapping, claims: Sequence[Mapping[str, str]]) -> list[dict]:
    """Each claim as a paired comparison: per seed, arm minus reference of one scalar (same seed = same warm-up model,
    data order and sampling seeds), and how many seeds differ in the claimed direction."""
    rows = []
    for claim in claims:
        arms = summary["arms"]
        if claim["arm"] not in arms or claim["reference"] not in arms:
            continue
        arm, reference = arms[claim["arm"]][claim["scalar"]], arms[claim["reference"]][claim["scalar"]]
        seeds = [s for s in arm["per_seed"] if s in reference["per_seed"]]
        diffs = {s: arm["per_seed"][s] - reference["per_seed"][s] for s in seeds}
        sign = 1.0 if claim["expect"] == "higher" else -1.0
        rows.append(
            {
                **claim,
                "diff_per_seed": diffs,
                "diff_mean": statistics.fmean(diffs.values()) if diffs else float("nan"),
                "seeds_agreeing": sum(1 for d in diffs.values() if sign * d > 0),
                "seeds": len(diffs),
            }
        )
    return rows


def _cell(stat: Mapping[str, float]) -> str:
    mean, sd = stat["mean"], stat["sd"]
    return "n/a" if not np.isfinite(mean) else f"{mean:.3f} ± {sd:.3f}"


def write_summary(summary: Mapping, results: Path) -> None:
    """summary.json (everything) and summary.md (mean ± sd over seeds of the headline scalars)."""
    results.mkdir(parents=True, exist_ok=True)
    previous = results / "summary.json"
    if previous.is_file():  # keep the timing of earlier invocations (an interrupted study continued later)
        summary = {**summary, "history": [*json.loads(previous.read_text()).get("history", [])]}
    if "study" in summary:
        summary = {**summary, "history": [*summary.get("history", []), summary["study"]]}
    (results / "summary.json").write_text(json.dumps(_finite_or_null(summary), indent=1, sort_keys=True) + "\n")
    lines = [
        "| arm | " + " | ".join(TABLE_COLUMNS) + " |",
        "|---|" + "---|" * len(TABLE_COLUMNS),
    ]
    for arm, stats in summary["arms"].items():
        cells = [_cell(stats[c]) for c in TABLE_COLUMNS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    claim_lines = [
        "| claim | arm - reference | scalar | expected | difference per seed | mean | seeds agreeing |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary.get("claims", []):
        per_seed = " / ".join(f"{d:+.3f}" for d in row["diff_per_seed"].values())
        claim_lines.append(
            f"| {row['claim']} | {row['arm']} - {row['reference']} | {row['scalar']} | {row['expect']} | {per_seed} "
            f"| {row['diff_mean']:+.3f} | {row['seeds_agreeing']}/{row['seeds']} |"
        )
    (results / "summary.md").write_text(
        f"Mean ± sd over seeds (last-5 = mean of the last {LAST} steps; first3 = steps 1-3). Generated by "
        "examples/replication/summarize.py from the metrics JSONL files in this folder.\n\n"
        + "\n".join(lines)
        + "\n\nThe paper's claims as paired comparisons (study.yaml `claims`):\n\n"
        + "\n".join(claim_lines)
        + "\n"
    )


def _finite_or_null(value: object) -> object:
    """JSON has no NaN: runs that never logged a metric get null."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(v) for v in value]
    return value


def write_figures(
    results: Path, figures: Mapping[str, Sequence[str]], labels: Mapping[str, str], seeds: Sequence[int]
) -> list[Path]:
    """One folder of PNGs per figure (mean and min-max band over seeds), drawn by the project's plotting tool."""
    written: list[Path] = []
    for figure, arms in figures.items():
        runs = {
            labels.get(arm, arm): [results / arm / f"seed{s}" for s in seeds if (results / arm / f"seed{s}").is_dir()]
            for arm in arms
        }
        runs = {label: dirs for label, dirs in runs.items() if dirs}
        if runs:
            written += plot_runs(runs, results / "plots" / figure, panels=STUDY_PANELS)
    return written


def write_report(
    results: Path, study: Mapping, arms: Sequence[str], seeds: Sequence[int], invocation: Mapping | None = None
) -> list[Path]:
    """summary.json / summary.md (per-arm scalars and the paired claims, plus ``invocation`` in the history) and the
    figures, for the given arms and seeds: what both the study command and this script write."""
    summary = summarize_study(results, arms, seeds)
    summary["claims"] = paired_claims(summary, study.get("claims", []))
    if invocation is not None:
        summary["study"] = dict(invocation)
    write_summary(summary, results)
    figures = {fig: [a for a in members if a in arms] for fig, members in study["figures"].items()}
    labels = {name: spec["label"] for name, spec in study["arms"].items()}
    return write_figures(results, figures, labels, seeds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--study", default=str(HERE / "study.yaml"))
    args = parser.parse_args(argv)
    study = yaml.safe_load(Path(args.study).read_text())
    results = Path(args.results)
    for path in write_report(results, study, list(study["arms"]), study["seeds"]):
        print(path)
    print(results / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
