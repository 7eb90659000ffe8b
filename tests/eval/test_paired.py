"""benchmarks/paired.py: a lever against the baseline run of the same training seed."""

import json

import pytest
from bench_scripts import bench_module


def levers_json(path, cells):
    """A levers.py --json file with one row per step count: cells {steps: (fd, pix_fd, bg)}."""
    rows = [{"steps": k, "x_teacher40": dict(zip(("fd", "pix_fd", "bg_noise"), v))} for k, v in cells.items()]
    path.write_text(json.dumps({"rows": rows}))
    return path


def test_differences_are_paired_by_seed_and_lower_is_counted(tmp_path):
    compare = bench_module("paired").compare
    base = [levers_json(tmp_path / "b0.json", {1: (1.0, 1.0, 3.0), 2: (1.0, 1.0, 2.0)}),
            levers_json(tmp_path / "b1.json", {1: (2.0, 1.0, 4.0), 2: (1.0, 1.0, 2.0)})]
    new = [levers_json(tmp_path / "n0.json", {1: (0.9, 1.0, 2.0), 2: (1.1, 1.0, 2.0)}),
           levers_json(tmp_path / "n1.json", {1: (2.1, 1.0, 3.0), 2: (1.1, 1.0, 2.0)})]
    r = {(x["steps"], x["judge"]): x for x in compare(base, new)}
    assert set(r) == {(k, j) for k in (1, 2) for j in ("fd", "pix_fd", "bg_noise")}
    fd1 = r[1, "fd"]  # −0.1 and +0.1: no mean change, one pair of two lower
    assert fd1["diff"] == pytest.approx(0.0) and fd1["lower"] == 1 and fd1["se"] == pytest.approx(0.1)
    assert fd1["base"] == pytest.approx(1.5) and fd1["new"] == pytest.approx(1.5)
    bg1 = r[1, "bg_noise"]  # −1 in both pairs
    assert bg1["diff"] == pytest.approx(-1.0) and bg1["lower"] == 2 and bg1["se"] == pytest.approx(0.0)
    assert r[2, "fd"]["diff"] == pytest.approx(0.1) and r[2, "fd"]["lower"] == 0
    # the files are paired by order: paired the other way round the same means differ by ±1.1
    swapped = {(x["steps"], x["judge"]): x for x in compare(base, new[::-1])}
    assert swapped[1, "fd"]["diff"] == pytest.approx(0.0) and swapped[1, "fd"]["se"] == pytest.approx(1.1)


def test_unequal_lists_are_refused(tmp_path):
    compare = bench_module("paired").compare
    one = levers_json(tmp_path / "a.json", {1: (1.0, 1.0, 1.0)})
    with pytest.raises(SystemExit, match="as many --base files as --new"):
        compare([one], [one, one])
