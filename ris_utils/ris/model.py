"""A CRIS-style referring image segmentation model on an open_clip CLIP (Wang et al., CVPR 2022).

Architecture (as CRIS's ``model/segmenter.py`` + ``model/layers.py``, written here against open_clip):

- **image encoder**: the CLIP ``ModifiedResNet``; C3 = ``layer2`` (stride 8, 8·w channels), C4 = ``layer3``
  (stride 16, 16·w), C5 = CLIP's attention pool applied to EVERY position of ``layer4`` (stride 32,
  ``embed_dim`` channels; positional embedding resized bicubically) plus a 1x1 conv + BN shortcut, ReLU.
- **text encoder**: the CLIP text transformer; word features = ``ln_final`` output (B, L, text width),
  sentence feature = the end-of-text position projected by ``text_projection`` (B, embed_dim).
- **neck** (:class:`FPN`): sentence-conditioned fusion ``f5 = ReLU(BN(proj(C5) ⊙ proj(s)))``, then top-down
  fusion with C4 and C3, aggregation at stride 16 and a CoordConv.
- **decoder** (:class:`VisionLanguageDecoder`): transformer layers, self-attention over visual tokens
  and cross-attention to the words (sine positional encodings, key padding mask on pad tokens).
- **projector** (:class:`Projector`): text-to-pixel contrast. Visual features are upsampled ×4 (stride 4)
  and convolved with a per-sample 3x3 kernel + bias generated from the sentence feature:
  ``logit(x) = <W(s), Z_v(x)> + b(s)``; trained with BCE-with-logits against the mask (CRIS Eq. 5-6).

Builders live in :data:`MODEL_REGISTRY` keyed by the names of the tables: ``cris_rn50`` / ``cris_rn101``
(OpenAI CLIP weights through open_clip) and ``cris_tiny`` (``ris_clip_tiny`` from
``ris_utils/model_configs``, random init, for the shapes world).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ris_utils.models import quiet_random_init, register_open_clip_configs
from ris_utils.profiles import project_root
from ris_utils.ris.backbone import CLIPBackbone, set_c5_stride

logger = logging.getLogger(__name__)

__all__ = ["CRIS", "FPN", "Projector", "RelativeLocation", "VisionLanguageDecoder", "MODEL_REGISTRY", "build_model",
           "ris_loss", "CLIPBackbone", "set_c5_stride"]


def conv_bn_relu(c_in: int, c_out: int, k: int = 1, p: int = 0, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, p, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))


class CoordConv(nn.Module):
    """conv-bn-relu over the input with two extra channels holding x and y in [-1, 1]."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, p: int = 1):
        super().__init__()
        self.conv = conv_bn_relu(c_in + 2, c_out, k, p)

    def forward(self, x):  # (B, C, H, W)
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([gx, gy]).expand(b, 2, h, w)
        return self.conv(torch.cat([x, coords], 1))


# --------------------------------------------------------------------------- neck / decoder / projector


