"""Distillation under MultiWorkerMirroredStrategy, two local CPU workers.

The test starts two worker processes of this file with TF_CONFIG naming
two free ports on 127.0.0.1. The workers run a few distillation steps with
online teacher targets, an evaluation, then a few steps with targets from
the soft-target cache that the chief writes. Both workers must report the
losses of one process (strategy `none`) trained on the same global
batches.

Same data order on every process: the pipelines are not shuffled (online)
or shuffled with one fixed seed (cache), and the auto-shard policy is set
to DATA deliberately. FILE sharding cannot apply to in-memory arrays, and
AUTO would fall back to DATA with a warning. With DATA, each global batch
is split into per-replica batches and each worker keeps its own, so the
union of the workers' batches at a step is exactly the single process's
batch. OFF would give both workers the same half batch instead.

The student here is a Dense model without BatchNormalization. In training
mode a BatchNormalization layer normalises each replica's batch with that
batch's statistics. A two-worker step then differs from a one-process step
on the global batch by design (see docs/DISTRIBUTED.md).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 8
STEPS = 3
NUM_CLASSES = 12
NUM_VERTICALS = 3
WORKER_TIMEOUT_S = 150


def free_ports(count):
    """Return `count` distinct TCP ports that are free on 127.0.0.1 now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


# ---------------------------------------------------------------------------
# Worker (runs in a child process, or in-process for the reference)


def _ordered(data):
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    return data.with_options(options)


def _tiny_teacher(num_outputs, preprocessing, name, seed):
    from kc_keras.models import backbones

    keras.utils.set_random_seed(seed)
    inputs = keras.Input(preprocessing.input_shape, name="pixels")
    features = backbones.build_features(
        inputs,
        backbones.BackboneSpec(filters=4, blocks=1),
        preprocessing,
        keras,
    )
    logits = keras.layers.Dense(num_outputs, name="logits")(features)
    return keras.Model(inputs, logits, name=name)


