"""Lightning callbacks for watching gradient conflict (the conflict monitor, LAPE, silhouette)."""
