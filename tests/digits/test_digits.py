import pytest
import torch

from hypersd.digits import data
from hypersd.digits.judges import Judges, load_judge
from hypersd.digits.text import tokenize
from hypersd.digits.train_teacher import train_teacher
from hypersd.errors import HypersdError
from hypersd.teachers import load_teacher
from hypersd.teachers.digits import DigitsTeacher


def test_split_is_fixed_disjoint_and_scaled():
    x_tr, y_tr = data.load("train")
    x_te, y_te = data.load("test")
    assert len(x_tr) + len(x_te) == 1797 and x_tr.shape[1:] == (1, 8, 8)
    assert x_tr.min() == -1 and x_tr.max() == 1
    assert set(y_te.tolist()) == set(range(10))
    assert torch.equal(data.load("test")[0], x_te)  # same split every call
    tr = {tuple(v) for v in x_tr.flatten(1).tolist()}
    assert sum(tuple(v) in tr for v in x_te.flatten(1).tolist()) < 5  # only exact duplicate digits


def test_prompts_and_tokenizer():
    assert data.prompt_for(7) == "a handwritten digit seven"
    toks = tokenize(["a handwritten digit seven", ""])
    assert toks.shape == (2, 6) and toks[1].eq(0).all() and toks[0, 3] != 0
    with pytest.raises(HypersdError, match="does not know the word"):
        tokenize(["a photo of a cat"])


def test_teacher_round_trip_keeps_outputs(random_teacher_file):
    t = load_teacher("digits", str(random_teacher_file))
    t2 = DigitsTeacher.load(random_teacher_file)
    x = torch.randn(2, 1, 8, 8)
    cond = t.encode_prompt(data.prompts_for([1, 2]))
    assert torch.equal(t.eps(x, 10, cond), t2.eps(x, 10, t2.encode_prompt(data.prompts_for([1, 2]))))
    assert t.default_guidance == 2.0 and t.T == 1000
    assert t.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, abs=1e-6)


def test_teacher_errors(tmp_path):
    with pytest.raises(HypersdError, match="not found"):
        DigitsTeacher.load(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(bad))
    with pytest.raises(HypersdError, match="not a hypersd digits teacher"):
        DigitsTeacher.load(bad)
    torn = tmp_path / "torn.safetensors"
    torn.write_bytes(b"\x10garbage")
    with pytest.raises(HypersdError, match="not a readable safetensors digits teacher"):
        DigitsTeacher.load(torn)
    with pytest.raises(HypersdError, match="unknown backbone"):
        load_teacher("sd4")
    with pytest.raises(HypersdError, match=r"\[N, 1, 8, 8\]"):
        DigitsTeacher.new().encode(torch.zeros(2, 3, 8, 8))


def test_teacher_training_smoke(tmp_path):
    out = tmp_path / "t.safetensors"
    train_teacher(out, steps=3, batch=8, progress=False)
    t = DigitsTeacher.load(out)
    assert t.info["steps"] == 3


def test_shipped_judges_are_accurate_and_differ():
    judges = Judges()
    x, y = data.load("test")
    for model in (judges.reward_model, judges.evaluator):
        assert (model(x).argmax(1) == y).float().mean() > 0.95
    assert type(judges.reward_model) is not type(judges.evaluator)
    r = judges.reward(x[:10].requires_grad_(), y[:10])
    r.sum().backward()  # the reward is differentiable in the images
    assert r.shape == (10,)
    with pytest.raises(HypersdError, match="not found"):
        load_judge("reward", "/nonexistent/reward.safetensors")


def test_guidance_pick_is_measured_and_stored(tmp_path, random_teacher_file):
    import shutil

    from hypersd.digits.guidance import pick_guidance

    path = tmp_path / "t.safetensors"
    shutil.copy(random_teacher_file, path)
    pick, results = pick_guidance(path, [1.0, 3.0], n=20, seeds=range(2), steps=1, write=True)
    assert set(results) == {1.0, 3.0}
    best_acc = max(r["acc"]["mean"] for r in results.values())
    eligible = [w for w, r in results.items() if r["acc"]["mean"] >= best_acc - 0.005]
    assert pick == min(eligible, key=lambda w: results[w]["fd"]["mean"])
    t = DigitsTeacher.load(path)
    assert t.default_guidance == pick and set(t.info["guidance_scan"]) == {"1", "3"}
