"""Offline API for tests and benchmarks: `LLM(model_dir, tp=2, pp=2, cpu_workers=4).generate(prompts, params)`."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.engine.config import EngineConfig
from rempd.engine.llm_engine import LLMEngine
from rempd.engine.sampling_params import SamplingParams


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None


class LLM:
    def __init__(self, model: str, tp: int = 1, pp: int = 1, devices: list[int] | None = None,
                 cpu_workers: int | None = None, **options):
        if not devices and not cpu_workers:
            cpu_workers = tp * pp
        config = EngineConfig(model_dir=str(model), tp=tp, pp=pp, devices=list(devices or []),
                              cpu_workers=cpu_workers or 0, **options)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(self, prompts: list[str | list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationOutput]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, params_list):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, token_ids, p)
            ids.append((request_id, token_ids))
        results = {rid: GenerationOutput(tokens, [], "", None) for rid, tokens in ids}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                result = results[out.request_id]
                result.token_ids += out.new_token_ids
                result.text += out.new_text
                result.finish_reason = out.finish_reason
        return [results[rid] for rid, _ in ids]

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
