"""The training loop: one jitted, sharded train step; Orbax checkpoints; exact resume.

Read top to bottom: durations and schedule, optimizer, train state, loss and the module-level
:func:`train_step` / :func:`eval_step`, state creation (``eval_shape`` first, then a jitted init
with ``out_shardings``), checkpointing, reporting, and :func:`train_and_evaluate`.

Determinism: every random draw of step ``s`` (dropout / drop path, erasing noise, mixup) comes
from ``fold_in(state.rng, s)``, and the data iterator's position is saved with each
checkpoint, so a run restarted from a checkpoint reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from orbax.checkpoint import checkpoint_managers as ocp_managers

import nat_jax
from nat_jax import pretrained, zoo
from nat_jax.preprocess import EvalTransform
from nat_jax.timing import write_json
from nat_jax.train import augment, input_pipeline, sharding
from nat_jax.train.errors import UserInputError

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the run stops and the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# Durations, schedule, optimizer
# ---------------------------------------------------------------------------------------------

def _steps(config, steps_name: str, epochs_name: str, steps_per_epoch: int) -> int:
    """A step count given (>= 0) wins over the epoch count; else epochs * steps_per_epoch."""
    steps, epochs = config[steps_name], config[epochs_name]
    if steps >= 0:
        if epochs >= 0:
            log.info("%s=%d takes precedence over %s=%g (%d steps at %d steps per epoch)",
                     steps_name, steps, epochs_name, epochs,
                     int(round(epochs * steps_per_epoch)), steps_per_epoch)
        return int(steps)
    if epochs < 0:
        raise UserInputError(f"{steps_name} and {epochs_name} are both -1; set one of them")
    return int(round(epochs * steps_per_epoch))


def resolve_durations(config, steps_per_epoch: int) -> tuple[int, int, int]:
    """(total steps, warmup steps, cooldown steps) from the steps-or-epochs config fields.

    ``num_*`` counts the main schedule; cooldown steps at ``min_lr`` come on top of it. In each
    steps/epochs pair a step count (>= 0) takes precedence over the epoch count (logged). A
    warmup or cooldown longer than the main schedule is clamped to it, with a warning.
    """
    main = _steps(config, "num_train_steps", "num_epochs", steps_per_epoch)
    if main < 1:
        raise UserInputError(f"the run has {main} steps (num_train_steps / num_epochs); it "
                             "needs at least 1")
    phases = {}
    for name in ("warmup", "cooldown"):
        steps = _steps(config, f"{name}_steps", f"{name}_epochs", steps_per_epoch)
        if steps > main:
            log.warning("%s of %d steps is longer than the run (%d steps): clamped to %d",
                        name, steps, main, main)
            steps = main
        phases[name] = steps
    return main + phases["cooldown"], phases["warmup"], phases["cooldown"]


def make_schedule(config, total_steps: int, warmup_steps: int, cooldown_steps: int
                  ) -> optax.Schedule:
    """Linear warmup from ``warmup_init_lr``, cosine to ``min_lr``, then ``min_lr`` (cooldown)."""
    cosine_steps = max(total_steps - warmup_steps - cooldown_steps, 1)
    return optax.join_schedules(
        [optax.linear_schedule(config.warmup_init_lr, config.learning_rate, max(warmup_steps, 1)),
         optax.cosine_decay_schedule(config.learning_rate, cosine_steps,
                                     alpha=config.min_lr / config.learning_rate),
         optax.constant_schedule(config.min_lr)],
        boundaries=[warmup_steps, warmup_steps + cosine_steps])


def _path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)


def decay_mask(params, no_weight_decay) -> Any:
    """True where weight decay applies: >= 2-D weights, except the parameters the model lists
    in ``no_weight_decay`` (``model.no_weight_decay()``: relative position biases, layer
    scales). Biases and norm parameters are 1-D."""
    skip = {tuple(map(str, path)) for path in no_weight_decay}
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf.ndim >= 2 and _path_key(path) not in skip, params)


def make_optimizer(config, schedule: optax.Schedule, no_weight_decay=frozenset()
                   ) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decay masked off 1-D params, biases and the model's
    ``no_weight_decay`` parameters)."""
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay,
                             mask=functools.partial(decay_mask,
                                                    no_weight_decay=no_weight_decay)))
    return optax.chain(*parts)


