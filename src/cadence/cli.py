"""``cadence``: a thin shell over the library. Exit codes: 0 ok, 2 bad input (one line), 1 anything else."""

from __future__ import annotations

import argparse
import sys

from cadence.errors import FieldError


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set optimizer.lr=0.4 (repeatable)")


def cmd_plan(args) -> int:
    from cadence.recipe import load_recipe
    from cadence import report

    recipe = load_recipe(args.recipe, args.sets)
    try:
        timeline = recipe.timeline(world_size=args.world_size)
    except FieldError as e:
        raise e.within(file=args.recipe) from None
    print(f"{recipe.name}: {recipe.data.train_size():,} training images, "
          f"schedule {recipe.schedule.spec.kind} ({recipe.schedule.scope}, by {recipe.schedule.progress})")
    print(report.plan_table(timeline))
    if args.csv:
        report.write_plan_csv(timeline, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        report.plot_plan(timeline, args.plot, title=recipe.name)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cadence", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="print and draw the whole training plan; no data or training needed")
    _recipe_args(p)
    p.add_argument("--csv", help="write one row per optimizer step here")
    p.add_argument("--plot", help="write the plan figure (PNG) here")
    p.add_argument("--world-size", type=int, default=1, help="ranks the global batch is split over")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FieldError as e:
        print(f"cadence: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
