"""nat-jax: Neighborhood Attention Transformers (NAT, DiNAT) in JAX/Flax."""

from nat_jax import configs, zoo
from nat_jax.configs import DinatConfig, ModelConfig, NatConfig
from nat_jax.hub import from_pretrained
from nat_jax.kernels import (merge_attentions, na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk,
                             na3d, na3d_av, na3d_qk)
from nat_jax.modeling import (BuildOptions, DinatBackbone, DinatForImageClassification,
                              DinatModel, NatBackbone, NatForImageClassification, NatModel,
                              count_params)
from nat_jax.outputs import BackboneOutput, ImageClassifierOutput, ModelOutput
from nat_jax.preprocess import (EvalTransform, imagenet_labels, label_names, predict, preprocess,
                                top_k)
from nat_jax.pretrained import load_pretrained, save_pretrained
from nat_jax.zoo import abstract_model, build_model

__version__ = "0.1.0"

__all__ = ["merge_attentions", "na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk",
           "na3d", "na3d_av", "na3d_qk",
           "BackboneOutput", "BuildOptions", "DinatBackbone", "DinatConfig",
           "DinatForImageClassification", "DinatModel", "EvalTransform",
           "ImageClassifierOutput", "ModelConfig", "ModelOutput", "NatBackbone", "NatConfig",
           "NatForImageClassification", "NatModel", "abstract_model", "build_model", "configs",
           "count_params", "from_pretrained", "imagenet_labels", "label_names",
           "load_pretrained", "predict", "preprocess", "save_pretrained", "top_k", "zoo"]
