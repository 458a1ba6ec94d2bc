"""cadence against airbench94 on this CPU, side by side: each contender pinned to its own core with
one thread, on the same CIFAR-10 JPEGs, for each seed.

airbench's file is not part of cadence: give the path of ``legacy/airbench94.py`` in a checkout of the
public KellerJordan/cifar10-airbench repository. It is ported at run time by a few textual edits,
each checked to apply exactly once (written to ``OUT/airbench/airbench94_cpu.py``, never committed):

- the data: ``cifar10/train.pt`` and ``test.pt`` in airbench's own cache format are written from the
  JPEG folder (training images shuffled once, so the whitening's first 5,000 are not the first classes);
- CUDA -> CPU: ``map_location`` and ``net.half().cuda()``; fp16 -> fp32 (``--precision bf16``: each
  training step's forward and loss, and the evaluation, under bf16 autocast instead, entered anew each
  time: autocast keeps its bf16 copies of the weights until the outermost context is left, so one
  context around the whole run trains nothing); the CUDA event timers -> process CPU time;
- one run with ``torch.manual_seed(seed)`` instead of 25 unseeded ones;
- the per-epoch evaluation (untimed in airbench, as in cadence) is dropped; with ``--curve`` it uses
  airbench's own TTA instead of none, as cadence's evaluations do, so both contenders' accuracy over
  CPU time is measured alike (the "to reach the other's accuracy" column). Each epoch prints one JSON
  line. Evaluations cost: six views of 10,000 images are about a third of a training epoch here
  (~300 s of a ~755 s epoch on a slow day: ten of them made airbench's half ~3.1 h, longer than a
  session), so ``--curve FROM`` evaluates airbench from epoch FROM on only (cadence, whose half is
  the shorter, after every epoch). A contender reaches the other's accuracy at its first evaluation
  at or above it; on a curve that starts late, a reach at its first evaluation is an upper bound
  ("<=" in the table): choose FROM where airbench is still well below (90%+ only comes in the
  last epoch or two of both schedules).

CPU seconds are training time as each program counts it, in process CPU time, evaluation excluded:
airbench's timers (whitening and epochs; its own total also counts the final TTA evaluation, which is
taken out and printed apart) and cadence's ``cpu`` column of metrics.jsonl (epochs; its whitening, a
second or so, happens before training and is not counted). Whole-process CPU seconds (startup, data
loading, every evaluation) are printed too, from the kernel's accounting.

To pause a pair (the cores are needed for something else), stop both with SIGSTOP and continue them
with SIGCONT: process CPU time does not count a stopped process. Stopping cadence with SIGTERM
(it checkpoints, exit 143) lets airbench run on; cadence then continues alone on its core: the same
command with ``--cadence-only --seeds N`` (its launch line goes on from the checkpoint of the same
recipe), or ``cadence train --resume`` and then ``--collect``. Either way its whole-process CPU and
wall time are not recorded (one process saw only part of the run); its training CPU is whole (the
checkpoint carries it). Any other failure of one stops the other.

    python benchmarks/vs_airbench.py --airbench ~/cifar10-airbench/legacy/airbench94.py \\
        --data /data/cifar10 --recipe recipes/cifar10-airbench.yaml --seeds 0 1 2
Another cadence recipe (or an ablation: ``--set``) against the same airbench runs: give it a
``--name`` (its runs are ``OUT/NAME-seedN``) and ``--cadence-only``, which trains it alone on the
second core and reads it against the airbench log of each seed already in OUT (or train it by hand
and read it with ``--collect``). ``--airbench-only`` is the other half: airbench alone on the first
core, its log left in OUT for a later ``--cadence-only`` (give both ``--curve`` for the CPU-to-reach
column); airbench cannot continue a stopped run, so its hours are best started where they can finish.

Each seed's figures go to ``--results`` (default ``OUT/results.json``). Runs of one seed take hours
here and run directories do not outlive a session, so the project keeps its measurements in
``benchmarks/figures/vs_airbench.json``: give that file as ``--results`` and seeds measured in other
sessions count in the mean over seeds, and ``--cadence-only`` reads airbench's run of a seed from it.
``--table`` prints the file as the markdown table of benchmarks/RESULTS.md, and for the seeds run as a pair
with ``--curve``, a second: the CPU each contender took to reach the other's accuracy.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MARK = "VS-AIRBENCH "

PRELUDE = '''import time as _time


class _CpuTimer:  # stands in for torch.cuda.Event(enable_timing=True): process CPU time, in ms
    def record(self):
        self.t = _time.process_time()

    def elapsed_time(self, end):
        return 1e3 * (end.t - self.t)


'''

AUTOCAST = "with torch.autocast('cpu', dtype=torch.bfloat16, enabled=os.environ.get('BF16') == '1'):"  # --precision
# (what the port does, text in airbench94.py, its replacement): each must match exactly once
EDITS = [
    ("load the data on the CPU", "data = torch.load(data_path, map_location=torch.device(gpu))",
     "data = torch.load(data_path, map_location='cpu')"),
    ("fp32 images", "self.images = (self.images.half() / 255)", "self.images = (self.images.float() / 255)"),
    ("fp32 weights on the CPU", "net = net.half().cuda()", "net = net.float()"),
    ("CPU timers", "starter = torch.cuda.Event(enable_timing=True)", "starter = _CpuTimer()"),
    ("CPU timers", "ender = torch.cuda.Event(enable_timing=True)", "ender = _CpuTimer()"),
    ("per-epoch evaluation: with airbench's TTA, one JSON line per epoch (--curve FROM: from epoch FROM), or none",
     "val_acc = evaluate(model, test_loader, tta_level=0)",
     "val_acc = evaluate(model, test_loader, tta_level=hyp['net']['tta_level'])"
     " if os.environ['CURVE_FROM'] != 'none' and epoch >= int(os.environ['CURVE_FROM']) else None\n"
     "        print(%r + __import__('json').dumps({'epoch': epoch, 'cpu': total_time_seconds, 'acc': val_acc}),"
     " flush=True)" % MARK),
    ("bf16 autocast (--precision bf16) around each step's forward and loss, entered and left every step as "
     "torch's AMP examples have it (one context around all of main would keep its cache of bf16 weights "
     "for the whole run: the forward would see the initial weights throughout and the run not learn)",
     "            outputs = model(inputs)\n            loss = loss_fn(outputs, labels).sum()",
     "            " + AUTOCAST + "\n                outputs = model(inputs)\n                loss = loss_fn(outputs, labels).sum()"),
    ("the evaluation under the same autocast", "    logits = infer(model, loader, tta_level)",
     "    " + AUTOCAST + "\n        logits = infer(model, loader, tta_level)"),
    ("one seeded run", "accs = torch.tensor([main(run) for run in range(25)])",
     "torch.manual_seed(int(os.environ['SEED']))\n"
     "    accs = torch.tensor([main(0)])\n"
     "    print(%r + __import__('json').dumps({'final': accs[0].item()}), flush=True)" % MARK),
]
FINAL_TIME = ("the final time", "print_training_details(locals(), is_final_entry=True)",
              "print_training_details(locals(), is_final_entry=True)\n"
              "    print(%r + __import__('json').dumps({'total_cpu': total_time_seconds,"
              " 'tta_cpu': 1e-3 * starter.elapsed_time(ender)}), flush=True)" % MARK)


def port(text: str) -> str:
    """airbench94.py -> a CPU script (see the module's docstring). Exits 2 naming an edit that does not
    apply exactly once (a different version of airbench94.py)."""
    for what, old, new in EDITS + [FINAL_TIME]:
        n = text.count(old)
        if n != 1:
            sys.exit(f"vs_airbench: {what}: expected one {old!r} in airbench94.py, found {n} "
                     "(the port knows legacy/airbench94.py of KellerJordan/cifar10-airbench at f1c599c)")
        text = text.replace(old, new)
    text = text.replace("torch.cuda.synchronize()", "pass")
    return PRELUDE + text


def write_airbench_data(data_root: str, out: str) -> None:
    """CIFAR-10 JPEGs -> airbench's cache files (HWC uint8 images, int64 labels, class names)."""
    import torch

    from cadence import data
    from cadence.recipe import DataConfig

    os.makedirs(out, exist_ok=True)
    source = data.load_source(DataConfig(source="cifar10", root=data_root))
    classes = sorted(os.listdir(os.path.join(data_root, "train")))
    for name, split, shuffle in (("train.pt", source.train, True), ("test.pt", source.val, False)):
        images, labels = split.images, torch.as_tensor(split.labels)
        if shuffle:  # one fixed permutation: ImageFolder order is by class
            order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345))
            images, labels = images[order], labels[order]
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels.long(), "classes": classes},
                   os.path.join(out, name))