# ---------------------------------------------------------------------------------------------
# Model and train state
# ---------------------------------------------------------------------------------------------

def model_config(config, num_classes: int):
    """The architecture: preset ``config.model`` + ``config.model_overrides`` + the class count."""
    overrides = {k: (tuple(tuple(x) if isinstance(x, (list, tuple)) else x for x in v)
                     if isinstance(v, (list, tuple)) else v)
                 for k, v in dict(config.model_overrides).items()}
    overrides.update(num_labels=num_classes)
    return nat_jax.configs.get(config.model, **overrides)


def compute_dtype(config, platform: str | None = None) -> str:
    """The training config's compute dtype on ``platform`` (default: the default backend's).
    ``"auto"`` is bfloat16 on accelerators and float32 on CPU, where bfloat16 runs slower
    (XLA:CPU computes it through float32 conversions: the xla NA path's fwd+bwd took 42 vs 34 ms
    at 56x56, the presets' inference 1.2-1.9x longer)."""
    dtype = config.compute_dtype
    if dtype != "auto":
        return dtype
    return "float32" if (platform or jax.default_backend()) == "cpu" else "bfloat16"


def build_options(config, platform: str | None = None) -> dict[str, Any]:
    """The model's build-time arguments from the training config (dtypes, NA backend, remat,
    context parallelism, layer order and scan, and the eval transform training evaluates with,
    which the trained model carries) for devices of ``platform`` (default: the default
    backend's)."""
    aug = config.aug
    context = config.get("context", 1) > 1
    return dict(dtype=compute_dtype(config, platform), param_dtype=config.param_dtype,
                na_backend=config.na_backend, remat=config.remat,
                context_axis=sharding.CONTEXT_AXIS if context else None,
                context_stages=config.get("context_stages", 1),
                ordered_backward=config.get("ordered_backward", True),
                scan_layers=config.get("scan_layers", False),
                eval_transform=EvalTransform(config.image_size, aug.eval_crop_pct, aug.mean,
                                             aug.std))


@struct.dataclass
class TrainState:
    """Everything a checkpoint holds besides the data iterator (pure pytrees of arrays)."""

    step: jax.Array        # int32 []
    params: Any            # nested dict of float32 arrays (nnx pure dict)
    opt_state: Any
    ema_params: Any        # same tree as params, or None when EMA is off
    rng: jax.Array         # uint32 [2]: raw key; step s uses fold_in(rng, s)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static (hashable) settings of the train step."""

    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    compute_dtype: str
    mixup_alpha: float
    cutmix_alpha: float
    mix_prob: float
    switch_prob: float
    label_smoothing: float
    random_erasing: bool
    ema_decay: float

    @classmethod
    def from_config(cls, config, num_classes: int, platform: str | None = None
                    ) -> "StepConfig":
        a = config.aug
        return cls(num_classes=num_classes, mean=tuple(a.mean), std=tuple(a.std),
                   compute_dtype=compute_dtype(config, platform), mixup_alpha=a.mixup_alpha,
                   cutmix_alpha=a.cutmix_alpha, mix_prob=a.mix_prob, switch_prob=a.switch_prob,
                   label_smoothing=a.label_smoothing, random_erasing=a.random_erasing > 0,
                   ema_decay=config.ema_decay)


