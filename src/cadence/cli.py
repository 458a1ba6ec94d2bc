"""``cadence``: a thin shell over the library. Exit codes: 0 ok, 2 bad input (one line), 1 anything else."""

from __future__ import annotations

import argparse
import os
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
    if recipe.optimizer.lr == "auto":
        rt = recipe.optimizer.lr_find
        print(f"optimizer.lr is auto: the LRs below are multiples of the peak the range test ({rt.steps} steps, "
              f"LR {rt.start:g} to {rt.end:g}, on stage 0) will choose")
    print(report.plan_table(timeline))
    if args.csv:
        report.write_plan_csv(timeline, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        report.plot_plan(timeline, args.plot, title=recipe.name)
        print(f"wrote {args.plot}")
    return 0


def cmd_prepare(args) -> int:
    from cadence.prepare import describe, prepare_copy
    from cadence.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.sets)
    out = args.out or recipe.data.prepared
    if out is None:
        raise FieldError("data.prepared", None, "say where the copy goes (or pass --out)", file=args.recipe)
    try:
        manifests = prepare_copy(recipe, out, short_sides=args.short_side, workers=args.workers,
                                quality=args.quality, progress=not args.quiet)
    except FieldError as e:
        raise e.within(file=args.recipe) from None
    print(describe(manifests, out))
    if recipe.data.prepared != out:
        print(f"train from it with: --set data.prepared={out}")
    return 0


def _resolve_recipe(args):
    """The recipe to train: RECIPE (+ --set), or, when resuming, the run's own recipe.yaml.
    (A resumed run's recipe is checked against its checkpoint's in ``changes.reconcile``.)"""
    from cadence.recipe import load_recipe

    if args.resume:
        saved = os.path.join(args.resume, "recipe.yaml")
        if not os.path.exists(saved):
            raise FieldError("--resume", args.resume, "is not a run directory (it holds no recipe.yaml)")
        run_recipe = load_recipe(saved)
        if args.recipe is None and not args.sets:
            return run_recipe, saved
        return _as_recorded(load_recipe(args.recipe or saved, args.sets), run_recipe), args.recipe or saved
    if args.recipe is None:
        raise FieldError("RECIPE", None, "give a recipe file (or --resume RUN_DIR)")
    return load_recipe(args.recipe, args.sets), args.recipe


