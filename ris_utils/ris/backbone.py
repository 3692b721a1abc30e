"""CRIS's two CLIP towers as one module (:class:`CLIPBackbone`) and the dense maps of the image tower.

- :func:`visual_trunk`: ``ModifiedResNet`` up to ``layer4`` -> (C3, C4, layer4);
- :func:`attnpool_dense`: CLIP's attention pool at EVERY ``layer4`` position (CRIS's C5), the positional
  embedding resized bicubically; :func:`attnpool_values`: MaskCLIP's per-position values (the dense map
  aligned with the text embedding without the pool's query);
- :func:`set_c5_stride`: ``layer4`` at stride 16 instead of 32 (a C5 grid twice as fine);
- :func:`dense_map`: either map for a whole image (the training-free dense pick accuracy of
  :mod:`ris_utils.ris.pretrain`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CLIPBackbone", "attnpool_dense", "attnpool_values", "visual_trunk", "dense_map", "set_c5_stride"]


def _pool_positions(pool: nn.Module, h: int, w: int) -> torch.Tensor:
    """The attention pool's spatial positional embedding as (1, C, h, w), resized bicubically when its grid differs."""
    c = pool.positional_embedding.shape[1]
    side = int(round(math.sqrt(pool.positional_embedding.shape[0] - 1)))
    pos = pool.positional_embedding[1:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    if (side, side) != (h, w):
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    return pos


def attnpool_dense(pool: nn.Module, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """CLIP's ``AttentionPool2d`` run at EVERY position of (B, C, H, W) -> (B, embed_dim, H, W) (CRIS).

    Each position is a query over all positions (keys/values), with the pool's positional embedding
    resized bicubically when the grid differs from the one it was trained for."""
    b, c, h, w = x.shape
    pos = _pool_positions(pool, h, w)
    x = (x + pos.to(x.dtype)).flatten(2).permute(2, 0, 1)  # (HW, B, C)
    x, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=c, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=training,
        need_weights=False)
    return x.permute(1, 2, 0).reshape(b, -1, h, w)


def attnpool_values(pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's dense features (Zhou et al., ECCV 2022): CLIP's attention pool with every position attending
    only to itself -- ``c_proj(v_proj(x + pos))`` at each position -> (B, embed_dim, H, W). Local by construction
    (each output sees its own layer4 feature), where :func:`attnpool_dense` mixes all positions."""
    b, c, h, w = x.shape
    pos = _pool_positions(pool, h, w)
    v = F.linear((x + pos.to(x.dtype)).flatten(2).transpose(1, 2), pool.v_proj.weight, pool.v_proj.bias)
    out = F.linear(v, pool.c_proj.weight, pool.c_proj.bias)  # (B, HW, E)
    return out.transpose(1, 2).reshape(b, -1, h, w)


def visual_trunk(visual: nn.Module, img: torch.Tensor):
    """``ModifiedResNet`` stem + layers: img (B, 3, S, S) -> (C3 = layer2, C4 = layer3, layer4) maps."""
    x = visual.stem(img.to(visual.conv1.weight.dtype))
    c3 = visual.layer2(visual.layer1(x))
    c4 = visual.layer3(c3)
    return c3, c4, visual.layer4(c4)


def dense_map(visual: nn.Module, img: torch.Tensor, kind: str = "attn") -> torch.Tensor:
    """The dense C5 map of a CLIP image tower (without CRIS's new shortcut) -> (B, embed_dim, S/s5, S/s5):
    ``kind="attn"``: the attention pool at every position of layer4 (:func:`attnpool_dense`, CRIS's C5);
    ``"value"``: MaskCLIP's value path (:func:`attnpool_values`). What :mod:`ris_utils.ris.pretrain` aligns
    with text."""
    l4 = visual_trunk(visual, img)[2]
    if kind == "value":
        return attnpool_values(visual.attnpool, l4)
    if kind != "attn":
        raise ValueError(f"dense map kind must be attn or value, got {kind!r}")
    return attnpool_dense(visual.attnpool, l4, visual.training)


def set_c5_stride(visual: nn.Module, stride: int) -> nn.Module:
    """Run ``layer4`` of a ``ModifiedResNet`` at stride 16 (``stride=16``: its first block's average pools,
    main path and shortcut, become identities; the weights are unchanged) or keep CLIP's 32. In place."""
    if stride == 32:
        return visual
    if stride != 16:
        raise ValueError(f"c5_stride must be 16 or 32, got {stride}")
    block = visual.layer4[0]
    block.avgpool = nn.Identity()
    if block.downsample is not None:
        block.downsample[0] = nn.Identity()
    return visual


class CLIPBackbone(nn.Module):
    """Multi-scale image features and word/sentence features from an open_clip ``CLIP`` with a
    ``ModifiedResNet`` image tower.

    Arguments:
      clip: an ``open_clip.model.CLIP`` whose ``visual`` is a ``ModifiedResNet``.
      word_len: number of text tokens used (CRIS: 17); positional embedding and causal mask are cut to it.
      eot_token_id: id of the end-of-text token (the sentence feature is read there).
    """

    def __init__(self, clip: nn.Module, word_len: int, eot_token_id: int):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet

        if not isinstance(clip.visual, ModifiedResNet):
            raise ValueError(f"CRIS needs a ModifiedResNet (RN50-family) image tower, got {type(clip.visual).__name__}")
        if word_len > clip.positional_embedding.shape[0]:
            raise ValueError(f"word_len={word_len} exceeds the text context length {clip.positional_embedding.shape[0]}")
        self.visual = clip.visual
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask[:word_len, :word_len].clone(), persistent=False)
        self.word_len = int(word_len)
        self.eot_token_id = int(eot_token_id)
        self.values = False  # trunk() also returns MaskCLIP's dense values (attnpool_values)
        pool = self.visual.attnpool
        c5_in = pool.k_proj.in_features
        c5_out = pool.c_proj.out_features
        # CRIS: a shortcut around the spatial attention pool (new, randomly initialised).
        self.c5_shortcut = nn.Sequential(nn.Conv2d(c5_in, c5_out, 1, bias=False), nn.BatchNorm2d(c5_out))
        width = self.visual.layer1[0].conv1.in_channels
        self.channels = (width * 8, width * 16, c5_out)  # C3, C4, C5
        self.text_width = self.ln_final.normalized_shape[0]
        self.embed_dim = (self.text_projection.shape[1] if isinstance(self.text_projection, torch.Tensor)
                          else self.text_projection.out_features)

    def trunk(self, img: torch.Tensor):
        """The text-independent CLIP part (frozen with the image tower, cacheable): img (B, 3, S, S) ->
        (C3, C4, layer4 map, attention pool at every layer4 position (:func:`attnpool_dense`))."""
        c3, c4, l4 = visual_trunk(self.visual, img)
        out = (c3, c4, l4, attnpool_dense(self.visual.attnpool, l4, self.visual.training))
        if self.values:  # MaskCLIP's dense values, for CRIS.clip_prior = "value"
            out += (attnpool_values(self.visual.attnpool, l4),)
        return out

    def finish(self, feats):
        """(C3, C4, layer4, pooled) of :meth:`trunk` -> (C3, C4, C5) with C5 = ReLU(pooled + shortcut(layer4))
        (CRIS; the shortcut is new and always trained)."""
        c3, c4, l4, a5 = feats[:4]
        return c3, c4, F.relu(a5 + self.c5_shortcut(l4))

    def encode_image(self, img: torch.Tensor):
        """img (B, 3, S, S) normalised -> (C3 (B, 8w, S/8, S/8), C4 (B, 16w, S/16, S/16), C5 (B, D, S/s5, S/s5));
        s5 = 32 (CLIP) or 16 (:func:`set_c5_stride`)."""
        return self.finish(self.trunk(img))

    def encode_text(self, tokens: torch.Tensor):
        """tokens (B, L) -> words (B, L, text width), sentence (B, embed_dim) read at the end-of-text token."""
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.transformer(x, attn_mask=self.attn_mask[:L, :L])
        x = self.ln_final(x)  # (B, L, W)
        is_eot = tokens == self.eot_token_id
        eot = torch.where(is_eot.any(1), is_eot.float().argmax(1), tokens.argmax(1))
        state = x[torch.arange(len(x), device=x.device), eot]
        if isinstance(self.text_projection, torch.Tensor):
            state = state @ self.text_projection
        else:
            state = self.text_projection(state)
        return x, state
