"""bench/gpu.py at toy size on the CPU: the command a GPU session runs once must not rot."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ["plain_tokens_per_s", "calibrate_probes_off_ratio", "calibrate_probes_on_ratio", "plain_ops_per_layer",
           "calibrate_ops_per_layer", "plain_profiled_syncs_per_layer", "calibrate_profiled_syncs_per_layer",
           "memory_calibrate", "memory_evaluate_plan", "memory_trace", "memory_distill", "memory_layer_by_layer"]
# What the GPU machine's image lacks: none of it may be imported on the way.
ABSENT = ("streamlit", "plotly", "umap", "datasets")


def test_tiny_run_prints_every_figure_and_imports_nothing_the_gpu_image_lacks(tmp_path):
    out = tmp_path / "results.json"
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "finally:\n    print('IMPORTED', sorted({m.split('.')[0] for m in sys.modules} & set(%r)))" % (ABSENT,))
    run = subprocess.run([sys.executable, "-c", probe, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--tiny",
                          "--repeats", "1", "--distill-s", "2", "--dir", str(tmp_path), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "IMPORTED []" in run.stdout
    results = json.loads(out.read_text())
    assert results["errors"] == {}
    for key in FIGURES:  # memory above the start may be nothing new on the CPU, whose allocator reuses
        assert results[key] >= 0 if key.startswith("memory") else results[key] > 0, key
    assert results["agreement_ok"] and results["agreement"]["count"]["differing"] == 0
    assert results["verify_transformers_ok"], results["verify_transformers"]  # the export served as planned
    assert results["verify_transformers"].startswith("Verified in transformers")
    table = run.stdout.split("| figure | value |")[1]
    assert "–" not in table.replace("– / –", "")  # every figure printed; CUDA's sync count only on CUDA
    assert table.count("\n|") >= 12