def _dense_student(preprocessing, num_classes, seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(preprocessing.input_shape, name="pixels")
    x = keras.layers.Rescaling(preprocessing.scale, name="rescale")(inputs)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu", name="shared_fc")(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="student")


class BatchLosses(keras.callbacks.Callback):
    """Collect the running mean loss after every training batch."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def _trainer(strategy, dataset, teachers, seed):
    from kc_keras.distill import soft_targets
    from kc_keras.distill import train as train_lib
    from kc_keras.distill.config import LossConfig
    from kc_keras.distill.config import TrainConfig
    from kc_keras.distill.distiller import Distiller

    loss_config = LossConfig()
    with strategy.scope():
        student = _dense_student(
            dataset.preprocessing, dataset.taxonomy.num_classes, seed
        )
        targets = soft_targets.TeacherTargets(
            teachers[0], teachers[1], dataset.taxonomy, loss_config
        )
        trainer = Distiller(student, loss_config, targets)
        trainer.compile(
            optimizer=train_lib.make_optimizer(
                TrainConfig(batch_size=GLOBAL_BATCH, seed=seed), STEPS
            ),
            auto_scale_loss=False,
        )
        trainer(np.zeros((1,) + dataset.preprocessing.input_shape, "f4"))
    return trainer, targets


def run_distillation(strategy_name, cache_folder, is_chief=True):
    """Train and evaluate a tiny distiller; return its losses as a dict.

    Args:
        strategy_name: `none` or `multi-worker` (reads TF_CONFIG).
        cache_folder: the soft-target cache folder, on storage that every
            worker can read. Only the chief writes it.
        is_chief: whether this process writes the cache.
    """
    from kc_keras.data import load_dataset
    from kc_keras.distill import soft_targets
    from kc_keras.distill.strategy import make_strategy

    strategy = make_strategy(strategy_name)
    dataset = load_dataset(
        "synthetic",
        num_classes=NUM_CLASSES,
        num_verticals=NUM_VERTICALS,
        quick=True,
        seed=0,
    )
    taxonomy = dataset.taxonomy
    with strategy.scope():
        generalist = _tiny_teacher(
            taxonomy.num_classes, dataset.preprocessing, "generalist", 1
        )
        specialists = [
            _tiny_teacher(
                len(taxonomy.vertical_classes(v)) + 1,
                dataset.preprocessing,
                f"specialist_{v}",
                2 + v,
            )
            for v in range(taxonomy.num_verticals)
        ]
    teachers = (generalist, specialists)
    split = dataset.split("train")
    count = GLOBAL_BATCH * STEPS
    result = {"replicas": strategy.num_replicas_in_sync}

    # Online teacher targets, unshuffled.
    trainer, targets = _trainer(strategy, dataset, teachers, seed=0)
    online = tf.data.Dataset.from_tensor_slices(
        (split.images[:count].astype("float32"), split.labels[:count])
    ).batch(GLOBAL_BATCH)
    callback = BatchLosses()
    trainer.fit(
        _ordered(online),
        epochs=1,
        callbacks=[callback],
        verbose=0,
        shuffle=False,
    )
    result["online"] = callback.losses

    # Evaluation: hard-label loss and accuracy of the trained student.
    validation = dataset.split("validation")
    evaluation = tf.data.Dataset.from_tensor_slices(
        (validation.images.astype("float32"), validation.labels)
    ).batch(GLOBAL_BATCH)
    scores = trainer.evaluate(_ordered(evaluation), verbose=0, return_dict=True)
    result["evaluation"] = {
        "loss": float(scores["loss"]),
        "accuracy": float(scores["accuracy"]),
    }

    # Cached targets: the chief writes the cache, every worker reads it.
    key = soft_targets.cache_key(targets, dataset, [])
    if is_chief:
        soft_targets.write_cache(cache_folder, targets, dataset, key)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    arrays = soft_targets.read_cache(cache_folder, key)
    while arrays is None and time.monotonic() < deadline:
        time.sleep(0.2)
        arrays = soft_targets.read_cache(cache_folder, key)
    if arrays is None:
        raise RuntimeError(f"no soft-target cache appeared in {cache_folder}")
    trainer, _ = _trainer(strategy, dataset, teachers, seed=0)
    cached = soft_targets.cached_pipeline(
        dataset, arrays, GLOBAL_BATCH, seed=7
    ).take(STEPS)
    callback = BatchLosses()
    trainer.fit(
        _ordered(cached),
        epochs=1,
        callbacks=[callback],
        verbose=0,
        shuffle=False,
    )
    result["cached"] = callback.losses
    keras.backend.clear_session()
    return result


def worker_main(argv):
    """Child entry point: `test_multiworker.py worker OUT CACHE`."""
    keras.config.disable_traceback_filtering()
    out, cache_folder = Path(argv[0]), Path(argv[1])
    index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    result = run_distillation("multi-worker", cache_folder, index == 0)
    out.write_text(json.dumps(result), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------
# Test


def _start_worker(index, ports, out, cache_folder, log):
    tf_config = {
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": index},
    }
    env = dict(
        os.environ,
        TF_CONFIG=json.dumps(tf_config),
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )
    return subprocess.Popen(
        [sys.executable, __file__, "worker", str(out), str(cache_folder)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait(processes, timeout_s):
    deadline = time.monotonic() + timeout_s
    for process in processes:
        remaining = max(0.1, deadline - time.monotonic())
        process.wait(timeout=remaining)


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multiworker")
    ports = free_ports(2)
    cache_folder = folder / "soft_targets"
    processes = []
    logs = []
    try:
        for index in range(2):
            log = open(folder / f"worker_{index}.log", "wb")
            logs.append(log)
            processes.append(
                _start_worker(
                    index,
                    ports,
                    folder / f"worker_{index}.json",
                    cache_folder,
                    log,
                )
            )
        _wait(processes, WORKER_TIMEOUT_S)
    finally:
        # Stop only the workers this test started, by their PIDs.
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    results = []
    for index, process in enumerate(processes):
        log = (folder / f"worker_{index}.log").read_text(errors="replace")
        assert process.returncode == 0, log[-3000:]
        results.append(
            json.loads((folder / f"worker_{index}.json").read_text())
        )
    return results


@pytest.fixture(scope="module")
def single_result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    return run_distillation("none", folder / "soft_targets")


@pytest.mark.slow
def test_workers_form_one_cluster(worker_results):
    assert [r["replicas"] for r in worker_results] == [2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["online", "cached"])
def test_workers_match_single_process(worker_results, single_result, mode):
    expected = single_result[mode]
    assert len(expected) == STEPS
    for index, result in enumerate(worker_results):
        np.testing.assert_allclose(
            result[mode],
            expected,
            rtol=1e-4,
            err_msg=f"worker {index}, {mode} targets",
        )


@pytest.mark.slow
def test_workers_evaluate_like_single_process(worker_results, single_result):
    expected = single_result["evaluation"]
    for result in worker_results:
        assert result["evaluation"]["loss"] == pytest.approx(
            expected["loss"], rel=1e-4
        )
        assert result["evaluation"]["accuracy"] == pytest.approx(
            expected["accuracy"], abs=1e-6
        )


@pytest.mark.slow
def test_losses_change_between_steps(single_result):
    # Guards against a test that compares constants: the optimizer moves
    # the student, so the running loss changes from step to step.
    assert len(set(np.round(single_result["online"], 6))) > 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.exit(worker_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} worker OUT CACHE")
