import json

import pytest

from hypersd.errors import HypersdError
from hypersd.eval.bench import budget, method_recipes, run_bench
from hypersd.train.recipe import from_dict


def _recipe(teacher, stages):
    return from_dict({"teacher": str(teacher), "lora_rank": 4, "grid_every_stage": False, "eval_steps": [1],
                      "stage_defaults": {"batch": 4}, "stages": stages})


def test_packaged_methods_share_one_budget():
    recipes = method_recipes(["lcm", "phased", "tscd", "hypersd"])
    assert len({budget(r) for r in recipes.values()}) == 1
    assert [s.segments for s in recipes["tscd"].stages] == [8, 4, 2, 1]
    assert {s.kind for s in recipes["tscd"].stages} == {"tscd"}
    assert recipes["lcm"].stages[0].segments == 1 and recipes["lcm"].stages[0].end == "boundary"
    assert recipes["phased"].stages[0].end == "boundary"
    with pytest.raises(HypersdError, match="unknown bench method"):
        method_recipes(["dmd9"])


def test_the_flow_world_benches_the_same_methods_on_its_teacher():
    flow, ddpm = method_recipes(["lcm", "phased", "tscd", "hypersd"], "digits-flow"), method_recipes(["lcm"])
    assert {r.backbone for r in flow.values()} == {"digits-flow"} and ddpm["lcm"].backbone == "digits"
    assert len({budget(r) for r in flow.values()}) == 1  # one budget, as on the DDPM world
    assert [s.kind for s in flow["hypersd"].stages] == ["tscd"] * 4 + ["feedback", "merge", "dmd"]
    with pytest.raises(HypersdError, match="digits worlds"):
        method_recipes(["lcm"], "sd15")


def test_bench_table_and_kept_loras(tmp_path, random_teacher_file):
    recipes = {"lcm": _recipe(random_teacher_file, [{"name": "lcm", "segments": 1, "end": "boundary", "steps": 4}]),
               "hypersd": _recipe(random_teacher_file, [
                   {"name": "a", "segments": 2, "steps": 1}, {"name": "b", "segments": 1, "steps": 1},
                   {"name": "fb", "kind": "feedback", "perceptual_weight": 1.0, "steps": 1},
                   {"name": "m", "kind": "merge"},
                   {"name": "d", "kind": "dmd", "steps": 1, "fake_warmup": 1, "fake_updates": 1, "reg_pool": 4,
                    "reg_steps": 2, "reg_batch": 2}])}
    rows = run_bench(tmp_path, recipes, steps=(1, 2), etas=(0.0, 1.0), n=20, seeds=1, progress=False, jobs=2)
    methods = [(r["method"], r["steps"]) for r in rows]
    assert ("teacher DDIM", 40) in methods and ("LCM-style", 1) in methods
    lora_of = {(r["method"], r["steps"]): r["lora"] for r in rows if "lora" in r}
    for k in (1, 2):
        assert lora_of[("Hyper-SD: TSCD", k)].endswith("stages/b/lora.safetensors")
        assert lora_of[("Hyper-SD: TSCD + feedback", k)].endswith("stages/m/lora.safetensors")
        assert lora_of[("Hyper-SD: TSCD + feedback + DMD (final, unified)", k)].endswith("hypersd/lora.safetensors")
        assert lora_of[("LCM-style", k)].endswith("lcm/lora.safetensors")
    student = [r for r in rows if r["method"] == "LCM-style"]
    assert all(r["eta"] in (0.0, 1.0) and set(r["eta_scan"]) == {"0", "1"} for r in student if r["steps"] > 1)
    assert "eta_scan" not in student[0]  # one step never re-noises: eta is moot
    per_k = {r["steps"]: r["lora"] for r in rows if r["method"] == "Hyper-SD: TSCD, stage LoRA per k"}
    assert per_k[2].endswith("stages/a/lora.safetensors") and per_k[1].endswith("stages/b/lora.safetensors")
    assert json.loads((tmp_path / "bench.json").read_text())["meta"]["budget (steps x batch)"] == 16
    recipes["lcm"].stages[0].steps = 5
    with pytest.raises(HypersdError, match="one training budget"):
        run_bench(tmp_path / "x", recipes, n=20, seeds=2, progress=False)


def test_a_dumped_recipe_reads_back_the_same(random_teacher_file):
    import yaml

    r = method_recipes(["hypersd"])["hypersd"]
    assert from_dict(yaml.safe_load(r.dump())).fingerprint() == r.fingerprint()
