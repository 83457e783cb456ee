"""lm-evaluation-harness on the in-memory demo model, with the shipped local demo tasks."""

import pytest

from moeviz.harness import demo_task_names, demo_tasks_dir, run_lm_eval
from moeviz.loading import load_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'moeviz[eval]'")


def test_local_demo_tasks_agree_with_moeviz_scoring(tmp_path):
    from moeviz.demo.tasks import task_accuracy

    model, tokenizer = load_model("demo", device="cpu")
    tasks = demo_task_names()[:2]
    root = demo_tasks_dir(n=40, seed=0, root=tmp_path)
    assert (root / f"{tasks[0]}.yaml").is_file()
    scores = run_lm_eval(model, tokenizer, tasks, include_path=root)
    assert set(scores) == {f"lm_{t}" for t in tasks} | {"lm_mean"}
    for task in tasks:
        domain = task.removeprefix("moeviz_demo_")
        ours = task_accuracy(model, tokenizer, domain, n=40, seed=0)
        assert scores[f"lm_{task}"] == pytest.approx(ours, abs=0.051), domain
    assert scores["lm_mean"] > 0.5
