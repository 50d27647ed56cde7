"""The `megatron-dispo` command line.

Each subcommand lives next to the code it drives, in a module that defines
`add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> int`.
Modules are imported only when their subcommand runs, so `--help` stays fast and a missing optional
dependency (vLLM, Megatron) only matters to the subcommand that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module implementing add_arguments/run, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": (
        "megatron_dispo.trainer.cli",
        "Run RL training from a YAML config with dotted overrides (torchrun for >1 rank).",
    ),
    "demo": ("megatron_dispo.demo", "Train a tiny Qwen3 on synthetic arithmetic on CPU (the embedded default)."),
    "convert": ("megatron_dispo.models.convert_cli", "Convert checkpoints HF <-> Megatron (hf-to-mcore, mcore-to-hf)."),
    "eval": ("megatron_dispo.eval.cli", "Evaluate a model or a responses file: Avg@n, pass@k, maj@k (paper App. B)."),
    "plan": (
        "megatron_dispo.plan_cli",
        "Check a config's parallel layout and per-GPU memory for N nodes x G GPUs, without starting anything.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-dispo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        # Arguments are added lazily in main() once we know which subcommand runs.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help") and argv[0] not in SUBCOMMANDS:
            parser.error(f"unknown command {argv[0]!r}; choose one of {sorted(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = argparse.ArgumentParser(prog=f"megatron-dispo {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