def launch(cmd: list[str], core: int, log: str, env: dict, cwd: str | None = None) -> subprocess.Popen:
    """``cmd`` pinned to ``core`` with one thread, its output appended to ``log`` (a continued run's too)."""
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(["taskset", "-c", str(core)] + cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env=env, cwd=cwd)


PAUSED = (130, 143)  # cadence stopped by Ctrl-C / SIGTERM after writing a checkpoint: it can continue


def wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, float]:
    """Wait for every process; its whole CPU seconds (user + system) from the kernel. One that fails
    stops the others (the pair is no comparison any more; cadence, stopped by SIGTERM, checkpoints).
    cadence stopped at a checkpoint (``PAUSED``) is not a failure: airbench goes on."""
    cpu, left = {}, {p.pid: name for name, p in procs.items()}
    while left:
        pid, status, usage = os.wait4(-1, 0)
        if pid in left:
            name = left.pop(pid)
            procs[name].returncode = os.waitstatus_to_exitcode(status)
            cpu[name] = usage.ru_utime + usage.ru_stime
            if procs[name].returncode and not (name == "cadence" and procs[name].returncode in PAUSED):
                for other in left.values():
                    procs[other].terminate()
    return cpu


def airbench_result(log: str) -> dict:
    rows = [json.loads(line[len(MARK):]) for line in open(log) if line.startswith(MARK)]
    curve = [(r["cpu"], r["acc"]) for r in rows if "epoch" in r and r["acc"] is not None]
    final = next(r["final"] for r in rows if "final" in r)
    times = next(r for r in rows if "total_cpu" in r)
    train = times["total_cpu"] - times["tta_cpu"]  # its own total counts the final evaluation: taken out
    first = next((r["epoch"] for r in rows if "epoch" in r and r["acc"] is not None), None)
    return {"acc": final, "cpu": train, "own_total": times["total_cpu"], "curve": curve + [(train, final)],
            "curve_from": first}


