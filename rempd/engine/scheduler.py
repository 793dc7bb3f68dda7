"""Continuous batching: decodes and prefill chunks share one token budget; preemption by recompute."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from rempd.engine.block_manager import BlockManager
from rempd.engine.sequence import Sequence, SequenceStatus
from rempd.engine.step_input import StepInput


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]
    sent_stamps: tuple[float, float] = (0.0, 0.0)  # perf_counter when the driver began scheduling it, and sent it
    starts: list[int] = field(default_factory=list)  # position of each sequence's first new token
    sampling: list[bool] = field(default_factory=list)  # whether its step ends on its last token, so gets a new one
    ahead: list[bool] = field(default_factory=list)  # a decode of a token an in-flight step samples (async tokens)

    def samplers(self) -> list[Sequence]:
        return [s for s, sampled in zip(self.seqs, self.sampling) if sampled]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: tuple[int, ...] = ()):
        self.blocks = blocks
        # run ahead: a sequence whose in-flight step samples may decode that token in the next step already
        self.async_tokens = False
        self.samples_sent = 0  # rows sent to be sampled, all steps together: their numbers for StepInput.feedback
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
        order = sorted(self.running, key=lambda s: s.arrival)
        if max_seqs is not None:
            # micro-batches: sequences with a step in flight (run-ahead candidates) go last, the least advanced
            # first; in arrival order the oldest micro-batch would run ahead every time and starve the others
            order.sort(key=lambda s: (s.in_flight > 0, s.num_output_tokens + s.num_pending if s.in_flight else 0))
        for seq in order:
            if budget == 0 or (max_seqs is not None and len(batch.seqs) >= max_seqs):
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.in_flight:
                if self._can_run_ahead(seq):
                    self._take(batch, seq, 1, ahead=True)
                    budget -= 1
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

    def _can_run_ahead(self, seq: Sequence) -> bool:
        """Its one step in flight samples a token, and that token surely does not end it by length (EOS and stop
        may still end it: the step run ahead is then wasted, and its token dropped)."""
        if not (self.async_tokens and seq.in_flight == 1 and seq.num_pending == 1):
            return False
        total = seq.num_tokens + 1
        if seq.num_output_tokens + 1 >= seq.params.max_tokens or total >= self.max_model_len:
            return False
        return self.blocks.can_hold(seq, total)  # never preempts: the sequence can wait one step instead

    def _take(self, batch: ScheduledBatch, seq: Sequence, n: int, ahead: bool = False) -> None:
        start = seq.num_tokens + seq.num_pending - 1 if ahead else seq.num_computed
        self.blocks.grow(seq, start + n)
        sampling = ahead or start + n == seq.num_tokens
        seq.in_flight += 1
        seq.num_pending += sampling
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.starts.append(start)
        batch.sampling.append(sampling)
        batch.ahead.append(ahead)

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
        seq.in_flight = seq.num_pending = 0  # steps still in flight for it (cut short by a failure) are forgotten
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preempted += 1
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)

    def step_input(self, batch: ScheduledBatch) -> StepInput:
        step = StepInput([], [], [], [], [], [], [], [], feedback=self.async_tokens, first_sample=self.samples_sent)
        bs = self.blocks.block_size
        for seq, n, start, sampling, ahead in zip(batch.seqs, batch.num_new_tokens, batch.starts, batch.sampling,
                                                  batch.ahead):
            end = start + n
            if n == 1:  # a decode; the general form below costs a slice, a range and a list per token
                step.token_ids.append(-seq.sample_number - 1 if ahead else seq.token_ids[start])
                step.positions.append(start)
                step.slot_mapping.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                step.token_ids += seq.token_ids[start:end]
                step.positions += range(start, end)
                step.slot_mapping += [self.blocks.slot(seq, p) for p in range(start, end)]
            step.query_lens.append(n)
            step.context_lens.append(end)
            step.block_tables.append(seq.block_table[:-(-end // bs)])
            if sampling:
                seq.sample_number = step.first_sample + len(step.samples)
                step.sample_indices.append(len(step.token_ids) - 1)
                step.samples.append(seq.sample_spec(ahead=seq.num_pending - 1))
        self.samples_sent += len(step.samples)
        return step

    def postprocess(self, batch: ScheduledBatch, tokens: list[int]) -> list[Sequence]:
        """Record the step's progress and sampled tokens; returns the sequences that got a token."""
        samplers = batch.samplers()
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            seq.in_flight -= 1
        updated = []
        for seq, token in zip(samplers, tokens):
            seq.num_pending -= 1
            if seq.is_finished:  # aborted while its step ran, or ended by the step before (run ahead)
                continue
            seq.token_ids.append(token)
            updated.append(seq)
            reason = self._finish_reason(seq, token)
            if reason:
                self.finish(seq, reason)
        for seq in batch.seqs:
            if seq.is_finished and seq.block_table and not seq.in_flight:
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
