"""Chief election: the one worker of a distributed run that writes files.

Under `MultiWorkerMirroredStrategy` every worker runs the same training,
so every worker would write the soft-target cache, the checkpoints, the
backups and metrics.json to the same shared paths. As the TensorFlow
multi-worker guide recommends, only the chief writes to the run folder and
every other worker writes to a private temporary folder that is removed
when the run ends.
"""

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

from kc_keras import training
from kc_keras.run import RunDir

logger = logging.getLogger(__name__)


def is_chief(strategy):
    """Return whether this process writes the run folder's files.

    The chief is the task of type `chief`, or worker 0 when the cluster has
    no `chief` task. A process outside a cluster (any strategy without a
    cluster resolver, or one with no task type) is its own chief.

    Args:
        strategy: a `tf.distribute.Strategy`.

    Returns:
        True for the chief.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return True
    if resolver.task_type == "chief":
        return True
    cluster = resolver.cluster_spec().as_dict()
    return (
        resolver.task_type == "worker"
        and resolver.task_id == 0
        and "chief" not in cluster
    )


class WorkerRunDir(RunDir):
    """A non-chief worker's view of a run folder.

    Reads of the teachers and run.json go to the shared run folder, and
    every write (student, metrics, logs, backups, soft-target cache) goes
    under a private root.

    Args:
        root: the private folder that receives the writes.
        shared: the shared `RunDir`.
    """

    def __init__(self, root, shared):
        super().__init__(root)
        self.shared = shared

    @property
    def run_file(self):
        return self.shared.run_file

    @property
    def teachers(self):
        return self.shared.teachers


@contextlib.contextmanager
def writable_run_dir(run_dir, strategy):
    """Yield the `RunDir` this process writes to.

    The chief gets `run_dir` itself. Another worker gets a `WorkerRunDir`
    in a new temporary folder, removed on exit. The shared backups are
    copied into it first, so an interrupted run resumes every worker from
    the chief's backup and the mirrored weights stay identical.

    Args:
        run_dir: the shared `RunDir`.
        strategy: the `tf.distribute.Strategy` of the run.

    Yields:
        A `RunDir`.
    """
    if is_chief(strategy):
        yield run_dir
        return
    root = Path(tempfile.mkdtemp(prefix="kc-worker-"))
    logger.info("not the chief worker: writing to %s, removed at exit", root)
    try:
        backups = Path(run_dir.logs) / training.BACKUP_FOLDER
        if backups.is_dir():
            # NOTE: the copy is not locked against the chief. The chief
            # writes backups only at epoch ends, after training steps that
            # wait for this worker, except when its `BackupAndRestore`
            # replaces a missing latest backup by the previous one.
            shutil.copytree(backups, root / "logs" / training.BACKUP_FOLDER)
        yield WorkerRunDir(root, run_dir)
    finally:
        shutil.rmtree(root, ignore_errors=True)
