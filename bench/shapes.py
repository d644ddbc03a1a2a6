"""Model shapes the benchmarks and the audit use, in one place."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int


MODELS = {
    m.name: m
    for m in (
        ModelShape("smollm2-135m", 576, 1536, 9, 3, 64, 49152),
        ModelShape("llama3-8b", 4096, 14336, 32, 8, 128, 128256),
        ModelShape("llama3-70b", 8192, 28672, 64, 8, 128, 128256),
    )
}
