"""Parity with HF transformers' GroupViT (an independent implementation; test-only dependency): identical
random weights mapped by ``hf_to_official`` give the same soft assignments, group/image embeddings and
text embeddings; our CLIP BPE tokenizer agrees with HF's CLIPTokenizer built from the same vocabulary."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nbsupport.models import groupvit as gv


def hf_small():
    from transformers import GroupViTConfig, GroupViTModel

    c = gv.CONFIGS["small"]
    cfg = GroupViTConfig(
        text_config=dict(
            vocab_size=c.vocab_size,
            hidden_size=c.text_width,
            intermediate_size=4 * c.text_width,
            num_hidden_layers=c.text_layers,
            num_attention_heads=c.text_heads,
            max_position_embeddings=c.context_length,
        ),
        vision_config=dict(
            hidden_size=c.embed_dim,
            intermediate_size=4 * c.embed_dim,
            depths=list(c.depths),
            num_group_tokens=list(c.num_group_tokens),
            num_output_groups=list(c.num_output_groups) + [c.num_output_groups[-1]],
            num_attention_heads=c.num_heads,
            image_size=c.img_size,
            patch_size=c.patch_size,
        ),
        projection_dim=c.proj_dim,
        projection_intermediate_dim=c.proj_inner,
    )
    torch.manual_seed(0)
    m = GroupViTModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # perturb everything (zero group tokens, unit norms, BN stats) so no term is trivial
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if t.dtype.is_floating_point:
                noise = torch.randn(t.shape, generator=g)
                if name.endswith("running_var"):
                    t.copy_(1 + 0.5 * noise.abs())
                elif "norm" in name or name.endswith(("layernorm.weight", ".1.weight")):
                    t.add_(0.1 * noise)
                else:
                    t.add_(0.05 * noise)
    return m


@pytest.fixture(scope="module")
def pair():
    hf = hf_small()
    ours = gv.from_state_dict(hf.state_dict(), gv.CONFIGS["small"], source="hf")
    return hf, ours


def test_state_dict_mapping_is_complete(pair):
    hf, ours = pair
    mapped = gv.hf_to_official(hf.state_dict())
    own = ours.state_dict()
    assert set(own) - set(mapped) == set()  # every one of our tensors comes from HF
    assert set(mapped) - set(own) == set()
    assert gv.infer_config(mapped) == gv.CONFIGS["small"]


def test_vision_parity(pair):
    hf, ours = pair
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, output_attentions=True, return_dict=True)
        out = ours.encode_image(x)
        ref_groups = torch.nn.functional.normalize(hf.visual_projection(ref.last_hidden_state.reshape(-1, 96)), dim=-1)
        ref_image = torch.nn.functional.normalize(hf.visual_projection(ref.pooler_output), dim=-1)
    assert len(ref.attentions) == 2
    for a, b in zip(out.soft, ref.attentions):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.final_tokens, ref.last_hidden_state, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.group_embeds.reshape(-1, 32), ref_groups, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.image_embeds, ref_image, atol=1e-4, rtol=0)
    # the assignments are not degenerate: several groups own patches
    assert len(out.soft[0][0].argmax(0).unique()) >= 3


def test_vision_parity_other_resolution(pair):
    hf, ours = pair
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        ref = hf.vision_model.embeddings(x, interpolate_pos_encoding=True)
        # same embedding (patches + LayerNorm + bicubic position embedding) as ours
        enc = ours.img_encoder
        mine = enc.patch_embed.norm(enc.patch_embed.proj(x).flatten(2).transpose(1, 2))
        mine = mine + gv.interpolate_pos_embed(enc.pos_embed, (12, 12))
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_text_parity_and_logits(pair):
    hf, ours = pair
    ids = gv.tokenizer()(["a photo of a cat.", "a photo of a dog.", "an aeroplane over the sea"])
    with torch.no_grad():
        ref = torch.nn.functional.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
        mine = ours.encode_text(ids)
        x = torch.randn(2, 3, 64, 64)
        ref_logits = hf(input_ids=ids, pixel_values=x).logits_per_image
        my_logits = ours(x, ids)
    torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(my_logits, ref_logits, atol=1e-3, rtol=1e-4)


def test_tokenizer_matches_hf_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    tok = gv.tokenizer()
    merges = sorted(tok.ranks, key=tok.ranks.get)
    try:  # transformers >= 5: vocab dict + merge list (a Rust BPE from the tokenizers package)
        hf = CLIPTokenizer(vocab=dict(tok.encoder), merges=merges)
    except TypeError:
        vocab, mf = tmp_path / "vocab.json", tmp_path / "merges.txt"
        vocab.write_text(json.dumps(tok.encoder))
        mf.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        hf = CLIPTokenizer(vocab_file=str(vocab), merges_file=str(mf))
    texts = [
        "a photo of a cat.",
        "A PHOTO of the Dining-Table!!",
        "tv monitor, pottedplant & sofa 123",
        "it's a bird's nest; they're flying",
        "naïve café über straße",
    ]
    for t in texts:
        ref = hf(t)["input_ids"]
        assert [tok.sot] + tok.encode(t) + [tok.eot] == ref, t


def test_hub_name_reads_only_the_local_cache_offline(pair, tmp_path, monkeypatch):
    """NBSUPPORT_OFFLINE=1: an HF hub name is read from the hub cache under cache_dir()/groupvit without
    any network call (the HF layout renamed on load, same embeddings), and an empty cache is a clear error."""
    from safetensors.torch import save_file

    from nbsupport.models.checkpoints import WeightsUnavailableError

    hf, ours = pair
    monkeypatch.setenv("NBSUPPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NBSUPPORT_OFFLINE", "1")
    repo = "nvidia/groupvit-gcc-yfcc"
    with pytest.raises(WeightsUnavailableError, match="groupvit-gcc-yfcc.*offline"):
        gv.load(repo)
    # the huggingface_hub cache layout: refs/main names the snapshot that holds the file
    root = tmp_path / "cache" / "groupvit" / "models--nvidia--groupvit-gcc-yfcc"
    rev = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    (root / "snapshots" / rev).mkdir(parents=True)
    sd = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    save_file(sd, str(root / "snapshots" / rev / "model.safetensors"))
    m = gv.load(repo)
    assert gv.describe(m) == f"GroupViT {repo} (HF)" and m.cfg == gv.CONFIGS["small"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m.encode_image(x).image_embeds, ours.encode_image(x).image_embeds)
