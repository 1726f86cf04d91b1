"""A new, empty MLflow sqlite store in a test's folder, copied from one made once per test process.

MLflow makes a new sqlite store by running its schema migrations, about 4 s on a 2-core
machine, for every test that records a run; a copy of a store it made takes milliseconds and
is the same empty store. The copy's Default experiment keeps its artifacts under the test's
folder, as if MLflow had made the store there.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import sqlite3
import tempfile
from pathlib import Path

STORE_FILE = "mlflow.db"


@functools.cache
def _made_by_mlflow() -> Path:
    from mlflow.tracking import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="vfm-test-mlflow-"))
    atexit.register(shutil.rmtree, folder, True)
    db = folder / STORE_FILE
    MlflowClient(f"sqlite:///{db}").search_experiments()  # creates the tables and the Default experiment
    return db


def new_store(folder: Path) -> str:
    """An empty store at ``folder``/mlflow.db (replacing none: the folder must not hold one);
    returns its URI."""
    db = folder / STORE_FILE
    if db.exists():
        raise FileExistsError(f"{db} exists")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_made_by_mlflow(), db)
    connection = sqlite3.connect(db)
    try:
        with connection:
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                               (str(folder / "mlruns" / "0"),))
    finally:
        connection.close()
    return f"sqlite:///{db}"
