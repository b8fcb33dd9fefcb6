"""The command line: a thin layer over the Python API. Printing lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .config import AUGMENT_NAMES, DEVICES, MODEL_NAMES, PRESETS
from .data.mnist import SPLITS
from .errors import MnistlabError, UsageError
from .train.schedule import SCHEDULES

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit status 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1-65535, got {text!r}")
    return value


def seed_list(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2), '0-9' -> (0, ..., 9), or both mixed: distinct non-negative integers."""
    try:
        seeds = []
        for part in text.split(","):
            first, sep, last = part.partition("-")
            seeds += list(range(int(first), int(last) + 1)) if sep and first else [int(part)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 0,1,2 or 0-9, got {text!r}") from None
    seeds = tuple(seeds)
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers, got {text!r}")
    return seeds


def index_range(text: str) -> tuple[int, int]:
    """'A:B' (items A..B-1) or 'N' (item N)."""
    try:
        if ":" in text:
            start, stop = text.split(":")
            start, stop = int(start or 0), int(stop)
        else:
            start = int(text)
            stop = start + 1
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP or an index, got {text!r}") from None
    if start < 0 or stop <= start:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < STOP, got {text!r}")
    return start, stop


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run directory",
                       description="Train a model as the seed does and write a run directory.")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="a named recipe; explicit options override its values. seed: the seed's CNN as its "
                        "walk-through trains it (the default values below); fast: time to 99%% (a small "
                        "BatchNorm CNN, 2 epochs, one-cycle Nesterov SGD); best: accuracy on the standard test set "
                        "(fastcnn twice as wide, augmentation, 65 epochs, test-time augmentation)")
    p.add_argument("--model", default=None, choices=list(MODEL_NAMES), help="registered model (default: cnn)")
    p.add_argument("--epochs", type=positive_int, default=None, help="passes over the training part (default: 15)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per SGD step (default: 64)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="SGD learning rate, the peak one with --schedule onecycle (default: 0.5 for linear, 0.1 "
                        "for cnn)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: 0 for linear, 0.9 for cnn)")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 penalty (default: 0)")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                   help="learning rate per step: constant, or onecycle (linear rise over the first quarter, "
                        "then linear fall to 0) (default: constant)")
    p.add_argument("--label-smoothing", type=float, default=None, help="in [0, 1) (default: 0)")
    p.add_argument("--augment", default=None, choices=list(AUGMENT_NAMES),
                   help="affine: random shifts (2 px), rotations (10 degrees) and scaling (10%%) per image; "
                        "elastic: the same plus a smooth random elastic distortion (default: none)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights, updated every step "
                        "with this decay, e.g. 0.999 (default: 0, off)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="score the final model with test-time augmentation: probabilities averaged over each "
                        "validation image and its 8 one-pixel shifts (default: off; on in --preset best)")
    p.add_argument("--seed", type=int, default=None, help="random seed for weights and shuffling (default: 0)")
    p.add_argument("--subsample", type=float, default=None, metavar="FRACTION",
                   help="train on this fraction of the training part, a subset drawn with the seed: runs of "
                        "different seeds see different images, for diverse ensembles (default: 1, all)")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...|A-B",
                   help="train once per seed into OUT/seed-S and report mean ± std of the accuracy")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="with --seeds: queue the seeds in this Optuna storage (sqlite:///PATH or "
                        "postgresql://USER@HOST/DB); every process started with the same command trains the next "
                        "unclaimed seed, each exactly once (default: train them here, one after another)")
    p.add_argument("--study", default=None, help="with --storage: the queue's name (default: seeds-OUT's name)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a JSON config, e.g. a search's best.json or a run's config.json; explicit options "
                        "override its values")
    p.add_argument("--split", default=None, choices=list(SPLITS),
                   help="seed: first 50,000 train / last 20,000 valid; standard: 60,000 / the 10,000 test images; "
                        "holdout: the training images alone, 50,000 / 10,000, for tuning (default: seed)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST-format IDX files, gzip or raw (default: the shipped MNIST)")
    p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-YYYYmmdd-HHMMSS)")
    p.add_argument("--force", action="store_true", help="overwrite the run in an existing --out directory")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last complete epoch (its own config is used)")
    p.add_argument("--device", default=None, choices=list(DEVICES),
                   help="auto: the GPU where the machine shows one and PyTorch can use it, else the CPU "
                        "(default: auto)")
    p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="train this run in N processes on this machine (data-parallel, through torchrun; gloo on "
                        "the CPU, NCCL on GPUs); --batch-size stays the global batch (default: 1)")
    p.add_argument("--max-restarts", type=non_negative_int, default=0, metavar="K",
                   help="with --nproc: restart every process from the last checkpoint after one dies, up to K "
                        "times (default: 0)")
    p.add_argument("--dist-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="with --nproc: end the job when a process stays silent this long (default: 120)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with --nproc on GPUs: BatchNorm statistics over the whole global batch (default: each "
                        "process its own)")
    p.set_defaults(func=cmd_train)


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="hyperparameter search on Optuna; every trial a run directory",
                       description="Search a declared space with Optuna's TPE sampler (seeded), pruning trials "
                                   "on their per-epoch validation accuracy. Trials are run directories OUT/trial-N; "
                                   "OUT/best.json is the best config. Start the same command in more processes "
                                   "(on other machines with --storage postgresql://...) to share the work.")
    p.add_argument("out", metavar="OUT", help="folder for the trials' run directories (shared by the workers)")
    p.add_argument("--trials", type=positive_int, default=20, help="finished trials in the study (default: 20)")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="JSON space: {\"base\": {TrainConfig values}, \"params\": {NAME: {\"type\": float|int|"
                        "categorical, ...}}} (default: lr, weight decay, momentum, label smoothing, batch size, "
                        "epochs, fastcnn/widecnn, augmentation around the fast preset)")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna storage: sqlite:///PATH or postgresql://USER@HOST:PORT/DB (default: "
                        "sqlite:///OUT/study.db)")
    p.add_argument("--study", default=None, help="study name in the storage (default: search)")
    p.add_argument("--split", default="holdout", choices=list(SPLITS),
                   help="only holdout is allowed: the others' validation parts hold the test images (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of every trial's run (default: 0)")
    p.add_argument("--data-dir", default=None, help="folder with four MNIST-format IDX files (default: MNIST)")
    p.add_argument("--device", default="auto", choices=list(DEVICES), help="(default: auto)")
    p.add_argument("--heartbeat", type=positive_int, default=30, metavar="SECONDS",
                   help="a worker silent for 3 heartbeats is taken as dead and its trial continued by another "
                        "(default: 30)")
    p.add_argument("--show", action="store_true", help="print the trials and the best, and write best.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_search)


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="loss and accuracy of a run on its validation part")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average over each image and its 8 one-pixel shifts "
                        "(default: as the run was trained)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_evaluate)


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify your own images, or validation items",
                       description="Classify image files (prepared as MNIST's digits were: grayscale, "
                                   "inverted if the background is light, cropped, scaled to 20 px, centred "
                                   "by mass in 28x28), or validation items of the run's split.")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="PNG, JPEG or any file Pillow reads, any size")
    p.add_argument("--valid", type=index_range, default=None, metavar="START:STOP",
                   help="validation items to predict (default without IMAGE: 0:9, the seed's grid)")
    p.add_argument("--json", action="store_true", help="print JSON (all probabilities) instead of text")
    p.set_defaults(func=cmd_predict)


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="draw dataset images to a PNG (default: the first training example)")
    p.add_argument("--index", type=int, default=0, help="first image to draw (default: 0)")
    p.add_argument("--part", default="train", choices=["train", "valid"], help="part of the split (default: train)")
    p.add_argument("--grid", type=positive_int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="draw ROWS x COLS images starting at --index (default: one image)")
    p.add_argument("--split", default="seed", choices=list(SPLITS), help="the split (default: seed)")
    p.add_argument("--data-dir", default=None, help="folder with four MNIST-format IDX files (default: MNIST)")
    p.add_argument("--out", default=None, help="PNG file to write (default: PART-INDEX.png)")
    p.set_defaults(func=cmd_show)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html (or a search folder's), one self-contained page")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="validation curves and final figures of several runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by 'mnistlab train'")
    p.add_argument("--out", default="compare.png", help="picture to write (default: compare.png)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_compare)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the run's model as ONNX or TorchScript",
                       description="Export a run's model. Input 'pixels': float32 (N, 784) in [0, 1) "
                                   "(uint8 / 256); output 'logits': float32 (N, classes).")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="(default: onnx)")
    p.add_argument("--out", default=None, help="file to write (default: RUN_DIR/model.onnx or RUN_DIR/model.pt)")
    p.set_defaults(func=cmd_export)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a run over HTTP: POST /predict, GET /health, a page to draw on")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default: 8000)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes, each with the model and one torch thread (default: 1)")
    p.set_defaults(func=cmd_serve)


