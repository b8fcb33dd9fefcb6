"""Searches and queued seeds on Optuna: SQLite here, a real PostgreSQL server where .ci/run starts one
(MNISTLAB_TEST_POSTGRES); several worker processes, a worker killed mid-trial, a database gone."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

optuna = pytest.importorskip("optuna")

from mnistlab.cli import main  # noqa: E402
from mnistlab.errors import MnistlabError, UsageError  # noqa: E402
from mnistlab.lab import search  # noqa: E402

POSTGRES = os.environ.get("MNISTLAB_TEST_POSTGRES") or None
if os.environ.get("MNISTLAB_REQUIRE_POSTGRES") and not POSTGRES:
    raise RuntimeError("MNISTLAB_REQUIRE_POSTGRES is set but MNISTLAB_TEST_POSTGRES is not: start the server first")
needs_postgres = pytest.mark.skipif(POSTGRES is None, reason="no PostgreSQL server (.ci/run starts one)")

SPACE = {"base": {"preset": "fast", "epochs": 2, "batch_size": 64},
         "params": {"lr": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
                    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2}}}


def _space_file(tmp_path, space=SPACE):
    path = tmp_path / f"space-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(space))
    return path


def _postgres_database() -> str:
    """A fresh database on the test server, so that tests do not share studies."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.execute(sa.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return POSTGRES.rsplit("/", 1)[0] + "/" + name


