"""The ``mvn-core`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from mvn_core import backends


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
                           "numpy always runs, as the reference)")
    demo.add_argument("--plot", default="mvn-core-demo.png",
                      help="where to write the PNG of loss curves ('' for none)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    claims = commands.add_parser(
        "claims", help="reproduce the three numerical claims of the MVN-Grad paper "
                       "(tables, and one PNG each)")
    claims.add_argument("--out", default=".", help="folder for the PNGs (default: here)")
    claims.add_argument("--no-plot", action="store_true", help="print the tables only")

    bench = commands.add_parser(
        "bench", help="time one optimizer step of every rule on every backend and path, "
                      "against torch.optim, optax and the other peers")
    from .bench import add_arguments

    add_arguments(bench)
    bench.add_argument("--distributed", action="store_true",
                       help="the distributed benchmark (mvn_core.conformance.bench_distributed)")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        selected = set(args.backends.split(",")) if args.backends else None
        unknown = sorted((selected or set()) - set(backends.NAMES))
        if unknown:
            parser.error(f"unknown backends {unknown}; known: {', '.join(backends.NAMES)}")
        run_demo(steps=args.steps, lr=args.lr, batch_size=args.batch_size, hidden=args.hidden,
                 seed=args.seed, selected=selected, plot_path=args.plot,
                 show_progress=not args.no_progress)
    elif args.command == "claims":
        from .claims import run_claims

        run_claims(args.out, plot=not args.no_plot)
    elif args.command == "bench":
        return _bench(parser, args)
    return 0


def _bench(parser, args) -> int:
    """The single-process benchmark, or with ``--distributed`` the distributed one,
    whose module has a ``main(args)`` of its own where it is installed."""
    if not args.distributed:
        from .bench import main as bench_main

        return bench_main(args)
    name = f"{__package__}.bench_distributed"
    if importlib.util.find_spec(name) is None:
        parser.error("--distributed: this installation has no distributed benchmark "
                     f"({name})")
    return importlib.import_module(name).main(args)


if __name__ == "__main__":
    sys.exit(main())
