import pytest

from hypersd.teachers.digits import DigitsTeacher


@pytest.fixture(scope="session")
def random_teacher_file(tmp_path_factory):
    """A digits teacher with random weights, saved: fast stand-in for the shipped one."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    t = DigitsTeacher.new(seed=0)
    t.default_guidance = 2.0
    t.save(path)
    return path