class FPN(nn.Module):
    """Sentence-conditioned feature pyramid (CRIS's neck).

    Arguments:
      in_channels: (C3, C4, C5) channels; C5 must equal the sentence feature dim.
      out_channels: (o3, o4, o5); o4 is the width of the fused map (= the decoder's ``d_model``).
      kernel: of the neck's convs that CRIS makes 3x3 (projections of C3 / C4, the three fusion convs, the
        CoordConv stage); 1 (ours): 1x1, ~0.75x the step time of the tiny shapes head on a CPU.
    Input: (C3, C4, C5) maps at strides 8/16/32 and the sentence feature (B, C5); output (B, o4, S/16, S/16).
    """

    def __init__(self, in_channels=(512, 1024, 1024), out_channels=(256, 512, 1024), kernel: int = 3):
        super().__init__()
        i3, i4, i5 = in_channels
        o3, o4, o5 = out_channels
        if kernel not in (1, 3):
            raise ValueError(f"model_args.neck_kernel must be 3 (CRIS) or 1, got {kernel!r}")
        k, pad = int(kernel), int(kernel) // 2
        self.txt_proj = nn.Sequential(nn.Linear(i5, o5, bias=False), nn.BatchNorm1d(o5), nn.ReLU(True))
        self.f5_proj = conv_bn_relu(i5, o5, 1, 0)
        self.f5_norm = nn.Sequential(nn.BatchNorm2d(o5), nn.ReLU(True))
        # every 3x3 conv of CRIS's neck; 1x1 (ours): the tiny CPU head spends most of a step in them
        self.f4_proj = conv_bn_relu(i4, o4, k, pad)
        self.f4_cat = conv_bn_relu(o5 + o4, o4, 1, 0)
        self.f3_proj = conv_bn_relu(i3, o3, k, pad)
        self.f3_cat = conv_bn_relu(o3 + o4, o4, 1, 0)
        self.q5 = conv_bn_relu(o5, o4, k, pad)
        self.q4 = conv_bn_relu(o4, o4, k, pad)
        self.q3 = conv_bn_relu(o4, o4, k, pad)
        self.aggr = conv_bn_relu(3 * o4, o4, 1, 0)
        self.coord = nn.Sequential(CoordConv(o4, o4, k, pad), conv_bn_relu(o4, o4, k, pad))

    def image_part(self, feats):
        """The sentence-independent projections of (C3, C4, C5): computed once per image when several sentences
        share it (evaluation, BatchNorm in eval mode) -> (p5, p4, p3 pooled to stride 16)."""
        v3, v4, v5 = feats
        return self.f5_proj(v5), self.f4_proj(v4), F.adaptive_avg_pool2d(self.f3_proj(v3), v4.shape[-2:])

    def forward(self, feats, state, index: torch.Tensor | None = None):
        """``index`` (B,): row of ``feats`` (one per image) for each sentence of ``state`` (default: the same row)."""
        p5, p4, p3 = self.image_part(feats)
        if index is not None:
            p5, p4, p3 = p5[index], p4[index], p3[index]
        s = self.txt_proj(state)[:, :, None, None]  # (B, o5, 1, 1)
        f5 = self.f5_norm(p5 * s)  # stride 32 (CRIS) / 16: multiplicative text fusion
        f5_up = F.interpolate(f5, size=p4.shape[-2:], mode="bilinear", align_corners=False)
        f4 = self.f4_cat(torch.cat([p4, f5_up], 1))  # stride 16
        f3 = self.f3_cat(torch.cat([p3, f4], 1))  # stride 8 pooled to 16
        q5 = F.interpolate(self.q5(f5), size=p4.shape[-2:], mode="bilinear", align_corners=False)
        fq = self.aggr(torch.cat([self.q3(f3), self.q4(f4), q5], 1))
        return self.coord(fq)  # (B, o4, S/16, S/16)