def _step_key(state: TrainState) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def train_step(state: TrainState, batch: dict[str, jax.Array], model_rest: Any, *,
               graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, cfg: StepConfig) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch.

    batch: ``image`` uint8 ``[B, S, S, 3]``, ``label`` int32 ``[B]``, ``erase`` int32 ``[B, 4]``.
    model_rest: the model's non-parameter state (RNG streams), reseeded here every step.
    Returns the new state and scalar metrics (loss, grad_norm, lr).
    """
    k_erase, k_mix, k_drop = jax.random.split(_step_key(state), 3)
    images = augment.normalize(batch["image"], cfg.mean, cfg.std, jnp.dtype(cfg.compute_dtype))
    if cfg.random_erasing:
        images = augment.random_erase(images, batch["erase"], k_erase)
    images, targets = augment.mixup_cutmix(
        images, batch["label"], k_mix, num_classes=cfg.num_classes,
        mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, mix_prob=cfg.mix_prob,
        switch_prob=cfg.switch_prob, label_smoothing=cfg.label_smoothing)

    # The step's key reseeds the dropout / drop-path streams: every step is reproducible.
    model = nnx.merge(graphdef, state.params, model_rest)
    model.train()  # dropout and drop path on (graphdef is the eval-mode model)
    nnx.reseed(model, dropout=k_drop)

    def loss_fn(model):
        logits = model(images).logits.astype(jnp.float32)
        return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # grads: nnx.State of the Params
    grads = nnx.to_pure_dict(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        d = cfg.ema_decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return new_state, metrics


def eval_step(params: Any, batch: dict[str, jax.Array], model_rest: Any, *,
              graphdef: nnx.GraphDef, cfg: StepConfig) -> dict[str, jax.Array]:
    """Sums over a padded eval batch (``mask`` marks real examples): loss, top-1, top-5, count."""
    model = nnx.merge(graphdef, params, model_rest)
    images = augment.normalize(batch["image"], cfg.mean, cfg.std, jnp.dtype(cfg.compute_dtype))
    logits = model(images).logits.astype(jnp.float32)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    k = min(5, cfg.num_classes)
    top_k = jax.lax.top_k(logits, k)[1]
    hit_k = jnp.any(top_k == labels[:, None], axis=-1)
    return {"loss": jnp.sum(loss * mask), "top1": jnp.sum((top_k[:, 0] == labels) * mask),
            "top5": jnp.sum(hit_k * mask), "count": jnp.sum(mask)}


def _init_fn(model_cfg, tx: optax.GradientTransformation, config):
    """The allocating initializer of the train state (and the model's non-parameter state)."""
    seed, use_ema = config.seed, config.ema_decay > 0

    def init():
        model = zoo.build_model(model_cfg, rngs=zoo.seed_rngs(seed), **build_options(config))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        rng = jax.random.key_data(jax.random.key(seed + 2))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params),
                           ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
                           rng=rng)
        return state, rest

    return init


def abstract_train_state(graphdef: nnx.GraphDef, abstract_params, abstract_rest,
                         tx: optax.GradientTransformation, mesh, config
                         ) -> tuple[TrainState, Any, Any]:
    """Shapes and shardings of the train state of the model ``zoo.abstract_model`` describes
    (``abstract_params`` as a pure dict), without allocating anything.

    Returns (abstract state, state shardings, rest shardings).
    """
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
        opt_state=jax.eval_shape(tx.init, abstract_params),
        ema_params=abstract_params if config.ema_decay > 0 else None,
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    state_sh = sharding.state_shardings(abstract_state, mesh, config.fsdp_min_size)
    rest_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abstract_rest)
    return abstract_state, state_sh, rest_sh


def put_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global jax arrays split over all devices along the batch."""
    shard = sharding.batch_sharding(mesh)
    count = jax.process_count()
    return {k: jax.make_array_from_process_local_data(
                shard, v, (v.shape[0] * count, *v.shape[1:]))
            for k, v in batch.items()}


@dataclasses.dataclass
class Training:
    """What :func:`setup_training` builds: the sharded state and the compiled steps."""

    model_cfg: Any
    graphdef: nnx.GraphDef
    state: TrainState
    state_sh: Any          # NamedShardings of the state (same tree)
    rest: Any              # the model's non-parameter state (RNG streams), replicated
    step_fn: Any           # (state, batch, rest) -> (state, metrics); state is donated
    eval_fn: Any           # (params, batch, rest) -> summed eval metrics
    schedule: optax.Schedule
    mesh: Any


def _under_mesh(mesh, fn):
    """``fn`` traced with ``mesh`` as the context mesh, so kernels XLA cannot partition (the
    Pallas NA backend) run under ``shard_map`` over it (:mod:`nat_jax.kernels.sharding`)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


@dataclasses.dataclass
class Steps:
    """The jitted train / eval steps of a config on a mesh, and their abstract arguments."""

    model_cfg: Any
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState     # ShapeDtypeStructs carrying their shardings
    state_sh: Any
    rest: Any             # the model's non-parameter state (ShapeDtypeStructs), replicated
    rest_sh: Any
    batch: dict           # one global train batch (ShapeDtypeStructs)
    step_fn: Any          # (state, batch, rest) -> (state, metrics); state is donated
    eval_fn: Any          # (params, batch, rest) -> summed eval metrics
    mesh: Any


