"""The shipped demo models, their synthetic corpus and their tasks.

Two checkpoints trained on the same corpus by ``python -m moeviz.demo.train --shape …``:
``demo`` (``--shape coarse``, a small Mixtral) and ``demo-fine`` (``--shape fine``, a
Qwen2-MoE with fine-grained experts and a shared expert). Each loads with plain
``AutoModelForCausalLM.from_pretrained(DEMO_MODELS[name].path)``.
"""

from dataclasses import dataclass
from pathlib import Path

from moeviz.demo.corpus import DOMAINS, TaskExample, documents, task_examples
from moeviz.demo.tasks import expert_frequencies, routing_divergence, task_accuracies, task_accuracy

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class DemoModel:
    """A shipped checkpoint: where it is, the training shape that made it, what it teaches."""

    path: Path
    shape: str  # `python -m moeviz.demo.train --shape …`
    teaches: str  # one line for the app and the README


DEMO_MODELS = {
    "demo": DemoModel(
        _HERE / "checkpoint", "coarse",
        "Mixtral, 16 coarse experts, top-2: experts specialise by domain at a glance; removing a quarter "
        "of them already collapses the tasks.",
    ),
    "demo-fine": DemoModel(
        _HERE / "checkpoint-fine", "fine",
        "Qwen2-MoE, 64 small experts, top-4, plus a shared expert, shaped like today's MoEs: removing a "
        "fifth of its experts barely shows, a quarter costs its arithmetic, half most tasks; where to stop "
        "is the lesson.",
    ),
}
CHECKPOINT_DIR = DEMO_MODELS["demo"].path

__all__ = [
    "CHECKPOINT_DIR",
    "DEMO_MODELS",
    "DOMAINS",
    "DemoModel",
    "TaskExample",
    "documents",
    "expert_frequencies",
    "routing_divergence",
    "task_accuracies",
    "task_accuracy",
    "task_examples",
]
