"""The compile report behind ``CompiledModel.explain()``: every pass, its matches and time, and the backend
choice with its reason. A user must be able to see why their model got the graph it got."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassRecord:
    name: str
    num_matches: int
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileReport:
    model: str = ""
    loading: list[str] = field(default_factory=list)  # how the model was loaded: source, dtype, attention, why
    passes: list[PassRecord] = field(default_factory=list)
    backend: str = ""
    backend_reason: str = ""
    rejected_backends: dict[str, str] = field(default_factory=dict)
    # per-layer fallbacks ("layers 0,2 -> torch: <why the primary refused them>") and the grade they leave
    backend_fallbacks: list[str] = field(default_factory=list)
    lowering: str = ""
    lowering_reason: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)
    cache: str = ""
    cache_hit: str = ""  # compile-cache entry this graph was loaded from (export and passes skipped)
    quantization: str = ""  # what quantize_linears did: mode, linears quantized/skipped, memory saved
    kernels: list[str] = field(default_factory=list)  # kernel providers used or skipped, and why

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "loading": self.loading,
            "passes": [vars(p) for p in self.passes],
            "backend": {"name": self.backend, "reason": self.backend_reason, "rejected": self.rejected_backends,
                        "fallbacks": self.backend_fallbacks},
            "lowering": {"name": self.lowering, "reason": self.lowering_reason},
            "stage_seconds": self.stage_seconds,
            "cache": self.cache,
            "compile_cache_hit": self.cache_hit,
            "quantization": self.quantization,
            "kernels": self.kernels,
        }

    def render(self) -> str:
        lines = [f"autodeploy compile report: {self.model}"]
        if self.loading:
            lines.append(f"  loaded: {'; '.join(self.loading)}")
        for stage, secs in self.stage_seconds.items():
            lines.append(f"  stage {stage:<12} {secs * 1e3:9.1f} ms")
        if self.cache_hit:
            lines.append(f"  loaded from compile cache {self.cache_hit} (pass records below are from the original compile)")
        lines.append("  passes:")
        width = max((len(p.name) for p in self.passes), default=10)
        for p in self.passes:
            lines.append(f"    {p.name:<{width}}  matches={p.num_matches:<4} time={p.seconds * 1e3:8.1f} ms")
            for note in p.notes:
                lines.append(f"    {'':<{width}}    - {note}")
        lines.append(f"  backend: {self.backend} ({self.backend_reason})")
        for note in self.backend_fallbacks:
            lines.append(f"    {note}")
        for name, why in self.rejected_backends.items():
            lines.append(f"    not {name}: {why}")
        for note in self.kernels:
            lines.append(f"  {note}")
        lines.append(f"  lowering: {self.lowering} ({self.lowering_reason})")
        if self.quantization:
            lines.append(f"  quantization: {self.quantization}")
        if self.cache:
            lines.append(f"  kv cache: {self.cache}")
        return "\n".join(lines)
