"""dinat_large at 224 on ImageNet-1k with the original recipe (200M parameters).

The published model was pre-trained on ImageNet-22k and fine-tuned on 1k (86.6% top-1); this
config trains from scratch on ImageNet-1k with the same recipe and shards parameters and
optimizer state over all devices (``fsdp=-1``) to fit memory. For the published fine-tuning recipe
use ``--config.learning_rate=5e-5 --config.num_epochs=30 --config.global_batch_size=64
--config.aug.mixup_alpha=0 --config.aug.cutmix_alpha=0 --config.weight_decay=1e-4``.

Command::

    nat-jax train --config dinat_large --workdir runs/dinat_large --config.data_dir=~/tensorflow_datasets

Expected result: top-1 in the mid 80s from scratch (no ImageNet-1k-only number was published).
"""

from nat_jax.train.configs import common


def get_config():
    c = common.imagenet_config("dinat_large")
    c.fsdp = -1  # all devices
    return c
