"""GroupViT weights: official NVlabs releases (downloaded once into ``$NBSUPPORT_CACHE/groupvit`` and hash
checked by :func:`nbsupport.models.checkpoints.fetch_release`, the path DINO's weights take too), HF
transformers files (renamed to the official layout), shipped offline models, seeded random inits.
"""

from __future__ import annotations

import logging
import math
import re as _re
from dataclasses import replace
from pathlib import Path

import torch

from nbsupport.core import paths
from nbsupport.models.checkpoints import (
    FIXTURE_LABEL,
    WeightsUnavailableError,
    fetch_release,
    fixture_marker,
    offline,
    read_checkpoint,
)
from nbsupport.models.groupvit.model import CONFIGS, Config, GroupViT, build, interpolate_pos_embed

URLS = {
    "group_vit_gcc_yfcc_30e": "https://github.com/xvjiarui/GroupViT/releases/download/v1.0.0/"
    "group_vit_gcc_yfcc_30e-879422e0.pth",
    "group_vit_gcc_redcap_30e": "https://github.com/xvjiarui/GroupViT/releases/download/v1.0.0/"
    "group_vit_gcc_redcap_30e-3dd09a76.pth",
}

log = logging.getLogger(__name__)


#: Small weights shipped in ``data/weights/`` (name -> file, the ``groupvit-train`` command that trains them).
SHIPPED = {
    "tiny_groupvit_synth": (
        "tiny_groupvit_synth.safetensors",
        "python -m nbsupport groupvit-train --recipe tiny_groupvit_synth (see docs/experiments/tiny_groupvit.md)",
    ),
    "tiny_groupvit_synth_supervised": (
        "tiny_groupvit_synth_supervised.safetensors",
        "python -m nbsupport standin train --recipe tiny_groupvit_synth_supervised "
        "(see docs/experiments/offline_models.md)",
    ),
}

#: Descriptions of shipped weights that are not the default "tiny GroupViT trained on the synthetic world".
SHIPPED_DESCRIPTIONS = {
    "tiny_groupvit_synth_supervised": "tiny GroupViT, supervised stand-in (synthetic world)",
}


