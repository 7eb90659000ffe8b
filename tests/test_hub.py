"""The one hub-id check behind every model, VAE and reward source."""

import pytest

from hypersd.errors import HypersdError
from hypersd.hub import check_hub_id, is_hub_id
from hypersd.inference.models import detect_backbone
from hypersd.rewards.base import model_source

FIX = "pass a folder or a hub id"


@pytest.mark.parametrize("name", ["org/name", "stabilityai/stable-diffusion-xl-base-1.0", "openai/clip-vit-base-patch32",
                                  "yuvalkirstain/PickScore_v1"])
def test_hub_ids_are_accepted(name):
    assert is_hub_id(name)
    assert check_hub_id(name, "model", FIX) == name


def test_an_existing_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(HypersdError, match=r"model .*model\.safetensors is a file, not a folder; pass a folder"):
        check_hub_id(str(path), "model", FIX)


@pytest.mark.parametrize("name", ["/no/such/model", "~/models/sd15", "./sd15", "../sd15", "runs/sd15/final"])
def test_a_missing_path_is_not_found(name):
    with pytest.raises(HypersdError, match=f"model {name} not found; {FIX}"):
        check_hub_id(name, "model", FIX)


@pytest.mark.parametrize("name", ["sd15", "org/", "/name", "org/na me", "-org/name", "org/.name", "org//name"])
def test_a_malformed_id_is_refused_clearly(name):
    assert not is_hub_id(name)
    with pytest.raises(HypersdError, match=f"{FIX}$") as e:
        check_hub_id(name, "model", FIX)
    assert "\n" not in str(e.value)
    if name.count("/") < 2 and not name.startswith("/"):
        assert "neither a folder here nor a hub id of the form owner/name" in str(e.value)


def test_every_caller_uses_it(tmp_path):
    with pytest.raises(HypersdError, match="model sd15-weights is neither a folder here nor a hub id"):
        detect_backbone("sd15-weights")
    with pytest.raises(HypersdError, match="clip reward: clip-model is neither a folder here nor a hub id"):
        model_source("clip-model", "clip", "a CLIP model")
    assert model_source("openai/clip-vit-base-patch32", "clip", "a CLIP model") == "openai/clip-vit-base-patch32"
    assert model_source(str(tmp_path), "clip", "a CLIP model") == str(tmp_path)
