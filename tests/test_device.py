"""The one device resolver every command and run goes through."""

import pytest
import torch

from hypersd.cli import main
from hypersd.device import resolve_device
from hypersd.errors import HypersdError
from hypersd.train.runtime import Runtime


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")  # hypersd cache's --device default
    assert resolve_device() == torch.device("cpu")
    assert Runtime.create("auto").device == torch.device("cpu")


def test_a_named_device_is_kept(no_cuda):
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_cuda_is_refused(no_cuda, name):
    with pytest.raises(HypersdError, match=f"device '{name}' asked for, but torch sees no CUDA GPU; use cpu"):
        resolve_device(name)
    with pytest.raises(HypersdError, match="sees no CUDA GPU"):
        Runtime.create(name)


def test_an_unknown_device_is_refused():
    with pytest.raises(HypersdError, match="unknown device 'gpu0'; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")


def test_generate_refuses_cuda_before_loading_anything(no_cuda, tmp_path, capsys):
    # the model is never looked at: the device is refused first, in one line
    assert main(["generate", "--model", "owner/never-loaded", "--prompt", "a", "--out", str(tmp_path / "o"),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "sees no CUDA GPU" in err and err.count("\n") == 1
