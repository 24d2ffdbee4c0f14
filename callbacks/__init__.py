"""Lightning callbacks for watching gradient conflict (the conflict monitor, LAPE, silhouette), and
for surviving a cluster (preemption) and reading progress in steps."""

from .conflict_monitor import ConflictMonitor
from .neurons import NeuronSpecificity
from .preemption import Preemption
from .progress import StepProgressBar
from .silhouette import Silhouette

__all__ = ["ConflictMonitor", "NeuronSpecificity", "Preemption", "Silhouette", "StepProgressBar"]
