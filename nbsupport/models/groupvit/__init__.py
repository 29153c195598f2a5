"""GroupViT (Xu et al. 2022; thesis sections 4.4-4.6, Eq 12-35): the model with every intermediate exposed,
its weights, the CLIP tokenizer and the paper's zero-shot inference. Shapes: ``B`` images, ``N = h*w``
patches, ``C`` width, ``G_l`` group tokens of stage ``l``, ``P`` joint-space dimension, ``K`` texts.

- :mod:`.model` - :class:`GroupViT` / :func:`build` / :data:`CONFIGS` (``group_vit_gcc_yfcc_30e``,
  ``group_vit_gcc_redcap_30e``, ``small`` and ``small128`` for offline runs) with the official NVlabs module
  names, so an official ``['model']`` state dict loads without renaming; ``model.encode_image(images) ->
  ImageOutput`` (soft/hard assignments, segment and group tokens per stage, chained attention ``Attn`` of
  Eq 32, image and group embeddings); ``model.encode_text(token_ids)``.
- :mod:`.weights` - :func:`load` (official releases through :func:`fetch`, the project's one
  download-and-verify path; HF ``nvidia/groupvit-gcc-yfcc`` files renamed by :func:`hf_to_official`; the
  shipped ``tiny_groupvit_synth``; local ``.pth`` / ``.safetensors``; ``random:<config>``; a ``fallback``
  for weights that are unavailable).
- :mod:`.tokenizer` - :class:`Tokenizer` (CLIP BPE from the packaged vocabulary, no network).
- :mod:`.inference` - :func:`text_embeddings` (prompt templates averaged), :func:`segment` (Eq 29-35: top-5
  classes, background threshold, sliding window), :func:`group_segmentation` (Eq 47, the pixel-to-group map
  the section 5.4 analyses in :mod:`nbsupport.analysis.group_tokens` start from).
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
from .weights import (
    HF_REPOS,
    SHIPPED,
    URLS,
    fetch,
    from_state_dict,
    hf_to_official,
    infer_config,
    load,
    weights_path,
)

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
    "fetch",
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
