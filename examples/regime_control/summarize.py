"""Numbers, claim verdicts and figures of the regime-control study, computed from the kept metrics JSONL files only.

    .venv/bin/python examples/regime_control/summarize.py [--results examples/regime_control/results]

Per run: the replication study's scalars (held-out accuracy, entropy, length, repetition and truncation rates, regime
fractions; examples/replication/summarize.py) plus the controller's: the share of steps whose entropy lies inside the
band, the bounds in force at the end and how many steps each guard was up. Per arm: mean, sd, min, max over the seeds
present. Per claim and seed: a verdict (study.yaml `claims`). Re-running this script on the committed metrics
reproduces summary.json / summary.md.
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

from examples.replication.summarize import LAST, RUN_SCALARS, STUDY_PANELS, _finite_or_null  # noqa: E402
from megatron_dispo.trainer.metrics import read_metrics  # noqa: E402
from megatron_dispo.trainer.plotting import Panel, plot_runs, series  # noqa: E402

CONTROL_PANELS: tuple[Panel, ...] = (
    Panel("eps_high_pos (Regime 1)", ("control/eps_high_pos",), "bound in force"),
    Panel("eps_low_pos (Regime 2)", ("control/eps_low_pos",), "bound in force"),
    Panel("eps_high_neg (Regime 3)", ("control/eps_high_neg",), "bound in force"),
    Panel("eps_low_neg (Regime 4)", ("control/eps_low_neg",), "bound in force"),
    Panel("Entropy and band", ("train/entropy", "control/band_low", "control/band_high"), "nats / token", True),
    Panel("Guards up", ("control/regime3_guard", "control/regime4_guard"), "0 / 1", True),
    Panel("Response length", ("rollout/response/len_mean",), "tokens"),
    Panel("Repetition-truncated responses", ("rollout/finish/repetition_frac",), "fraction"),
    Panel("Held-out accuracy", ("eval/heldout/accuracy",), "accuracy"),
)
"""The controller's view of a run: the four bounds in force, its signals, band and guard states."""

TABLE_COLUMNS = (
    "heldout_start", "heldout_mean_after_start", "heldout_final", "entropy_first3", "entropy_last5",
    "entropy_in_band_frac", "length_first3", "length_last5", "length_min", "repetition_frac_max",
    "length_trunc_frac_max", "eps_high_pos_last", "eps_low_pos_last", "eps_high_neg_last", "eps_low_neg_last",
    "regime3_guard_steps", "regime4_guard_steps",
)  # fmt: skip


def entropy_in_band_frac(records: Sequence[Mapping], band: Mapping[str, float]) -> float:
    """Share of the steps after calibration whose token entropy lies in [band_low, band_high] x the mean entropy of
    the first `calibration_steps` steps: the controller's own band (its calibration reads the same `train/entropy`),
    measured the same way on arms without a controller."""
    values = series(records, "train/entropy")[1]
    calibration = int(band["calibration_steps"])
    if values.size <= calibration:
        return float("nan")
    reference = float(values[:calibration].mean())
    after = values[calibration:]
    inside = (after >= band["band_low"] * reference) & (after <= band["band_high"] * reference)
    return float(inside.mean())


def _last_value(key: str, default: float = float("nan")) -> Callable[[Sequence[Mapping]], float]:
    def last(records: Sequence[Mapping]) -> float:
        values = series(records, key)[1]
        return float(values[-1]) if values.size else default

    return last


def _count(key: str) -> Callable[[Sequence[Mapping]], float]:
    return lambda records: float(series(records, key)[1].sum())


def study_scalars(band: Mapping[str, float]) -> dict[str, Callable[[Sequence[Mapping]], float]]:
    """The replication study's per-run scalars plus the controller's."""
    return {
        **RUN_SCALARS,
        "entropy_in_band_frac": lambda records: entropy_in_band_frac(records, band),
        **{f"{bound}_last": _last_value(f"control/{bound}") for bound in
           ("eps_high_pos", "eps_low_pos", "eps_high_neg", "eps_low_neg")},
        "regime3_guard_steps": _count("control/regime3_guard"),
        "regime4_guard_steps": _count("control/regime4_guard"),
    }  # fmt: skip


def summarize_runs(results: Path, study: Mapping) -> dict:
    """{"arms": {arm: {scalar: {mean, sd, min, max, per_seed}}}} over every arm and seed kept under ``results``."""
    scalars = study_scalars(study["band"])
    out: dict[str, dict] = {"arms": {}}
    for arm in study["arms"]:
        per_seed = {}
        for seed_dir in sorted((results / arm).glob("seed*"), key=lambda p: int(p.name[4:])):
            if (seed_dir / "metrics.jsonl").is_file():
                records = read_metrics(seed_dir)
                per_seed[seed_dir.name[4:]] = {name: fn(records) for name, fn in scalars.items()}
        if not per_seed:
            continue
        stats = {}
        for name in scalars:
            values = [v[name] for v in per_seed.values()]
            finite = [v for v in values if np.isfinite(v)]
            stats[name] = {
                "mean": statistics.fmean(finite) if finite else float("nan"),
                "sd": statistics.pstdev(finite) if len(finite) > 1 else 0.0,
                "min": min(finite) if finite else float("nan"),
                "max": max(finite) if finite else float("nan"),
                "per_seed": {seed: v[name] for seed, v in per_seed.items()},
            }
        out["arms"][arm] = stats
    return out


