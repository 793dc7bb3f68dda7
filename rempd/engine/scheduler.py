"""Continuous batching: decodes and prefill chunks share one token budget; preemption by recompute."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rempd.engine.block_manager import BlockManager
from rempd.engine.sequence import Sequence, SequenceStatus
from rempd.engine.step_input import StepInput


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    sent_stamps: tuple[float, float] = (0.0, 0.0)  # perf_counter when the driver began scheduling it, and sent it

    def samplers(self) -> list[Sequence]:
        """Sequences whose step ends on their last token, so they get a new one."""
        return [s for s, n in zip(self.seqs, self.num_new_tokens) if s.num_computed + n == s.num_tokens]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.blocks = blocks
        self.eos_token_ids = eos_token_ids
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, max_seqs: int | None = None) -> ScheduledBatch | None:
        """max_seqs caps the running sequences one batch takes, so that pp micro-batches share them."""
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if budget == 0 or (max_seqs is not None and len(batch.seqs) >= max_seqs):
                break
            if seq.in_flight or seq.status is not SequenceStatus.RUNNING:
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_hold(seq, seq.num_computed + n):
                while self._preempt_youngest(batch, seq) and not self.blocks.can_hold(seq, seq.num_computed + n):
                    pass
                if not self.blocks.can_hold(seq, seq.num_computed + n):
                    continue  # blocks held by in-flight steps come back when those finish
            self._take(batch, seq, n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_hold(seq, seq.num_computed + n):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._take(batch, seq, n)
            budget -= n
        return batch if batch.seqs else None

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        self.blocks.grow(seq, seq.num_computed + n)
        seq.in_flight = True
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)

    def _preempt_youngest(self, batch: ScheduledBatch, keep: Sequence) -> bool:
        candidates = [s for s in self.running if s is not keep and not s.in_flight and s not in batch.seqs]
        if not candidates:
            return False
        self.preempt(max(candidates, key=lambda s: s.arrival))
        return True

    def preempt(self, seq: Sequence) -> None:
        """Drop the sequence's KV; it waits, in arrival order, to recompute prompt and output so far."""
        self.blocks.release(seq)
        self.running.remove(seq)
        seq.num_computed = 0
        seq.in_flight = False  # a step still in flight for it (cut short by a worker failure) is forgotten
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preempted += 1
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)

    def step_input(self, batch: ScheduledBatch) -> StepInput:
        step = StepInput([], [], [], [], [], [], [], [])
        bs = self.blocks.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            if n == 1:  # a decode; the general form below costs a slice, a range and a list per token
                step.token_ids.append(seq.token_ids[start])
                step.positions.append(start)
                step.slot_mapping.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                step.token_ids += seq.token_ids[start:end]
                step.positions += range(start, end)
                step.slot_mapping += [self.blocks.slot(seq, p) for p in range(start, end)]
            step.query_lens.append(n)
            step.context_lens.append(end)
            step.block_tables.append(seq.block_table[:-(-end // bs)])
            if end == len(seq.token_ids):
                step.sample_indices.append(len(step.token_ids) - 1)
                step.samples.append(seq.sample_spec())
        return step

    def postprocess(self, batch: ScheduledBatch, tokens: list[int]) -> list[Sequence]:
        """Record the step's progress and sampled tokens; returns the sequences that got a token."""
        samplers = batch.samplers()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            seq.in_flight = False
        updated = []
        for seq, token in zip(samplers, tokens):
            if seq.is_finished:  # aborted while its step ran
                continue
            seq.token_ids.append(token)
            updated.append(seq)
            reason = self._finish_reason(seq, token)
            if reason:
                self.finish(seq, reason)
        for seq in batch.seqs:
            if seq.is_finished and seq.block_table:
                self.blocks.release(seq)
        return updated

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence; its blocks return now, or when the step it is part of finishes."""
        if seq.is_finished:
            return
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.in_flight:
            self.blocks.release(seq)