def cadence_result(run_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    evals = [r for r in rows if "val_top1" in r]
    if not evals:
        sys.exit(f"vs_airbench: {run_dir} has not finished (no evaluation yet): continue it with cadence train --resume")
    return {"acc": evals[-1]["val_top1"], "cpu": evals[-1]["cpu"], "curve": [(r["cpu"], r["val_top1"]) for r in evals]}


def reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """CPU seconds at the first evaluation at or above ``target`` (None: never)."""
    return next((cpu for cpu, acc in curve if acc >= target), None)


def at_most(x: dict, target: float) -> bool:
    """Whether a contender's reach of ``target`` is only an upper bound: its curve starts at a later
    epoch (``--curve FROM``) and its first evaluation there already reached it."""
    return bool(x.get("curve_from")) and x["curve"][0][1] >= target


def log_of(out: str, who: str, seed: int) -> str:
    """Where a contender's run of a seed logs: ``OUT/airbench-seedN.log``, ``OUT/NAME-seedN.log``."""
    return os.path.join(out, f"{who}-seed{seed}.log")


def recorded(path: str) -> list[dict]:
    """The results file: one entry per (name, seed), each with both contenders' figures."""
    return json.load(open(path)) if os.path.exists(path) else []


def precision_of(x: dict) -> str:
    return x.get("precision", "fp32")  # records before it was recorded: fp32, the default


def entry(x: dict) -> tuple[str, int, str]:
    """What identifies a results file's entry: (name, seed, precision)."""
    return x.get("name", "cadence"), x["seed"], precision_of(x)


def record(path: str, r: dict) -> list[dict]:
    """Adds ``r`` to the results file, replacing the entry of its (name, seed, precision); read afresh
    each time, so invocations that ran meanwhile into the same file (another --name, a --collect) are
    kept. Written whole under another name, then renamed over the file."""
    folder = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)  # two lanes of ablations finishing at once: one after the other
        results = [x for x in recorded(path) if entry(x) != entry(r)] + [r]
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), suffix=".tmp", delete=False) as f:
            json.dump(results, f, indent=1)
        os.replace(f.name, path)
    finally:
        os.close(folder)  # (and the lock with it)
    return results


