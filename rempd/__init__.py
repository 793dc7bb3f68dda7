"""ReMP: an LLM server whose TP×PP topology changes while it serves.

The offline API is imported lazily so that `rempctl`, which shares `rempd.protocol`, never loads torch."""
from typing import Any

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from rempd.llm import LLM
        return LLM
    if name == "SamplingParams":
        from rempd.engine.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
