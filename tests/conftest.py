import pytest
import torch

from hypersd.teachers.digits import DigitsTeacher


def _saved_random_teacher(tmp_path_factory, cls, guidance: float, name: str):
    path = tmp_path_factory.mktemp("teacher") / name
    t = cls.new(seed=0)
    t.default_guidance = guidance
    t.save(path)
    return path


@pytest.fixture(scope="session")
def random_teacher_file(tmp_path_factory):
    """A digits teacher with random weights, saved: fast stand-in for the shipped one."""
    return _saved_random_teacher(tmp_path_factory, DigitsTeacher, 2.0, "teacher.safetensors")


@pytest.fixture(scope="session")
def flow_file(tmp_path_factory):
    """The flow digits teacher (an SD3 transformer) with random weights, saved."""
    from hypersd.teachers.digits_flow import FlowDigitsTeacher

    return _saved_random_teacher(tmp_path_factory, FlowDigitsTeacher, 2.5, "teacher-flow.safetensors")


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never read or write the user's cache of teacher references."""
    import os

    old = os.environ.get("HYPERSD_CACHE")
    os.environ["HYPERSD_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("HYPERSD_CACHE", None)
    else:
        os.environ["HYPERSD_CACHE"] = old


@pytest.fixture(autouse=True, scope="session")
def _offline_hub():
    """Nothing in the tests downloads anything. huggingface_hub reads HF_HUB_OFFLINE once, at
    import, so set its constant as well as the variable."""
    import huggingface_hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP threads slow them 100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
