"""Hyperparameter search on Optuna: a declared space, TPE seeded, pruning on the epochs' validation
accuracy, every trial an ordinary run directory, any number of worker processes on one storage.

Storage: ``sqlite:///OUT/study.db`` by default (one machine); ``postgresql://...`` for workers on
several machines (their ``OUT`` on a shared filesystem). Each worker beats a heartbeat into the
storage; a worker that stops beating (killed, its machine gone) has its trial failed by the next
worker that starts one, and the trial is retried with the same parameters, continuing the dead
worker's run from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from ..config import FASTCNN_WIDTHS, MODEL_NAMES, PRESETS, TrainConfig
from ..data.mnist import TUNING_SPLITS, load_dataset
from ..errors import TrainingDiverged, UsageError
from ..files import write_json_atomic
from ..run.driver import CONTINUE, START, run_training
from ..run.rundir import read_config
from ..use.report import SEARCH_TRIALS
from .studies import connect, open_study, retried_number, seed_sampler, storage_url, work_left

STUDY = "search"  # the default study name
PRUNE_AFTER_TRIALS = 3  # trials that run to the end before the median pruner stops any
SPACE = "space.json"
BEST = "best.json"
TUNABLE = {"lr", "momentum", "weight_decay", "label_smoothing", "batch_size", "epochs", "model", "augment",
           "nesterov", "schedule", "warmup", "ema", "tta", "subsample"}
KINDS = ("float", "int", "categorical")

# The default space: the fast preset's recipe around its own values, sized for trials of seconds.
_FAST = PRESETS["fast"]
DEFAULT_SPACE = {
    "base": {"preset": "fast"},
    "params": {
        "lr": {"type": "float", "low": _FAST["lr"] / 20, "high": _FAST["lr"] * 2.5, "log": True},
        "weight_decay": {"type": "float", "low": _FAST["weight_decay"] / 50, "high": _FAST["weight_decay"] * 20,
                         "log": True},
        "momentum": {"type": "float", "low": round(_FAST["momentum"] - 0.1, 6),
                     "high": round(_FAST["momentum"] + 0.05, 6)},
        "label_smoothing": {"type": "float", "low": 0.0, "high": 2 * _FAST["label_smoothing"]},
        "batch_size": {"type": "categorical", "choices": [_FAST["batch_size"] * k // 4 for k in (1, 2, 4, 8)]},
        "epochs": {"type": "int", "low": 1, "high": 2 * _FAST["epochs"]},
        "model": {"type": "categorical", "choices": list(FASTCNN_WIDTHS)},
        "augment": {"type": "categorical", "choices": ["none", "affine"]},
    },
}


def check_space(space, where: str = "space") -> dict:
    """``space`` checked: ``{"base": TrainConfig fields or {"preset": NAME, ...}, "params": {name: spec}}``,
    each spec ``{"type": "float"|"int", "low", "high", "log"?}`` or ``{"type": "categorical",
    "choices": [...]}``. Every bound and choice must make a valid config; errors in one line."""
    if not isinstance(space, dict) or not isinstance(space.get("params"), dict) or not space["params"]:
        raise UsageError(f'{where}: expected {{"base": {{...}}, "params": {{"NAME": {{"type": ...}}, ...}}}}')
    base = space.get("base", {})
    if not isinstance(base, dict):
        raise UsageError(f"{where}: base must be an object of TrainConfig values")
    base_config(base, where)
    for name, spec in space["params"].items():
        at = f"{where}: params.{name}"
        if name not in TUNABLE:
            raise UsageError(f"{at}: not a searchable setting; expected some of: {', '.join(sorted(TUNABLE))}")
        if not isinstance(spec, dict) or spec.get("type") not in KINDS:
            raise UsageError(f"{at}: expected an object with type one of {', '.join(KINDS)}")
        if spec["type"] == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UsageError(f"{at}: categorical needs a non-empty list of choices")
            values = choices
            if name == "model" and not set(choices) <= set(MODEL_NAMES):
                raise UsageError(f"{at}: unknown model in {choices}; expected some of: {', '.join(MODEL_NAMES)}")
        else:
            low, high = spec.get("low"), spec.get("high")
            number = int if spec["type"] == "int" else (int, float)
            if isinstance(low, bool) or isinstance(high, bool) or not isinstance(low, number) \
                    or not isinstance(high, number) or not low < high:
                raise UsageError(f"{at}: expected {spec['type']} bounds low < high, got {low!r}, {high!r}")
            if spec.get("log") and not low > 0:
                raise UsageError(f"{at}: a log scale needs low > 0, got {low!r}")
            values = [low, high]
        for value in values:
            try:
                base_config({**base, name: value}, where)
            except UsageError as exc:
                raise UsageError(f"{at}: {value!r} makes no valid config ({exc})") from None
    return {"base": base, "params": space["params"]}


def base_config(values: dict, where: str = "space") -> TrainConfig:
    """The config a space's ``base`` makes (a preset's values, then the others; the seed, split, data
    and device are the search's own)."""
    values = {k: v for k, v in values.items() if k not in ("seed", "split", "data_dir", "device")}
    try:
        return TrainConfig.from_preset(values.pop("preset", None), **values)
    except UsageError as exc:
        raise UsageError(f"{where}: base: {exc}") from None