def build_steps(config, mesh, num_classes: int, total_steps: int, warmup_steps: int,
                cooldown_steps: int = 0) -> Steps:
    """The optimizer and the jitted, sharded steps; allocates nothing, so the steps can also be
    compiled ahead of time for devices that are not here (:mod:`nat_jax.train.deviceless`)."""
    shards = sharding.batch_shards(mesh)
    if config.global_batch_size % shards:
        context = mesh.shape.get(sharding.CONTEXT_AXIS, 1)
        what = (f"the number of devices ({shards})" if context == 1 else
                f"the number of batch shards ({shards} = {mesh.size} devices / {context=})")
        raise UserInputError(f"global_batch_size={config.global_batch_size} must be divisible "
                             f"by {what}")
    schedule = make_schedule(config, total_steps, warmup_steps, cooldown_steps)
    model_cfg = model_config(config, num_classes)
    platform = mesh.devices.flat[0].platform  # abstract devices too (deviceless compiles)
    graphdef, params, rest = zoo.abstract_model(model_cfg, seed=config.seed,
                                                **build_options(config, platform))
    # The model says which parameters take no weight decay (timm's no_weight_decay).
    tx = make_optimizer(config, schedule, nnx.merge(graphdef, params, rest).no_weight_decay())
    state, state_sh, rest_sh = abstract_train_state(graphdef, nnx.to_pure_dict(params), rest,
                                                    tx, mesh, config)
    cfg = StepConfig.from_config(config, num_classes, platform)
    batch_sh = sharding.batch_sharding(mesh)
    options = dict(config.get("xla_options", {})) or None
    step_fn = jax.jit(
        _under_mesh(mesh, functools.partial(train_step, graphdef=graphdef, tx=tx,
                                            schedule=schedule, cfg=cfg)),
        in_shardings=(state_sh, batch_sh, rest_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0,
        compiler_options=options)
    eval_fn = jax.jit(_under_mesh(mesh, functools.partial(eval_step, graphdef=graphdef,
                                                          cfg=cfg)),
                      in_shardings=(state_sh.params, batch_sh, rest_sh),
                      out_shardings=sharding.replicated(mesh), compiler_options=options)
    b, s = config.global_batch_size, config.image_size
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8, sharding=batch_sh),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh),
             "erase": jax.ShapeDtypeStruct((b, 4), jnp.int32, sharding=batch_sh)}
    return Steps(model_cfg, graphdef, tx, schedule, _abstract_with_shardings(state, state_sh),
                 state_sh, _abstract_with_shardings(rest, rest_sh), rest_sh, batch, step_fn,
                 eval_fn, mesh)


def setup_training(config, mesh, num_classes: int, total_steps: int, warmup_steps: int,
                   cooldown_steps: int = 0) -> Training:
    """Builds the optimizer, the sharded initial state and the jitted train / eval steps."""
    steps = build_steps(config, mesh, num_classes, total_steps, warmup_steps, cooldown_steps)
    state, rest = jax.jit(_init_fn(steps.model_cfg, steps.tx, config),
                          out_shardings=(steps.state_sh, steps.rest_sh))()
    return Training(steps.model_cfg, steps.graphdef, state, steps.state_sh, rest,
                    steps.step_fn, steps.eval_fn, steps.schedule, mesh)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def make_checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Async manager in ``workdir/checkpoints``: the latest ``keep`` plus the best eval top-1."""
    policy = ocp_managers.AnyPreservationPolicy([
        ocp_managers.LatestN(n=keep),
        ocp_managers.BestN(get_metric_fn=lambda m: m["eval_top1"], n=1,
                           keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def _abstract_with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, data_iter,
                    metrics: dict | None = None) -> None:
    import grain

    step = int(jax.device_get(state.step))
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, state: TrainState,
                       state_sh, data_iter=None) -> TrainState:
    """Restores ``state`` (into its shardings) and, if given, the data iterator's position."""
    import grain

    items = {"state": ocp.args.StandardRestore(_abstract_with_shardings(state, state_sh))}
    if data_iter is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


# ---------------------------------------------------------------------------------------------
# Reporting (host 0 only)
# ---------------------------------------------------------------------------------------------

