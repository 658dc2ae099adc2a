"""nat-jax: Neighborhood Attention Transformers (NAT, DiNAT) in JAX/Flax."""

from nat_jax.kernels import (na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av,
                             na3d_qk)

from nat_jax import configs  # noqa: E402  (after kernels: configs -> modeling -> kernels)
from nat_jax.configs import DinatConfig, NatConfig  # noqa: E402
from nat_jax.modeling import (DinatBackbone, DinatForImageClassification, DinatModel,  # noqa: E402
                              NatBackbone, NatForImageClassification, NatModel, build_model,
                              count_params)
from nat_jax.outputs import BackboneOutput, ImageClassifierOutput, ModelOutput  # noqa: E402
from nat_jax.preprocess import imagenet_labels, predict, preprocess, top_k  # noqa: E402
from nat_jax.pretrained import load_pretrained, save_pretrained  # noqa: E402

__version__ = "0.1.0"

__all__ = ["na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk", "na3d", "na3d_av",
           "na3d_qk",
           "BackboneOutput", "DinatBackbone", "DinatConfig", "DinatForImageClassification",
           "DinatModel", "ImageClassifierOutput", "ModelOutput", "NatBackbone", "NatConfig",
           "NatForImageClassification", "NatModel", "build_model", "configs", "count_params",
           "imagenet_labels", "load_pretrained", "predict", "preprocess", "save_pretrained",
           "top_k"]
