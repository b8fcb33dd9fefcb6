"""The command line's options: one parser per command, with the types that check their values.

Every option's help states its default; a bad value gets one line naming it and what is allowed.
"""

from __future__ import annotations

import argparse

from . import __version__
from .config import AUGMENT_NAMES, AUGMENTS, DEVICES, MODEL_NAMES, PRECISIONS, PRESETS, RECIPES, SCHEDULES, TrainConfig
from .data.mnist import SPLITS, TUNING_SPLITS
from .train.distributed import DEFAULT_TIMEOUT

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit status 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind, accept, expected: str):
    """An argparse type: ``kind(text)`` where ``accept(value)``, else one line saying what is expected."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
port_number = _number(int, lambda v: 1 <= v <= 65535, "a port number 1-65535")
positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")


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


def tuning_split(text: str) -> str:
    """A split to choose settings on: one whose validation part holds no test image."""
    if text in TUNING_SPLITS:
        return text
    why = "its validation part holds the 10,000 test images" if text in SPLITS else "no such split"
    raise argparse.ArgumentTypeError(f"{text!r}: {why}; expected {' or '.join(TUNING_SPLITS)}")


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


def default(name: str):
    """A :class:`TrainConfig` field's default value."""
    return TrainConfig.__dataclass_fields__[name].default


def _precision_defaults() -> str:
    """Which presets default to which precision, and the plain default."""
    by = {}
    for name, values in PRESETS.items():
        by.setdefault(values.get("precision", default("precision")), []).append(name)
    named = [f"{p} with --preset {' or '.join(names)}" for p, names in by.items() if p != default("precision")]
    return ", ".join(named + [f"else {default('precision')}"])


def _presets_help() -> str:
    """Each preset's values, as the help of --preset shows them."""
    def values(p: dict) -> str:
        shown = [f"{p['model']}, {p['epochs']} epochs, batch {p['batch_size']}, lr {p['lr']:g}"]
        shown += [f"{k.replace('_', ' ')} {v:g}" if not isinstance(v, str) else f"{k} {v}"
                  for k, v in p.items() if k not in ("model", "epochs", "batch_size", "lr", "momentum", "nesterov",
                                                      "tta") and v is not True]
        shown += [k for k in ("nesterov", "tta") if p.get(k)]
        return ", ".join(shown)

    roles = {"seed": "the seed's CNN as its walk-through trains it", "fast": "time to 99%%",
             "best": "accuracy on the standard test set"}
    return "; ".join(f"{name}: {roles.get(name, name)} ({values(p)})" for name, p in PRESETS.items())


def _augment_help() -> str:
    affine, elastic = AUGMENTS["affine"], AUGMENTS["elastic"]
    return (f"affine: random shifts ({affine['shift']:g} px), rotations ({affine['rotate']:g} degrees) and scaling "
            f"({100 * affine['scale']:g}%%) per image; elastic: the same plus a smooth random elastic distortion "
            f"({elastic['elastic']:g} px at {elastic['control']}x{elastic['control']} control points) "
            f"(default: {default('augment')})")


