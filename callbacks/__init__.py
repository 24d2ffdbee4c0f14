"""Lightning callbacks for watching gradient conflict (the conflict monitor, LAPE, silhouette)."""
from .conflict_monitor import ConflictMonitor  # noqa: F401
from .neurons import NeuronSpecificity  # noqa: F401
from .silhouette import Silhouette  # noqa: F401
