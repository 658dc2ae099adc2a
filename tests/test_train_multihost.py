"""Multi-host training for real: two processes on 127.0.0.1, 4 CPU devices each, gloo collectives.

The two processes run the README's multi-host example, read from README.md (its environment
and ``nat-jax train`` arguments; only the port and the workdir are replaced), so the README
shows exactly what is tested. The same config in one process with 8 devices must give the same
run step for step: the global batch of a step may not depend on how many processes read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nat_jax.train import configs, trainer
from nat_jax.train.cli import split_overrides
from nat_jax.train.errors import UserInputError

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TIMEOUT_S = 180  # both processes together: 52-88 s here, alone or beside other tests


def readme_example() -> tuple[dict[str, str], list[str]]:
    """(exported environment, ``nat-jax train`` arguments) of the README's multi-host block."""
    text = open(README).read()
    section = text[text.index("**Several hosts**"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    env, args = {}, None
    for line in block.splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            env.update(w.split("=", 1) for w in words[1:])
        elif "nat-jax" in words:
            args = words[words.index("nat-jax") + 2:-1]  # after "nat-jax train", before "&"
    assert words and args and words == ["done;", "wait"], block
    return env, args


README_ENV, README_ARGS = readme_example()
# The config flags after --distributed, in the README's order.
OVERRIDES = README_ARGS[README_ARGS.index("--distributed") + 1:]


def nat_jax_command(*args: str) -> list[str]:
    """The installed ``nat-jax`` console script of this interpreter's environment."""
    return [os.path.join(os.path.dirname(sys.executable), "nat-jax"), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """This environment minus any launch variables, CPU only, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "SLURM_", "OMPI_", "NAT_JAX_")) and k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", **extra})
    return env


def run_two_processes(workdir: str, log_dir) -> list[str]:
    """Runs the README's two processes to completion; returns their outputs.

    A run that does not finish within :data:`TIMEOUT_S` is killed and tried once more on a
    fresh port and an emptied workdir (a stalled start, e.g. the coordinator port taken between
    :func:`free_port` and its use by another test process, once cost a whole CI run); if the
    second run stalls too, the failure shows both runs' outputs."""
    stalled = []
    for attempt in range(2):
        try:
            return _run_two_processes(workdir, log_dir, attempt)
        except subprocess.TimeoutExpired as err:
            stalled.append(err.output)
            shutil.rmtree(workdir, ignore_errors=True)
            warnings.warn(f"two-process run stalled past {TIMEOUT_S} s (attempt {attempt + 1}); "
                          "their output ends: " + " | ".join(o[-300:] for o in err.output))
    raise AssertionError(f"two processes did not finish within {TIMEOUT_S} s, twice; their "
                         "outputs:\n" + "\n---\n".join(o[-2000:] for run in stalled
                                                         for o in run))


def _run_two_processes(workdir: str, log_dir, attempt: int) -> list[str]:
    args = list(README_ARGS)
    args[args.index("--workdir") + 1] = workdir
    port = free_port()
    procs, logs = [], []
    try:
        for index in range(2):
            env = launch_env(**README_ENV, JAX_PROCESS_ID=str(index))
            host = env["JAX_COORDINATOR_ADDRESS"].rsplit(":", 1)[0]
            env["JAX_COORDINATOR_ADDRESS"] = f"{host}:{port}"
            # Output to files, not pipes: a full pipe would stall one process and, through the
            # collectives, the other.
            logs.append(open(log_dir / f"process_{index}_{attempt}.log", "w+"))
            procs.append(subprocess.Popen(
                nat_jax_command("train", *args),
                env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        try:
            for proc in procs:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired as err:
            stalled = err
        else:
            stalled = None
    finally:
        for proc in procs:  # whatever happened: no process outlives the test
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        outputs = []
        for f in logs:
            f.seek(0)
            outputs.append(f.read())
            f.close()
    if stalled is not None:
        stalled.output = outputs
        raise stalled
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    return outputs


def train_rows(workdir) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r for r in rows if "train_loss" in r}


def final_state(workdir, like=None):
    """(step, state) of the latest checkpoint, on this process's first device (``like``: a
    restored state giving the tree; needed for a checkpoint written by another topology)."""
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    target = None if like is None else jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(
                                           jax.devices()[0])), like)
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return step, state


def test_two_processes_of_four_devices_equal_one_process_of_eight(tmp_path):
    two = str(tmp_path / "two_processes")
    assert README_ENV["JAX_NUM_PROCESSES"] == "2" and "--distributed" in README_ARGS
    outputs = run_two_processes(two, tmp_path)
    assert "mesh {'data': 8, 'fsdp': 1, 'context': 1}" in outputs[0]
    assert "Predictions of the checkpoint at step 4" in outputs[0]
    assert "Starting a new run" not in outputs[1]  # host 0 reports, host 1 stays quiet

    # The same config in this process (8 devices), parsed as the command line does.
    config = configs.get_config(README_ARGS[README_ARGS.index("--config") + 1])
    configs.apply_overrides(config, split_overrides(OVERRIDES)[1])
    one = str(tmp_path / "one_process")
    metrics = trainer.train_and_evaluate(config, one)

    rows_two, rows_one = train_rows(two), train_rows(one)
    assert sorted(rows_two) == sorted(rows_one) == [1, 2, 3, 4]
    for step in rows_one:
        for key in ("train_loss", "grad_norm", "lr"):
            np.testing.assert_allclose(rows_two[step][key], rows_one[step][key], rtol=1e-5,
                                       err_msg=f"{key} at step {step}")
    final_two = json.loads(outputs[0].split("Final metrics: ")[1].splitlines()[0])
    assert final_two["eval_count"] == metrics["eval_count"] == 360
    np.testing.assert_allclose(final_two["eval_loss"], metrics["eval_loss"], rtol=1e-5)
    step_one, state_one = final_state(one)
    step_two, state_two = final_state(two, like=state_one)
    assert step_two == step_one == 4
    for key in ("params", "opt_state", "rng"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     state_two[key], state_one[key])


def test_distributed_without_a_cluster_or_variables_is_one_line(tmp_path):
    proc = subprocess.run(
        nat_jax_command("train", "--config", "digits", "--workdir", str(tmp_path / "w"),
                        "--distributed"),
        env=launch_env(), capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert "JAX_COORDINATOR_ADDRESS=host:port" in err and "JAX_NUM_PROCESSES" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("environ,problem", [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "need 0 <= JAX_PROCESS_ID (2) < JAX_NUM_PROCESSES (2)"),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "must be integers"),
    ({"JAX_COORDINATOR_ADDRESS": "host0", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
     "must be host:port"),
])
def test_launch_variables_are_checked(environ, problem):
    with pytest.raises(UserInputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        trainer.distributed_arguments(environ)


def test_launch_variables_become_initialize_arguments():
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
               "JAX_PROCESS_ID": "3"}
    assert trainer.distributed_arguments(environ) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    # Only the address (or nothing): JAX's own cluster detection supplies the rest.
    assert trainer.distributed_arguments({"JAX_COORDINATOR_ADDRESS": "h:1"}) == {}
    assert trainer.distributed_arguments({}) == {}
