"""FX-graph utilities and the pass registry, shared by the compiler, the passes and the backends."""