def cmd_train(args) -> int:
    from cadence import train

    if args.max_steps is not None and args.max_steps < 1:
        raise FieldError("--max-steps", args.max_steps, "must be >= 1")
    recipe, recipe_file = _resolve_recipe(args)
    setup = train.prepare(recipe, recipe_file)
    run_dir = args.resume or args.out or train.default_run_dir(recipe)
    if not args.resume and os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt")):
        raise FieldError("--out", run_dir, "already holds a run (use --resume to continue it)")
    state, at = None, None
    say = print if setup.dist.main else (lambda *a, **k: None)
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    if args.resume and os.path.exists(last):  # read (and vet) the checkpoint before saying or doing anything
        from cadence import changes, checkpoint

        state = checkpoint.load(last)
        at = changes.reconcile(state, setup.recipe, setup.timeline, run_dir, args.on_recipe_change,
                               recipe_file=recipe_file, train_samples=len(setup.source.train),
                               world_size=setup.dist.world, write=setup.dist.main)
    elif args.resume:
        say(f"cadence: {run_dir} was stopped before its first checkpoint: training it from step 0", file=sys.stderr)
    if recipe.optimizer.lr == "auto":
        setup = train.find_auto_lr(setup, recipe_file, progress=not args.quiet and setup.dist.main)
        say(_auto_lr_chosen(setup.recipe), file=sys.stderr)
    if not args.resume and setup.dist.main:  # a new run's folder that cannot be made is bad input, not a crash
        try:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        except OSError as e:
            raise FieldError("--out", run_dir, f"cannot create it: {e.strerror or e}") from None
    ranks = f" x {setup.dist.world} ranks" if setup.dist.active else ""
    say(f"{recipe.name}: {len(setup.timeline):,} steps over {len(recipe.stages)} stage(s) on "
        f"{setup.device}{ranks}; run directory {run_dir}", file=sys.stderr)
    try:
        trainer, final = train.train(setup, run_dir, resume=bool(args.resume), stop_at=args.max_steps,
                                     progress=not args.quiet, state=state, at=at)
    except train.Interrupted as e:
        say(f"cadence: {e}: checkpoint written; continue with: cadence train --resume {run_dir}",
            file=sys.stderr)
        return 128 + e.signum
    except FloatingPointError as e:  # divergence: the last good checkpoint is kept
        say(f"cadence: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, no permission: the last checkpoint is intact
        kept = f"; the last checkpoint is intact: cadence train --resume {run_dir}" if os.path.exists(last) else ""
        say(f"cadence: error: cannot write {e.filename or run_dir}: {e.strerror or e}{kept}", file=sys.stderr)
        return 1
    finally:
        from cadence import distributed

        distributed.shutdown()
    if not setup.dist.main:
        return 0
    if final is None:
        print(f"stopped after step {trainer.step:,} of {len(setup.timeline):,}; continue with: "
              f"cadence train --resume {run_dir}")
        return 0
    print(_result_line(final, trainer.elapsed))
    if trainer.skipped:
        print(f"{trainer.skipped:,} step(s) skipped for a non-finite loss (train.on_nonfinite: skip)")
    print(f"run directory: {run_dir}")
    return 0


def _result_line(result: dict, elapsed: float | None = None) -> str:
    line = f"held-out top-1 {100 * result['val_top1']:.2f}%"
    if "val_top5" in result:
        line += f", top-5 {100 * result['val_top5']:.2f}%"
    line += f" at {result['resolution']}px (loss {result['val_loss']:.4f})"
    if elapsed is not None:
        line += f" after {elapsed:.1f} s of training"
    return line


def cmd_eval(args) -> int:
    from cadence import train
    from cadence.recipe import load_recipe

    if args.resolution is not None and args.resolution < 1:
        raise FieldError("--resolution", args.resolution, "must be >= 1 px")
    if not os.path.exists(os.path.join(args.run_dir, "checkpoints", "last.pt")):
        raise FieldError("RUN_DIR", args.run_dir, "holds no checkpoints/last.pt")
    recipe_file = os.path.join(args.run_dir, "recipe.yaml")
    setup = train.prepare(load_recipe(recipe_file, args.sets), recipe_file)
    trainer = train.Trainer.resume(setup, args.run_dir)
    result = trainer.evaluate(args.resolution)
    print(_result_line(result) + f" (checkpoint at step {trainer.step:,})")
    return 0


def cmd_export(args) -> int:
    from cadence import checkpoint

    if not os.path.isdir(args.run_dir):
        raise FieldError("RUN_DIR", args.run_dir, "is not a folder")
    try:
        out, meta = checkpoint.export(args.run_dir, args.out)
    except OSError as e:
        raise FieldError("--out", e.filename, f"cannot write: {e.strerror}") from None
    print(f"wrote {out} ({meta['arch']}, step {int(meta['step']):,})")
    return 0


def cmd_report(args) -> int:
    from cadence import report

    if not os.path.exists(os.path.join(args.run_dir, "metrics.jsonl")):
        raise FieldError("RUN_DIR", args.run_dir, "holds no metrics.jsonl")
    print(f"wrote {report.write_run_report(args.run_dir)}")
    return 0


def cmd_find_lr(args) -> int:
    from cadence import lr_finder, train
    from cadence.plan import lr_scale
    from cadence.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.sets)
    rt = recipe.optimizer.lr_find  # the range lr: auto would use, unless the flags say otherwise
    start, end, steps = (rt.start if args.start is None else args.start, rt.end if args.end is None else args.end,
                         rt.steps if args.steps is None else args.steps)
    lr_finder.check_range(start, end, steps)
    if not 0 <= args.stage < len(recipe.stages):
        raise FieldError("--stage", args.stage, f"the recipe has stages 0..{len(recipe.stages) - 1}")
    setup = train.prepare(recipe, args.recipe)
    trainer = train.Trainer(setup, run_dir="")
    stages = range(len(recipe.stages)) if args.all_stages else [args.stage]
    results = [lr_finder.range_test(trainer, k, start=start, end=end, steps=steps,
                                    mode=args.mode, progress=not args.quiet) for k in stages]
    if not setup.dist.main:
        return 0
    o = recipe.optimizer
    for res in results:
        head = f"stage {res.stage} ({res.resolution}px, batch {res.batch_size}, {len(res.lrs)} steps"
        head += ", stopped at divergence)" if res.stopped_early else ")"
        if res.suggestions is None:
            print(f"{head}: no suggestion: {res.error}")
            continue
        s = res.suggestions
        ref = o.reference_batch_size or recipe.stages[0].batch_size
        at_ref = s.recommended / lr_scale(res.batch_size, ref, o.lr_scaling)
        print(f"{head}: steepest {s.steepest:.3g}, minimum/10 {s.minimum_div_10:.3g}, valley {s.valley:.3g}, "
              f"loss climbs away from {s.edge:.3g}"
              f"\n  recommended one-cycle max_lr {s.recommended:.3g} (a tenth of that) at batch {res.batch_size}"
              f" (optimizer.lr: {at_ref:.3g} at reference batch {ref}, lr_scaling {o.lr_scaling})")
    note = lr_finder.caveat(o.name)
    if note and any(res.suggestions for res in results):
        print(f"  note: {note}")
    os.makedirs(args.out, exist_ok=True)
    csv_path, png_path = os.path.join(args.out, "lr_find.csv"), os.path.join(args.out, "lr_find.png")
    lr_finder.write_csv(results, csv_path)
    lr_finder.plot(results, png_path, title=f"{recipe.name}: LR range test")
    print(f"wrote {csv_path} and {png_path}")
    return 0 if any(res.suggestions for res in results) else 1


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_compare(args) -> int:
    """Recipes (plans; trained with --seeds unless --plan-only) or finished run directories."""
    import time
    from cadence import report
    from cadence.recipe import load_recipe

    runs = [p for p in args.items if os.path.isdir(p)]
    recipes = [p for p in args.items if not os.path.isdir(p)]
    if runs and recipes:
        raise FieldError("ITEMS", args.items, "give recipes or run directories, not both")
    for d in runs:
        if not os.path.exists(os.path.join(d, "metrics.jsonl")):
            raise FieldError("ITEMS", d, "is not a finished run directory (no metrics.jsonl)")
    loaded = [load_recipe(p, args.sets) for p in recipes]
    timelines = {}
    for r, p in zip(loaded, recipes):
        try:
            timelines[r.name] = r.timeline()
        except FieldError as e:
            raise e.within(file=p) from None
    out = args.out or os.path.join("runs", "compare-" + time.strftime("%Y%m%d-%H%M%S"))
    if args.plan_only:
        if runs or not recipes:
            raise FieldError("--plan-only", args.items, "compares recipes' plans: give recipe files")
        plot = args.plot or os.path.join(out, "plans.png")
        os.makedirs(os.path.dirname(os.path.abspath(plot)), exist_ok=True)
        report.plot_plans_overlay(timelines, plot)
        auto = {r.name for r in loaded if r.optimizer.lr == "auto"}
        for name, t in timelines.items():
            peak = "auto (the range test picks it; plotted as 1)" if name in auto else f"{max(t.lr):.4g}"
            print(f"{name}: {len(t):,} steps, {t.samples_seen[-1]:,} images, peak LR {peak}")
        print(f"wrote {plot}")
        return 0
    if recipes:  # train every recipe for every seed
        from cadence import train

        for r, p in zip(loaded, recipes):
            train.prepare(r, p)  # all bad input before any training
        for seed in range(args.seeds):  # seed by seed: a study cut short has every recipe at seed 0 first
            for r, p in zip(loaded, recipes):
                run_dir = os.path.join(out, f"{r.name}-seed{seed}")
                recipe = load_recipe(p, args.sets + [f"seed={seed}"])
                started = os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt"))
                if started:
                    saved = load_recipe(os.path.join(run_dir, "recipe.yaml"))
                    recipe = _as_recorded(recipe, saved)
                    if saved.raw != recipe.raw:
                        raise FieldError("--out", out, f"{run_dir} holds a run of a different {r.name} recipe; "
                                         "compare into another folder", file=p)
                setup = train.prepare(recipe, p)
                if started and _finished(run_dir, len(setup.timeline)):
                    print(f"{run_dir}: already trained, reusing it")
                else:  # new, or stopped part-way (a killed study): continue it exactly
                    if not started and recipe.optimizer.lr == "auto":
                        setup = train.find_auto_lr(setup, p, progress=not args.quiet)
                        print(f"{run_dir}: {_auto_lr_chosen(setup.recipe)}")
                    train.train(setup, run_dir, resume=started, progress=not args.quiet)
                runs.append(run_dir)
    else:
        for d in runs:
            r = load_recipe(os.path.join(d, "recipe.yaml"))
            timelines[r.name] = r.timeline()
    os.makedirs(out, exist_ok=True)
    thresholds = tuple(args.thresholds)
    summary = report.summarize_runs(runs, thresholds)
    baseline = None
    if args.baseline:
        if args.baseline not in summary:
            raise FieldError("--baseline", args.baseline, f"is not one of the recipes compared: {sorted(summary)}")
        target = summary[args.baseline]["top1_mean"]
        thresholds += (target,)
        summary = report.summarize_runs(runs, thresholds)
        baseline = (args.baseline, target)
    report.plot_plans_overlay(timelines, os.path.join(out, "plans.png"))
    report.plot_runs_overlay(summary, os.path.join(out, "accuracy.png"))
    for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["top1_mean"]):
        print(f"{name}: top-1 {100 * s['top1_mean']:.2f} +- {100 * s['top1_std']:.2f}% over {s['n']} "
              f"run(s), {s['time_mean']:.1f} s")
    if baseline is not None:
        name, target = baseline
        base_time = summary[name]["time_mean"]
        print(f"time to reach {name}'s final top-1 ({100 * target:.2f}%), against its {base_time:.1f} s:")
        for other, s in summary.items():
            t = s["reach"][target]
            print(f"  {other}: " + ("never (mean over seeds)" if t is None else f"{t:.1f} s, ratio {t / base_time:.2f}"))
    report.write_summary_json(summary, os.path.join(out, "summary.json"), baseline)
    print(f"wrote {report.write_compare_html(summary, out, thresholds, baseline)}")
    return 0