def load_space(path: str | os.PathLike) -> dict:
    try:
        return check_space(json.loads(Path(path).read_text()), str(path))
    except FileNotFoundError:
        raise UsageError(f"--space {path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--space {path}: not a JSON space ({exc})") from None


def trial_config(trial, space: dict, split: str, data_dir: str | None, seed: int, device: str) -> TrainConfig:
    """The config a trial trains: the base, then a value drawn for each parameter."""
    values = {}
    for name, spec in space["params"].items():
        if spec["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=bool(spec.get("log")))
    base = base_config(space["base"])
    if values.get("momentum", base.momentum) == 0:
        values["nesterov"] = False
    return TrainConfig.from_dict({**base.to_dict(), **values, "split": split, "data_dir": data_dir, "seed": seed,
                                  "device": device})


def search(out: str | os.PathLike, trials: int, *, space: dict | None = None, storage: str | None = None,
           study_name: str | None = None, split: str = "holdout", data_dir: str | None = None, seed: int = 0,
           device: str = "auto", heartbeat: int = 30,
           on_trial: Callable[[dict], None] | None = None) -> dict:
    """Run trials until the study holds ``trials`` finished ones (completed or pruned); returns :func:`show`."""
    if split not in TUNING_SPLITS:
        raise UsageError(f"--split {split}: choosing hyperparameters on it would look at the 10,000 test images "
                         f"(its validation part holds them); searches run on --split holdout")
    if not isinstance(trials, int) or trials <= 0:
        raise UsageError(f"--trials must be a positive integer, got {trials!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    space = check_space(space if space is not None else DEFAULT_SPACE)
    data_dir = str(Path(data_dir).resolve()) if data_dir is not None else None
    dataset = load_dataset(data_dir)
    url = storage_url(out, storage)
    import optuna

    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=1)
    study, _ = open_study(url, study_name or STUDY, heartbeat, {"space": space, "split": split}, pruner=pruner)
    seed_sampler(study, seed)
    write_json_atomic(out / SPACE, space)

    def objective(trial) -> float:
        number = retried_number(trial)
        run_dir = out / f"trial-{number:04d}"  # a retried trial continues the dead worker's run
        trial.set_user_attr("run_dir", run_dir.name)
        config = trial_config(trial, space, split, data_dir, seed, device)

        def report(record: dict) -> None:
            trial.report(record["valid_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {record['epoch']}")

        def replay(config, run_dir, history) -> None:  # a resumed run's epochs, reported again
            for record in history.epochs:
                trial.report(record["valid_acc"], record["epoch"])

        # a retried trial continues the dead worker's run (finished, but its worker died before
        # telling: as it is); a new trial trains from the start
        mode = CONTINUE if number != trial.number else START
        result = run_training(config, run_dir, mode=mode, force=True, dataset=dataset, on_start=replay,
                              on_epoch=report)
        return result.summary["valid_acc"]

    def told(study, frozen) -> None:
        if on_trial is not None:
            on_trial(_row(frozen))

    with connect(url):
        while work_left(study, trials):
            study.optimize(objective, n_trials=1, catch=(TrainingDiverged,), callbacks=[told])
        result = show(out, storage, study_name)
        write_pictures(out, study)
    return result


def _row(t) -> dict:
    value = t.value if t.value is not None and math.isfinite(t.value) else None
    last = max(t.intermediate_values) if t.intermediate_values else None
    return {"number": t.number, "state": t.state.name.lower(), "valid_acc": value,
            "epochs": last, "run_dir": t.user_attrs.get("run_dir"), "params": t.params}


def show(out: str | os.PathLike, storage: str | None = None, study_name: str | None = None) -> dict:
    """The study's trials (number, state, valid_acc, the last epoch reported, run_dir, params) and the
    best; writes ``OUT/best.json``, the best trial's config as it trained (on the holdout split), for
    ``mnistlab train --config OUT/best.json --split standard``."""
    out = Path(out)
    url = storage_url(out, storage)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        raise UsageError(f"{out}: no search here ({url[len('sqlite:///'):]} not found); give --storage where it ran")
    with connect(url):
        study, _ = open_study(url, study_name or STUDY, None, create=False)
        rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    complete = [r for r in rows if r["state"] == "complete" and r["valid_acc"] is not None]
    best = max(complete, key=lambda r: r["valid_acc"]) if complete else None
    if best is not None:
        write_json_atomic(out / BEST, read_config(out / best["run_dir"]).to_dict())
    result = {"study": study.study_name, "trials": rows, "best": best}
    write_json_atomic(out / SEARCH_TRIALS, result)
    return result


def write_pictures(out: Path, study) -> None:
    """``OUT/history.png`` (each trial's accuracy and the best so far) and ``OUT/importances.png``."""
    from .. import plots

    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    plots.save(plots.plot_search_history(rows), out / "history.png")
    complete = [r for r in rows if r["state"] == "complete"]
    if len(complete) >= 2 and len({json.dumps(r["params"], sort_keys=True) for r in complete}) >= 2:
        import optuna

        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError):  # too few distinct trials for the evaluator
            importances = {}
        plots.save(plots.plot_importances(importances), out / "importances.png")