def seed_verdict(claim: Mapping, value: float, reference: float | None) -> tuple[str, float]:
    """('supported' | 'not supported' | 'n/a', the number judged) for one seed. Paired: the difference arm -
    reference must go the expected way by more than `margin` (not_lower: must not fall below -margin)."""
    if claim["kind"] == "threshold":
        if not np.isfinite(value):
            return "n/a", value
        return ("supported" if value >= claim["at_least"] else "not supported"), value
    assert reference is not None
    if not (np.isfinite(value) and np.isfinite(reference)):
        return "n/a", float("nan")
    diff, margin = value - reference, float(claim.get("margin", 0.0))
    holds = {"higher": diff > margin, "lower": diff < -margin, "not_lower": diff >= -margin}[claim["expect"]]
    return ("supported" if holds else "not supported"), diff


def judge_claims(summary: Mapping, claims: Sequence[Mapping]) -> list[dict]:
    """Each claim per seed (the seeds both arms have), with an overall verdict: supported when every testable seed
    supports it, not supported when none does, inconclusive when the seeds disagree or none is testable (a claim
    that `requires` another is testable on a seed only where that one is supported)."""
    rows: list[dict] = []
    by_id: dict[str, dict] = {}
    arms = summary["arms"]
    for claim in claims:
        needed = [claim["arm"]] + ([claim["reference"]] if claim["kind"] == "paired" else [])
        if any(arm not in arms for arm in needed):
            continue
        arm = arms[claim["arm"]][claim["scalar"]]["per_seed"]
        reference = arms[claim["reference"]][claim["scalar"]]["per_seed"] if claim["kind"] == "paired" else None
        seeds = [s for s in arm if reference is None or s in reference]
        per_seed = {}
        for seed in seeds:
            verdict, number = seed_verdict(claim, arm[seed], None if reference is None else reference[seed])
            prerequisite = by_id.get(claim.get("requires", ""), {}).get("per_seed", {}).get(seed)
            if claim.get("requires") and (prerequisite is None or prerequisite["verdict"] != "supported"):
                verdict = "n/a"  # nothing to stop on this seed: the same start did not collapse without the guard
            per_seed[seed] = {"verdict": verdict, "value": number}
        verdicts = [v["verdict"] for v in per_seed.values() if v["verdict"] != "n/a"]
        if not verdicts:
            overall = "inconclusive"
        elif all(v == "supported" for v in verdicts):
            overall = "supported"
        elif all(v == "not supported" for v in verdicts):
            overall = "not supported"
        else:
            overall = "inconclusive"
        row = {**claim, "per_seed": per_seed, "verdict": overall, "testable_seeds": len(verdicts)}
        rows.append(row)
        by_id[claim["id"]] = row
    return rows


def _cell(stat: Mapping[str, float]) -> str:
    mean, sd = stat["mean"], stat["sd"]
    return "n/a" if not np.isfinite(mean) else f"{mean:.3f} ± {sd:.3f}"


def _claim_line(row: Mapping) -> str:
    if row["kind"] == "paired":
        what = f"{row['arm']} - {row['reference']}: {row['scalar']}, {row['expect'].replace('_', ' ')}"
        what += f" (margin {row.get('margin', 0)})"
    else:
        what = f"{row['arm']}: {row['scalar']} >= {row['at_least']}"
    seeds = " / ".join(
        f"s{seed}: {v['value']:+.3f} {v['verdict']}" if np.isfinite(v["value"]) else f"s{seed}: n/a"
        for seed, v in row["per_seed"].items()
    )
    return f"| {row['claim']} | {what} | {seeds} | **{row['verdict']}** ({row['testable_seeds']} testable) |"


def completeness(results: Path, study: Mapping) -> dict:
    """Which of the study's arm x seed runs are kept, and how many steps each ran: a partial study says so."""
    expected = [(arm, seed) for seed in study["seeds"] for arm in study["arms"]]
    steps = {}
    for arm, seed in expected:
        metrics = results / arm / f"seed{seed}"
        if (metrics / "metrics.jsonl").is_file():
            steps[f"{arm}/seed{seed}"] = max(int(r["step"]) for r in read_metrics(metrics))
    missing = [f"{arm}/seed{seed}" for arm, seed in expected if f"{arm}/seed{seed}" not in steps]
    return {"expected_runs": len(expected), "kept_runs": steps, "missing_runs": missing, "seeds": study["seeds"]}