class Reporter:
    """JSONL + TensorBoard metrics, a tqdm progress bar, and the curve PNG at the end."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, global_batch: int,
                 enabled: bool, progress_bar: bool):
        self.enabled = enabled
        self.global_batch = global_batch
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.writer = self.bar = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, desc="train")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def plot(self) -> str | None:
        """Training loss and eval top-1 against the step, from the JSONL file."""
        if not self.enabled or not os.path.exists(self.path):
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in open(self.path)]
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        evals = [(r["step"], r["eval_top1"]) for r in rows if "eval_top1" in r]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        if train:
            ax[0].plot(*zip(*train))
        ax[0].set(xlabel="step", ylabel="train loss", title="training loss")
        if evals:
            ax[1].plot(*zip(*evals), marker="o")
        ax[1].set(xlabel="step", ylabel="top-1", title="validation top-1")
        fig.tight_layout()
        out = os.path.join(os.path.dirname(self.path), "training_curve.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

def evaluate(eval_fn, params, rest, config, source, mesh,
             unreadable: input_pipeline.UnreadableFiles | None = None) -> dict[str, float]:
    """Top-1 / top-5 (in %) and mean loss over the whole eval split.

    ``unreadable`` collects (and warns once about) files that cannot be read.
    """
    totals = None
    for batch in input_pipeline.eval_batches(config, source,
                                             process_index=jax.process_index(),
                                             process_count=jax.process_count(),
                                             unreadable=unreadable):
        sums = eval_fn(params, put_batch(batch, mesh), rest)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {"eval_top1": 100.0 * float(totals["top1"]) / count,
            "eval_top5": 100.0 * float(totals["top5"]) / count,
            "eval_loss": float(totals["loss"]) / count, "eval_count": int(totals["count"])}


def _eval_line(step: int, m: dict[str, float]) -> str:
    return (f"step {step}: eval top-1 {m['eval_top1']:.2f}% top-5 {m['eval_top5']:.2f}% "
            f"loss {m['eval_loss']:.4f}")


class _Preemption:
    """Turns SIGTERM into a flag the loop checks (final save, then a clean exit)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