def airbench_of(out: str, results: str, seed: int, precision: str) -> dict | None:
    """airbench's run of a seed: read from its log in OUT, or, when that is gone (a run dir of another
    session), from the results file's record of it at the same precision; None if neither has it."""
    if os.path.exists(log_of(out, "airbench", seed)):
        return airbench_result(log_of(out, "airbench", seed))
    return next((dict(x["airbench"]) for x in recorded(results)
                 if x["seed"] == seed and precision_of(x) == precision), None)


def has_curves(r: dict) -> bool:
    """Whether a seed's entry has both contenders evaluated after every epoch: run with ``--curve`` as a
    pair (``--cadence-only`` reads airbench's record of the seed, its final point alone)."""
    return bool(r.get("curve")) and all(len(r[who]["curve"]) > 1 for who in ("airbench", "cadence"))


def spread(xs: list[float], fmt: str) -> str:
    sd = fmt.replace("+", "")  # a spread has no sign
    return fmt.format(statistics.mean(xs)) + (" +- " + sd.format(statistics.stdev(xs)) if len(xs) > 1 else "")


def table(results: list[dict], precision: str) -> str:
    """The results file as a markdown table: airbench over every seed it ran, then each cadence recipe
    (``name``) over its seeds, with its difference in top-1 and its CPU ratio against airbench's runs
    of the same seeds (means of the per-seed figures) and the seeds whose ratio was measured side by
    side (the pair run at once, whole: ``side_by_side``; other ratios are across runs, and a machine's
    speed drifts between sessions); an ablation (``NAME@BASE``) also against BASE's runs of the seeds
    both ran."""
    results = [r for r in results if precision_of(r) == precision]
    airbench = {}
    for r in results:
        airbench.setdefault(r["seed"], r["airbench"])
    by_name: dict[str, dict[int, dict]] = {}
    paired: dict[str, list[int]] = {}
    for r in results:
        by_name.setdefault(r.get("name", "cadence"), {})[r["seed"]] = r["cadence"]
        if r.get("side_by_side"):
            paired.setdefault(r.get("name", "cadence"), []).append(r["seed"])
    rows = ["| contender | seeds | held-out top-1 (%) | training CPU s | top-1 - airbench's (points) | CPU / airbench's "
            "| seeds side by side | top-1 - its base's (points) | CPU / its base's |", "|---|---|---|---|---|---|---|---|---|"]
    seeds = sorted(airbench)
    rows.append(f"| airbench94, ported | {', '.join(map(str, seeds))} | "
                f"{spread([100 * airbench[s]['acc'] for s in seeds], '{:.2f}')} | "
                f"{spread([airbench[s]['cpu'] for s in seeds], '{:,.0f}')} | | | | | |")
    for name, runs in by_name.items():
        mine = sorted(runs)
        first = next(r for r in results if r.get("name", "cadence") == name)
        what = first["recipe"]
        what = what[what.rfind("recipes/"):] if "recipes/" in what else what  # wherever the checkout was
        what += "".join(f" `{s}`" for s in first.get("sets", []))
        row = (f"| {name} ({what}) | {', '.join(map(str, mine))} | "
               f"{spread([100 * runs[s]['acc'] for s in mine], '{:.2f}')} | "
               f"{spread([runs[s]['cpu'] for s in mine], '{:,.0f}')} | "
               f"{spread([100 * (runs[s]['acc'] - airbench[s]['acc']) for s in mine], '{:+.2f}')} | "
               f"{spread([runs[s]['cpu'] / airbench[s]['cpu'] for s in mine], '{:.2f}')}x | "
               f"{', '.join(map(str, sorted(paired.get(name, [])))) or 'none'} |")
        base = by_name.get(name.partition("@")[2], {})
        both = [s for s in mine if s in base]
        if both:
            row += (f" {spread([100 * (runs[s]['acc'] - base[s]['acc']) for s in both], '{:+.2f}')} | "
                    f"{spread([runs[s]['cpu'] / base[s]['cpu'] for s in both], '{:.2f}')}x |")
        else:
            row += " | |"
        rows.append(row)
    return "\n".join(rows + reach_table(results))


