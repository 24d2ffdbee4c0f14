"""Lightning callbacks for watching gradient conflict (the conflict monitor, LAPE, silhouette)."""

from .conflict_monitor import ConflictMonitor
from .neurons import NeuronSpecificity
from .silhouette import Silhouette

__all__ = ["ConflictMonitor", "NeuronSpecificity", "Silhouette"]
