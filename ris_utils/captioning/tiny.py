"""Random-init CoCa models of the open_clip architecture, for tests and benchmarks (no weights needed).

:func:`random_coca` registers an in-memory open_clip config (``open_clip.factory._MODEL_CONFIGS``) and
builds it with ``open_clip.create_model_and_transforms(name, pretrained=None)``: the same code path as
the paper's ``coca_ViT-L-14``, only smaller. CoCa requires embed_dim == text width == multimodal width.
"""

from __future__ import annotations

import torch

from ..models import init_uninitialised


def coca_config(vocab_size: int, width: int = 32, layers: int = 2, heads: int = 4, image_size: int = 32,
                patch_size: int = 8, vision_width: int = 32, vision_layers: int = 1, n_queries: int = 8,
                context_length: int = 32, embed_cls: bool = True) -> dict:
    """An open_clip CoCa config dict (the format of open_clip's ``model_configs/coca_*.json``)."""
    return {
        "embed_dim": width,
        "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                       "head_width": max(vision_width // heads, 8), "patch_size": patch_size,
                       "attentional_pool": True, "attn_pooler_queries": n_queries,
                       "attn_pooler_heads": heads, "output_tokens": True},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": width, "heads": heads,
                     "layers": layers, "embed_cls": embed_cls, "output_tokens": True},
        "multimodal_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": width,
                           "heads": heads, "layers": layers, "attn_pooler_heads": heads},
        "custom_text": True,
    }


def random_coca(name: str = "coca_random_test", seed: int = 0, **cfg):
    """Build a random-init CoCa from :func:`coca_config` ``(**cfg)``; returns ``(model, preprocess_val)``."""
    import open_clip
    from open_clip import factory

    factory._MODEL_CONFIGS[name] = coca_config(**cfg)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    init_uninitialised(model)
    model.eval()
    return model, preprocess


__all__ = ["coca_config", "random_coca", "init_uninitialised"]
