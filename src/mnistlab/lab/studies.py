"""Optuna studies on a storage URL, shared by searches and queued seeds: opening them, counting their
trials, heartbeats and retries of dead workers' trials, and one-line errors for storage trouble."""

from __future__ import annotations

import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import MnistlabError, UsageError, first_line

SCHEMES = ("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgresql+psycopg2://")
MAX_RETRY = 3  # how often a dead worker's trial is taken over


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UsageError("searches and queued seeds need Optuna: pip install 'mnistlab[search]'") from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, retries
    return optuna


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@/]*@", r"://\1:***@", url)


def storage_url(out: Path, url: str | None) -> str:
    """The storage: ``url`` checked, or ``sqlite:///OUT/study.db``."""
    if url is None:
        return f"sqlite:///{(Path(out) / 'study.db').resolve()}"
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise UsageError(f"--storage {redact(str(url))}: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return url


def _first_line(exc: BaseException) -> str:
    return first_line(getattr(exc, "orig", None) or exc)  # SQLAlchemy wraps the driver's error


@contextmanager
def connect(url: str):
    """Storage errors as one line: a database that cannot be reached or went away."""
    try:
        import sqlalchemy.exc
        from optuna.exceptions import StorageInternalError
    except ImportError:
        yield
        return
    try:
        yield
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.DatabaseError,
            StorageInternalError) as exc:
        exc = exc.__cause__ if isinstance(exc, StorageInternalError) and exc.__cause__ is not None else exc
        raise MnistlabError(f"storage {redact(url)}: the database cannot be reached ({_first_line(exc)}); finished "
                            f"runs stay in their run directories; run the command again to continue") from None


def _racing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in ("unique", "already exists", "duplicate", "locked"))


def _fast_sqlite(engine) -> None:
    """SQLite in write-ahead-log mode, syncing at checkpoints rather than at every commit: half the
    storage's time per trial (benchmarks/bench_search.py), and readers never wait for a writer. A
    crash loses at most the last commits, never the file's consistency."""
    import sqlalchemy

    def pragmas(connection, _record) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    sqlalchemy.event.listen(engine, "connect", pragmas)
    engine.dispose()  # connections opened while creating the tables go; new ones get the pragmas


def make_storage(url: str, heartbeat: int | None):
    """An Optuna RDB storage; with ``heartbeat`` (seconds), a worker silent for three beats counts as
    dead, its trial failed and queued again with the same parameters (at most ``MAX_RETRY`` times)."""
    optuna = _optuna()
    kwargs = {}
    if heartbeat:
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
        kwargs = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat,
                  "heartbeat_stale_trial_callback": retry}
    engine = {"pool_pre_ping": True} if url.startswith("postgresql") else {"connect_args": {"timeout": 60}}
    import sqlalchemy.exc

    with connect(url):
        for attempt in range(10):
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
                if url.startswith("sqlite"):
                    _fast_sqlite(storage.engine)
                return storage
            except (ImportError, ModuleNotFoundError) as exc:
                raise UsageError(f"--storage {redact(url)}: its database driver is missing ({exc}); "
                                 f"pip install 'mnistlab[search]'") from None
            except (ValueError, RuntimeError) as exc:
                raise UsageError(f"--storage {redact(url)}: cannot open it ({_first_line(exc)})") from None
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError) \
                    as exc:  # another process creating the tables at the same moment: once they exist, go on
                if attempt == 9 or not _racing(exc):
                    raise
                time.sleep(0.2 + 0.1 * attempt)


def open_study(url: str, name: str, heartbeat: int | None, attrs: dict | None = None, pruner=None,
               create: bool = True):
    """Create or load the study ``name`` on ``url``; returns ``(study, created)``, ``created`` true in the
    one process that created it. ``attrs``: what the study was made for (its space, its seeds);
    loading a study made for other ``attrs`` is refused in one line. Several processes may create the
    same study at once: one creates it, the others load it."""
    optuna = _optuna()
    storage = make_storage(url, heartbeat)
    created = False
    with connect(url):
        try:
            study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        except KeyError:
            if not create:
                raise UsageError(f"no study {name!r} in {redact(url)}") from None
            try:
                study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
                created = True
            except optuna.exceptions.DuplicatedStudyError:  # created by another process meanwhile
                study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        for key, value in (attrs or {}).items():
            stored = study.user_attrs.get(key)
            if stored is None:
                study.set_user_attr(key, value)
            elif stored != value:
                raise UsageError(f"study {name!r} in {redact(url)} was made with another {key}; "
                                 f"choose another --study or storage")
    return study, created


def retried_number(trial) -> int:
    """The number of the trial whose work ``trial`` continues: the first one, where a dead worker's
    trial is retried; else the trial's own."""
    number = system_attrs(trial).get("failed_trial")
    return number if number is not None else trial.number


def system_attrs(trial) -> dict:
    """A running trial's system attributes (Optuna keeps what queued or retried it there)."""
    return trial.study._storage.get_trial_system_attrs(trial._trial_id)


def counts(study) -> dict[str, int]:
    """Trials by state, after failing stale ones (dead workers') so that their retries are waiting."""
    optuna = _optuna()
    from optuna.storages._heartbeat import is_heartbeat_enabled

    if is_heartbeat_enabled(study._storage):
        optuna.storages.fail_stale_trials(study)
    result: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        result[t.state.name.lower()] = result.get(t.state.name.lower(), 0) + 1
    return result


def work_left(study, total: int) -> bool:
    """Whether a worker should start another trial: one is waiting (a retry), or fewer than ``total``
    trials are finished or under way."""
    c = counts(study)
    done = c.get("complete", 0) + c.get("pruned", 0)
    return done < total and (c.get("waiting", 0) > 0 or done + c.get("running", 0) < total)


def seed_sampler(study, seed: int) -> None:
    """TPE seeded with ``seed`` for a worker that starts the study (an empty one: a one-worker search
    repeats exactly), else with ``seed`` offset by the trials there and the process, so that workers
    joining one study draw different random trials."""
    optuna = _optuna()
    n = len(study.get_trials(deepcopy=False))
    study.sampler = optuna.samplers.TPESampler(seed=seed if n == 0 else seed + 7919 * n + os.getpid())
