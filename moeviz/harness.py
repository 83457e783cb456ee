"""lm-evaluation-harness on the in-memory model (optional: `pip install moeviz[eval]`).

The field's zero-shot suite (MoNE's nine tasks) with acc_norm where the papers use it; and,
offline, the demo domains as local lm-eval tasks (`demo_tasks_dir`), so the integration is
tested without a hub.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .adapters import execution_device
from .demo.corpus import DOMAINS, task_examples

MONE_TASKS = ("arc_easy", "arc_challenge", "boolq", "copa", "mmlu", "openbookqa", "piqa", "rte", "winogrande")
ACC_NORM = {"arc_easy", "arc_challenge", "openbookqa", "piqa", "hellaswag"}

_TASK_YAML = """task: moeviz_demo_{domain}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def demo_tasks_dir(n: int = 100, seed: int = 0, root: str | Path | None = None) -> Path:
    """Write lm-eval task files over the demo domains' held-out items; returns their folder.

    Each task `moeviz_demo_<domain>` scores a loglikelihood request whose `acc` is 1 when the
    answer is the model's greedy continuation: the same exact match as `moeviz.demo.tasks`.
    """
    root = Path(root or tempfile.mkdtemp(prefix="moeviz-lm-eval-"))
    root.mkdir(parents=True, exist_ok=True)
    for domain in DOMAINS:
        data = root / f"{domain}.jsonl"
        data.write_text("".join(json.dumps(dict(prompt=t.prompt, answer=t.answer)) + "\n"
                                for t in task_examples(domain, n, seed)))
        (root / f"moeviz_demo_{domain}.yaml").write_text(_TASK_YAML.format(domain=domain, data=data))
    return root


def demo_task_names() -> list[str]:
    return [f"moeviz_demo_{d}" for d in DOMAINS]


def run_lm_eval(model, tokenizer, tasks=MONE_TASKS, limit: int | None = None, batch_size: int = 8,
                include_path: str | Path | None = None) -> dict[str, float]:
    """Zero-shot accuracy on lm-eval `tasks` of the in-memory model: {"lm_<task>": acc, "lm_mean": …}."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"lm-evaluation-harness needs {err.name!r}, which is not installed: "
                          "pip install 'moeviz[eval]'") from err
    tasks = list(tasks)
    if include_path is None and any(t.startswith("moeviz_demo_") for t in tasks):
        include_path = demo_tasks_dir()
    device = execution_device(model)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=False,
                          bootstrap_iters=0)
    scores = {}
    for task in tasks:
        metrics = out["results"][task]
        key = "acc_norm,none" if task in ACC_NORM and "acc_norm,none" in metrics else "acc,none"
        scores[f"lm_{task}"] = float(metrics[key])
    scores["lm_mean"] = sum(scores.values()) / len(scores)
    return scores