LAUNCH_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_arguments(environ: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for ``jax.distributed.initialize`` from the launch environment.

    JAX itself reads only ``JAX_COORDINATOR_ADDRESS`` (and detects SLURM, Open MPI and TPU
    pods); the process count and id come from ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``,
    which must then be set together with the address. Returns ``{}`` when neither is set
    (auto-detection). Raises UserInputError naming what is missing or malformed.
    """
    address, count, index = (environ.get(name) or None for name in LAUNCH_ENV)
    if count is None and index is None:
        return {}
    missing = [n for n, v in zip(LAUNCH_ENV, (address, count, index)) if v is None]
    if missing:
        raise UserInputError(f"--distributed: {' and '.join(missing)} not set; set all of "
                             "JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and "
                             "JAX_PROCESS_ID=i (0 <= i < N) on every host")
    try:
        num, pid = int(count), int(index)
    except ValueError:
        raise UserInputError(f"--distributed: JAX_NUM_PROCESSES={count!r} and "
                             f"JAX_PROCESS_ID={index!r} must be integers") from None
    if num < 1 or not 0 <= pid < num:
        raise UserInputError(f"--distributed: need 0 <= JAX_PROCESS_ID ({pid}) < "
                             f"JAX_NUM_PROCESSES ({num})")
    host, colon, port = address.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise UserInputError(f"--distributed: JAX_COORDINATOR_ADDRESS={address!r} must be "
                             "host:port (process 0's address)")
    return {"coordinator_address": address, "num_processes": num, "process_id": pid}


def maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize()`` when asked (config.distributed or NAT_JAX_DISTRIBUTED=1).

    The coordinator, process count and id come from :func:`distributed_arguments` (the
    ``JAX_*`` variables) or, when those are unset, from SLURM / Open MPI / TPU pod detection.
    Nothing to go on is a UserInputError saying what to set. Must run before anything uses a
    JAX backend.
    """
    wanted = config.distributed or os.environ.get("NAT_JAX_DISTRIBUTED", "") in ("1", "true")
    if not wanted or jax.distributed.is_initialized():
        return
    kwargs = distributed_arguments(os.environ)
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if kwargs:
            raise
        raise UserInputError(
            f"--distributed: no cluster environment (SLURM, Open MPI, TPU pod) to take the "
            f"process count and id from ({e}); set JAX_COORDINATOR_ADDRESS=host:port, "
            "JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i on every host") from None


MODEL_CONFIG_FILE = "model_config.json"  # the resolved model config of the run, in the workdir


def stored_model_config(model_cfg, config) -> dict[str, Any]:
    """What :data:`MODEL_CONFIG_FILE` holds: the architecture config and the parameter dtype
    (both decide what a checkpoint holds; compute dtype and NA backend may change on resume)."""
    return {**model_cfg.to_dict(), "param_dtype": config.param_dtype}


def check_resume_matches(workdir: str, wanted: dict[str, Any]) -> None:
    """Refuses to resume checkpoints of another model: compares ``workdir``'s stored
    :data:`MODEL_CONFIG_FILE` with ``wanted`` (:func:`stored_model_config` of this run; entries
    only older files have, such as their ``dtype`` / ``na_backend``, are not compared).

    Reads only. Raises UserInputError naming every differing field; does nothing when the
    workdir holds no checkpoint. A workdir from before the file existed is resumed unchecked,
    with a warning.
    """
    checkpoints = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(name.isdigit()
                                                  for name in os.listdir(checkpoints)):
        return
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        log.warning("%s holds checkpoints but no %s: cannot check that they are of this model",
                    workdir, MODEL_CONFIG_FILE)
        return
    with open(path) as f:
        stored = json.load(f)
    wanted = json.loads(json.dumps(wanted))  # the same JSON types as stored
    diffs = [f"{k} {stored.get(k)} -> {wanted[k]}" for k in sorted(wanted)
             if stored.get(k) != wanted[k]]
    if diffs:
        raise UserInputError(f"{workdir} holds checkpoints of a different model "
                             f"({'; '.join(diffs)}); resume with the same model config, or "
                             "train it in a new --workdir")


def check_workdir(workdir: str) -> None:
    """UserInputError (one line) if ``workdir`` cannot be created or written; creates nothing."""
    reason = pretrained.unwritable_reason(workdir)
    if reason is not None:
        raise UserInputError(f"cannot use --workdir {workdir}: {reason}")


# Fields that divide or count steps and batches: 0 or less makes no run.
_POSITIVE_FIELDS = ("global_batch_size", "log_every_steps", "eval_every_steps",
                    "checkpoint_every_steps", "keep_checkpoints", "image_size", "context")


def validate_config(config) -> None:
    """One-line UserInputErrors for settings that cannot make a run (checked before any work)."""
    for name in _POSITIVE_FIELDS:
        if config[name] < 1:
            raise UserInputError(f"{name}={config[name]} must be >= 1")
    if config.num_workers < 0:
        raise UserInputError(f"num_workers={config.num_workers} must be >= 0 (0: no worker "
                             "processes)")
    processes = jax.process_count()
    if config.global_batch_size % processes:
        raise UserInputError(f"global_batch_size={config.global_batch_size} must be divisible "
                             f"by the number of processes ({processes})")


def train_and_evaluate(config, workdir: str) -> dict[str, float]:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Returns the final metrics: ``eval_top1``, ``eval_top5``, ``eval_loss``, ``train_loss``,
    ``step``, ``train_seconds`` and ``resumed_from`` (the restored step, or 0).
    Raises NonFiniteLossError if the loss becomes NaN/inf (the last good checkpoint stays).
    """
    import grain

    maybe_initialize_distributed(config)
    validate_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    check_workdir(workdir)
    is_host0 = jax.process_index() == 0

    # Data.
    train_source = input_pipeline.make_source(config, config.train_split)
    eval_source = input_pipeline.make_source(config, config.eval_split)
    num_classes = config.num_classes
    if num_classes < 1:
        num_classes = input_pipeline.num_classes_of(train_source)
        if num_classes is None:
            raise UserInputError("config.num_classes=-1 but the dataset does not name its "
                                 "classes")
    steps_per_epoch = max(len(train_source) // config.global_batch_size, 1)
    total_steps, warmup_steps, cooldown_steps = resolve_durations(config, steps_per_epoch)

    # The workdir: checked before anything in it changes, then the configs of this run.
    requested_model = stored_model_config(model_config(config, num_classes), config)
    check_resume_matches(workdir, requested_model)
    os.makedirs(workdir, exist_ok=True)
    if is_host0:
        write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
        write_json(os.path.join(workdir, MODEL_CONFIG_FILE), requested_model)
    # This host computes the rows of each global batch that its devices hold.
    mesh = sharding.make_mesh(config.fsdp, context=config.get("context", 1))
    block, blocks = sharding.host_batch_block(mesh)
    train_ds = input_pipeline.train_dataset(config, train_source, process_index=block,
                                            process_count=blocks)
    train_iter = iter(train_ds)
    unreadable = input_pipeline.UnreadableFiles()  # warns once per unreadable file

    # Model, optimizer, sharded state, compiled steps.
    run = setup_training(config, mesh, num_classes, total_steps, warmup_steps, cooldown_steps)
    model_cfg, state, state_sh, rest = run.model_cfg, run.state, run.state_sh, run.rest
    step_fn, eval_fn = run.step_fn, run.eval_fn

    # Resume.
    manager = make_checkpoint_manager(workdir, config.keep_checkpoints)
    resumed_from = 0
    latest = manager.latest_step()
    if latest is not None:
        state = restore_checkpoint(manager, latest, state, state_sh, train_iter)
        resumed_from = latest
    start = int(jax.device_get(state.step))

    reporter = Reporter(workdir, total_steps, start, config.global_batch_size,
                        enabled=is_host0, progress_bar=config.progress_bar)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    if resumed_from:
        reporter.message(f"Resuming from the checkpoint at step {resumed_from} in {workdir} "
                         f"(data iterator and RNG restored); {total_steps - start} steps left.")
    else:
        reporter.message(f"Starting a new run in {workdir}: {config.model} ({n_params:,} "
                         f"params), {total_steps} steps of {config.global_batch_size} images, "
                         f"mesh {dict(mesh.shape)}, compute dtype "
                         f"{compute_dtype(config, mesh.devices.flat[0].platform)}"
                         f"{' (auto)' if config.compute_dtype == 'auto' else ''}.")

    metrics_buffer: list[tuple[int, dict]] = []
    last_saved = resumed_from or None
    last_eval: dict[str, float] = {}
    train_loss = float("nan")
    timer_step, timer_time, compile_done = start, None, False
    train_seconds = 0.0

    def flush() -> None:
        """Fetches buffered step metrics; stops on a non-finite loss; logs the mean."""
        nonlocal train_loss
        if not metrics_buffer:
            return
        fetched = jax.device_get([m for _, m in metrics_buffer])
        steps = [s for s, _ in metrics_buffer]
        metrics_buffer.clear()
        for s, m in zip(steps, fetched):
            if not math.isfinite(float(m["loss"])):
                manager.wait_until_finished()
                raise NonFiniteLossError(
                    f"non-finite loss {float(m['loss'])} at step {s}; stopping. The last good "
                    f"checkpoint is step {manager.latest_step()} in {workdir}/checkpoints.")
        train_loss = float(np.mean([float(m["loss"]) for m in fetched]))
        row = {"train_loss": train_loss,
               "grad_norm": float(np.mean([float(m["grad_norm"]) for m in fetched])),
               "lr": float(fetched[-1]["lr"])}
        reporter.write(steps[-1], row)

    final_metrics: dict[str, float] = {}
    with _Preemption() as preemption:
        step = start
        while step < total_steps:
            batch = put_batch(unreadable.take(next(train_iter)), mesh)
            state, metrics = step_fn(state, batch, rest)
            step += 1
            metrics_buffer.append((step, metrics))
            if not compile_done:  # timings exclude the first (compiling) step
                jax.block_until_ready(metrics)
                compile_done, timer_step, timer_time = True, step, time.perf_counter()

            is_last = step == total_steps
            if step % config.log_every_steps == 0 or is_last:
                flush()
                now = time.perf_counter()
                rate = (step - timer_step) * config.global_batch_size / max(now - timer_time,
                                                                           1e-9)
                train_seconds += now - timer_time
                timer_step, timer_time = step, now
                reporter.write(step, {"images_per_second": rate})
                reporter.progress(step, {"loss": f"{train_loss:.4f}",
                                         "lr": f"{float(jax.device_get(metrics['lr'])):.2e}",
                                         "img/s": f"{rate:.0f}"})
            evaluated = False
            if step % config.eval_every_steps == 0 or is_last:
                flush()
                eval_params = state.ema_params if state.ema_params is not None else state.params
                last_eval = evaluate(eval_fn, eval_params, rest, config, eval_source, mesh,
                                     unreadable)
                evaluated = True
                reporter.write(step, last_eval)
                reporter.message(_eval_line(step, last_eval))
                timer_time = time.perf_counter()  # eval time is not training time
            if step % config.checkpoint_every_steps == 0 or is_last or preemption.requested:
                flush()
                save_checkpoint(manager, state, train_iter,
                                {"eval_top1": last_eval["eval_top1"]} if evaluated else None)
                last_saved = step
            if preemption.requested:
                manager.wait_until_finished()
                reporter.message(f"SIGTERM: saved the checkpoint at step {step}; exiting. "
                                 "Run the same command again to resume.")
                final_metrics["preempted"] = True
                break
        manager.wait_until_finished()

    if not last_eval and not final_metrics.get("preempted"):  # resumed a finished run
        eval_params = state.ema_params if state.ema_params is not None else state.params
        last_eval = evaluate(eval_fn, eval_params, rest, config, eval_source, mesh, unreadable)
        reporter.message(_eval_line(start, last_eval) + " (the run had already finished)")
    reporter.close()
    if hasattr(train_iter, "close"):
        train_iter.close()  # stops grain worker processes now, not at interpreter exit
    curve = reporter.plot()
    final_metrics.update(last_eval)
    final_metrics.update(step=int(jax.device_get(state.step)), train_loss=train_loss,
                         train_seconds=train_seconds, resumed_from=resumed_from,
                         last_checkpoint=last_saved or 0)
    if curve and is_host0:
        print(f"Training curve: {curve}", flush=True)
    if config.predict_after_training > 0 and not final_metrics.get("preempted"):
        predict_from_checkpoint(config, workdir, eval_source, model_cfg,
                                count=config.predict_after_training)
    manager.close()
    return final_metrics


def load_trained_model(workdir: str, model_cfg, step: int | None = None, use_ema: bool = False,
                       **options):
    """An NNX model with the params of checkpoint ``step`` (default: latest) in ``workdir``,
    built with ``options`` (:func:`build_options`)."""
    manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(create=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"no checkpoint in {workdir}/checkpoints")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    manager.close()
    params = restored["ema_params"] if use_ema and restored.get("ema_params") else \
        restored["params"]
    graphdef, param_state, _ = zoo.abstract_model(model_cfg, **options)
    # Restoring without a target turns integer keys (layer indices) into strings;
    # replace_by_pure_dict maps them back onto the model's own tree.
    nnx.replace_by_pure_dict(param_state, params)
    return nnx.merge(graphdef, param_state, zoo.init_rest(model_cfg, **options)), step


def predict_from_checkpoint(config, workdir: str, source, model_cfg, count: int = 8) -> list:
    """Reloads the latest checkpoint and prints jit-compiled predictions for ``count`` images.

    Every process takes part (restoring a checkpoint is collective; the images are the same on
    every host); host 0 prints and returns the rows, the others return ``[]``.
    """
    model, step = load_trained_model(workdir, model_cfg, **build_options(config))
    aug = config.aug
    transform = input_pipeline.EvalTransform(config.image_size, aug.eval_crop_pct)
    picks, examples = [], []
    for i in np.linspace(0, len(source) - 1, count).astype(int):
        try:
            examples.append(transform(input_pipeline.decode(source[int(i)])))
            picks.append(int(i))
        except input_pipeline.UnreadableImageError:
            continue  # already reported during evaluation
    if not examples:
        return []
    images = np.stack([e["image"] for e in examples])
    labels = [int(e["label"]) for e in examples]

    @nnx.jit
    def predict(model, images_u8):
        x = augment.normalize(images_u8, aug.mean, aug.std)
        return jax.nn.softmax(model(x).logits, axis=-1)

    probs = np.asarray(predict(model, jnp.asarray(images)))
    if jax.process_index() != 0:
        return []
    names = getattr(source, "class_names", None)

    def show(c: int) -> str:  # a label beyond the named classes prints as its index
        return names[c] if names and c < len(names) else str(c)

    print(f"Predictions of the checkpoint at step {step} (reloaded from {workdir}) on "
          f"{len(labels)} held-out images:", flush=True)
    rows = []
    for i, (p, y) in enumerate(zip(probs, labels)):
        guess = int(np.argmax(p))
        mark = "ok" if guess == y else "WRONG"
        print(f"  image {picks[i]:4d}: true {show(y):>6}  predicted {show(guess):>6}  "
              f"(p={p[guess]:.3f})  {mark}", flush=True)
        rows.append((picks[i], y, guess, float(p[guess])))
    return rows
