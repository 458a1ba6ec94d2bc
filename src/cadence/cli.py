"""``cadence``: a thin shell over the library. Exit codes: 0 ok, 2 bad input (one line), 1 anything else."""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading

from cadence.errors import FieldError


def _recipe_args(p: argparse.ArgumentParser, nargs: str | None = None, help: str = "recipe YAML file") -> None:
    p.add_argument("recipe", nargs=nargs, help=help)
    _set_arg(p)


def _set_arg(p: argparse.ArgumentParser, help: str = "override a recipe field, e.g. --set optimizer.lr=0.4 "
             "(repeatable)") -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=help)


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation this machine cannot make (torch says so in a RuntimeError)."""
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and "allocate" in str(e)


def plan_checks_model(recipe) -> bool:
    """What reading the recipe cannot see about its model, checked as training will: that timm has a
    ``timm/`` model, and the parameter groups (a group of parameters the model has none of, frozen
    scales that start at 0): ``parts.check_groups`` builds the model on the meta device, or on the CPU
    when frozen scales need their initial values. Plan has no data, and any class count does. Returns
    whether the check was skipped: a timm model or optimizer where timm is not installed. (Plan
    imports torch only for a recipe that sets groups or names a timm model.)"""
    from cadence.recipe import TIMM

    groups = recipe.optimizer.groups.set()
    if not groups and not recipe.model.arch.startswith(TIMM):
        return False
    from cadence import models, parts

    if models.timm_missing(recipe.model, recipe.optimizer):
        return True
    models.check_arch(recipe.model)
    if groups:
        parts.check_groups(recipe, recipe.model.num_classes or 1000, channels=3)
    return False


def cmd_plan(args) -> int:
    from cadence import report
    from cadence.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.sets)
    try:
        timeline = recipe.timeline(world_size=args.world_size)
        unchecked = plan_checks_model(recipe)
    except FieldError as e:
        raise e.within(file=args.recipe) from None
    print(f"{recipe.name}: {recipe.data.train_size():,} training images, "
          f"schedule {recipe.schedule.spec.kind} ({recipe.schedule.scope}, by {recipe.schedule.progress})")
    if recipe.optimizer.lr == "auto":
        rt = recipe.optimizer.lr_find
        print(f"optimizer.lr is auto: the LRs below are multiples of the peak the range test ({rt.steps} steps, "
              f"LR {rt.start:g} to {rt.end:g}, on stage 0) will choose")
    print(report.plan_table(timeline))
    print("\n".join(report.training_lines(recipe)))
    if unchecked:
        print("model and parameter groups not checked: the model or optimizer needs timm, not installed here "
              "(cadence train checks them)")
    if args.measure or args.memory_limit:
        from cadence import measure

        limit = measure.parse_bytes(args.memory_limit) if args.memory_limit else None
        if args.measure_steps < 1:
            raise FieldError("--measure-steps", args.measure_steps, "must be >= 1")
        result = measure.measure(recipe, timeline, world_size=args.world_size, steps=args.measure_steps,
                                 memory_limit=limit, progress=lambda line: print(line, file=sys.stderr))
        print(measure.table(result, limit))
    for flag, path, write in (("--csv", args.csv, lambda p: report.write_plan_csv(timeline, p)),
                              ("--plot", args.plot, lambda p: report.plot_plan(timeline, p, title=recipe.name))):
        if path:
            try:
                write(path)
            except OSError as e:  # a missing folder, a folder, no permission: the output path is bad input
                raise FieldError(flag, path, f"cannot write it: {e.strerror or e}") from None
            print(f"wrote {path}")
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
    from cadence.recipe import as_recorded, load_recipe
    from cadence.rundir import RunDir

    if args.resume:
        run = RunDir(args.resume)
        if not run.has_recipe():
            raise FieldError("--resume", args.resume, "is not a run directory (it holds no recipe.yaml)")
        run_recipe = load_recipe(run.recipe)
        if args.recipe is None and not args.sets:
            return run_recipe, run.recipe
        return as_recorded(load_recipe(args.recipe or run.recipe, args.sets), run_recipe), args.recipe or run.recipe
    if args.recipe is None:
        raise FieldError("RECIPE", None, "give a recipe file (or --resume RUN_DIR)")
    return load_recipe(args.recipe, args.sets), args.recipe


def cmd_train(args) -> int:
    from cadence import distributed, train
    from cadence.rundir import RunDir

    if args.max_steps is not None and args.max_steps < 1:
        raise FieldError("--max-steps", args.max_steps, "must be >= 1")
    recipe, recipe_file = _resolve_recipe(args)
    run = args.resume or args.out or RunDir.default(recipe.name).path
    try:
        trainer, final = train.launch(recipe, recipe_file, run, resume=bool(args.resume), stop_at=args.max_steps,
                                      on_recipe_change=args.on_recipe_change, progress=not args.quiet,
                                      say=lambda line: print(line, file=sys.stderr))
    finally:
        distributed.shutdown()
    if not trainer.main:
        return 0
    if final is None:
        print(f"stopped after step {trainer.step:,} of {len(trainer.timeline):,}; continue with: "
              f"cadence train --resume {run}")
        return 0
    print(_result_line(final, trainer.elapsed))
    if trainer.guard.skipped:
        print(f"{trainer.guard.skipped:,} step(s) skipped for a non-finite loss (train.on_nonfinite: skip)")
    print(f"run directory: {run}")
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
    from cadence import checkpoint, parts
    from cadence.evaluate import best, sweep
    from cadence.plan import MAX_RESOLUTION
    from cadence.recipe import load_recipe
    from cadence.rundir import RunDir

    resolutions = args.resolution or [None]  # None: the recipe's
    for r in args.resolution or []:
        if not 8 <= r <= MAX_RESOLUTION:
            raise FieldError("--resolution", r, f"must be 8 .. {MAX_RESOLUTION} px")
    if len(set(resolutions)) < len(resolutions):
        raise FieldError("--resolution", args.resolution, "gives a resolution twice")
    run = RunDir(args.run_dir)
    if not run.has_checkpoint():
        raise FieldError("RUN_DIR", args.run_dir, "holds no checkpoints/last.pt")
    path = run.kept(args.checkpoint)
    setup = parts.build_setup(load_recipe(run.recipe, args.sets), run.recipe)
    state = checkpoint.load(path)
    built = parts.build_parts(setup)
    built.load_weights(state)
    results = sweep(built, setup, resolutions)
    at = f" ({'checkpoint' if path == run.last else os.path.basename(path)} at step {state['step']:,})"
    if len(results) == 1:
        print(_result_line(results[0]) + at)
        return 0
    print("\n".join(map(_result_line, results)))
    top = best(results)
    print(f"best: {top['resolution']}px, held-out top-1 {100 * top['val_top1']:.2f}%{at}")
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
    from cadence.rundir import RunDir

    if not os.path.exists(RunDir(args.run_dir).metrics):
        raise FieldError("RUN_DIR", args.run_dir, "holds no metrics.jsonl")
    print(f"wrote {report.write_run_report(args.run_dir)}")
    return 0


def cmd_find_lr(args) -> int:
    from cadence import lr_finder, parts, report
    from cadence.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.sets)
    rt = recipe.optimizer.lr_find  # the range lr: auto would use, unless the flags say otherwise
    start, end, steps = (rt.start if args.start is None else args.start, rt.end if args.end is None else args.end,
                         rt.steps if args.steps is None else args.steps)
    lr_finder.check_range(start, end, steps)
    if not 0 <= args.stage < len(recipe.stages):
        raise FieldError("--stage", args.stage, f"the recipe has stages 0..{len(recipe.stages) - 1}")
    setup = parts.build_setup(recipe, args.recipe)
    try:  # where the curve goes must be writable before the test runs, not after
        os.makedirs(args.out, exist_ok=True)
        if not os.access(args.out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise FieldError("--out", args.out, f"cannot write there: {e.strerror or e}") from None
    built = parts.build_parts(setup)
    stages = range(len(recipe.stages)) if args.all_stages else [args.stage]
    results = [lr_finder.range_test_stage(setup, built, k, start=start, end=end, steps=steps, mode=args.mode,
                                          progress=not args.quiet) for k in stages]
    if not setup.dist.main:
        return 0
    print("\n".join(lr_finder.summary_lines(results, recipe)))
    csv_path, png_path = os.path.join(args.out, "lr_find.csv"), os.path.join(args.out, "lr_find.png")
    report.write_range_csv(results, csv_path)
    report.plot_range_test(results, png_path, title=f"{recipe.name}: LR range test")
    print(f"wrote {csv_path} and {png_path}")
    return 0 if any(res.suggestions for res in results) else 1


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, exit 2, like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def cmd_compare(args) -> int:
    """Recipes (plans; trained with --seeds unless --plan-only) or finished run directories."""
    import shlex
    import time

    from cadence import compare
    from cadence.errors import Interrupted

    runs = [p for p in args.items if os.path.isdir(p)]
    recipes = [p for p in args.items if not os.path.isdir(p)]
    if runs and recipes:
        raise FieldError("ITEMS", args.items, "give recipes or run directories, not both")
    out = args.out or os.path.join("runs", "compare-" + time.strftime("%Y%m%d-%H%M%S"))
    if args.plan_only:
        if runs or not recipes:
            raise FieldError("--plan-only", args.items, "compares recipes' plans: give recipe files")
        plot = args.plot or os.path.join(out, "plans.png")
        print("\n".join(compare.plan_overlay(recipes, plot, args.sets, check_model=plan_checks_model))
              + f"\nwrote {plot}")
        return 0
    if recipes:
        try:
            runs = compare.train_study(recipes, out, seeds=args.seeds, sets=args.sets, progress=not args.quiet)
        except Interrupted as e:  # run again into the same folder, the study continues where it stopped
            again = args.argv + ([] if args.out else ["--out", out])
            raise Interrupted(e.signum, e.step, "cadence " + shlex.join(again)) from None
    print("\n".join(compare.compare_runs(runs, out, args.thresholds, args.baseline).lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cadence", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="print and draw the whole training plan; no data or training needed")
    _recipe_args(p)
    p.add_argument("--csv", help="write one row per optimizer step here")
    p.add_argument("--plot", help="write the plan figure (PNG) here")
    p.add_argument("--world-size", type=int, default=1, help="ranks the global batch is split over")
    p.add_argument("--measure", action="store_true", help="time a few optimizer steps at every (resolution, "
                   "per-process batch) of the plan on this machine: img/s, time and peak memory per stage")
    p.add_argument("--measure-steps", type=int, default=5, metavar="N", help="timed steps per size (default 5)")
    p.add_argument("--memory-limit", metavar="SIZE", help="with --measure: the micro_batch_size that fits, e.g. 40GB")
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
    _recipe_args(p, nargs="?", help="recipe YAML file (optional with --resume)")
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
    p.add_argument("--checkpoint", default="last", metavar="NAME",
                   help="last (default), best (the best kept by train.keep_best), or a file in RUN_DIR/checkpoints")
    p.add_argument("--resolution", type=int, nargs="+", metavar="PX", help="evaluation resolution in px (default: "
                   "the recipe's); several: each is evaluated, then the best named (highest top-1; ties: the lowest)")
    _set_arg(p, help="override a field of the run's recipe, e.g. --set data.root=...")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="compare recipes (plans, or trained over seeds) or finished runs")
    p.add_argument("items", nargs="+", help="recipe files, or finished run directories")
    _set_arg(p, help="override a field in every recipe (e.g. data.root=...)")
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
    """Run one command; every way it can end maps to an exit code here, with one line on stderr:
    bad input 2; a signal honoured after a checkpoint 128 + signal, with the command that continues;
    Ctrl-C anywhere else 130; divergence or a failed write 1."""
    import signal

    from cadence.errors import Diverged, Interrupted, Terminated

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv

    def stop(signum, frame):
        """Ctrl-C / SIGTERM outside a training step (the loop takes them over during steps). Never
        inside an import: a KeyboardInterrupt there can be caught by the library being imported and
        leave it half-initialised (numpy under scipy, seen here: the run then fails with a
        RecursionError, or goes on and ignores the Ctrl-C); the signal is sent again 50 ms later."""
        f = frame
        while f is not None:
            if f.f_code.co_filename.startswith("<frozen importlib"):
                again = threading.Timer(0.05, os.kill, (os.getpid(), signum))
                again.daemon = True
                again.start()
                return
            f = f.f_back
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except FieldError as e:
        print(f"cadence: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"cadence: {e}: checkpoint written; continue with: {e.resume}", file=sys.stderr)
        return 128 + e.signum
    except (KeyboardInterrupt, Terminated) as e:
        name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("Ctrl-C", 130)
        print(f"cadence: {name} outside a training step: stopped; a new run's folder is removed, a run's last "
              "checkpoint is intact", file=sys.stderr)
        return code
    except (MemoryError, RuntimeError) as e:  # an allocation too large for this machine: say so, and how large
        if not out_of_memory(e):
            raise
        wanted = re.search(r"allocate (\d+) bytes", str(e))
        size = f" ({int(wanted.group(1)) / 2**30:.1f} GiB at once)" if wanted else ""
        print(f"cadence: error: out of memory{size}: lower the batch size or the resolution, or take a smaller model",
              file=sys.stderr)
        return 1
    except Diverged as e:  # the last good checkpoint is kept
        print(f"cadence: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `cadence plan ... | head -1`: the reader has gone; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # disk full, no permission: the last checkpoint is intact
        then = f"; the last checkpoint is intact: {e.resume}" if getattr(e, "resume", None) else ""
        print(f"cadence: error: cannot write {e.filename or ''}: {e.strerror or e}{then}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