def _auto_lr_chosen(recipe) -> str:
    """The line that says which peak LR the range test of ``optimizer.lr: auto`` chose (``recipe``
    holds it now), with the caveat for the optimizer, if any."""
    from cadence import lr_finder

    note = lr_finder.caveat(recipe.optimizer.name)
    return (f"optimizer.lr: auto -> {recipe.optimizer.lr:.4g} (LR range test on stage 0)"
            + (f"; note: {note}" if note else ""))


def _as_recorded(recipe, run_recipe):
    """``recipe``, with the LR the run's range test chose if ``recipe`` says ``optimizer.lr: auto``."""
    from cadence.recipe import with_lr

    return with_lr(recipe, run_recipe.optimizer.lr) if recipe.optimizer.lr == "auto" else recipe


def _finished(run_dir: str, steps: int) -> bool:
    from cadence.report import read_metrics

    return any("val_top1" in r and r["step"] == steps for r in read_metrics(run_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cadence", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="print and draw the whole training plan; no data or training needed")
    _recipe_args(p)
    p.add_argument("--csv", help="write one row per optimizer step here")
    p.add_argument("--plot", help="write the plan figure (PNG) here")
    p.add_argument("--world-size", type=int, default=1, help="ranks the global batch is split over")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("prepare", help="imagefolder: write a training copy re-encoded at a bounded size "
                       "(decoded several times faster; resumable)")
    _recipe_args(p)
    p.add_argument("--out", help="where the copy goes (default: the recipe's data.prepared)")
    p.add_argument("--short-side", type=int, nargs="+", metavar="PX", help="one copy per value, each capping "
                   "every image's shorter side (default: each stage resolution x 256/224)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the copy")
    p.add_argument("--workers", type=int, help="processes (default: one per CPU core)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a recipe (under torchrun: DDP, batch_size = global batch)")
    p.add_argument("recipe", nargs="?", help="recipe YAML file (optional with --resume)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set data.root=/data/imagenet (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<name>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run exactly where it stopped")
    p.add_argument("--max-steps", type=int, help="stop (resumably) after this many optimizer steps in all")
    p.add_argument("--on-recipe-change", choices=["keep-position", "stretch"],
                   help="resuming with a recipe whose schedule or data order differs: continue at the same "
                        "images seen (keep-position) or the same fraction of training (stretch)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("find-lr", help="LR range test: suggest max_lr for a stage (or every stage)")
    _recipe_args(p)
    p.add_argument("--stage", type=int, default=0, help="stage whose resolution, batch and data to use")
    p.add_argument("--all-stages", action="store_true", help="one curve per stage")
    # --start-lr/--end-lr under torchrun: its parser would take "--start" for "--start-method"
    p.add_argument("--start", "--start-lr", dest="start", type=float,
                   help="first LR (default: the recipe's optimizer.lr_find.start, 1e-6)")
    p.add_argument("--end", "--end-lr", dest="end", type=float, help="last LR (default: optimizer.lr_find.end, 10)")
    p.add_argument("--steps", type=int, help="batches in the range (default: optimizer.lr_find.steps, 200)")
    p.add_argument("--mode", choices=["exp", "linear"], default="exp", help="how the LR rises")
    p.add_argument("--out", default=".", help="folder for lr_find.csv and lr_find.png")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_find_lr)

    p = sub.add_parser("eval", help="evaluate a run's last checkpoint, at any resolution")
    p.add_argument("run_dir")
    p.add_argument("--resolution", type=int, help="evaluation resolution in px (default: the recipe's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the run's recipe, e.g. --set data.root=...")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare recipes (plans, or trained over seeds) or finished runs")
    p.add_argument("items", nargs="+", help="recipe files, or finished run directories")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field in every recipe (e.g. data.root=...)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per recipe when training")
    p.add_argument("--plan-only", action="store_true", help="compare the plans only: no data, no training")
    p.add_argument("--plot", help="with --plan-only: where to write the figure")
    p.add_argument("--out", help="folder for runs, figures and compare.html")
    p.add_argument("--thresholds", type=float, nargs="*", default=[], metavar="ACC",
                   help="held-out top-1 levels (0..1) whose time to reach is reported")
    p.add_argument("--baseline", metavar="NAME", help="report every recipe's time to reach this recipe's "
                   "final top-1 (mean over seeds), as a ratio of the baseline's own training time")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="write a run's model weights (last checkpoint) as safetensors")
    p.add_argument("run_dir")
    p.add_argument("--out", help="file to write (default: RUN_DIR/model.safetensors)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="redraw a run's curves.png and report.html")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
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