def _worker(out, *args, data_dir, space_file):
    cmd = [sys.executable, "-m", "mnistlab", "search", str(out), "--space", str(space_file), "--data-dir",
           str(data_dir), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_search_writes_run_directories_the_other_commands_read(tmp_path, small_dir, capsys):
    out = tmp_path / "search"
    assert main(["search", str(out), "--trials", "4", "--space", str(_space_file(tmp_path)), "--data-dir",
                 str(small_dir)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("trial ") >= 4 and "best: trial" in printed
    trials = sorted(out.glob("trial-*"))
    assert [t.name for t in trials] == [f"trial-{n:04d}" for n in range(4)]
    for run in trials:  # every trial is an ordinary run directory on the holdout split
        config = json.loads((run / "config.json").read_text())
        assert config["split"] == "holdout" and config["epochs"] == 2 and 0.05 <= config["lr"] <= 0.5
    finished = [t for t in trials if (t / "summary.json").is_file()]
    assert len(finished) >= 3  # the median pruner lets the first three run to the end
    assert main(["evaluate", str(finished[0]), "--json"]) == 0
    assert main(["compare", *map(str, finished), "--out", str(tmp_path / "c.png")]) == 0
    assert main(["ensemble", *map(str, finished)]) == 0
    assert main(["report", str(out)]) == 0 and "trial-0000" in (out / "report.html").read_text()
    for name in ("history.png", "importances.png", "best.json", "space.json", "trials.json"):
        assert (out / name).stat().st_size > 100, name
    capsys.readouterr()
    assert main(["search", str(out), "--show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    best = shown["best"]
    assert best["valid_acc"] == max(t["valid_acc"] for t in shown["trials"] if t["state"] == "complete")
    assert best["valid_acc"] == json.loads((out / best["run_dir"] / "summary.json").read_text())["valid_acc"]
    # the best config trains as it is, on the standard split
    final = tmp_path / "final"
    assert main(["train", "--config", str(out / "best.json"), "--split", "standard", "--out", str(final)]) == 0
    config = json.loads((final / "config.json").read_text())
    assert config["split"] == "standard" and config["lr"] == best["params"]["lr"]


def test_restarting_continues_the_study(tmp_path, small_dir):
    out, space = tmp_path / "s", _space_file(tmp_path)
    first = search.search(out, 2, space=json.loads(space.read_text()), data_dir=small_dir)
    before = {t["number"]: t for t in first["trials"]}
    again = search.search(out, 4, space=json.loads(space.read_text()), data_dir=small_dir)
    assert len(again["trials"]) == 4
    for number, trial in before.items():
        assert again["trials"][number] == trial  # untouched


def test_pruning_stops_a_bad_trial_early(tmp_path, small_dir):
    out = tmp_path / "s"
    space = {"base": {"preset": "fast", "epochs": 4, "batch_size": 64},
             "params": {"lr": {"type": "categorical", "choices": [0.3, 1e-05]}}}
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="search", direction="maximize")
    for lr in (0.3, 0.3, 0.3, 1e-05):  # three good trials first, then a hopeless one
        study.enqueue_trial({"lr": lr})
    result = search.search(out, 4, space=space, storage=url, data_dir=small_dir)
    states = [t["state"] for t in result["trials"]]
    assert states == ["complete", "complete", "complete", "pruned"], states
    pruned = result["trials"][3]
    epochs = (out / pruned["run_dir"] / "metrics.jsonl").read_text().splitlines()
    assert pruned["epochs"] == len(epochs) < 4  # stopped before its last epoch


@pytest.mark.parametrize("space, message", [
    ({"params": {}}, "expected"),
    ({"params": {"seed": {"type": "int", "low": 0, "high": 3}}}, "not a searchable setting"),
    ({"params": {"lr": {"type": "float", "low": 1.0, "high": 0.1}}}, "low < high"),
    ({"params": {"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "log scale needs low > 0"),
    ({"params": {"momentum": {"type": "float", "low": 0.5, "high": 1.5}}}, "1.5 makes no valid config"),
    ({"params": {"model": {"type": "categorical", "choices": ["cnn", "resnet"]}}}, "unknown model"),
    ({"params": {"epochs": {"type": "int", "low": 1.5, "high": 3}}}, "expected int bounds"),
    ({"params": {"batch_size": {"type": "categorical", "choices": []}}}, "non-empty list"),
    ({"params": {"lr": {"type": "gauss"}}}, "type one of"),
    ({"base": {"epochs": 0}, "params": {"lr": {"type": "float", "low": 0.1, "high": 0.2}}}, "epochs must be"),
    ({"base": {"colour": 1}, "params": {"lr": {"type": "float", "low": 0.1, "high": 0.2}}}, "unknown setting"),
])
def test_bad_spaces_are_refused_in_one_line(tmp_path, capsys, space, message):
    assert main(["search", str(tmp_path / "s"), "--space", str(_space_file(tmp_path, space))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_choosing_on_the_test_split_and_bad_storages_are_refused(tmp_path, capsys):
    for split in ("standard", "seed"):
        with pytest.raises(SystemExit) as exit:
            main(["search", str(tmp_path / "s"), "--split", split])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and "test images" in err and "holdout" in err, err
        with pytest.raises(UsageError, match="test images"):  # the Python API refuses them too
            search.search(tmp_path / "s", 1, split=split)
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--split holdout" in help_text and "standard" not in help_text.split("--split")[1].split("--seed")[0]
    assert main(["search", str(tmp_path / "s"), "--storage", "mysql://x@localhost/db"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected sqlite:///PATH or postgresql://" in err
    assert main(["search", str(tmp_path / "s"), "--storage", "postgresql://nobody:secret@127.0.0.1:1/none"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be reached" in err and "secret" not in err, err
    assert main(["search", str(tmp_path / "nothing"), "--show"]) == 2
    assert "no search here" in capsys.readouterr().err


def test_a_study_made_with_another_space_is_refused(tmp_path, small_dir, capsys):
    out = tmp_path / "s"
    assert main(["search", str(out), "--trials", "1", "--space", str(_space_file(tmp_path)), "--data-dir",
                 str(small_dir)]) == 0
    other = {**SPACE, "params": {"lr": {"type": "float", "low": 0.01, "high": 0.1}}}
    capsys.readouterr()
    assert main(["search", str(out), "--trials", "2", "--space", str(_space_file(tmp_path, other)), "--data-dir",
                 str(small_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was made with another space" in err


def _storages():
    return ["sqlite", pytest.param("postgres", marks=needs_postgres)]


def _storage(kind, tmp_path):
    return f"sqlite:///{tmp_path / 'shared.db'}" if kind == "sqlite" else _postgres_database()


@pytest.mark.parametrize("kind", _storages())
def test_two_workers_share_a_study_without_losing_or_repeating_a_trial(tmp_path, small_dir, kind):
    url, out, space = _storage(kind, tmp_path), tmp_path / "s", _space_file(tmp_path)
    workers = [_worker(out, "--trials", "6", "--storage", url, data_dir=small_dir, space_file=space)
               for _ in range(2)]  # started together: both create the study, one wins
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
    told = [[line.split(":")[0] for line in o[0].splitlines() if re.match(r"trial \d+:", line)] for o in outputs]
    ran = told[0] + told[1]
    assert len(ran) == len(set(ran)), ran  # no trial told by both workers
    assert all(told), told  # both worked
    result = search.show(out, url)
    numbers = [t["number"] for t in result["trials"]]
    assert numbers == list(range(len(numbers))) and 6 <= len(numbers) <= 7  # the end may start one extra
    assert all(t["state"] in ("complete", "pruned") for t in result["trials"])
    assert sorted(p.name for p in out.glob("trial-*")) == [f"trial-{n:04d}" for n in numbers]
    for t in result["trials"]:  # each trial's run directory holds exactly the epochs it reported
        epochs = (out / t["run_dir"] / "metrics.jsonl").read_text().splitlines()
        assert len(epochs) == t["epochs"]


@pytest.mark.parametrize("kind", _storages())
def test_a_killed_workers_trial_is_taken_over_and_resumed_from_its_checkpoint(tmp_path, kind):
    """SIGKILL mid-trial: after its heartbeats stop, the next worker fails the trial, retries it with the
    same settings, resumes the dead worker's run from its checkpoint and ends bit for bit where an
    uninterrupted run ends."""
    url, out = _storage(kind, tmp_path), tmp_path / "s"
    space = _space_file(tmp_path, {"base": {"preset": "fast", "epochs": 6},
                                   "params": {"lr": {"type": "categorical", "choices": [0.4]}}})
    # all of MNIST's training images: about a second an epoch, time to kill it after the first
    first = subprocess.Popen([sys.executable, "-m", "mnistlab", "search", str(out), "--trials", "1", "--space",
                              str(space), "--storage", url, "--heartbeat", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "trial-0000" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-2000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = metrics.read_text().count("\n")
    assert done_before < 6 and not (out / "trial-0000" / "summary.json").exists()
    time.sleep(3.5)  # three missed heartbeats
    second = subprocess.run([sys.executable, "-m", "mnistlab", "search", str(out), "--trials", "1", "--space",
                             str(space), "--storage", url, "--heartbeat", "1"],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    result = search.show(out, url)
    assert [t["state"] for t in result["trials"]] == ["fail", "complete"]
    assert result["trials"][1]["run_dir"] == "trial-0000"  # the retry continued the dead worker's run
    assert len(metrics.read_text().splitlines()) == 6
    # the same config trained without interruption
    config = json.loads((out / "trial-0000" / "config.json").read_text())
    config.pop("resolved_device")
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "whole")]) == 0
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (out / "trial-0000" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", _storages())
def test_queued_seeds_are_each_trained_exactly_once(tmp_path, small_dir, kind):
    url, out = _storage(kind, tmp_path), tmp_path / "seeds"
    cmd = [sys.executable, "-m", "mnistlab", "train", "--preset", "fast", "--epochs", "2", "--batch-size", "64",
           "--data-dir", str(small_dir), "--seeds", "0-5", "--storage", url, "--out", str(out)]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
    trained = [line.split(":")[0] for o in outputs for line in o[0].splitlines() if line.startswith("seed ")
               and "valid_acc" in line and "epoch" not in line]
    assert sorted(trained) == [f"seed {s}" for s in range(6)]  # each once, between them
    summary = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in summary["runs"]] == list(range(6)) and summary["valid_acc"]["n"] == 6
    for s in range(6):
        assert len((out / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()) == 2
        assert json.loads((out / f"seed-{s}" / "config.json").read_text())["seed"] == s
    capsys_free = main(["ensemble", *(str(out / f"seed-{s}") for s in range(6))])
    assert capsys_free == 0


@needs_postgres
def test_the_database_going_away_is_one_line_and_loses_no_finished_run(tmp_path, small_dir):
    import sqlalchemy as sa

    url, out = _postgres_database(), tmp_path / "s"
    name = url.rsplit("/", 1)[1]

    def drop_after_first(row):
        engine = sa.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.execute(sa.text(f"DROP DATABASE {name} WITH (FORCE)"))
        engine.dispose()

    with pytest.raises(MnistlabError, match="the database cannot be reached") as caught:
        search.search(out, 3, space=SPACE, storage=url, data_dir=small_dir, on_trial=drop_after_first)
    assert "\n" not in str(caught.value)
    assert (out / "trial-0000" / "summary.json").is_file()  # the finished trial's run is whole


def test_storage_urls_are_checked_and_passwords_never_printed():
    from mnistlab.lab.studies import redact, storage_url

    assert redact("postgresql://me:hunter2@db:5432/x") == "postgresql://me:***@db:5432/x"
    with pytest.raises(UsageError, match="expected sqlite"):
        storage_url(".", "redis://localhost")


def test_a_space_base_takes_its_models_own_sgd_values():
    """Without a preset, a base naming a model gets that model's learning rate and momentum, as
    ``train --model`` does; unknown settings are refused."""
    assert search.base_config({"model": "linear"}).lr == 0.5
    assert search.base_config({"preset": "fast", "lr": 0.2}).lr == 0.2
    with pytest.raises(UsageError, match="base: unknown setting 'colour'"):
        search.base_config({"colour": 1})