def _by_model(key: str) -> str:
    return ", ".join(f"{recipe[key]:g} for {model}" for model, recipe in RECIPES.items())


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run directory",
                       description="Train a model as the seed does and write a run directory.")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"a named recipe; explicit options override its values. {_presets_help()}")
    p.add_argument("--model", default=None, choices=list(MODEL_NAMES),
                   help=f"registered model (default: {default('model')})")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"passes over the training part (default: {default('epochs')})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"images per SGD step (default: {default('batch_size')})")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"SGD learning rate, the peak one with --schedule onecycle (default: {_by_model('lr')})")
    p.add_argument("--momentum", type=float, default=None, help=f"SGD momentum (default: {_by_model('momentum')})")
    p.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum")
    p.add_argument("--weight-decay", type=float, default=None,
                   help=f"L2 penalty (default: {default('weight_decay'):g})")
    p.add_argument("--schedule", default=None, choices=list(SCHEDULES),
                   help=f"learning rate per step: constant, or onecycle (linear rise over the first "
                        f"{100 * default('warmup'):g}%% of the steps, then linear fall to 0) "
                        f"(default: {default('schedule')})")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help=f"in [0, 1) (default: {default('label_smoothing'):g})")
    p.add_argument("--augment", default=None, choices=list(AUGMENT_NAMES), help=_augment_help())
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="validate and save an exponential moving average of the weights, updated every step "
                        "with this decay, e.g. 0.999 (default: 0, off)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="score the final model with test-time augmentation: probabilities averaged over each "
                        "validation image and its 8 one-pixel shifts (default: off)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="bf16: the kernel engine's convolutions from bf16 operands summed in fp32, on CPUs with "
                        "AVX512-BF16; weights, gradients and the update stay fp32. auto: bf16 where it can, else fp32 "
                        f"(default: {_precision_defaults()})")
    p.add_argument("--drop-last", action="store_true", default=None,
                   help="every step a full batch: each epoch's last partial batch is left out (a new one each epoch, "
                        "as the order is reshuffled); on CUDA the step is then captured once as a CUDA graph and "
                        "replayed (default: off, the last batch is smaller)")
    p.add_argument("--seed", type=non_negative_int, default=None,
                   help=f"random seed for weights and shuffling (default: {default('seed')})")
    p.add_argument("--subsample", type=float, default=None, metavar="FRACTION",
                   help="train on this fraction of the training part, a subset drawn with the seed: runs of "
                        f"different seeds see different images, for diverse ensembles (default: "
                        f"{default('subsample'):g}, all)")
    p.add_argument("--seeds", type=seed_list, default=None, metavar="S,S,...|A-B",
                   help="train once per seed into OUT/seed-S and report mean ± std of the accuracy")
    p.add_argument("--batched", action="store_true",
                   help="with --seeds (fastcnn, widecnn): train every seed at once in this process as one wider "
                        "network (grouped convolutions), each seed still its own run with its own random numbers; "
                        "--resume OUT continues the batch (default: one seed after another)")
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
                        f"holdout: the training images alone, 50,000 / 10,000, for tuning "
                        f"(default: {default('split')})")
    p.add_argument("--data-dir", default=None,
                   help="folder with the four MNIST-format IDX files, gzip or raw (default: the shipped MNIST)")
    p.add_argument("--out", default=None, help="run directory (default: runs/MODEL-YYYYmmdd-HHMMSS)")
    p.add_argument("--force", action="store_true", help="overwrite the run in an existing --out directory")
    p.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue an interrupted run from its last complete epoch (its own config is used)")
    p.add_argument("--device", default=None, choices=list(DEVICES),
                   help=f"auto: the GPU where the machine shows one and PyTorch can use it, else the CPU "
                        f"(default: {default('device')})")
    p.add_argument("--nondeterministic", dest="deterministic", action="store_const", const=False, default=None,
                   help="on CUDA: let cuDNN pick its fastest kernels, whose sums are not repeatable (default: "
                        "deterministic algorithms, a seed's weights bit-identical; docs/gpu.md gives the cost)")
    p.add_argument("--nproc", type=positive_int, default=None, metavar="N",
                   help="train this run in N processes on this machine (data-parallel, through torchrun; gloo on "
                        f"the CPU, NCCL on GPUs); --batch-size stays the global batch (default: {default('nproc')})")
    p.add_argument("--max-restarts", type=non_negative_int, default=0, metavar="K",
                   help="with --nproc: restart every process from the last checkpoint after one dies, up to K "
                        "times (default: 0)")
    p.add_argument("--dist-timeout", type=positive_float, default=None, metavar="SECONDS",
                   help=f"with --nproc: end the job when a process stays silent this long (default: "
                        f"{DEFAULT_TIMEOUT:g})")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="with --nproc on GPUs: BatchNorm statistics over the whole global batch (default: each "
                        "process its own)")


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
    p.add_argument("--split", default=TUNING_SPLITS[0], type=tuning_split, metavar="|".join(TUNING_SPLITS),
                   help=f"{', '.join(TUNING_SPLITS)}: the training images alone; the other splits' validation parts "
                        f"hold the test images, so a search never runs on them (default: {TUNING_SPLITS[0]})")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the sampler and of every trial's run (default: 0)")
    p.add_argument("--data-dir", default=None, help="folder with four MNIST-format IDX files (default: MNIST)")
    p.add_argument("--device", default=default("device"), choices=list(DEVICES),
                   help=f"(default: {default('device')})")
    p.add_argument("--heartbeat", type=positive_int, default=30, metavar="SECONDS",
                   help="a worker silent for 3 heartbeats is taken as dead and its trial continued by another "
                        "(default: 30)")
    p.add_argument("--show", action="store_true", help="print the trials and the best, and write best.json")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="loss and accuracy of a run on its validation part")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average over each image and its 8 one-pixel shifts "
                        "(default: as the run was trained)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


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


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="draw dataset images to a PNG (default: the first training example)")
    p.add_argument("--index", type=int, default=0, help="first image to draw (default: 0)")
    p.add_argument("--part", default="train", choices=["train", "valid"], help="part of the split (default: train)")
    p.add_argument("--grid", type=positive_int, nargs=2, metavar=("ROWS", "COLS"), default=None,
                   help="draw ROWS x COLS images starting at --index (default: one image)")
    p.add_argument("--split", default="seed", choices=list(SPLITS), help="the split (default: seed)")
    p.add_argument("--data-dir", default=None, help="folder with four MNIST-format IDX files (default: MNIST)")
    p.add_argument("--out", default=None, help="PNG file to write (default: PART-INDEX.png)")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report.html (or a search folder's), one self-contained page")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="validation curves and final figures of several runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by 'mnistlab train'")
    p.add_argument("--out", default="compare.png", help="picture to write (default: compare.png)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the run's model as ONNX or TorchScript",
                       description="Export a run's model. Input 'pixels': float32 (N, 784) in [0, 1) "
                                   "(uint8 / 256); output 'logits': float32 (N, classes).")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--format", default="onnx", choices=["onnx", "torchscript"], help="(default: onnx)")
    p.add_argument("--out", default=None, help="file to write (default: RUN_DIR/model.onnx or RUN_DIR/model.pt)")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve a run over HTTP: POST /predict, GET /health, a page to draw on")
    p.add_argument("run_dir", help="a run directory made by 'mnistlab train'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default: 8000)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes, each with the model and one torch thread (default: 1)")


def _add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="accuracy of the averaged probabilities of several runs",
                       description="Average the class probabilities of several finished runs (same split) on "
                                   "their validation part; print each run's accuracy and the ensemble's.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories made by 'mnistlab train'")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: each run's probabilities averaged over the image and its 8 "
                        "one-pixel shifts first")
    p.add_argument("--choose", action="store_true",
                   help="choose a mix instead: every subset of the runs of up to --size members scored, grouped by "
                        "how many members each recipe gives; runs of --split holdout only (the others' validation "
                        "parts hold the test images)")
    p.add_argument("--size", type=positive_int, default=5, help="with --choose: the largest ensemble (default: 5)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


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
