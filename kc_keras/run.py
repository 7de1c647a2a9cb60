"""Run folder layout: one folder contains every stage's artifacts.

RUN/run.json                     dataset name and spec, taxonomy
RUN/teachers/generalist.keras    all classes
RUN/teachers/specialist_<k>.keras  vertical k's classes + a dustbin
RUN/teachers/teachers.json       manifest: file, role, output classes
RUN/teachers/{taxonomy.json,labels.txt,metrics.json}
RUN/student/student.keras        the deployable student
RUN/student/metrics.json
RUN/soft_targets/                cached top-K teacher outputs
RUN/tflite/                      exports, parity.json, test.npz
RUN/bench/                       bench.json, bench.md, bench.png
RUN/logs/                        TensorBoard logs
"""

import logging
from pathlib import Path

from kc_keras import io_utils
from kc_keras.errors import KCError

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"


class RunDir:
    """Paths inside one run folder.

    Args:
        root: the run folder (`runs/trio-30` by default in the Makefile).
    """

    def __init__(self, root):
        self.root = Path(root)

    @property
    def run_file(self):
        return self.root / RUN_FILE

    @property
    def teachers(self):
        return self.root / "teachers"

    @property
    def student(self):
        return self.root / "student"

    @property
    def soft_targets(self):
        return self.root / "soft_targets"

    @property
    def tflite(self):
        return self.root / "tflite"

    @property
    def bench(self):
        return self.root / "bench"

    @property
    def logs(self):
        return self.root / "logs"

    def generalist_path(self):
        return self.teachers / "generalist.keras"

    def specialist_path(self, vertical):
        return self.teachers / f"specialist_{vertical}.keras"

    def read_run_info(self):
        """Return run.json, or raise `KCError` when the run has none."""
        if not self.run_file.exists():
            raise KCError(
                f"{self.root} is not a run folder (no {RUN_FILE}); run "
                f"`kc teachers --run {self.root}` first"
            )
        return io_utils.read_json(self.run_file)

    def claim(self, dataset_spec, overwrite=False):
        """Record `dataset_spec` in run.json, or check it matches.

        Args:
            dataset_spec: the dataset's `spec` dict.
            overwrite: replace a run of another dataset instead of raising.

        Raises:
            KCError: the folder contains a run of another dataset and
                `overwrite` is False.
        """
        if self.run_file.exists():
            existing = io_utils.read_json(self.run_file).get("dataset") or {}
            if existing != dataset_spec and not overwrite:
                differences = ", ".join(
                    f"{key}={existing.get(key)!r} "
                    f"(now {dataset_spec.get(key)!r})"
                    for key in sorted(set(existing) | set(dataset_spec))
                    if existing.get(key) != dataset_spec.get(key)
                )
                raise KCError(
                    f"run folder {self.root} contains a run with other dataset "
                    f"settings: {differences}; pick another run folder "
                    "(--run, or RUN= with make), or replace it with "
                    "--overwrite (OVERWRITE=1 with make)"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        io_utils.write_json(self.run_file, {"dataset": dataset_spec})