def sine_pos_1d(d: int, length: int) -> torch.Tensor:
    """(length, d) sinusoidal positions (Vaswani et al.)."""
    if d % 2:
        raise ValueError(f"1-d sine positional encoding needs an even dim, got {d}")
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    pe = torch.zeros(length, d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


def sine_pos_2d(d: int, h: int, w: int) -> torch.Tensor:
    """(h*w, d) 2-d sinusoidal positions: first half of the channels encode x, second half y."""
    if d % 4:
        raise ValueError(f"2-d sine positional encoding needs a dim divisible by 4, got {d}")
    px = sine_pos_1d(d // 2, w)  # (w, d/2)
    py = sine_pos_1d(d // 2, h)  # (h, d/2)
    pe = torch.cat([px[None, :, :].expand(h, w, d // 2), py[:, None, :].expand(h, w, d // 2)], -1)
    return pe.reshape(h * w, d)


class DecoderLayer(nn.Module):
    """Pre-norm layer: self-attention over visual tokens, cross-attention to words, FFN (CRIS layout)."""

    def __init__(self, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn_norm, self.cross_attn_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, dim_ffn), nn.ReLU(True), nn.Dropout(dropout),
                                 nn.LayerNorm(dim_ffn), nn.Linear(dim_ffn, d_model))
        self.drop1, self.drop2, self.drop3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis, txt, vis_pos, txt_pos, pad_mask):
        # vis (B, HW, D), txt (B, L, D), vis_pos (HW, D), txt_pos (L, D), pad_mask (B, L) True = padding
        v = self.norm1(vis)
        q = v + vis_pos
        vis = vis + self.drop1(self.self_attn_norm(self.self_attn(q, q, v, need_weights=False)[0]))
        v = self.norm2(vis)
        v = self.cross_attn(v + vis_pos, txt + txt_pos, txt, key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.drop2(self.cross_attn_norm(v))
        return vis + self.drop3(self.ffn(self.norm3(vis)))


class VisionLanguageDecoder(nn.Module):
    """Stack of :class:`DecoderLayer` + final LayerNorm: (B, D, h, w) visual map, (B, L, D) words -> (B, D, h, w)."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(d_model, nhead, dim_ffn, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis, txt, pad_mask):
        b, c, h, w = vis.shape
        vis_pos = sine_pos_2d(c, h, w).to(vis)
        txt_pos = sine_pos_1d(txt.shape[-1], txt.shape[1]).to(txt)
        x = vis.flatten(2).transpose(1, 2)  # (B, HW, D)
        for layer in self.layers:
            x = layer(x, txt, vis_pos, txt_pos, pad_mask)
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)


class Projector(nn.Module):
    """Text-to-pixel contrast (CRIS Sec. 3.2): ``logit = conv2d(Z_v, W(s)) + b(s)`` per sample.

    ``Z_v`` = the decoder map upsampled ×4 (two ×2 bilinear + conv stages) to ``in_dim`` channels;
    ``W(s), b(s)`` = a linear map of the sentence feature s into a ``in_dim``×k×k kernel and a bias.
    Input (B, 2·in_dim, h, w) and (B, word_dim); output logits (B, 1, 4h, 4w).
    """

    def __init__(self, word_dim: int, in_dim: int, kernel_size: int = 3, upsample: int = 4, skip_dim: int = 0):
        super().__init__()
        self.in_dim, self.kernel_size = in_dim, kernel_size
        if upsample == 4:  # CRIS
            self.vis = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_bn_relu(in_dim * 2, in_dim * 2, 3, 1),
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_bn_relu(in_dim * 2, in_dim, 3, 1),
                nn.Conv2d(in_dim, in_dim, 1))
        elif upsample == 2:  # (ours, tiny CPU head) one x2 stage: logits at stride 8, ~4x fewer operations
            self.vis = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                conv_bn_relu(in_dim * 2, in_dim, 3, 1),
                nn.Conv2d(in_dim, in_dim, 1))
        else:
            raise ValueError(f"projector upsample must be 2 or 4 (CRIS), got {upsample}")
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)
        # (ours, off in CRIS) the image tower's stride-8 map C3 added before the last 1x1 conv: object edges
        # at the resolution of the logits (``skip_dim`` = C3's channels; stride 8 = upsample 2 only)
        self.skip = None
        if skip_dim:
            if upsample != 2:
                raise ValueError("the projector's C3 skip needs upsample 2 (logits at C3's stride 8)")
            self.skip = conv_bn_relu(int(skip_dim), in_dim, 1, 0)

    def init_prior(self, p: float) -> None:
        """(our choice, off in CRIS) start the generated bias at logit(p), the share of foreground pixels
        (as RetinaNet's prior init), so early steps do not go into learning the background rate."""
        with torch.no_grad():
            self.txt.bias[-1] = math.log(p / (1 - p))

    def forward(self, x, state, skip: torch.Tensor | None = None, index: torch.Tensor | None = None):
        """``skip``: C3, one row per sample, or per image with ``index`` (B,) naming each sample's row (evaluation:
        the skip conv then runs once per image, not once per sentence)."""
        if self.skip is not None:
            x = self.vis[:-1](x)
            s = self.skip(skip)
            x = self.vis[-1](x + (s if index is None else s[index]))
        else:
            x = self.vis(x)  # (B, C, H, W)
        params = self.txt(state)  # (B, C*k*k + 1)
        return dynamic_conv(x, params[:, :-1], params[:, -1], self.kernel_size)


def dynamic_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, k: int) -> torch.Tensor:
    """CRIS's text-to-pixel contrast: sample b's map convolved with its own k x k kernel (zero padding k // 2),

        out[b, y, x] = bias[b] + sum_{c, i, j} W[b, c, i, j] * x[b, c, y + i - k//2, x + j - k//2],

    for ``x`` (B, C, H, W), ``weight`` (B, C*k*k) (as ``reshape(B, C, k, k)``), ``bias`` (B,) -> (B, 1, H, W).
    CRIS runs it as one convolution with ``groups=B``; here the channels are contracted first, per tap, by one
    batched matmul (B, HW, C) x (B, C, k*k), and the k*k tap maps are shifted and summed: the same sum in
    another order, ~3x faster forward + backward than the grouped convolution on a CPU (tiny shapes head)."""
    b, c, h, w = x.shape
    pad = k // 2
    taps = torch.bmm(x.permute(0, 2, 3, 1).reshape(b, h * w, c), weight.reshape(b, c, k * k))  # (B, HW, k*k)
    taps = F.pad(taps.reshape(b, h, w, k * k), (0, 0, pad, pad, pad, pad))  # zero input padding = zero taps
    out = bias[:, None, None].expand(b, h, w)
    for i in range(k):
        for j in range(k):
            out = out + taps[:, i:i + h, j:j + w, i * k + j]
    return out[:, None]


class RelativeLocation(nn.Module):
    """(ours, off in CRIS) Where a sentence's location words point, relative to the objects it fits.

    Referring expressions place the target against the other objects of its kind ("the lower cross",
    "the man on the left"): a comparison over the fitting objects, which a small decoder trained for a few
    hundred steps does not find. This head reads the words into a direction ``w = (w_x, w_y)``, centralities
    ``(q_x, q_y)`` and ``q_w`` (along ``w``) and a gain ``c``, and adds to the mask logits

        r(x) = p(x) * (w . d - q_x d_x^2 - q_y d_y^2 - q_w (u . d)^2 + c),   u = w / sqrt(|w|^2 + 1),
        d(x) = (g(x) - mu) / sigma,

    where ``g`` are pixel coordinates in [-1, 1], ``p = sigmoid(logits)`` (detached) marks what the model
    already predicts -- every object the words fit -- and ``mu`` / ``sigma`` are the mean / spread of ``g``
    weighted by ``p^2``. The extreme object in direction ``w`` gets a positive ``r``, the others a negative
    one; ``q_x`` / ``q_y`` select the central one ("the middle ring"), ``q_w`` one short of the extreme along
    ``w`` ("the second ring from the left": the peak of ``w . d - q_w (u . d)^2`` lies inside the spread).
    Starts as the identity (zero coefficients for every sentence).

    How the words become the coefficients (``pool``):

    * ``bag``: a sum over the sentence's words of a 6-vector per word -- "right" adds the same push in "the
      right ring", "the ring on the right" and "the second ring from the right", "second" the same ``q_w``
      whatever the direction; every sentence naming a word trains it. Measured on gt ``shapes`` val (300 steps,
      seeds 0/1/2, without ``q_w``): pick 0.831 / 0.811 / 0.816.
    * ``attention``: its own word embedding, attention-pooled, then an MLP (``q_w`` = 0). Measured: pick
      0.806 / 0.788 / 0.706 -- unstable: in the seed-0 run "the ring on the right" pointed right (w_x = 10.2) but
      "the right ring" and "the lower ring" got the coefficients of "ring" (the attention had learnt to read
      "right" in one phrasing only)."""

    def __init__(self, vocab_size: int, dim: int = 32, hidden: int = 64, pool: str = "attention"):
        super().__init__()
        if pool not in ("attention", "bag"):
            raise ValueError(f"model_args.location_args.pool must be attention or bag, got {pool!r}")
        self.pool = pool
        if pool == "bag":  # each word adds its own coefficients: "right" means the same in any phrase
            self.words = nn.Embedding(vocab_size, 6)
            nn.init.zeros_(self.words.weight)
        else:  # its own word embedding, attention-pooled, then an MLP
            self.embed = nn.Embedding(vocab_size, dim)
            self.attn = nn.Linear(dim, 1)
            self.head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 5))
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)

    def coefficients(self, tokens: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, 6): ``(w_x, w_y, q_x, q_y, c, q_w)`` per sentence."""
        if self.pool == "bag":
            return (self.words(tokens) * (~pad_mask)[..., None]).sum(1)
        words = self.embed(tokens)
        att = self.attn(words).squeeze(-1).masked_fill(pad_mask, float("-inf")).softmax(-1)  # (B, L)
        return F.pad(self.head(torch.einsum("bl,bld->bd", att, words)), (0, 1))  # q_w = 0

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        wx, wy, qx, qy, c, qw = self.coefficients(tokens, pad_mask).T[..., None, None, None]
        p = torch.sigmoid(logits.detach())
        weight = p * p
        total = weight.sum((2, 3), keepdim=True) + 1e-6
        h, w = logits.shape[-2:]
        gy = torch.linspace(-1, 1, h, device=logits.device).view(1, 1, h, 1)
        gx = torch.linspace(-1, 1, w, device=logits.device).view(1, 1, 1, w)

        def standardised(g):
            mu = (weight * g).sum((2, 3), keepdim=True) / total
            sd = ((weight * (g - mu) ** 2).sum((2, 3), keepdim=True) / total + 1e-3).sqrt()
            return ((g - mu) / sd).clamp(-3, 3)

        dx, dy = standardised(gx), standardised(gy)
        # w . d written twice on purpose: one shared node sums its two gradients in another float order, which
        # moved the shapes gt run (51.86 -> 51.63 mIoU); the recorded numbers are this form's
        along = (wx * dx + wy * dy) / (wx * wx + wy * wy + 1).sqrt()  # u . d
        return p * (wx * dx + wy * dy - qx * dx * dx - qy * dy * dy - qw * along * along + c)


def ris_loss(logits: torch.Tensor, mask: torch.Tensor, dice_weight: float = 0.0, target: str = "nearest"
             ) -> torch.Tensor:
    """BCE-with-logits between logits (B, 1, h, w) and a mask (B, H, W) in {0, 1} resized to h x w:
    ``target="nearest"`` (CRIS: a {0, 1} target) or ``"area"`` (ours: the share of each logit cell the mask
    covers, a soft target; at stride 8 a 14-px object is ~2 cells, and its coverage is what the threshold
    reads after warping back).

    CRIS Eq. 6: L = -mean_x [ y_x log σ(z_x) + (1 - y_x) log(1 - σ(z_x)) ].
    (our choice, off by default) ``dice_weight`` > 0 adds ``dice_weight * mean_b (1 - 2|σ(z)·y| / (|σ(z)| + |y|))``.
    """
    if target not in ("nearest", "area"):
        raise ValueError(f"ris.loss_target must be nearest or area, got {target!r}")
    target = F.interpolate(mask[:, None].float(), size=logits.shape[-2:], mode=target)
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if dice_weight:
        p = torch.sigmoid(logits).flatten(1)
        t = target.flatten(1)
        dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
        loss = loss + dice_weight * dice.mean()
    return loss


class CRIS(nn.Module):
    """CRIS: CLIP backbone -> FPN neck -> vision-language decoder -> text-to-pixel projector.

    ``forward(img (B, 3, S, S), tokens (B, L))`` -> logits (B, 1, S/4, S/4); ``forward(None, tokens,
    feats=encode_image(img))`` reuses image features (the image encoder does not see the sentence).
    """

    def __init__(self, backbone: CLIPBackbone, fpn_out=(256, 512, 1024), num_layers: int = 3, num_heads: int = 8,
                 dim_ffn: int = 2048, dropout: float = 0.1, pad_token_id: int = 0, prior: float | None = None,
                 proj_upsample: int = 4, clip_prior: str | bool | None = None, prior_feature: bool = False,
                 location: str | None = None, proj_skip: bool = False, location_args: dict | None = None,
                 neck_kernel: int = 3, channels_last: bool = False):
        super().__init__()
        self.backbone = backbone
        fpn_out = tuple(int(c) for c in fpn_out)
        if fpn_out[1] != backbone.text_width:
            raise ValueError(f"fpn_out[1]={fpn_out[1]} must equal the text width {backbone.text_width} "
                             "(the decoder cross-attends visual tokens to word features)")
        self.neck = FPN(backbone.channels, fpn_out, kernel=neck_kernel)
        self.decoder = VisionLanguageDecoder(num_layers, fpn_out[1], num_heads, dim_ffn, dropout)
        self.proj = Projector(backbone.embed_dim, fpn_out[1] // 2, 3, upsample=int(proj_upsample),
                              skip_dim=backbone.channels[0] if proj_skip else 0)
        self.pad_token_id = int(pad_token_id)
        self.frozen: tuple = ()  # CLIP towers frozen by :meth:`freeze`
        # (ours, off in CRIS) the pretrained CLIP's own text-to-pixel score as a residual logit:
        # prior(x) = a * cos(D(x), s) + b, D = dense C5 attention-pool map, s = sentence embedding
        if clip_prior is True:
            clip_prior = "attn"
        if clip_prior not in (None, False, "attn", "value"):
            raise ValueError(f"clip_prior must be null, attn or value, got {clip_prior!r}")
        self.prior_kind = clip_prior or None  # attn: CRIS's dense C5 attention pool; value: MaskCLIP's values
        backbone.values = self.prior_kind == "value"
        self.clip_prior = nn.Parameter(torch.tensor([10.0, -4.0])) if clip_prior else None
        # (ours) the prior map also enters the decoder's input (stride 16), so the mask head can follow it
        self.prior_feature = conv_bn_relu(1, fpn_out[1], 1, 0) if (clip_prior and prior_feature) else None
        if location not in (None, "relative"):
            raise ValueError(f"location must be null or relative, got {location!r}")
        self.location = (RelativeLocation(backbone.token_embedding.num_embeddings, **(location_args or {}))
                         if location == "relative" else None)
        if prior:
            self.proj.init_prior(float(prior))
        # (ours) the trained part in channels-last memory (NHWC): oneDNN's CPU convolutions skip their layout
        # reorders (tiny shapes head: a step 0.81x). The CLIP trunk stays as it is, so cached features do not
        # depend on this switch.
        self.channels_last = bool(channels_last)
        if self.channels_last:
            for m in (self.neck, self.decoder, self.proj, self.prior_feature, backbone.c5_shortcut):
                if m is not None:
                    m.to(memory_format=torch.channels_last)

    def encode_image(self, img: torch.Tensor):
        """The text-independent part (:meth:`CLIPBackbone.trunk`) for :meth:`forward`'s ``feats``."""
        return self.backbone.trunk(img)

    def encode_text(self, tokens: torch.Tensor):
        """(words (B, L, W), sentence (B, E)) for :meth:`forward`'s ``text``."""
        return self.backbone.encode_text(tokens)

    def forward(self, img: torch.Tensor | None, tokens: torch.Tensor, feats=None, text=None,
                image_index: torch.Tensor | None = None) -> torch.Tensor:
        """``feats`` = :meth:`encode_image` output for these samples (then ``img`` is not used): several
        sentences about one image share one image encoding (evaluation), and a frozen image tower's features
        are computed once per image (:mod:`ris_utils.ris.features`); ``text`` = :meth:`encode_text` output
        (a frozen text tower's features, cached per sentence). ``image_index`` (B,): ``feats`` hold one row per
        IMAGE and sentence b is about image ``image_index[b]``; the sentence-independent part of the neck then
        runs once per image (eval mode only: in training BatchNorm would see other batch statistics)."""
        pad_mask = tokens == self.pad_token_id  # (B, L)
        if feats is None:
            feats = self.backbone.trunk(img)
        if image_index is not None and self.training:
            raise ValueError("image_index is for evaluation (model.eval()) only")
        words, state = text if text is not None else self.backbone.encode_text(tokens)  # (B, L, D), (B, E)
        if self.channels_last:
            feats = tuple(f.contiguous(memory_format=torch.channels_last) if f.dim() == 4 else f for f in feats)
        fq = self.neck(self.backbone.finish(feats), state, index=image_index)  # (B, D, S/16, S/16)
        prior = None
        if self.clip_prior is not None:
            dense = feats[4] if self.prior_kind == "value" else feats[3]
            prior = self.prior_logits(dense if image_index is None else dense[image_index], state)  # (B, 1, h5, w5)
            if self.prior_feature is not None:
                fq = fq + self.prior_feature(F.interpolate(prior, size=fq.shape[-2:], mode="bilinear",
                                                           align_corners=False))
        fq = self.decoder(fq, words, pad_mask)
        logits = self.proj(fq, state, feats[0] if self.proj.skip is not None else None, image_index)  # (B, 1, S/4, S/4)
        if prior is not None:
            logits = logits + F.interpolate(prior, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        if self.location is not None:
            logits = logits + self.location(logits, tokens, pad_mask)
        return logits

    def prior_logits(self, dense: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """(B, E, h, w) dense C5 attention-pool map, (B, E) sentence -> (B, 1, h, w) ``a * cos + b``: the
        pretrained CLIP's dense text-to-pixel score (MaskCLIP-style), as a residual of the CRIS logits."""
        cos = torch.einsum("behw,be->bhw", F.normalize(dense, dim=1), F.normalize(state, dim=-1))
        a, b = self.clip_prior
        return (a * cos + b)[:, None]

    #: parameter-name prefixes of the two CLIP towers (what :meth:`freeze` freezes)
    TOWERS = {"visual": ("backbone.visual.",),
              "text": ("backbone.token_embedding", "backbone.positional_embedding", "backbone.transformer.",
                       "backbone.ln_final.", "backbone.text_projection")}

    def freeze(self, which: str = "none") -> CRIS:
        """Freeze CLIP's towers (ETRIS-style parameter-efficient tuning, Xu et al., ICCV 2023):
        ``none`` (CRIS: everything trains, the backbone at 0.1x lr) | ``visual`` | ``text`` | ``both``.
        Frozen parameters get ``requires_grad = False`` and frozen modules stay in eval mode (BatchNorm
        statistics fixed) whatever :meth:`train` is called with. CRIS's new C5 shortcut always trains."""
        if which not in ("none", "visual", "text", "both"):
            raise ValueError(f"ris.freeze must be none, visual, text or both, got {which!r}")
        self.frozen = {"none": (), "visual": ("visual",), "text": ("text",), "both": ("visual", "text")}[which]
        prefixes = tuple(p for t in self.frozen for p in self.TOWERS[t])
        for name, p in self.named_parameters():
            p.requires_grad_(not name.startswith(prefixes))
        return self.train(self.training)

    def train(self, mode: bool = True) -> CRIS:
        super().train(mode)
        b = self.backbone
        for tower in getattr(self, "frozen", ()):
            for m in ((b.visual,) if tower == "visual" else (b.transformer, b.ln_final)):
                m.eval()
        return self

    def param_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float, prior_lr_mult: float = 20.0,
                     location_lr_mult: float = 20.0) -> list[dict]:
        """AdamW groups: the CLIP backbone at ``lr * backbone_lr_mult`` (CRIS: 0.1), the rest at ``lr``; the
        two numbers of the CLIP prior (scale, offset; in logit units) at ``lr * prior_lr_mult``, no decay."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]  # frozen towers: not optimised
        bb = [p for n, p in named if n.startswith("backbone.") and "c5_shortcut" not in n]
        bb_ids = {id(p) for p in bb}
        prior = [p for n, p in named if n == "clip_prior"]
        location = [p for n, p in named if n.startswith("location.")]
        fast = {id(q) for q in prior + location}
        rest = [p for n, p in named if id(p) not in bb_ids and id(p) not in fast]
        groups = [{"params": bb, "lr": lr * backbone_lr_mult, "weight_decay": weight_decay, "name": "backbone"},
                  {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "head"}]
        if prior:
            groups.append({"params": prior, "lr": lr * prior_lr_mult, "weight_decay": 0.0, "name": "clip_prior"})
        if location:
            groups.append({"params": location, "lr": lr * location_lr_mult, "weight_decay": 0.0, "name": "location"})
        return groups


# --------------------------------------------------------------------------- builders


def _clip(name: str, pretrained: str | None, image_size: int | None = None, vocab_size: int | None = None,
          context_length: int | None = None):
    """An open_clip CLIP; for random-init models the input size, vocabulary and context length may be set."""
    import open_clip

    register_open_clip_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"open_clip has no model config {name!r}")
    if pretrained and ("/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin"))):
        return _clip_from_file(name, pretrained)
    kwargs = {}
    if pretrained is None:
        vision_cfg, text_cfg = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
        if image_size:
            vision_cfg["image_size"] = int(image_size)
        if vocab_size:
            text_cfg["vocab_size"] = int(vocab_size)
        if context_length:
            text_cfg["context_length"] = int(context_length)
        kwargs = {"vision_cfg": vision_cfg, "text_cfg": text_cfg}
    with quiet_random_init():  # open_clip warns on the root logger that a random init is random
        return open_clip.create_model(name, pretrained=pretrained, device="cpu", **kwargs)


def _clip_from_file(name: str, path: str):
    """open_clip model ``name`` with the weights of a state-dict file (``{"state_dict": ...}`` or a bare
    state dict; fp16 weights are loaded as fp32), e.g. the shapes CLIP ``ris_utils/assets/clip_shapes.pt``."""
    import open_clip

    register_open_clip_configs()
    p = Path(path)
    if not p.is_absolute() and not p.is_file():
        p = project_root() / p
    if not p.is_file():
        raise FileNotFoundError(f"CLIP checkpoint {path} not found (ris.pretrained)")
    with quiet_random_init():  # the weights are loaded just below
        model = open_clip.create_model(name, pretrained=None, device="cpu")
    state = torch.load(p, map_location="cpu", weights_only=True)
    sd = {k: v.float() for k, v in state.get("state_dict", state).items()}
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise RuntimeError(f"{p} does not match the open_clip config {name!r}: {e}") from e
    return model


def _build(clip_name: str, default_pretrained: str | None, defaults: dict, word_len: int, eot_token_id: int,
           pretrained: str | None = "default", image_size: int | None = None, vocab_size: int | None = None,
           c5_stride: int = 32, **head) -> CRIS:
    pretrained = default_pretrained if pretrained == "default" else pretrained
    clip = _clip(clip_name, pretrained, image_size=image_size, vocab_size=vocab_size,
                 context_length=word_len if pretrained is None else None)
    set_c5_stride(clip.visual, int(c5_stride))
    backbone = CLIPBackbone(clip, word_len=word_len, eot_token_id=eot_token_id)
    return CRIS(backbone, **{**defaults, **head})


def build_cris_rn50(word_len=17, eot_token_id=49407, **kw) -> CRIS:
    """CRIS on OpenAI CLIP RN50 (the paper's setting): fpn (256, 512, 1024), 3 layers, 8 heads, ffn 2048."""
    d = dict(fpn_out=(256, 512, 1024), num_layers=3, num_heads=8, dim_ffn=2048, dropout=0.1)
    return _build("RN50", "openai", d, word_len, eot_token_id, **kw)


def build_cris_rn101(word_len=17, eot_token_id=49407, **kw) -> CRIS:
    """CRIS on OpenAI CLIP RN101 (C5 = 512 channels)."""
    d = dict(fpn_out=(256, 512, 1024), num_layers=3, num_heads=8, dim_ffn=2048, dropout=0.1)
    return _build("RN101", "openai", d, word_len, eot_token_id, **kw)


def build_cris_tiny(word_len=17, eot_token_id=49407, clip_model: str = "ris_clip_tiny", **kw) -> CRIS:
    """The same code on a tiny random-init CLIP (``ris_utils/model_configs/ris_clip_tiny.json``)."""
    d = dict(fpn_out=(32, 64, 128), num_layers=1, num_heads=4, dim_ffn=128, dropout=0.0)
    return _build(clip_model, None, d, word_len, eot_token_id, **kw)


def build_cris_clip_shapes(word_len=16, eot_token_id=3, **kw) -> CRIS:
    """The tiny head on the shapes CLIP (``clip_shapes``: ModifiedResNet width 16, embed 64, text width 64;
    weights ``ris_utils/assets/clip_shapes.pt`` trained by step 3 on another shapes world) -- the shapes
    analogue of CRIS's init from a pretrained CLIP. Its text context is 16 tokens."""
    d = dict(fpn_out=(32, 64, 128), num_layers=1, num_heads=4, dim_ffn=128, dropout=0.0)
    return _build("clip_shapes", "ris_utils/assets/clip_shapes.pt", d, word_len, eot_token_id, **kw)


def build_cris_clip_dense(word_len=16, eot_token_id=3, c5_stride=16, **kw) -> CRIS:
    """The tiny head on the shapes world's pretrained CLIP (``clip_shapes_dense``, the analogue of CRIS's
    OpenAI RN50: ModifiedResNet width 16 with C5 at stride 16, embed 64, text width 64; weights
    ``ris_utils/assets/clip_shapes_dense.pt`` from :mod:`ris_utils.ris.pretrain`: generic captions of another
    shapes world, dense region-text contrast)."""
    d = dict(fpn_out=(32, 64, 128), num_layers=1, num_heads=4, dim_ffn=128, dropout=0.0)
    return _build("clip_shapes_dense", "ris_utils/assets/clip_shapes_dense.pt", d, word_len, eot_token_id,
                  c5_stride=c5_stride, **kw)


MODEL_REGISTRY = {"cris_rn50": build_cris_rn50, "cris_rn101": build_cris_rn101, "cris_tiny": build_cris_tiny,
                  "cris_clip_shapes": build_cris_clip_shapes, "cris_clip_dense": build_cris_clip_dense}


def build_model(name: str, word_len: int = 17, eot_token_id: int = 49407, **kw) -> CRIS:
    """Build a registered RIS model; ``kw`` = head overrides (fpn_out, num_layers, ...) and ``pretrained``."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown RIS model {name!r}; registered: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](word_len=word_len, eot_token_id=eot_token_id, **kw)
