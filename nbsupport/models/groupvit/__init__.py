"""GroupViT (Xu et al. 2022) with every intermediate exposed, its weights, CLIP tokenizer and the paper's
zero-shot segmentation (thesis sections 4.4-4.6, Eq 12-35; analyses of section 5.4, Eq 47-51).

The module names follow the official NVlabs checkpoint (``img_encoder.layers.i.blocks.j.attn.qkv`` ...), so
an official ``['model']`` state dict loads without renaming; :func:`hf_to_official` maps the HF
transformers layout (``nvidia/groupvit-gcc-yfcc``). Shapes: ``B`` images, ``N = h*w`` patches, ``C`` width,
``G_l`` group tokens of stage ``l``, ``P`` joint-space dimension, ``K`` texts.

- :class:`GroupViT` / :func:`build` / :data:`CONFIGS` (``group_vit_gcc_yfcc_30e``, ``group_vit_gcc_redcap_30e``,
  ``small`` for tests) ; ``model.encode_image(images) -> ImageOutput`` (soft/hard assignments, segment and
  group tokens per stage, chained attention ``Attn`` of Eq 32, image and group embeddings);
  ``model.encode_text(token_ids)``.
- :func:`load` (official names, local ``.pth`` / ``.safetensors`` / HF files, ``random:small``), a restricted
  unpickler (:func:`read_checkpoint`) that never runs code from the file.
- :class:`Tokenizer` (CLIP BPE, packaged vocabulary), :func:`text_embeddings` (prompt templates averaged).
- :func:`segment` (Eq 29-35 with top-5 classes, background threshold, sliding window).
- :func:`soft_labels`, :func:`knn_labels`, :func:`gt_group_labels` (section 5.4, Eq 47-51).
"""

from __future__ import annotations

from .inference import (
    BG_THRESH,
    TEMPLATES,
    group_segmentation,
    label_logits,
    resize_attn,
    segment,
    segment_logits,
    text_embeddings,
)
from .model import (
    CONFIGS,
    AssignAttention,
    Block,
    Config,
    CrossAttention,
    CrossBlock,
    GroupingBlock,
    GroupViT,
    ImageOutput,
    MixerMlp,
    Mlp,
    PatchEmbed,
    ProjectMLP,
    ResidualAttentionBlock,
    SelfAttention,
    Stage,
    TextTransformer,
    VisionEncoder,
    build,
    describe,
    hard_one_hot,
    init_weights,
    interpolate_pos_embed,
)
from .tokenizer import Tokenizer, tokenizer
from .weights import HF_REPOS, SHIPPED, URLS, from_state_dict, hf_to_official, infer_config, load, weights_path

__all__ = [
    "AssignAttention",
    "BG_THRESH",
    "Block",
    "build",
    "Config",
    "CONFIGS",
    "CrossAttention",
    "CrossBlock",
    "describe",
    "from_state_dict",
    "group_segmentation",
    "GroupingBlock",
    "GroupViT",
    "hard_one_hot",
    "HF_REPOS",
    "hf_to_official",
    "ImageOutput",
    "infer_config",
    "init_weights",
    "interpolate_pos_embed",
    "label_logits",
    "load",
    "MixerMlp",
    "Mlp",
    "PatchEmbed",
    "ProjectMLP",
    "ResidualAttentionBlock",
    "resize_attn",
    "segment",
    "segment_logits",
    "SelfAttention",
    "SHIPPED",
    "Stage",
    "TEMPLATES",
    "text_embeddings",
    "TextTransformer",
    "Tokenizer",
    "tokenizer",
    "URLS",
    "VisionEncoder",
    "weights_path",
]