def _add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="accuracy of the averaged probabilities of several runs",
                       description="Average the class probabilities of several finished runs (same split) on "
                                   "their validation part; print each run's accuracy and the ensemble's.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by 'mnistlab train'")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: each run's probabilities averaged over the image and its 8 "
                        "one-pixel shifts first")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_ensemble)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="time our presets against the seed's code and pytorch/examples, side by side",
                       description="Run the seed's code as written, the pytorch/examples MNIST recipe and our "
                                   "presets one after another in fresh processes; print (and with --out write) a "
                                   "Markdown table: time to 99%%, images/s, FLOP rate against this CPU's peak, "
                                   "whole command time and peak memory. Takes about 8 minutes; --quick about one.")
    p.add_argument("--quick", action="store_true", help="bounded runs: speed only, no time to 99%% for references")
    p.add_argument("--seeds", type=seed_list, default=(0, 1, 2), help="seeds of the fast preset (default: 0,1,2)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mnistlab", description="Train, inspect and use MNIST-style digit classifiers.")
    parser.add_argument("--version", action="version", version=f"mnistlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_search(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_show(sub)
    _add_report(sub)
    _add_compare(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_ensemble(sub)
    _add_bench(sub)
    return parser


def _progress(enabled: bool):
    """Per-batch and per-epoch hooks: a tqdm bar on a terminal, one line per epoch otherwise."""
    from tqdm import tqdm

    state = {"bar": None, "sum": 0.0}

    if not enabled:
        return None

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


def epoch_line(r: dict, epochs: int) -> str:
    return (f"epoch {r['epoch']:>3}/{epochs}  train_loss {r['train_loss']:.4f}  valid_loss {r['valid_loss']:.4f}  "
            f"valid_acc {100 * r['valid_acc']:.2f}%  {r['seconds']:.1f}s")


def format_grid(grid: list[list[int]]) -> str:
    return "[" + ",\n ".join(str(row) for row in grid) + "]"


def _on_train_start(config, run_dir: Path, resuming: bool) -> None:
    verb = f"resuming {run_dir}" if resuming else "training"
    print(f"{verb} {config.model}: {config.epochs} epochs, batch {config.batch_size}, {describe_sgd(config)}, "
          f"split {config.split}, seed {config.seed}", flush=True)


def cmd_train(args) -> int:
    from .run.driver import resume_run, train_run
    from .run.rundir import default_run_dir, read_config
    from .train import distributed

    if args.config is not None and args.preset is not None:
        raise UsageError("give --config or --preset, not both")
    if (args.storage is not None or args.study is not None) and args.seeds is None:
        raise UsageError("--storage and --study queue seeds; give --seeds too")
    if args.seeds is not None:
        if args.nproc not in (None, 1):
            raise UsageError("--seeds trains one process per run; leave out --nproc")
        return _train_seeds(args)
    if args.resume is not None:
        if args.out is not None:
            raise UsageError("--resume continues the run in place; leave out --out")
        config, run_dir = read_config(args.resume), Path(args.resume)
    else:
        config = _config_from_args(args)
        run_dir = Path(args.out) if args.out else default_run_dir(config.model)
    if distributed.launched():  # one of the processes torchrun started
        config = _join_job(args, config)
    elif config.nproc > 1:
        return _launch_job(args, config, run_dir)
    resuming = args.resume is not None or distributed.restarted()  # a restarted job continues its run
    if distributed.is_main():
        _on_train_start(config, run_dir, resuming)
    interactive = sys.stdout.isatty() and sys.stderr.isatty() and not distributed.launched()
    hooks = {"on_batch": _progress(interactive),
             "on_epoch": lambda r: print(epoch_line(r, config.epochs), flush=True)}
    try:
        if resuming:
            result = resume_run(run_dir, **hooks)
        else:
            result = train_run(config, run_dir, force=args.force, **hooks)
    except KeyboardInterrupt:
        print(f"\ninterrupted; every complete epoch is saved. Resume with: mnistlab train --resume {run_dir}",
              file=sys.stderr)
        return 130
    finally:
        distributed.teardown()
    if not distributed.is_main():
        return 0
    s = result.summary
    print(f"predicted labels of validation images 0-8:\n{format_grid(s['grid_predictions'])}")
    print(f"true labels:\n{format_grid(s['grid_labels'])}")
    tta = f" (test-time augmentation; single view {100 * s['valid_acc_single']:.2f}%)" if s.get("tta") else ""
    print(f"valid_acc {100 * s['valid_acc']:.2f}%{tta}  valid_loss {s['valid_loss']:.4f}  "
          f"trained in {s['train_seconds']:.1f}s; run saved to {result.run_dir}")
    return 0


def _launch_job(args, config, run_dir: Path) -> int:
    """Start ``config.nproc`` processes through torchrun, each running this same command."""
    from .train import distributed
    from .train.engine import KERNELS, choose_engine, create_engine, resolve_device

    device = resolve_device(config.device)
    if choose_engine(config, device) == KERNELS:  # refuse what the processes would refuse, before starting them
        create_engine(config, 10, device)  # the one-line refusal: that engine trains in one process
    if args.resume is None:
        if config.sync_bn and device != "cuda":
            raise UsageError("--sync-bn synchronises BatchNorm across GPUs; on the CPU each process keeps its own "
                             "statistics (leave out --sync-bn)")
    argv = [a for a in args.argv if a != "--force"] if args.resume else list(args.argv)
    if args.resume is None and args.out is None:
        argv += ["--out", str(run_dir)]
    code = distributed.launch(argv, config.nproc, args.max_restarts)
    return code


def _join_job(args, config):
    """Join the job torchrun started; the config records the job's size. Other ranks print nothing."""
    from dataclasses import replace

    from .train import distributed
    from .train.engine import resolve_device

    config = replace(config, nproc=distributed.world_size())
    distributed.setup(resolve_device(config.device), args.dist_timeout or distributed.DEFAULT_TIMEOUT)
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    return config


def _config_from_args(args):
    from .config import TrainConfig

    base = _read_config_file(args.config) if args.config else {}
    if base and args.preset is None:
        return TrainConfig.from_dict({**base, **{k: v for k, v in _option_values(args).items() if v is not None}})
    return TrainConfig.from_preset(
        args.preset, model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay, schedule=args.schedule,
        label_smoothing=args.label_smoothing, augment=args.augment, seed=args.seed, split=args.split,
        data_dir=args.data_dir, device=args.device, ema=args.ema, tta=args.tta, subsample=args.subsample,
        nproc=args.nproc, sync_bn=args.sync_bn)


def _option_values(args) -> dict:
    names = ("model", "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "schedule",
             "label_smoothing", "augment", "seed", "split", "data_dir", "device", "ema", "tta", "subsample", "nproc",
             "sync_bn")
    return {name: getattr(args, name) for name in names}


def _read_config_file(path: str) -> dict:
    from .config import TrainConfig

    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--config {path}: not a JSON config ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a JSON object of training settings")
    unknown = set(values) - set(TrainConfig.__dataclass_fields__) - {"resolved_device"}
    if unknown:
        raise UsageError(f"--config {path}: unknown setting {sorted(unknown)[0]!r}")
    return {k: v for k, v in values.items() if k != "resolved_device"}


def _train_seeds(args) -> int:
    from .lab.seeds import format_spread, train_seeds
    from .run.rundir import default_run_dir

    if args.resume is not None or args.seed is not None:
        raise UsageError("--seeds trains fresh runs; leave out --resume and --seed (resume one OUT/seed-S instead)")
    config = _config_from_args(args)
    out = Path(args.out) if args.out else default_run_dir(config.model)
    if args.storage is not None:
        return _queued_seeds(args, config, out)
    print(f"training {config.model} with seeds {', '.join(map(str, args.seeds))}: {config.epochs} epochs, batch "
          f"{config.batch_size}, {describe_sgd(config)}, split {config.split}; runs in {out}", flush=True)

    def on_run(seed, result) -> None:
        s = result.summary
        print(f"seed {seed}: valid_acc {100 * s['valid_acc']:.2f}%  valid_loss {s['valid_loss']:.4f}  "
              f"trained in {s['train_seconds']:.1f}s -> {result.run_dir}", flush=True)

    def on_epoch(seed: int, r: dict) -> None:
        print(f"seed {seed} {epoch_line(r, config.epochs)}", flush=True)

    try:
        summary = train_seeds(config, list(args.seeds), out, force=args.force, on_run=on_run, on_epoch=on_epoch)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished seeds are in {out}; resume the interrupted one with "
              f"mnistlab train --resume {out}/seed-S", file=sys.stderr)
        return 130
    print(f"valid_acc {format_spread(summary['valid_acc'])}; written to {out / 'seeds.json'}")
    return 0


def _queued_seeds(args, config, out: Path) -> int:
    from .lab.seeds import format_spread, train_queued_seeds

    print(f"training {config.model} with seeds {', '.join(map(str, args.seeds))} queued in {args.storage}: "
          f"{config.epochs} epochs, batch {config.batch_size}, {describe_sgd(config)}, split {config.split}; "
          f"runs in {out}", flush=True)

    def on_run(seed, result) -> None:
        s = result.summary
        print(f"seed {seed}: valid_acc {100 * s['valid_acc']:.2f}%  trained in {s['train_seconds']:.1f}s -> "
              f"{result.run_dir}", flush=True)

    def on_epoch(seed: int, r: dict) -> None:
        print(f"seed {seed} {epoch_line(r, config.epochs)}", flush=True)

    summary = train_queued_seeds(config, list(args.seeds), out, args.storage, args.study, on_run=on_run,
                                 on_epoch=on_epoch)
    if summary is None:
        print("no seed left to claim; the others are still training elsewhere")
    else:
        print(f"valid_acc {format_spread(summary['valid_acc'])}; written to {out / 'seeds.json'}")
    return 0


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


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate_run

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


def main(argv: list[str] | None = None) -> int:
    from .train.distributed import job_argv

    parser = build_parser()
    if argv is None:
        argv = job_argv() or sys.argv[1:]
    argv = list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
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
