"""A step's inputs for the GPU path as one int64 array: one host→device copy per step, or one copy into a CUDA
graph's static buffer. Layout: token ids, positions, slots [tokens] | sample rows [samples] | context lengths
[seqs] | query starts [seqs + 1] | block tables [seqs × max_blocks]."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rempd.engine.step_input import StepInput
from rempd.model.paged_attention import KernelMetadata


@dataclass(frozen=True)
class StepLayout:
    tokens: int
    samples: int
    seqs: int
    max_blocks: int

    @classmethod
    def of(cls, step: StepInput) -> "StepLayout":
        return cls(step.num_tokens, len(step.sample_indices), len(step.query_lens),
                   max(len(t) for t in step.block_tables))

    @property
    def size(self) -> int:
        return 3 * self.tokens + self.samples + 2 * self.seqs + 1 + self.seqs * self.max_blocks

    def pack(self, step: StepInput) -> np.ndarray:
        """The step padded to this layout: extra tokens write nothing (slot -1), extra sequences read nothing
        (context 0) and own one padding token each; extra sample rows repeat row indices past the real ones."""
        t, n, s = self.tokens, step.num_tokens, len(step.query_lens)
        flat = np.zeros(self.size, dtype=np.int64)
        flat[:n] = step.token_ids
        flat[t:t + n] = step.positions
        flat[2 * t:2 * t + n] = step.slot_mapping
        flat[2 * t + n:3 * t] = -1
        at = 3 * t
        flat[at:at + self.samples] = np.arange(self.samples)
        flat[at:at + len(step.sample_indices)] = step.sample_indices
        at += self.samples
        flat[at:at + s] = step.context_lens
        at += self.seqs
        starts = flat[at:at + self.seqs + 1]
        starts[1:s + 1] = np.cumsum(step.query_lens)
        starts[s + 1:] = n + np.arange(1, self.seqs - s + 1)
        tables = flat[at + self.seqs + 1:].reshape(self.seqs, self.max_blocks)
        for row, table in enumerate(step.block_tables):
            tables[row, :len(table)] = table
        return flat

    def unpack(self, flat: torch.Tensor, max_query_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      KernelMetadata]:
        """Views into `flat` (already on the device): token ids, positions, sample rows and the metadata."""
        t = self.tokens
        ids, positions, slots, samples, ctx, starts, tables = flat.split(
            [t, t, t, self.samples, self.seqs, self.seqs + 1, self.seqs * self.max_blocks])
        meta = KernelMetadata(slots, tables.view(self.seqs, self.max_blocks), starts, ctx, max_query_len)
        return ids, positions, samples, meta


def to_device(step: StepInput, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              KernelMetadata]:
    """The eager GPU path: the step as it is, in one copy."""
    layout = StepLayout.of(step)
    flat = torch.from_numpy(layout.pack(step)).to(device, non_blocking=True)
    return layout.unpack(flat, max(step.query_lens))
