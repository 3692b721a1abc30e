import pytest
import torch

from ris_utils import models


def test_resolve_device_cpu_and_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_device(None) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        models.resolve_device("cuda")


def test_resolve_device_takes_the_rank_gpu_under_torchrun(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert models.resolve_device("auto") == torch.device("cuda", 2)
    monkeypatch.delenv("LOCAL_RANK")
    assert models.resolve_device("auto") == torch.device("cuda", 0)


def test_our_open_clip_configs_register():
    import open_clip

    names = models.register_open_clip_configs()
    assert "coca_shapes" in names
    assert set(names) <= set(open_clip.list_models())
