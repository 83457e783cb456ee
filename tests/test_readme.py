"""The README's library example runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_library_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its calibration cache goes to ./cache
    block = README.read_text().split("## The library")[1].split("```python")[1].split("```")[0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["routing"].top_k_index.shape == (5, 2)
    assert not (scope["pruned_logits"] == scope["original_logits"]).all()  # the plan changes the outputs
    assert (tmp_path / "cache").is_dir()