HF_REPOS = {
    "nvidia/groupvit-gcc-yfcc": "group_vit_gcc_yfcc_30e",
    "nvidia/groupvit-gcc-redcaps": "group_vit_gcc_redcap_30e",
}


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an HF transformers ``GroupViTModel`` state dict (``nvidia/groupvit-gcc-yfcc``) to the official
    layout this module uses: q/k/v merged back into ``qkv`` / ``in_proj``, Linear projectors to 1x1 convs."""
    out, qkv = {}, {}
    vis_rules = [
        (r"^vision_model\.embeddings\.patch_embeddings\.projection\.", "img_encoder.patch_embed.proj."),
        (r"^vision_model\.embeddings\.layernorm\.", "img_encoder.patch_embed.norm."),
        (r"^vision_model\.embeddings\.position_embeddings$", "img_encoder.pos_embed"),
        (r"^vision_model\.layernorm\.", "img_encoder.norm."),
        (r"^vision_model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"img_encoder.layers.\1.blocks.\2."),
        (r"^vision_model\.encoder\.stages\.(\d+)\.", r"img_encoder.layers.\1."),
        (r"^text_model\.embeddings\.token_embedding\.", "text_encoder.token_embedding."),
        (r"^text_model\.embeddings\.position_embedding\.weight$", "text_encoder.positional_embedding"),
        (r"^text_model\.encoder\.layers\.(\d+)\.", r"text_encoder.transformer.resblocks.\1."),
        (r"^text_model\.final_layer_norm\.", "text_encoder.ln_final."),
        (r"^visual_projection\.[01]\.", None),
        (r"^text_projection\.[01]\.", None),
    ]
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        m = _re.match(r"^(visual|text)_projection\.(\d)\.(.+)$", k)
        if m:
            side = "img_projector" if m.group(1) == "visual" else "text_projector"
            idx, rest = int(m.group(2)), m.group(3)
            if idx == 0:
                out[f"{side}.linear_hidden.0.{rest}"] = v[..., None] if rest == "weight" else v
            elif idx == 1:
                out[f"{side}.linear_hidden.1.{rest}"] = v
            elif idx == 3:
                out[f"{side}.linear_out.{rest}"] = v[..., None] if rest == "weight" else v
            continue
        new = k
        for pat, rep in vis_rules:
            if rep is not None and _re.search(pat, new):
                new = _re.sub(pat, rep, new)
                break
        text = new.startswith("text_encoder.transformer")
        if new.startswith("img_encoder.layers") and ".blocks." in new:
            new = (
                new.replace(".layer_norm1.", ".norm1.")
                .replace(".layer_norm2.", ".norm2.")
                .replace(".self_attn.out_proj.", ".attn.proj.")
            )
        elif text:
            new = (
                new.replace(".layer_norm1.", ".ln_1.")
                .replace(".layer_norm2.", ".ln_2.")
                .replace(".mlp.fc1.", ".mlp.c_fc.")
                .replace(".mlp.fc2.", ".mlp.c_proj.")
                .replace(".self_attn.out_proj.", ".attn.out_proj.")
            )
        new = new.replace(".pre_assign_attn.attn.out_proj.", ".pre_assign_attn.attn.proj.")
        m = _re.match(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$", new)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        out[new] = v
    for (prefix, kind), parts in qkv.items():
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        if prefix.startswith("text_encoder"):
            out[f"{prefix}.attn.in_proj_{kind}"] = fused
        else:
            out[f"{prefix}.attn.qkv.{kind}"] = fused
    if "logit_scale" in out:
        out.setdefault("multi_label_logit_scale", out["logit_scale"].clone())
    return out


def _extract_state(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        sd = hf_to_official(sd)
    return sd


def infer_config(sd: dict[str, torch.Tensor]) -> Config:
    """The architecture a state dict (official layout) was trained with, read from tensor shapes."""
    emb = sd["img_encoder.patch_embed.proj.weight"]
    dim, patch = emb.shape[0], emb.shape[-1]
    n_stages = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("img_encoder.layers."))
    depths = tuple(
        1 + max([int(k.split(".")[4]) for k in sd if k.startswith(f"img_encoder.layers.{i}.blocks.")], default=-1)
        for i in range(n_stages)
    )
    groups = tuple(
        sd[f"img_encoder.layers.{i}.group_token"].shape[1] if f"img_encoder.layers.{i}.group_token" in sd else 0
        for i in range(n_stages)
    )
    outs = tuple(sd[f"img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight"].shape[0] for i in range(n_stages - 1))
    tw = sd["text_encoder.positional_embedding"].shape[1]
    tl = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text_encoder.transformer.resblocks."))
    # head counts are not visible in weight shapes: take them from a named config of the same shape, else
    # the ViT / CLIP convention of 64 channels per head
    known = [
        c
        for c in CONFIGS.values()
        if (c.embed_dim, c.depths, c.num_group_tokens, c.text_width) == (dim, depths, groups, tw)
    ]
    heads = known[0].num_heads if known else max(1, dim // 64)
    theads = known[0].text_heads if known else max(1, tw // 64)
    return Config(
        img_size=int(round(math.sqrt(sd["img_encoder.pos_embed"].shape[1]))) * patch,
        patch_size=patch,
        embed_dim=dim,
        depths=depths,
        num_heads=heads,
        num_group_tokens=groups,
        num_output_groups=outs,
        text_width=tw,
        text_layers=tl,
        text_heads=theads,
        context_length=sd["text_encoder.positional_embedding"].shape[0],
        vocab_size=sd["text_encoder.token_embedding.weight"].shape[0],
        proj_inner=sd["img_projector.linear_hidden.0.weight"].shape[0],
        proj_dim=sd["img_projector.linear_out.weight"].shape[0],
    )


def from_state_dict(
    sd: dict[str, torch.Tensor], cfg: Config | None = None, img_size: int | None = None, source: str = "state dict"
) -> GroupViT:
    """A GroupViT holding ``sd`` (official or HF layout). ``img_size`` resizes the position embedding
    permanently (bicubic), e.g. 384 for the thesis's high-resolution fine-tuning."""
    sd = _extract_state(sd)
    cfg = cfg or infer_config(sd)
    if img_size and img_size != cfg.img_size:
        g = img_size // cfg.patch_size
        sd = dict(sd, **{"img_encoder.pos_embed": interpolate_pos_embed(sd["img_encoder.pos_embed"], (g, g))})
        cfg = replace(cfg, img_size=img_size)
    model = GroupViT(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("multi_label_logit_scale")]
    if missing or unexpected:
        raise ValueError(
            f"{source}: weights do not fit GroupViT {cfg}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def weights_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where an official checkpoint is cached: ``<cache_dir>/groupvit/<file name of the release>`` (default
    :func:`nbsupport.core.paths.cache_dir`)."""
    return Path(cache_dir or paths.cache_dir()) / "groupvit" / URLS[name].rsplit("/", 1)[1]


def fetch(name: str, download: bool = True, progress: bool = True) -> Path:
    """The local path of official release ``name`` (:data:`URLS`), downloaded once into
    :func:`weights_path` and hash checked on every use (:func:`nbsupport.models.checkpoints.fetch_release`:
    the SHA-256 is pinned beside the file at its first download). Offline (``download=False`` or
    ``NBSUPPORT_OFFLINE=1``) and not cached: :class:`WeightsUnavailableError` naming the URL and the path."""
    if name not in URLS:
        raise ValueError(f"{name!r} is not an official GroupViT release: use one of {sorted(URLS)}")
    return fetch_release(
        URLS[name],
        weights_path(name),
        what=f"GroupViT weights {name!r}",
        loader="nbsupport.models.groupvit.load",
        alternatives=["'random:small'", "'small'"],
        download=download,
        progress=progress,
    )


def load(
    name_or_path: str | Path = "small",
    device: str | torch.device = "cpu",
    img_size: int | None = None,
    download: bool = True,
    seed: int = 0,
    fallback: str | None = None,
) -> GroupViT:
    """A GroupViT in eval mode.

    - ``"small"`` / ``"random:<config>"``: seeded random init (offline; figure titles say so);
    - ``"group_vit_gcc_yfcc_30e"`` / ``"group_vit_gcc_redcap_30e"``: official release, downloaded once into
      ``cache_dir()/groupvit`` and hash checked (:func:`fetch`), read by :func:`read_checkpoint` (no code
      from the file runs); a random-weight fixture there (:mod:`nbsupport.models.fixtures`) loads too, with
      ``nbs_info["fixture"]`` True and "(random weights, fixture)" in the description;
    - ``"nvidia/groupvit-gcc-yfcc"``: HF hub weights through ``huggingface_hub`` (if installed), renamed;
    - ``"tiny_groupvit_synth"``: the tiny GroupViT trained on the synthetic world (:data:`SHIPPED`);
    - ``"tiny_groupvit_synth_supervised"``: the supervised stand-in (groups matched to instance masks and
      named by class, ``nbsupport.training.standins``), stored in fp16 and loaded as fp32;
    - a path to a ``.pth``/``.pt`` (official or HF layout, maybe nested under ``model``) or ``.safetensors``.

    ``fallback``: a name loaded instead (with a logged warning, and ``nbs_info["fallback_for"]`` set) when
    the requested weights are unavailable (:class:`WeightsUnavailableError`: a shipped file not trained
    yet, official weights offline); None raises.
    """
    name = str(name_or_path)
    try:
        return _load(name, device, img_size, download, seed)
    except WeightsUnavailableError as e:
        if fallback is None:
            raise
        log.warning("%s\n-> using %r instead", e, fallback)
        model = _load(str(fallback), device, img_size, download, seed)
        model.nbs_info = dict(model.nbs_info, fallback_for=name)
        return model


def _load(name: str, device, img_size, download: bool, seed: int) -> GroupViT:
    if name in CONFIGS and name not in URLS or name.startswith("random:"):
        return build(name.removeprefix("random:"), seed).to(device)
    if name in URLS:
        path = fetch(name, download=download)
        model = from_state_dict(read_checkpoint(path), CONFIGS[name], img_size, source=str(path))
        model.nbs_info = _info(name, f"GroupViT {name}", path)
        return model.to(device)
    if name in HF_REPOS:
        model = _load_file(_hf_file(name, download), img_size)
        model.nbs_info = {"name": name, "pretrained": True, "fixture": False, "description": f"GroupViT {name} (HF)"}
        return model.to(device)
    if name in SHIPPED:  # tiny offline models trained by groupvit-train (see SHIPPED)
        path = paths.data_dir() / "weights" / SHIPPED[name][0]
        if not path.is_file():
            raise WeightsUnavailableError(
                f"{name!r}: the shipped weights {path} are missing (not trained yet, or deleted); "
                f"train them with {SHIPPED[name][1]}. Offline alternative: 'small'."
            )
        model = _load_file(path, img_size)
        model.nbs_info = {
            "name": name,
            "pretrained": True,
            "fixture": False,
            "description": SHIPPED_DESCRIPTIONS.get(name, f"{name} (tiny GroupViT trained on the synthetic world)"),
        }
        return model.to(device)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(
            f"{name!r} is neither a file nor a known GroupViT: "
            f"{sorted(CONFIGS)} + {sorted(HF_REPOS)} + {sorted(SHIPPED)} or random:<config>"
        )
    model = _load_file(path, img_size)
    model.nbs_info = _info(path.name, f"GroupViT ({path.name})", path)
    return model.to(device)


def _info(name: str, description: str, path: Path) -> dict:
    """``nbs_info`` of weights read from ``path``: a random-weight fixture (:mod:`nbsupport.models.fixtures`)
    says so in the description and flags, since figure titles print the description."""
    fixture = fixture_marker(path) is not None
    if fixture:
        description = f"{description} ({FIXTURE_LABEL})"
    return {"name": name, "pretrained": not fixture, "fixture": fixture, "description": description}


def _hf_file(repo: str, download: bool) -> Path:
    """The weights file of an HF hub repository, from the hub cache under ``cache_dir()/groupvit`` (only
    the local cache when offline: ``download=False`` or ``NBSUPPORT_OFFLINE=1``)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise ImportError("loading from the HF hub needs huggingface_hub; or pass a local file") from e
    local = offline() or not download
    errors = []
    for fname in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo, fname, cache_dir=paths.cache_dir() / "groupvit", local_files_only=local))
        except Exception as e:  # noqa: BLE001 - try the next file name, report both
            errors.append(f"{fname}: {type(e).__name__}: {e}")
    raise WeightsUnavailableError(
        f"GroupViT weights {repo!r} are not available{' offline' if local else ''} from the HF hub cache "
        f"{paths.cache_dir() / 'groupvit'} ({'; '.join(errors)}); pass a local .safetensors / .bin file instead."
    )


def _load_file(path: Path, img_size):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        obj = read_checkpoint(path)
    return from_state_dict(obj, None, img_size, source=str(path))