def reach_table(results: list[dict]) -> list[str]:
    """The seeds run with ``--curve`` (both contenders evaluated after every epoch), as a second table:
    each contender's training CPU until its held-out top-1 first reached the other's final one, by
    cadence recipe (means over the seeds where it did; how many did not). None when no seed has curves."""
    def reached(xs: list[dict]) -> str:
        ts = [x["to_reach_other"] for x in xs]
        got = [t for t in ts if t is not None]
        missed, bounds = len(ts) - len(got), sum(bool(x.get("to_reach_at_most")) for x in xs)
        return "; ".join(([("<= " if bounds else "") + spread(got, "{:,.0f}")] if got else [])
                         + ([f"at its first evaluation in {bounds} of {len(ts)}"] if bounds else [])
                         + ([f"not reached in {missed} of {len(ts)}"] if missed else []))
    by_name: dict[str, list[dict]] = {}
    for r in results:
        if has_curves(r):
            by_name.setdefault(r.get("name", "cadence"), []).append(r)
    if not by_name:
        return []
    rows = ["", "| contender (seeds evaluated after every epoch) | seeds | its CPU s to reach airbench's top-1 "
            "| airbench's CPU s to reach its top-1 |", "|---|---|---|---|"]
    for name, runs in by_name.items():
        rows.append(f"| {name} | {', '.join(str(r['seed']) for r in runs)} | "
                    f"{reached([r['cadence'] for r in runs])} | {reached([r['airbench'] for r in runs])} |")
    return rows


def launch_airbench(bench: str, out: str, seed: int, core: int, precision: str, curve: int | None) -> subprocess.Popen:
    """The ported airbench94 (in ``bench``) on ``core``, one seeded run, logging to OUT/airbench-seedN.log;
    ``curve``: the first epoch evaluated (None: none but the final evaluation)."""
    return launch([sys.executable, "airbench94_cpu.py"], core, log_of(out, "airbench", seed),
                  {"SEED": str(seed), "BF16": str(int(precision == "bf16")), "CURVE_FROM": str(curve).lower()}, cwd=bench)


