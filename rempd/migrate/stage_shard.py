"""A worker's part of a staged switch: build the target shard beside the live one, hold pre-copied KV, and at
the cut take the delta, free the old shard and install the new one.

Host-store loads and copies of rows this worker already holds need no peer, so a background thread does them
(on CUDA on a side stream) while the worker keeps executing steps. Peer transfers are collective, so they run
in chunks the driver posts between steps, in the same order on every worker, like the steps themselves; a chunk
is posted and left in flight across the next steps, and finished (copied into place) by the next staging step."""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, replace

import torch

from rempd.migrate.plan import SwitchPlan, WeightPiece
from rempd.migrate.reshard import PieceKey, pack_kv, post_round
from rempd.migrate.reshard_times import ReshardTimes
from rempd.migrate.shards import shard_of
from rempd.worker_pool.device_memory import alloc_retries, pool_blocks
from rempd.worker_pool.stage_builder import build_stage

STAGING_TAG = 1  # staging transfers stay in flight while steps hand activations on between stages (tag 0)


@dataclass
class ChunkTransfer:
    """One chunk's peer transfers in flight. The buffers are held here until they are done: the KV packed for
    peers and the receive buffers."""
    requests: list
    packed: dict[int, torch.Tensor]
    received: dict[PieceKey, torch.Tensor]
    weights: list[WeightPiece]
    has_kv: bool
    posted_at_step: int  # the worker's step count when it was posted


