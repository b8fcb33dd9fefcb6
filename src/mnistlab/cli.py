"""The command line: each command parses (:mod:`mnistlab.cli_args`), calls the Python API, prints."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .cli_args import build_parser
from .errors import MnistlabError, UsageError


def _progress(enabled: bool):
    """A per-batch hook drawing a tqdm progress bar (with the running mean loss), or None where not ``enabled``."""
    if not enabled:
        return None
    from tqdm import tqdm

    state = {"bar": None, "sum": 0.0}

    def on_batch(b: int, n: int, loss: float) -> None:
        if b == 0:
            state["bar"] = tqdm(total=n, leave=False, unit="batch", dynamic_ncols=True)
            state["sum"] = 0.0
        state["sum"] += loss
        bar = state["bar"]
        bar.update(1)
        if b % 20 == 0 or b == n - 1:
            bar.set_postfix(loss=f"{state['sum'] / (b + 1):.4f}", refresh=b == n - 1)
        if b == n - 1:
            bar.close()

    return on_batch


def describe_sgd(config) -> str:
    text = f"SGD lr {config.lr} momentum {config.momentum}"
    extras = [name for name, on in (("nesterov", config.nesterov), (f"weight decay {config.weight_decay}",
              config.weight_decay), (f"{config.schedule} schedule", config.schedule != "constant"),
              (f"label smoothing {config.label_smoothing}", config.label_smoothing),
              (f"weight average (EMA) {config.ema}", config.ema)) if on]
    return ", ".join([text, *extras])


def describe_recipe(config) -> str:
    """What every training banner says of a recipe."""
    precision = "" if config.precision == "fp32" else f", precision {config.precision}"
    return f"{config.epochs} epochs, batch {config.batch_size}, {describe_sgd(config)}{precision}, split {config.split}"


def epoch_line(r: dict, epochs: int) -> str:
    return (f"epoch {r['epoch']:>3}/{epochs}  train_loss {r['train_loss']:.4f}  valid_loss {r['valid_loss']:.4f}  "
            f"valid_acc {100 * r['valid_acc']:.2f}%  {r['seconds']:.1f}s")


def format_grid(grid: list[list[int]]) -> str:
    return "[" + ",\n ".join(str(row) for row in grid) + "]"


def _train_config(args):
    """The config the options give: a preset's or a --config file's values, then the options given."""
    from .config import TrainConfig

    if args.config is not None and args.preset is not None:
        raise UsageError("give --config or --preset, not both")
    # the options named as TrainConfig's fields; None: not given
    options = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__
               if name != "preset" and hasattr(args, name)}
    if args.config is not None:
        try:
            return TrainConfig.from_file(args.config, **options)
        except UsageError as exc:
            raise UsageError(f"--config {exc}") from None
    return TrainConfig.from_preset(args.preset, **options)


def cmd_train(args) -> int:
    from .run.batch import is_batch
    from .run.driver import RESUME, START, Job, run_training
    from .train.distributed import launched

    if (args.storage is not None or args.study is not None) and args.seeds is None:
        raise UsageError("--storage and --study queue seeds; give --seeds too")
    if args.seeds is not None:
        return _train_seeds(args)
    if args.resume is not None and args.out is not None:
        raise UsageError("--resume continues the run in place; leave out --out")
    if args.batched:
        raise UsageError("--batched trains the seeds of --seeds together; give --seeds too")
    if args.resume is not None and is_batch(args.resume):
        return _resume_batch(args)
    config = _train_config(args) if args.resume is None else None
    started = {}

    def on_start(config, run_dir: Path, history) -> None:
        started.update(config=config, run_dir=run_dir)
        verb = f"resuming {run_dir}" if history.epochs else "training"
        print(f"{verb} {config.model}: {describe_recipe(config)}, seed {config.seed}", flush=True)

    interactive = sys.stdout.isatty() and sys.stderr.isatty() and not launched()
    try:
        result = run_training(config, args.resume or args.out, mode=RESUME if args.resume else START,
                              force=args.force, job=Job(args.argv, args.max_restarts, args.dist_timeout),
                              on_start=on_start, on_batch=_progress(interactive),
                              on_epoch=lambda r: print(epoch_line(r, started["config"].epochs), flush=True))
    except KeyboardInterrupt:
        where = started.get("run_dir", args.resume or args.out or "RUN_DIR")
        print(f"\ninterrupted; every complete epoch is saved. Resume with: mnistlab train --resume {where}",
              file=sys.stderr)
        return 130
    if result is None:  # another process of a data-parallel job, or the launcher of one
        return 0
    s = result.summary
    print(f"predicted labels of validation images 0-8:\n{format_grid(s['grid_predictions'])}")
    print(f"true labels:\n{format_grid(s['grid_labels'])}")
    tta = f" (test-time augmentation; single view {100 * s['valid_acc_single']:.2f}%)" if s.get("tta") else ""
    print(f"valid_acc {100 * s['valid_acc']:.2f}%{tta}  valid_loss {s['valid_loss']:.4f}  "
          f"trained in {s['train_seconds']:.1f}s; run saved to {result.run_dir}")
    return 0


def _train_seeds(args) -> int:
    from .lab.seeds import train_queued_seeds, train_seeds
    from .run.rundir import default_run_dir

    if args.resume is not None or args.seed is not None:
        raise UsageError("--seeds trains fresh runs; leave out --resume and --seed (resume one OUT/seed-S instead)")
    if args.nproc not in (None, 1):
        raise UsageError("--seeds trains one process per run; leave out --nproc")
    config = _train_config(args)
    out = Path(args.out) if args.out else default_run_dir(config.model)
    if args.batched and args.storage is not None:
        raise UsageError("--batched trains the seeds together in this process; leave out --storage")
    queued = f" queued in {args.storage}" if args.storage is not None else ""
    print(f"training {config.model} with seeds {', '.join(map(str, args.seeds))}{queued}: {describe_recipe(config)}; "
          f"runs in {out}", flush=True)
    hooks = _seed_hooks(config.epochs)
    try:
        if args.storage is not None:
            summary = train_queued_seeds(config, list(args.seeds), out, args.storage, args.study, **hooks)
        else:
            summary = train_seeds(config, list(args.seeds), out, force=args.force, batched=args.batched,
                                  **hooks, **(_stop_hook() if args.batched else {}))
    except KeyboardInterrupt:
        again = f"the batch with mnistlab train --resume {out}" if args.batched else \
            f"the interrupted one with mnistlab train --resume {out}/seed-S"
        print(f"\ninterrupted; finished seeds are in {out}; resume {again}", file=sys.stderr)
        return 130
    return _print_seeds(summary, out)


def _resume_batch(args) -> int:
    from .lab.seeds import resume_batch
    from .run.batch import batch_epochs

    print(f"resuming the batch in {args.resume}", flush=True)
    try:
        summary = resume_batch(args.resume, **_seed_hooks(batch_epochs(args.resume)), **_stop_hook())
    except KeyboardInterrupt:
        print(f"\ninterrupted; resume with mnistlab train --resume {args.resume}", file=sys.stderr)
        return 130
    return _print_seeds(summary, Path(args.resume))


def _print_seeds(summary: dict | None, out: Path) -> int:
    from .lab.seeds import format_spread

    if summary is None:
        print("no seed left to claim; the others are still training elsewhere")
    elif summary["valid_acc"] is None:
        print(f"every seed stopped early; see {out / 'seeds.json'}")
        return 1
    else:
        print(f"valid_acc {format_spread(summary['valid_acc'])}; written to {out / 'seeds.json'}")
    return 0


def _stop_hook() -> dict:
    def on_stop(seed: int, message: str) -> None:
        print(f"seed {seed} stopped: {message}; the other seeds go on", flush=True)

    return {"on_stop": on_stop}


def _seed_hooks(epochs: int) -> dict:
    """What a seed sweep prints: each epoch's line and each finished run's, led by the seed."""

    def on_run(seed, result) -> None:
        s = result.summary
        print(f"seed {seed}: valid_acc {100 * s['valid_acc']:.2f}%  valid_loss {s['valid_loss']:.4f}  "
              f"trained in {s['train_seconds']:.1f}s -> {result.run_dir}", flush=True)

    def on_epoch(seed: int, r: dict) -> None:
        print(f"seed {seed} {epoch_line(r, epochs)}", flush=True)

    return {"on_run": on_run, "on_epoch": on_epoch}


def cmd_search(args) -> int:
    from .lab import search

    if args.show:
        return _print_search(search.show(args.out, args.storage, args.study), args.json)
    space = search.load_space(args.space) if args.space else None

    def on_trial(row: dict) -> None:
        acc = f"{100 * row['valid_acc']:.2f}%" if row["valid_acc"] is not None else "-"
        print(f"trial {row['number']}: {row['state']}, valid_acc {acc} after epoch {row['epochs']}, "
              f"{json.dumps(row['params'])}", flush=True)

    print(f"searching into {args.out}: {args.trials} trials in all, split {args.split}", flush=True)
    result = search.search(args.out, args.trials, space=space, storage=args.storage, study_name=args.study,
                           split=args.split, data_dir=args.data_dir, seed=args.seed, device=args.device,
                           heartbeat=args.heartbeat, on_trial=on_trial)
    return _print_search(result, args.json)


def _print_search(result: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'trial':>5}  {'state':<8}  {'valid_acc':>9}  {'epochs':>6}  params")
    for r in result["trials"]:
        acc = f"{100 * r['valid_acc']:.2f}%" if r["valid_acc"] is not None else "-"
        params = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r["params"].items())
        print(f"{r['number']:>5}  {r['state']:<8}  {acc:>9}  {r['epochs'] or '-':>6}  {params}")
    best = result["best"]
    if best is None:
        print("no trial finished yet")
    else:
        print(f"best: trial {best['number']}, valid_acc {100 * best['valid_acc']:.2f}% ({best['run_dir']}); "
              f"its config is in best.json")
    return 0


def cmd_ensemble(args) -> int:
    from .lab.ensemble import ensemble
    from .lab.seeds import format_spread

    if args.choose:
        return _choose_mix(args)
    result = ensemble(args.run_dirs, tta=args.tta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for m in result["members"]:
        print(f"{m['run_dir']}: valid_acc {100 * m['valid_acc']:.2f}%")
    print(f"members: {format_spread(result['member_acc'])}")
    how = "mean probabilities" + (", test-time augmentation" if result["tta"] else "")
    n = len(result["members"])
    print(f"ensemble of {n} ({how}): valid_acc {100 * result['valid_acc']:.2f}%  "
          f"nll {result['valid_nll']:.4f}  ({result['n_valid']} images, split {result['split']})")
    counts = ", ".join(f"{k + 1}: {c}" for k, c in enumerate(result["wrong_in"]))
    print(f"gain: {100 * result['gain_over_mean']:+.2f} points over the members' mean, "
          f"{100 * result['gain_over_best']:+.2f} over the best member")
    print(f"images wrong in k of the {n} runs (k: images): {counts}; right in at least one run: "
          f"{100 * result['oracle_acc']:.2f}%")
    return 0


def _choose_mix(args) -> int:
    from .lab.ensemble import mixes

    names, rows = mixes(args.run_dirs, size=args.size, tta=args.tta)
    if args.json:
        print(json.dumps({"recipes": names, "mixes": rows}, indent=2))
        return 0
    print(f"{len(args.run_dirs)} runs, {len(names)} recipes ({'with' if args.tta else 'without'} --tta):")
    for i, name in enumerate(names):
        print(f"  recipe {chr(65 + i)}: {name}")
    print("| members | mix | mean accuracy | min – max | subsets |")
    print("|---|---|---|---|---|")
    for r in rows:
        mix = " + ".join(f"{k}{chr(65 + i)}" for i, k in enumerate(r["counts"]) if k)
        print(f"| {r['members']} | {mix} | {100 * r['mean']:.3f}% | {100 * r['min']:.2f} – {100 * r['max']:.2f}% "
              f"| {r['subsets']} |")
    best = max(rows, key=lambda r: (r["mean"], -r["members"]))
    mix = ", ".join(f"{k} x {names[i]}" for i, k in enumerate(best["counts"]) if k)
    print(f"best mean: {mix} ({100 * best['mean']:.3f}% over {best['subsets']} choices of runs)")
    return 0


def cmd_evaluate(args) -> int:
    from .use.classifier import evaluate_run

    result = evaluate_run(args.run_dir, tta=args.tta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"valid_loss {result['valid_loss']:.4f}  valid_acc {100 * result['valid_acc']:.2f}%  "
          f"({result['n_valid']} validation images{', test-time augmentation' if result['tta'] else ''})\n")
    print(f"{'class':>5}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for r in result["per_class"]:
        print(f"{r['class']:>5}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7}")
    pairs = ", ".join(f"{p['true']}->{p['predicted']} ({p['count']})" for p in result["most_confused"])
    print(f"\nmost confused (true->predicted): {pairs or 'none'}")
    return 0


def cmd_predict(args) -> int:
    if args.images and args.valid is not None:
        raise UsageError("give IMAGE files or --valid, not both")
    return _predict_images(args) if args.images else _predict_valid(args)


def _predict_images(args) -> int:
    from .use.classifier import load_run

    # Every file is prepared (and so checked) before anything is printed.
    proba = load_run(args.run_dir).predict_proba(list(args.images))
    rows = [{"file": path, "label": int(p.argmax()), "probabilities": [round(float(v), 6) for v in p]}
            for path, p in zip(args.images, proba, strict=True)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        top = sorted(range(len(r["probabilities"])), key=lambda k: -r["probabilities"][k])[:3]
        ranked = ", ".join(f"{k}: {r['probabilities'][k]:.3f}" for k in top)
        print(f"{r['file']}: {r['label']}  ({ranked})")
    return 0


def _predict_valid(args) -> int:
    from .use.classifier import predict_valid

    rows = predict_valid(args.run_dir, *(args.valid or (0, 9)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'index':>6}  {'pred':>4}  {'label':>5}  {'prob':>6}")
    for r in rows:
        mark = "" if r["predicted"] == r["label"] else "  wrong"
        print(f"{r['index']:>6}  {r['predicted']:>4}  {r['label']:>5}  {r['probability']:>6.3f}{mark}")
    correct = sum(r["predicted"] == r["label"] for r in rows)
    print(f"{correct}/{len(rows)} correct")
    return 0


def _png_path(text: str) -> Path:
    out = Path(text)
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out}: expected a file name ending in .png")
    return out


def cmd_show(args) -> int:
    from . import plots

    out = _png_path(args.out or f"{args.part}-{args.index}.png")
    plots.save(plots.plot_dataset(args.part, args.index, args.grid, args.split, args.data_dir), out)
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    from .use.report import write_report

    print(f"wrote {write_report(args.run_dir, args.out)}")
    return 0


def cmd_compare(args) -> int:
    from . import plots
    from .lab.compare import compare_runs

    out = _png_path(args.out)
    rows, histories = compare_runs(args.run_dirs)
    plots.save(plots.plot_compare(histories), out)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["run"]) for r in rows)
    print(f"{'run':<{width}}  {'model':<8}  {'epochs':>6}  {'valid_acc':>9}  {'valid_loss':>10}  {'train_s':>7}")
    for r in rows:
        print(f"{r['run']:<{width}}  {r['model']:<8}  {r['epochs']:>6}  {100 * r['valid_acc']:>8.2f}%  "
              f"{r['valid_loss']:>10.4f}  {r['train_seconds']:>7.1f}")
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from .run.rundir import check_run_dir
    from .use.export import export_run

    check_run_dir(args.run_dir)
    print(f"wrote {export_run(args.run_dir, args.format, args.out)}")
    return 0


def cmd_serve(args) -> int:
    from .run.rundir import check_run_dir
    from .use.serve import serve

    check_run_dir(args.run_dir)
    serve(args.run_dir, args.host, args.port, args.workers,
          on_ready=lambda url: print(f"serving {args.run_dir} on {url} (Ctrl-C stops)", flush=True))
    return 0


def cmd_bench(args) -> int:
    from .files import write_text_atomic
    from .lab import bench

    out = Path(args.out) if args.out else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        raise UsageError(f"--out {out}: expected a file in an existing folder")

    def on_result(r) -> None:
        reach = r.time_to()
        reached = f"after {reach:.1f} s" if reach is not None else "not reached"
        print(f"{r.name} (seed {r.seed}): {r.images_per_second:,.0f} images/s, valid_acc {100 * r.valid_acc:.2f}% "
              f"after {len(r.epochs)} epochs, 99% {reached}; "
              f"whole process {r.wall_seconds:.1f} s, peak RSS {r.max_rss_mb:.0f} MB", flush=True)

    plan = bench.BenchPlan(quick=args.quick, seeds=args.seeds, device=args.device)
    print(f"machine: {bench.machine()}", flush=True)
    result = bench.run_bench(plan, on_result)
    if out is not None:
        write_text_atomic(out, result["table"])
    print(json.dumps(result["rows"], indent=2) if args.json else "\n" + result["table"], end="" if not args.json
          else "\n")
    return 0


COMMANDS = {"train": cmd_train, "search": cmd_search, "evaluate": cmd_evaluate, "predict": cmd_predict,
            "show": cmd_show, "report": cmd_report, "compare": cmd_compare, "export": cmd_export,
            "serve": cmd_serve, "ensemble": cmd_ensemble, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from .train.distributed import job_argv

    parser = build_parser()
    if argv is None:
        argv = job_argv() or sys.argv[1:]
    argv = list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except MnistlabError as exc:
        print(f"mnistlab {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mnistlab {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"mnistlab {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def run() -> None:
    """The console script and ``python -m mnistlab``: :func:`main`, then a quick exit.

    When ``main`` returns, everything the command writes is complete (closed and renamed
    into place); what is left is the interpreter's teardown of torch's and matplotlib's
    modules, about 0.5 s here, which ``os._exit`` skips once the output is flushed.
    (``--help``, ``--version`` and usage errors leave through ``SystemExit`` as usual.)
    """
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that went away (`| head`), or a closed stream
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