def _completeness_lines(done: Mapping, seeds: Sequence[int]) -> list[str]:
    kept, missing = done["kept_runs"], done["missing_runs"]
    lengths = sorted(set(kept.values()))
    if not missing:
        return [f"Complete: all {done['expected_runs']} runs (arms x seeds) kept, {lengths} steps each.", ""]
    return [
        f"**PARTIAL**: {len(kept)} of {done['expected_runs']} runs (arms x seeds) kept, {lengths} steps; the verdicts "
        "below are judged on these runs only. Missing: " + ", ".join(missing) + ".",
        "",
        "To complete it (each command skips the runs already complete in its `--runs` folder, resumes an interrupted "
        "one from its last checkpoint, and rewrites this summary over every run kept here; a run shorter than "
        "base.yaml's `trainer.max_steps` is continued to it; one seed is about 1 h on 2 cores):",
        "",
        "```",
        *[f"python examples/regime_control/run_study.py --seeds {seed}" for seed in seeds],
        "```",
        "",
    ]


def write_summary(summary: Mapping, results: Path) -> None:
    """summary.json (everything, with the invocation history) and summary.md (claims, then the per-arm table)."""
    results.mkdir(parents=True, exist_ok=True)
    previous = results / "summary.json"
    history = json.loads(previous.read_text()).get("history", []) if previous.is_file() else []
    if "study" in summary:
        history = [*history, summary["study"]]
    summary = {key: value for key, value in summary.items() if key != "study"}
    (results / "summary.json").write_text(
        json.dumps(_finite_or_null({**summary, "history": history}), indent=1, sort_keys=True) + "\n"
    )
    seeds = sorted({s for stats in summary["arms"].values() for s in stats["heldout_start"]["per_seed"]}, key=int)
    lines = [
        "# Regime-control study: results",
        "",
        f"Generated by examples/regime_control/summarize.py from the metrics JSONL files in this folder: "
        f"{len(summary['arms'])} arms, seeds {', '.join(seeds)}. Last-5 = mean of the last {LAST} steps; first3 = "
        "steps 1-3.",
        "",
        *_completeness_lines(summary["completeness"], summary["completeness"]["seeds"]),
        "## Claims, per seed (paired: same seed = same warm-up model, data order and sampling seeds)",
        "",
        "| claim | judged on | per seed: number, verdict | overall |",
        "|---|---|---|---|",
        *[_claim_line(row) for row in summary.get("claims", [])],
        "",
        "## Arms (mean ± sd over seeds)",
        "",
        "| arm | " + " | ".join(TABLE_COLUMNS) + " |",
        "|---|" + "---|" * len(TABLE_COLUMNS),
        *[f"| {arm} | " + " | ".join(_cell(stats[c]) for c in TABLE_COLUMNS) + " |"
          for arm, stats in summary["arms"].items()],
        "",
        "## Invocations",
        "",
        *[f"- `{h['command']}`: trained {', '.join(h.get('trained', [])) or 'nothing (all complete)'}; "
          f"wall {h['wall_s_this_invocation'] / 60:.1f} min, CPU {h['cpu_s_this_invocation'] / 60:.1f} min"
          for h in history],
    ]  # fmt: skip
    (results / "summary.md").write_text("\n".join(lines) + "\n")


def write_figures(results: Path, study: Mapping, arms: Sequence[str]) -> list[Path]:
    """One folder of PNGs per figure (mean and min-max band over the seeds present), by the project's plotting tool:
    the paper-style panels for `figures`, the controller's panels for `control_figures`."""
    labels = {name: spec["label"] for name, spec in study["arms"].items()}
    written: list[Path] = []
    for group, panels in (("figures", STUDY_PANELS), ("control_figures", CONTROL_PANELS)):
        for figure, members in study.get(group, {}).items():
            runs = {labels[arm]: sorted((results / arm).glob("seed*")) for arm in members if arm in arms}
            runs = {label: dirs for label, dirs in runs.items() if dirs}
            if runs:
                written += plot_runs(runs, results / "plots" / figure, panels=panels)
    return written


def write_report(results: Path, study: Mapping, invocation: Mapping | None = None) -> list[Path]:
    """summary.json / summary.md (per-arm scalars, per-seed claim verdicts, the invocation history) and the figures,
    over every arm and seed kept under ``results``: what both the study command and this script write."""
    summary = summarize_runs(results, study)
    summary["claims"] = judge_claims(summary, study.get("claims", []))
    summary["completeness"] = completeness(results, study)
    if invocation is not None:
        summary["study"] = dict(invocation)
    write_summary(summary, results)
    return write_figures(results, study, list(summary["arms"]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--study", default=str(HERE / "study.yaml"))
    args = parser.parse_args(argv)
    study = yaml.safe_load(Path(args.study).read_text())
    results = Path(args.results)
    for path in write_report(results, study):
        print(path)
    print(results / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