class ShardStaging:
    def __init__(self, worker, plan: SwitchPlan, block_size: int, max_len: int):
        self.worker, self.plan, self.block_size, self.max_len = worker, plan, block_size, max_len
        cfg, me = worker.setup.model, worker.setup.index
        self.me = me
        self.old_shard, self.new_shard = shard_of(cfg, plan.old, me), shard_of(cfg, plan.new, me)
        geo = worker.geometry
        self.old_heads = geo.kv_heads(self.old_shard) if self.old_shard else None
        self.old_weights = worker.stage.named_weights() if worker.stage is not None else {}
        self.old_rows = geo.holdings(self.old_shard) if self.old_shard else {}
        self.new_rows = geo.holdings(self.new_shard) if self.new_shard else {}
        self.rows = {name: torch.empty((b - a, *worker.row_shape(name)), dtype=worker.dtype, device=worker.device)
                     for name, (a, b) in self.new_rows.items()}
        self.precopy: list[dict[int, torch.Tensor]] = []  # per chunk: KV piece index → [layers, 2, n, ...]
        self.stage = None
        self.kv_view: torch.Tensor | None = None  # the kept pool in the new shape, as the staged graphs saw it
        self.times = ReshardTimes()
        self.in_flight: ChunkTransfer | None = None
        self.overlapped_steps = 0  # serving steps run between a chunk's post and its wait, summed over chunks
        self.error: BaseException | None = None
        # the background loads: their wall time ("seconds", device work included), how long the thread waited to
        # start, each kind's seconds and bytes, the allocator's cache flushes meanwhile (each a device-wide sync),
        # and whether the store is page-locked. The first 7B staged switch and every 70B one spent 1.2-7 s in the
        # loads outside the copies themselves (4x H100, session 9); these place it. The side stream is made here,
        # so that its making counts in begin, not in the loads.
        self.loads: dict[str, float] = {"pinned": float(worker.pinned)}
        self.side = torch.cuda.Stream(worker.device) if worker.device.type == "cuda" else None
        self.retries_before = alloc_retries(worker)
        self.thread_made = time.perf_counter()
        self.thread = threading.Thread(target=self._load_local, name="remp-staging", daemon=True)
        self.thread.start()

    def _target(self, piece: WeightPiece) -> torch.Tensor:
        start = self.new_rows[piece.name][0]
        return self.rows[piece.name][piece.start - start:piece.stop - start]

    def _load_local(self) -> None:
        """Rows from the host store, then rows this worker holds already: no peer takes part. Each kind is timed
        to its last copy's end (loads), to tell a slow host load from device copies held up."""
        worker, began, side = self.worker, time.perf_counter(), self.side
        self.loads["start_wait_seconds"] = began - self.thread_made
        try:
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for kind in ("host", "stay"):
                    start, nbytes = time.perf_counter(), 0
                    for piece in self.plan.weights:
                        if piece.dst != self.me or piece.source != kind:
                            continue
                        nbytes += piece.nbytes
                        if kind == "host":
                            rows = worker.store.rows(piece.name, piece.start, piece.stop)
                            self._target(piece).copy_(rows, non_blocking=side is not None)
                        else:
                            start_row = self.old_rows[piece.name][0]
                            self._target(piece).copy_(
                                self.old_weights[piece.name][piece.start - start_row:piece.stop - start_row])
                    if side is not None:
                        side.synchronize()
                    self.loads[f"{kind}_seconds"] = time.perf_counter() - start
                    self.loads[f"{kind}_bytes"] = nbytes
        except BaseException as exc:  # noqa: BLE001 - raised on the RPC thread by build()
            self.error = exc
        self.loads["alloc_retries"] = float(alloc_retries(worker) - self.retries_before)
        self.loads["seconds"] = time.perf_counter() - began

    def _kv_shape_of(self, num_blocks: int):
        cfg = self.worker.setup.model

        def shape(i: int) -> tuple:
            piece = self.plan.kv[i]
            return (len(piece.layers), 2, num_blocks, self.block_size, len(piece.heads), cfg.head_dim)
        return shape

    def _post(self, plan: SwitchPlan, blocks: list[int], tag: int = 0
              ) -> tuple[list, dict, dict[PieceKey, torch.Tensor]]:
        """Post peer weight pieces and the KV of `blocks`, one flattened transfer per peer pair: (requests, packed
        KV, received pieces once the requests are done). The KV is packed on the compute stream, behind the steps
        before, which write none of these blocks (they are full: delta.py)."""
        worker = self.worker
        packed = {}
        if not blocks:
            plan = replace(plan, kv=[])
        else:
            ids = torch.tensor(blocks, dtype=torch.long, device=worker.device)
            packed = pack_kv(plan, self.me, self.old_shard, self.old_heads, worker.kv, ids)
        keys = [("w", i) for i, p in enumerate(plan.weights) if p.source == "peer"]
        keys += [("kv", i) for i, p in enumerate(plan.kv) if p.source == "peer"]
        requests, received = post_round(plan, keys, self.me, self.old_weights, self.old_rows, packed,
                                        self._kv_shape_of(len(blocks)), self.worker.row_shape, worker.dtype,
                                        worker.device, self.times, worker.world, tag)
        return requests, packed, received

    def _received_kv(self, packed: dict, received: dict[PieceKey, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {i: packed[i] if piece.src == self.me else received[("kv", i)]
                for i, piece in enumerate(self.plan.kv) if piece.dst == self.me}

    def chunk(self, weights: list[WeightPiece], blocks: list[int]) -> None:
        """Post peer weight pieces, and a pre-copy of the KV of `blocks`, and return while they move: the steps
        that follow run meanwhile. The chunk before is finished first, so one chunk's buffers are in flight at
        a time."""
        self.settle()
        requests, packed, received = self._post(replace(self.plan, weights=weights), blocks, STAGING_TAG)
        self.in_flight = ChunkTransfer(requests, packed, received, weights, bool(blocks), self.worker.runner.steps)

    def loaded(self) -> bool:
        """Whether the rows from the host store and this worker's own rows are all in."""
        return not self.thread.is_alive()

    def settle(self) -> None:
        """Finish the chunk in flight: wait for its transfers (on CUDA the current stream waits, not the host),
        then copy the weight rows into place and keep the pre-copied KV."""
        chunk, self.in_flight = self.in_flight, None
        if chunk is None:
            return
        self.overlapped_steps += self.worker.runner.steps - chunk.posted_at_step
        for request in chunk.requests:
            request.wait()
        for i, piece in enumerate(chunk.weights):
            if piece.dst == self.me:
                self._target(piece).copy_(chunk.received[("w", i)])
        if chunk.has_kv:
            self.precopy.append(self._received_kv(chunk.packed, chunk.received))

    def build(self) -> None:
        """The new stage from the staged rows, once every row is in; its groups were built before."""
        self.settle()
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"staging the target's weights failed: {self.error}") from self.error
        shard, worker = self.new_shard, self.worker
        if shard is None:
            return

        def fill(name: str, rows: tuple[int, int], out: torch.Tensor) -> None:
            assert rows == self.new_rows[name], (name, rows)
            out.copy_(self.rows.pop(name))

        self.stage = build_stage(worker, self.plan.new, shard, fill, self.max_len)

    def graphs(self, num_blocks: int, max_batch: int, batch_sizes: list[int]) -> float:
        """Capture the new stage's decode graphs over the pool memory the cut will keep, viewed in the new shape
        now (the old stage keeps using it in the old shape until the cut). Seconds taken."""
        shard, worker = self.new_shard, self.worker
        if shard is None or self.stage is None or worker.kv_buffer is None:
            return 0.0
        self.kv_view = worker.kv_shape_for(shard, self.block_size).view(worker.kv_buffer, num_blocks)
        return worker.capture_graphs(max_batch, batch_sizes, self.stage, self.kv_view)

    def pool_blocks(self) -> int:
        return pool_blocks(self.worker, self.plan, self.block_size)

    def cut(self, delta_old: list[int], delta_new: list[int], precopied: dict[int, tuple[list[int], list[int]]],
            num_blocks: int, keep_pool: bool) -> dict:
        """Send the delta, drop the old shard, and install the new stage with a pool of `num_blocks`: the old
        pool's memory viewed in the new shape when `keep_pool`, else a fresh pool once the old one is freed."""
        worker, dev = self.worker, self.worker.device
        worker._wait_sends()
        self.settle()
        worker.runner.drop_graphs()  # they hold the old pool's addresses, and would keep it alive
        requests, packed, received = self._post(replace(self.plan, weights=[]), delta_old)
        for request in requests:
            request.wait()
        delta = self._received_kv(packed, received) if delta_old else {}
        self.old_weights.clear()
        worker.stage = None
        if not keep_pool:
            worker.drop_pool()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        kv = kv_shape = None
        shard = self.new_shard
        if shard is not None:
            kv_shape = worker.kv_shape_for(shard, self.block_size)
            # the delta was packed out above and pre-copied blocks are held apart, so the kept bytes are free
            if keep_pool:  # the very view the staged graphs captured, when they did
                same = self.kv_view is not None and self.kv_view.shape[2] == num_blocks
                kv = self.kv_view if same else kv_shape.view(worker.kv_buffer, num_blocks)
            else:
                kv = worker.new_pool(kv_shape, num_blocks)
            heads = worker.geometry.kv_heads(shard)

            def put(i: int, data: torch.Tensor, new_ids: list[int]) -> None:
                piece = self.plan.kv[i]
                l0, h0 = piece.layers.start - shard.layers.start, piece.heads.start - heads.start
                ids = torch.tensor(new_ids, dtype=torch.long, device=dev)
                kv[l0:l0 + len(piece.layers), :, ids, :, h0:h0 + len(piece.heads)] = data

            for chunk, (positions, new_ids) in precopied.items():
                where = torch.tensor(positions, dtype=torch.long, device=dev)
                for i, data in self.precopy[chunk].items():
                    put(i, data.index_select(2, where), new_ids)
            for i, data in delta.items():
                put(i, data, delta_new)
        self.precopy.clear()
        worker.stage, worker.kv, worker.kv_shape, worker.placement = self.stage, kv, kv_shape, self.plan.new
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return {"bytes_sent": self.times.bytes_sent, "bytes_received": self.times.bytes_received,
                "pool_kept": keep_pool, "overlapped_steps": self.overlapped_steps}

    def abort(self) -> None:
        self.settle()  # every peer posted it too: it completes
        self.thread.join()
        # the old stage serves on over the pool its graphs were captured on: dropping those left it stepping
        # eagerly until the next install or switch
        self.worker.runner.drop_graphs(staged=True, serving=False)
        self.rows.clear()
        self.precopy.clear()
        self.stage = None
