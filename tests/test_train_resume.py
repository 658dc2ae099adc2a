"""Exact resume: a run killed (SIGKILL) or preempted (SIGTERM) mid-way and restarted ends with
the same parameters as an uninterrupted run with the same seed and steps."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nat_jax.train import trainer
from nat_jax.train.errors import UserInputError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

# The child runs the same tiny config as the parent. SIGKILL mode: checkpoints are waited for
# (so "the last checkpoint" is well defined), then the process kills itself right before
# training step KILL_AT. SIGTERM mode: each step is slowed down so the parent can send SIGTERM.
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests_dir!r})
    from test_train_resume import resume_config
    from nat_jax.train import trainer

    workdir, mode, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    save = trainer.save_checkpoint
    def save_and_wait(manager, state, data_iter, metrics=None):
        save(manager, state, data_iter, metrics)
        manager.wait_until_finished()
    trainer.save_checkpoint = save_and_wait
    put = trainer.put_batch
    calls = [0]
    def put_batch(batch, mesh):
        calls[0] += 1
        if mode == "kill" and calls[0] == kill_at:
            print("child: SIGKILL before step", kill_at, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "term":
            time.sleep(0.5)
        return put(batch, mesh)
    trainer.put_batch = put_batch
    print(trainer.train_and_evaluate(resume_config(), workdir), flush=True)
""")


def resume_config():
    sys.path.insert(0, TESTS_DIR)
    from test_train import tiny_config

    c = tiny_config(dataset="digits", num_classes=10, seed=3)
    c.num_train_steps = 6
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 6
    c.aug.random_erasing = 0.25
    c.aug.mixup_alpha = 0.8  # every random source is in play
    return c


def final_state(workdir):
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return step, restored


def assert_same_state(a, b):
    assert a[0] == b[0]
    for key in ("params", "opt_state", "rng"):
        jax.tree.map(np.testing.assert_array_equal, a[1][key], b[1][key])


def run_child(workdir, mode, kill_at=0, wait=True):
    script = os.path.join(workdir, "..", f"child_{mode}.py")
    with open(script, "w") as f:
        f.write(CHILD.format(tests_dir=TESTS_DIR))
    proc = subprocess.Popen([sys.executable, script, workdir, mode, str(kill_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if wait:
        out = proc.communicate(timeout=600)[0]
        return proc.returncode, out
    return proc


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache shared with the children: the three runs compile one program."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", path)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    yield path
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    jax.config.update("jax_compilation_cache_dir", previous)


@pytest.fixture(scope="module")
def reference_workdir(tmp_path_factory, compilation_cache):
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    trainer.train_and_evaluate(resume_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def reference_run(reference_workdir):
    return final_state(reference_workdir)


def test_sigkill_then_restart_resumes_exactly(tmp_path, reference_run, capsys):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    code, out = run_child(workdir, "kill", kill_at=6)
    assert code == -signal.SIGKILL, out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"], out

    metrics = trainer.train_and_evaluate(resume_config(), workdir)
    printed = capsys.readouterr().out
    assert "Resuming from the checkpoint at step 4" in printed
    assert metrics["resumed_from"] == 4 and metrics["step"] == 6
    assert_same_state(final_state(workdir), reference_run)


@pytest.mark.slow
def test_sigterm_saves_and_resumes_exactly(tmp_path, reference_run):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    proc = run_child(workdir, "term", wait=False)
    first = os.path.join(workdir, "checkpoints", "2")
    deadline = time.time() + 300
    while not os.path.exists(first) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "SIGTERM: saved the checkpoint at step" in out
    saved = int(out.split("SIGTERM: saved the checkpoint at step ")[1].split(";")[0])
    assert 2 <= saved < 6

    metrics = trainer.train_and_evaluate(resume_config(), workdir)
    assert metrics["resumed_from"] == saved
    assert_same_state(final_state(workdir), reference_run)


def _files(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(root) for f in files}


@pytest.mark.parametrize("change,named", [
    # a changed width (the old code died in Orbax after overwriting config.json)
    (dict(embed_dim=32), ["embed_dim 16 -> 32"]),
    # the same parameters, another computation (the old code resumed it silently)
    (dict(layer_norm_eps=1e-6), ["layer_norm_eps 1e-05 -> 1e-06"]),
    # another family and its dilations
    (dict(model="dinat_mini", dilations=((2,), (1,))), ["dilations None -> [[2], [1]]",
                                                        "model_type nat -> dinat"]),
])
def test_resume_with_another_model_is_refused_touching_nothing(tmp_path, reference_workdir,
                                                               change, named):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference_workdir, workdir)
    before = _files(workdir)
    config = resume_config()
    config.model = change.pop("model", config.model)
    config.model_overrides.update(change)
    with pytest.raises(UserInputError) as error:
        trainer.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "holds checkpoints of a different model" in message and "\n" not in message
    for field in named:
        assert field in message, message
    assert _files(workdir) == before  # config.json and everything else untouched
