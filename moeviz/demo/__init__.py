"""The shipped demo model: a small trained Mixtral, its synthetic corpus and its tasks.

Retrain with ``python -m moeviz.demo.train``; the checkpoint loads with plain
``AutoModelForCausalLM.from_pretrained(CHECKPOINT_DIR)``.
"""

from pathlib import Path

from moeviz.demo.corpus import DOMAINS, TaskExample, documents, task_examples
from moeviz.demo.tasks import expert_frequencies, routing_divergence, task_accuracies, task_accuracy

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"

__all__ = [
    "CHECKPOINT_DIR",
    "DOMAINS",
    "TaskExample",
    "documents",
    "expert_frequencies",
    "routing_divergence",
    "task_accuracies",
    "task_accuracy",
    "task_examples",
]
