"""dinat_base on ImageNet-1k with the original recipe (AdamW 1e-3, 300 + 10 epochs, batch 1024).

Command (one host, all local devices; prepare ImageNet once first, see the README)::

    nat-jax train --config dinat_base --workdir runs/dinat_base --config.data_dir=~/tensorflow_datasets

Expected result: about 84.4% top-1 on the validation set after the full schedule
(the published dinat_base number). Smoke run on mock-sized settings:
--config.num_train_steps=10 --config.warmup_steps=2 --config.cooldown_steps=0 (step counts win over
the epoch counts).
"""

from nat_jax.train.configs import common


def get_config():
    return common.imagenet_config("dinat_base")