def airbench_alone(bench: str, out: str, seed: int, core: int, precision: str, curve: int | None) -> None:
    """``--airbench-only``: one seed of airbench on ``core``, its log left in OUT for ``--cadence-only``.
    airbench cannot continue a run, so a seed already logged there is refused rather than appended to."""
    log = log_of(out, "airbench", seed)
    if os.path.exists(log):
        sys.exit(f"vs_airbench: {log} exists: airbench's seed {seed} is logged already (remove it to run it again)")
    proc = launch_airbench(bench, out, seed, core, precision, curve)
    cpu = wait_all({"airbench": proc})["airbench"]
    if proc.returncode:
        sys.exit(f"vs_airbench: airbench (seed {seed}) exited {proc.returncode}: see {log}")
    x = airbench_result(log)
    print(f"seed {seed} (airbench alone on core {core}): top-1 {100 * x['acc']:.2f}%  training CPU {x['cpu']:.0f} s  "
          f"(process {cpu:.0f} s, {len(x['curve']) - 1} evaluations on the way); {log} is read by --cadence-only"
          + (" --curve" if curve is not None else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--airbench", help="path of legacy/airbench94.py in a cifar10-airbench checkout")
    p.add_argument("--data", help="CIFAR-10 as JPEG folders: train/<class>/*.jpg, test/<class>/*.jpg")
    p.add_argument("--recipe", default=os.path.join(ROOT, "recipes", "cifar10-airbench.yaml"))
    p.add_argument("--name", default="cadence", help="cadence's runs are OUT/NAME-seedN: several recipes can "
                   "be compared with the same airbench runs (--collect)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="cadence recipe overrides")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cores", type=int, nargs=2, default=[0, 1], help="the two cores (swapped every seed)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both contenders")
    p.add_argument("--curve", nargs="?", const=0, type=int, metavar="FROM",
                   help="evaluate both (with TTA, untimed) after every epoch; airbench only from epoch FROM on "
                   "(its evaluations are a third of an epoch each: all ten make its half ~40%% longer)")
    p.add_argument("--out", default="vs-airbench")
    p.add_argument("--cadence-only", action="store_true", help="train cadence alone (on the second core) and read it "
                   "against the airbench run already logged in --out for each seed: an ablation or another recipe")
    p.add_argument("--airbench-only", action="store_true", help="train airbench alone (on the first core) and leave "
                   "its log in --out for each seed, recording nothing: a later --cadence-only (with --curve, if this "
                   "had it) reads it, so a pair's halves can run at different times")
    p.add_argument("--collect", action="store_true", help="run nothing: read each seed's finished airbench log and "
                   "cadence run in --out (after a cadence run stopped at a checkpoint was continued with --resume)")
    p.add_argument("--table", action="store_true", help="run nothing: print the results file as a markdown table")
    p.add_argument("--skip-recorded", action="store_true", help="run no seed the results file already holds for "
                   "this --name and --precision (the ablations script's lanes, run again, go on where they were)")
    p.add_argument("--results", help="the file each seed's figures are added to (default OUT/results.json); one kept "
                   "with the project holds seeds measured in other sessions, and gives --cadence-only and --collect "
                   "airbench's run of a seed whose log is gone")
    a = p.parse_args()
    if not (a.collect or a.table) and not (a.data and (a.airbench or a.cadence_only)):
        p.error("--airbench and --data are required (--cadence-only: --data; --collect, --table: neither)")
    if a.airbench_only and (a.cadence_only or a.collect):
        p.error("--airbench-only trains airbench alone: not with --cadence-only or --collect")
    out = os.path.abspath(a.out)
    saved = os.path.abspath(a.results or os.path.join(out, "results.json"))
    if a.table:
        if not recorded(saved):
            p.error(f"no results in {saved}")
        print(table(recorded(saved), a.precision))
        return
    bench = os.path.join(out, "airbench")
    if a.cadence_only or a.collect:
        for seed in a.seeds:
            if airbench_of(out, saved, seed, a.precision) is None:
                p.error(f"no airbench run for seed {seed} in {out} or {saved}: run the pair first")
    else:
        os.makedirs(bench, exist_ok=True)
        with open(a.airbench) as f:
            script = port(f.read())
        with open(os.path.join(bench, "airbench94_cpu.py"), "w") as f:
            f.write(script)
        if not os.path.exists(os.path.join(bench, "cifar10", "test.pt")):
            write_airbench_data(a.data, os.path.join(bench, "cifar10"))
    os.makedirs(out, exist_ok=True)
    ran = False
    for i, seed in enumerate(a.seeds):
        # the results file is read afresh for each seed: another lane of the ablation script adds to it
        if a.skip_recorded and (a.name, seed, a.precision) in map(entry, recorded(saved)):
            print(f"seed {seed} of {a.name} ({a.precision}): in {saved} already, not run again", flush=True)
            continue
        cores = a.cores if i % 2 == 0 else a.cores[::-1]
        if a.airbench_only:
            airbench_alone(bench, out, seed, cores[0], a.precision, a.curve)
            continue
        run_dir = os.path.join(out, f"{a.name}-seed{seed}")
        cadence_cmd = [sys.executable, "-m", "cadence", "train", a.recipe, "--out", run_dir, "--set", f"seed={seed}",
                       "--set", f"data.root={a.data}", "--set", f"train.precision={a.precision}", "--quiet",
                       "--set", f"train.eval_every={'end' if a.curve is None else 'epoch'}"]
        for s in a.sets:
            cadence_cmd += ["--set", s]
        started = time.time()
        continued = os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt"))  # this launch goes on from it
        if a.collect:  # the pair ran earlier; cadence's part may have been continued from a checkpoint
            whole = {"airbench": None, "cadence": None}
        else:
            procs = {"cadence": launch(cadence_cmd, cores[1], log_of(out, a.name, seed), {})}
            if not a.cadence_only:
                procs["airbench"] = launch_airbench(bench, out, seed, cores[0], a.precision, a.curve)
            whole = {"airbench": None, **wait_all(procs)}
            airbench_done = a.cadence_only or procs["airbench"].returncode == 0
            if procs["cadence"].returncode in PAUSED and airbench_done:
                again = ("this command again" if a.cadence_only else f"airbench's run is whole. Continue cadence "
                         f"alone on its core: this command again with --cadence-only --seeds {seed}")
                sys.exit(f"vs_airbench: cadence (seed {seed}) stopped at a checkpoint (its training CPU is in it); "
                         f"{again} (the same recipe in the same run directory goes on from its checkpoint)"
                         + ("" if a.cadence_only else f", then without it for the seeds after {seed}"))
            logs = {"airbench": "airbench", "cadence": a.name}
            for name, proc in procs.items():
                if proc.returncode:
                    sys.exit(f"vs_airbench: {name} (seed {seed}) exited {proc.returncode}: "
                             f"see {log_of(out, logs[name], seed)}")
        partial = a.collect or continued  # this process saw only the run's last part
        r = {"name": a.name, "recipe": a.recipe, "sets": a.sets, "seed": seed,
             "wall": None if partial else time.time() - started,
             "precision": a.precision, "curve": a.curve is not None, "side_by_side": not (a.cadence_only or partial),
             "airbench": airbench_of(out, saved, seed, a.precision), "cadence": cadence_result(run_dir)}
        for name in ("airbench", "cadence"):
            known = whole[name] is not None and not (name == "cadence" and partial)
            r[name]["process_cpu"] = whole[name] if known else r[name].get("process_cpu")
        other = {"airbench": "cadence", "cadence": "airbench"}
        curves = has_curves(r)
        for name in ("airbench", "cadence"):
            r[name]["to_reach_other"] = reach(r[name]["curve"], r[other[name]]["acc"]) if curves else None
            r[name]["to_reach_at_most"] = curves and at_most(r[name], r[other[name]]["acc"])
        record(saved, r)
        ran = True
        where = ("both read from their runs" if a.collect else f"cadence alone on core {cores[1]}, against "
                 "airbench's recorded run" if a.cadence_only else f"airbench on core {cores[0]}, cadence on core {cores[1]}")
        print(f"seed {seed} ({where}):", flush=True)
        for name in ("airbench", "cadence"):
            x = r[name]
            t = x["to_reach_other"]
            process = "not recorded" if x["process_cpu"] is None else f"{x['process_cpu']:.0f} s"
            print(f"  {name:8s} top-1 {100 * x['acc']:.2f}%  training CPU {x['cpu']:.0f} s  "
                  f"(process {process})  to reach {other[name]}'s {100 * r[other[name]]['acc']:.2f}%: "
                  + ((f"<= {t:.0f} s (its first evaluation)" if x["to_reach_at_most"] else f"{t:.0f} s") if t is not None
                     else "not reached" if curves else "(--curve, both logged)"),
                  flush=True)
    if ran:
        print(table(recorded(saved), a.precision))  # every seed the results file holds, this run's with them


if __name__ == "__main__":
    main()
