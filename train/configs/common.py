"""Shared pieces of the training configs.

Every config file calls :func:`imagenet_config` (the original ImageNet-1k recipe of the
NAT/DiNAT papers, summarized in the README's Training section) or builds on
:func:`base_config`, then changes only what differs. Field names are part of the user-facing contract (command-line overrides such as
``--config.learning_rate=5e-4`` use them), so rename nothing here.

Durations: ``num_train_steps`` or ``num_epochs`` (-1 = unset); a step count given takes
precedence over the epoch count (so ``--config.num_train_steps=10`` alone makes a 10-step run);
the same for ``warmup_steps`` / ``warmup_epochs`` and ``cooldown_steps`` / ``cooldown_epochs``.
A warmup or cooldown longer than the main schedule is clamped to it (with a warning).
"""

from __future__ import annotations

import ml_collections

from nat_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD


def augment_config() -> ml_collections.ConfigDict:
    """The recipe's augmentation: RandomResizedCrop, flip, RandAugment, erasing, mixup/cutmix."""
    aug = ml_collections.ConfigDict()
    aug.crop_scale = (0.08, 1.0)          # RandomResizedCrop area range
    aug.crop_ratio = (3 / 4, 4 / 3)       # RandomResizedCrop aspect-ratio range
    aug.hflip = 0.5                       # probability of a horizontal flip
    aug.randaugment = "rand-m9-mstd0.5-inc1"  # timm-style spec; "" turns it off
    aug.random_erasing = 0.25             # probability (pixel mode, on device)
    aug.mixup_alpha = 0.8                 # 0 turns mixup off
    aug.cutmix_alpha = 1.0                # 0 turns cutmix off
    aug.mix_prob = 1.0                    # probability to mix a batch at all
    aug.switch_prob = 0.5                 # probability of cutmix instead of mixup
    aug.label_smoothing = 0.1
    aug.mean = IMAGENET_MEAN
    aug.std = IMAGENET_STD
    aug.eval_crop_pct = 0.875             # eval: resize to image_size / crop_pct, center crop
    return aug


def base_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with the ImageNet recipe's values."""
    c = ml_collections.ConfigDict()
    # Model: a preset name of nat_jax.configs plus overrides of its (architecture) fields, and
    # how it runs (the build options of nat_jax.BuildOptions).
    c.model = "nat_mini"
    c.model_overrides = ml_collections.ConfigDict()
    # Activations (parameters stay float32). "auto": bfloat16 on GPU/TPU, float32 on CPU, where
    # bfloat16 measured slower (README, "Timings"); name a dtype to force one.
    c.compute_dtype = "auto"
    c.param_dtype = "float32"
    c.na_backend = "auto"          # neighborhood-attention backend ("auto", "xla", "pallas", ...)
    c.remat = False                # recompute each layer in the backward pass (less memory)
    # Each layer's weight gradients before the layer below's backward (BuildOptions; without
    # it XLA keeps every layer's activations for one late all-reduce under data parallelism).
    c.ordered_backward = True
    # Scan each stage's repeated layers (BuildOptions.scan_layers): faster compiles of deep
    # stages, the same numbers and checkpoints.
    c.scan_layers = False
    # XLA compiler options of the train and eval steps, e.g. xla_gpu_enable_triton_gemm=False
    # where XLA's GPU compiler cannot tile a GEMM without its autotuner (see the README).
    c.xla_options = ml_collections.ConfigDict()
    # Data.
    c.dataset = "imagenet2012"     # a tfds name, "digits", or "image_folder"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir / folder root
    c.train_split = "train"
    c.eval_split = "validation"
    c.num_classes = 1000           # -1: take it from the dataset (image folders)
    # image_folder: class names in label order; () = the training split's sorted folder names.
    # Every split is labelled through this list (a validation folder may lack classes).
    c.class_names = ()
    c.image_size = 224
    c.num_workers = 8              # grain worker processes per host (0: in the main process)
    c.prefetch_buffer = 2          # batches buffered per worker
    c.aug = augment_config()
    # Schedule (per step). In each steps/epochs pair a step count (>= 0) wins; -1 = unset.
    c.global_batch_size = 1024
    c.num_train_steps = -1
    c.num_epochs = 300
    c.warmup_steps = -1
    c.warmup_epochs = 20
    c.cooldown_steps = -1
    c.cooldown_epochs = 10
    # Optimizer: AdamW, lr not scaled with the batch.
    c.learning_rate = 1e-3
    c.warmup_init_lr = 1e-6
    c.min_lr = 5e-6
    c.weight_decay = 0.05
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-8
    c.grad_clip_norm = 5.0
    c.ema_decay = 0.0              # 0 disables the parameter EMA
    # Sharding: the mesh is (data, fsdp, context); fsdp > 1 shards large parameters over that axis.
    c.fsdp = 1                     # devices per fsdp group; -1: all devices
    c.fsdp_min_size = 2 ** 18      # parameters smaller than this stay replicated
    # Context parallelism: devices per group that split the token rows of the first
    # `context_stages` stages (halo exchange; for grids too large for one device, e.g. 1024 px
    # DiNAT backbones). The batch is split over the devices / context groups.
    c.context = 1
    c.context_stages = 1
    # Loop, reporting and checkpoints.
    c.eval_every_steps = 5000
    c.checkpoint_every_steps = 2500
    c.log_every_steps = 100
    c.keep_checkpoints = 3         # latest N, plus the best by eval top-1
    c.progress_bar = True
    c.predict_after_training = 0   # print predictions for this many held-out images at the end
    c.seed = 0
    c.distributed = False          # call jax.distributed.initialize() (multi-host launches)
    return c


def imagenet_config(model: str, *, ema_decay: float = 0.0) -> ml_collections.ConfigDict:
    """The original ImageNet-1k recipe for one model preset (drop path comes with the preset)."""
    c = base_config()
    c.model = model
    c.ema_decay = ema_decay
    return c
