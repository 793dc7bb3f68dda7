"""Pre-copy bookkeeping of a staged switch: which KV blocks already sit at their new owners, and at the cut
which of those copies still hold and which blocks (the delta) must be sent now. Pure; no torch.

KV blocks are append-only: a block whose every slot was computed never changes again while its sequence keeps
it. So only such full blocks are pre-copied; the partial last block and every block written later form the delta.
A sequence preempted since its pre-copy got new blocks, so all of its copies are void."""
from __future__ import annotations

from dataclasses import dataclass, field

from rempd.engine.sequence import Sequence


@dataclass(frozen=True)
class Copied:
    old_id: int  # the block id in the old pool when it was copied
    chunk: int  # which pre-copy chunk carried it
    position: int  # its index among that chunk's blocks


@dataclass
class Record:
    preemptions: int  # a sequence preempted since then holds other blocks
    blocks: dict[int, Copied] = field(default_factory=dict)  # index in the block table → its copy


@dataclass
class CutLayout:
    """Where live blocks go in the new pool: each live sequence's blocks compacted to ids 0..n-1, in order."""
    new_tables: list[list[int]]
    precopied: dict[int, tuple[list[int], list[int]]]  # chunk → (positions in the chunk, new block ids)
    delta_old: list[int]  # old ids of the blocks to send at the cut
    delta_new: list[int]

    @property
    def num_precopied(self) -> int:
        return sum(len(positions) for positions, _ in self.precopied.values())


class PrecopyLedger:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.records: dict[str, Record] = {}
        self.num_chunks = 0
        self.num_copied = 0  # blocks held in pre-copy buffers, valid or not: they take memory until the cut

    def _record(self, seq: Sequence) -> Record:
        record = self.records.get(seq.request_id)
        if record is None or record.preemptions != seq.num_preemptions:
            record = self.records[seq.request_id] = Record(seq.num_preemptions)
        return record

    def pending(self, live: list[Sequence]) -> list[tuple[Sequence, int]]:
        """(sequence, block index) of every full block not copied yet. Steps may be in flight: num_computed counts
        finished steps only, a step in flight writes slots at or past it, and only sequences with no step in
        flight are preempted, so a block full now stays as it is until its sequence ends."""
        found = []
        for seq in live:
            record = self._record(seq)
            full = min(seq.num_computed // self.block_size, len(seq.block_table))
            found += [(seq, j) for j in range(full) if j not in record.blocks]
        return found

    def next_chunk(self, live: list[Sequence], max_blocks: int) -> list[int]:
        """Old block ids to copy in the next chunk (oldest sequences first), recorded as copied."""
        chunk, ids = self.num_chunks, []
        for seq, j in self.pending(sorted(live, key=lambda s: s.arrival))[:max_blocks]:
            self.records[seq.request_id].blocks[j] = Copied(seq.block_table[j], chunk, len(ids))
            ids.append(seq.block_table[j])
        if ids:
            self.num_chunks += 1
            self.num_copied += len(ids)
        return ids

    def layout(self, live: list[Sequence]) -> CutLayout:
        layout = CutLayout([], {}, [], [])
        next_id = 0
        for seq in live:
            record = self.records.get(seq.request_id)
            valid = record is not None and record.preemptions == seq.num_preemptions
            table = list(range(next_id, next_id + len(seq.block_table)))
            for j, (old_id, new_id) in enumerate(zip(seq.block_table, table)):
                copied = record.blocks.get(j) if valid else None
                if copied is not None and copied.old_id == old_id:
                    positions, new_ids = layout.precopied.setdefault(copied.chunk, ([], []))
                    positions.append(copied.position)
                    new_ids.append(new_id)
                else:
                    layout.delta_old.append(old_id)
                    layout.delta_new.append(new_id)
            layout.new_tables.append(table)
            next_id += len(table)
        return layout
