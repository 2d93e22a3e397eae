"""The ``mvn-core`` command line."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import mvn_core
from mvn_core import backends

from mvn_core.conformance.cases import rule_names
from mvn_core.conformance.paths import PATHS
from mvn_core.conformance.references import FOLDER, STEPS

FULL_STEPS = 100


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mvn-core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo", help="train a digits classifier with MVN-Grad and Adam on every installed backend")
    demo.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    demo.add_argument("--lr", type=float, default=3e-3, help="learning rate of both rules")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--hidden", type=int, default=32, help="hidden units")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backends", default=None,
                      help="comma-separated backends to run (default: all installed; "
                           "numpy always runs, as the reference; jax, torch and tensorflow "
                           "also run MVN-Grad through Keras, where Keras is installed)")
    demo.add_argument("--plot", default="mvn-core-demo.png",
                      help="where to write the PNG of loss curves ('' for none)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    claims = commands.add_parser(
        "claims", help="reproduce the three numerical claims of the MVN-Grad paper "
                       "(tables, and one PNG each)")
    claims.add_argument("--out", default=".", help="folder for the PNGs (default: here)")
    claims.add_argument("--no-plot", action="store_true", help="print the tables only")

    _add_check_parser(commands)
    goldens = commands.add_parser(
        "goldens", help="write the golden trajectories again, from the float64 oracle")
    goldens.add_argument("--out", default=None,
                         help="folder to write them to (default: the package's own)")
    goldens.add_argument("--steps", type=int, default=STEPS,
                         help=f"steps of every trajectory (default {STEPS})")
    bench_distributed = commands.add_parser(
        "bench-distributed",
        help="optimizer step time under FSDP2 on several local processes, against "
             "torch.optim.AdamW, and the cost of GAN's and NovoGrad's collectives",
        description="Time opt.step() of every rule under FSDP2 (fully_shard) on local "
                    "processes (gloo on CPU), against torch.optim.AdamW in the same run, "
                    "and replay GAN's and NovoGrad's collectives alone to price them.")
    from mvn_core.bench.distributed import add_arguments

    add_arguments(bench_distributed)
    bench = commands.add_parser(
        "bench", help="time one optimizer step of every rule on every backend and path, "
                      "against torch.optim, optax and the other peers "
                      "(under FSDP2: mvn-core bench-distributed)")
    from mvn_core.bench.run import add_arguments as add_bench_arguments

    add_bench_arguments(bench)

    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(parser, args)
    if args.command == "goldens":
        return _goldens(args)
    if args.command == "demo":
        from mvn_core.demo.run import run_demo

        selected = set(args.backends.split(",")) if args.backends else None
        known = backends.NAMES + backends.PARTIAL
        unknown = sorted((selected or set()) - set(known))
        if unknown:
            parser.error(f"unknown backends {unknown}; known: {', '.join(known)}")
        run_demo(steps=args.steps, lr=args.lr, batch_size=args.batch_size, hidden=args.hidden,
                 seed=args.seed, selected=selected, plot_path=args.plot,
                 show_progress=not args.no_progress)
    elif args.command == "claims":
        from mvn_core.demo.claims import run_claims

        run_claims(args.out, plot=not args.no_plot)
    elif args.command == "bench-distributed":
        from mvn_core.bench.distributed import run

        print(run(args))
    elif args.command == "bench":
        from mvn_core.bench.run import main as bench_main

        return bench_main(args)
    return 0


def _add_check_parser(commands) -> None:
    check = commands.add_parser(
        "check", help="run the conformance matrix (rule x backend/device x dtype x path) "
                      "against the float64 oracle and print one table",
        description="Run every selected rule on every installed backend, device, dtype and "
                    "path against the float64 oracle (or its stored goldens), within the "
                    "rounding bound of mvn_core.conformance.tolerance. Exit status 1 if "
                    "anything fails.")
    lists = "comma-separated; default: all"
    check.add_argument("--rules", help=f"rules to check: {', '.join(rule_names())} ({lists})")
    check.add_argument("--rules-from", metavar="MODULE", action="append", default=[],
                       help="also check the rules defined in MODULE (importable from here, "
                            "e.g. examples.custom_rule) with mvn_core.define_rule, against the "
                            "float64 references it gives in ORACLE (rule name -> "
                            "mvn_core.conformance.oracle.Entry); without --rules, only "
                            "those rules are checked (repeatable)")
    check.add_argument("--backends", help=f"backends to check: {', '.join(backends.NAMES)} "
                                          f"({lists} that are installed)")
    check.add_argument("--devices", help=f"device names as the table shows them ({lists})")
    check.add_argument("--dtypes", help=f"float16, bfloat16, float32, float64 ({lists} that "
                                        "a backend supports)")
    check.add_argument("--paths", help=f"paths: {', '.join(PATHS)} ({lists} that apply)")
    check.add_argument("--namespace", metavar="MODULE",
                       help="check the Array-API namespace importable as MODULE (the pure "
                            "functions on its default device) instead of the backends")
    check.add_argument("--reference", choices=("oracle", "goldens"), default=None,
                       help="compare with the float64 oracle (default) or the stored goldens")
    check.add_argument("--goldens", metavar="DIR", default=None,
                       help="golden files to use (implies --reference goldens; default: "
                            "those shipped with the package)")
    steps = check.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, default=STEPS,
                       help=f"steps per run (default {STEPS}, the goldens' number)")
    steps.add_argument("--full", action="store_true",
                       help=f"{FULL_STEPS} steps per run (with the oracle), and every path, "
                            "those left out by default too")
    check.add_argument("--peers", action="store_true",
                       help="also run the cross-checks against torch.optim, optax, timm and "
                            "adabelief-pytorch (for the selected rules and dtypes)")
    check.add_argument("--json", metavar="PATH", help="write the JSON report to PATH ('-': stdout)")
    check.add_argument("--markdown", metavar="PATH",
                       help="write the table in Markdown to PATH ('-': stdout)")
    check.add_argument("--no-progress", action="store_true", help="no progress display")


def _check(parser, args) -> int:
    from mvn_core import registry
    from mvn_core.conformance import oracle

    if args.json == "-" and args.markdown == "-":
        parser.error("only one of --json and --markdown can go to stdout")
    try:
        extra_rules, entries = _rules_from(args.rules_from)
    except (ImportError, TypeError, ValueError) as error:
        parser.error(f"--rules-from: {error}")
    with registry.including(extra_rules), oracle.including(entries):
        return _run_check(parser, args, tuple(r.name for r in extra_rules))


def _rules_from(modules: list[str]) -> tuple[list, dict]:
    """The rules (:class:`mvn_core.Rule`) at the top level of each module, and their
    oracle entries from its ``ORACLE`` mapping, each rule with one."""
    from mvn_core.conformance.oracle import Entry

    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as ``python -m`` would find the module
    found, entries = [], {}
    for name in modules:
        module = importlib.import_module(name)
        rules = [v for v in vars(module).values() if isinstance(v, mvn_core.Rule)]
        oracle_entries = getattr(module, "ORACLE", {})
        if not rules:
            raise ValueError(f"{name} defines no rule (mvn_core.define_rule at its top level)")
        for rule in rules:
            entry = oracle_entries.get(rule.name)
            if not isinstance(entry, Entry):
                raise TypeError(f"{name}.ORACLE[{rule.name!r}] must be the rule's float64 "
                                "reference, a mvn_core.conformance.oracle.Entry; it is "
                                f"{type(entry).__name__}")
            entries[rule.name] = entry
        found += rules
    return found, entries


def _run_check(parser, args, extra_rules: tuple[str, ...]) -> int:
    from mvn_core.conformance.check import Selection, run_check
    from mvn_core.conformance.references import GoldenError
    from mvn_core.conformance.report import as_json, markdown, text_lines

    try:
        selection = Selection(
            rules=_names(args.rules) or extra_rules or None, backends=_names(args.backends),
            devices=_names(args.devices), dtypes=_names(args.dtypes), paths=_names(args.paths),
            namespace=args.namespace, steps=FULL_STEPS if args.full else args.steps,
            reference=args.reference or ("goldens" if args.goldens else "oracle"),
            goldens=args.goldens, peers=args.peers, every_path=args.full)
    except ValueError as error:
        parser.error(str(error))
    progress = _Progress(enabled=not args.no_progress)
    try:
        report = run_check(selection, progress)
    except GoldenError as error:
        print(f"mvn-core check: {error}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    if "-" not in (args.json, args.markdown):
        print("\n".join(text_lines(report)))
    if args.json:
        _write(args.json, json.dumps(as_json(report), indent=1, allow_nan=False) + "\n")
    if args.markdown:
        _write(args.markdown, markdown(report))
    return 0 if report.passed else 1


def _names(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        with open(path, "w") as f:
            f.write(text)


class _Progress:
    """Progress of the check on stderr: a tqdm bar on a terminal where tqdm is
    installed, else one line per cell."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar = None

    def __call__(self, done: int, total: int, cell) -> None:
        if not self.enabled:
            return
        if done == 1:
            self.bar = _tqdm_bar(total)
        if self.bar is None:
            print(f"[{done}/{total}] {cell.label}: {cell.status}", file=sys.stderr, flush=True)
        else:
            self.bar.set_postfix_str(cell.label, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_bar(total: int):
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="mvn-core check", unit="cell", file=sys.stderr, leave=False)


def _goldens(args) -> int:
    from mvn_core.conformance.references import write_goldens

    folder = args.out or FOLDER
    manifest = write_goldens(folder, steps=args.steps)
    print(f"wrote {len(manifest['trajectories'])} trajectories of {args.steps} steps and the "
          f"problem to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
