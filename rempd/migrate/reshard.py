"""A worker's part of a switch: pack live KV, exchange weights and KV with peers, build the new shard.

Every worker walks the same plan in the same order, so the point-to-point messages of each (src, dst) pair
match without tags. Peer transfers go in rounds of about ROUND_BYTES, one flattened buffer per pair and round, so
the memory a switch needs beside the old and new shards stays small; the first round is in flight while the
host-store loads and local copies run, and each later round while the one before is copied into place."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch
import torch.distributed as dist

from rempd.migrate.plan import SwitchPlan, WeightPiece
from rempd.migrate.reshard_times import Clock, ReshardTimes
from rempd.migrate.shards import Shard
from rempd.model.weight_source import FillRows

RowSource = Callable[[str, int, int], torch.Tensor]  # (name, start, stop) → rows in the host store
PieceKey = tuple[str, int]  # ("w" | "kv", index into plan.weights or plan.kv)
ROUND_BYTES = 1 << 30


def pack_kv(plan: SwitchPlan, me: int, old_shard: Shard | None, old_heads: range | None,
            kv: torch.Tensor | None, live_blocks: torch.Tensor) -> dict[int, torch.Tensor]:
    """Copy out the live blocks of every KV piece this worker sources: [layers, 2, live, block, heads, dim]."""
    packed = {}
    for i, piece in enumerate(plan.kv):
        if piece.src != me:
            continue
        l0 = piece.layers.start - old_shard.layers.start
        h0 = piece.heads.start - old_heads.start
        layers = kv[l0:l0 + len(piece.layers)]
        packed[i] = layers.index_select(2, live_blocks)[:, :, :, :, h0:h0 + len(piece.heads)].contiguous()
    return packed


def exchange_rounds(plan: SwitchPlan, round_bytes: int = ROUND_BYTES) -> list[list[PieceKey]]:
    """Every peer piece in plan order (weights, then KV), cut into rounds of about `round_bytes`. It depends on
    the plan alone, so every worker cuts the same rounds."""
    rounds: list[list[PieceKey]] = [[]]
    filled = 0
    pieces = [("w", i, p.nbytes) for i, p in enumerate(plan.weights) if p.source == "peer"]
    pieces += [("kv", i, plan.kv_bytes(p)) for i, p in enumerate(plan.kv) if p.source == "peer"]
    for kind, i, nbytes in pieces:
        if filled >= round_bytes:
            rounds.append([])
            filled = 0
        rounds[-1].append((kind, i))
        filled += nbytes
    return [r for r in rounds if r]


def post_round(plan: SwitchPlan, keys: list[PieceKey], me: int, old_weights: dict[str, torch.Tensor],
               old_rows: dict[str, tuple], packed_kv: dict[int, torch.Tensor],
               kv_piece_shape: Callable[[int], tuple], row_shape: Callable[[str], tuple], dtype: torch.dtype,
               device: torch.device, times: ReshardTimes, group: dist.ProcessGroup, tag: int = 0
               ) -> tuple[list, dict[PieceKey, torch.Tensor]]:
    """Post one send and one receive per peer pair for this round's pieces, each flattened into one buffer
    (`tag` keeps them apart, on gloo, from other messages of the same pair in flight at the same time).
    Returns the requests and the received pieces by key: views of the receive buffers, valid once the
    requests are done."""
    outgoing: dict[int, list[torch.Tensor]] = {}
    incoming: dict[int, list[tuple[PieceKey, tuple]]] = {}
    for key in keys:
        kind, i = key
        if kind == "w":
            piece = plan.weights[i]
            if piece.src == me:
                start = old_rows[piece.name][0]
                outgoing.setdefault(piece.dst, []).append(
                    old_weights[piece.name][piece.start - start:piece.stop - start])
            elif piece.dst == me:
                incoming.setdefault(piece.src, []).append((key, (piece.stop - piece.start, *row_shape(piece.name))))
        else:
            piece = plan.kv[i]
            if piece.src == me:
                outgoing.setdefault(piece.dst, []).append(packed_kv[i])
            elif piece.dst == me:
                incoming.setdefault(piece.src, []).append((key, kv_piece_shape(i)))
    ops, received = [], {}
    for dst in sorted(outgoing):
        parts = outgoing[dst]
        flat = parts[0].reshape(-1) if len(parts) == 1 else torch.cat([t.reshape(-1) for t in parts])
        ops.append(dist.P2POp(dist.isend, flat, dst, group, tag))
        times.bytes_sent += flat.numel() * flat.element_size()
    for src in sorted(incoming):
        sizes = [math.prod(shape) for _, shape in incoming[src]]
        flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        ops.append(dist.P2POp(dist.irecv, flat, src, group, tag))
        times.bytes_received += flat.numel() * flat.element_size()
        for (key, shape), part in zip(incoming[src], flat.split(sizes)):
            received[key] = part.view(shape)
    return (dist.batch_isend_irecv(ops) if ops else []), received


def assemble_rows(pieces: list[tuple[int, WeightPiece]], rows: tuple[int, int], me: int,
                  old_weights: dict[str, torch.Tensor], old_rows: dict[str, tuple], from_host: RowSource,
                  out: torch.Tensor, from_peers: dict[int, torch.Tensor]) -> None:
    """Fill `out` (this worker's new rows of one tensor) from what stays and from the host store; the rows
    that peers send are left for later, recorded in `from_peers` by piece index."""
    for i, piece in pieces:
        target = out[piece.start - rows[0]:piece.stop - rows[0]]
        if piece.src == me:
            start = old_rows[piece.name][0]
            target.copy_(old_weights[piece.name][piece.start - start:piece.stop - start])
        elif piece.src is None:
            target.copy_(from_host(piece.name, piece.start, piece.stop), non_blocking=True)
        else:
            from_peers[i] = target


def install_kv(plan: SwitchPlan, me: int, new_shard: Shard, new_heads: range, kv: torch.Tensor,
               packed: dict[int, torch.Tensor], received: dict[PieceKey, torch.Tensor], num_live: int) -> None:
    """Write each piece into the new pool; live blocks are compacted to ids 0..num_live-1."""
    for i, piece in enumerate(plan.kv):
        if piece.dst != me:
            continue
        data = packed[i] if piece.src == me else received[("kv", i)]
        l0 = piece.layers.start - new_shard.layers.start
        h0 = piece.heads.start - new_heads.start
        kv[l0:l0 + len(piece.layers), :, :num_live, :, h0:h0 + len(piece.heads)] = data


def exchange(rounds: list[list[PieceKey]], post: Callable, from_peers: dict[int, torch.Tensor],
             first: tuple | None = None) -> dict[PieceKey, torch.Tensor]:
    """Run the rounds (the first one maybe posted already), the next one in flight while this one is copied into
    place: weight rows into `from_peers`' targets; received KV pieces are returned."""
    received_kv: dict[PieceKey, torch.Tensor] = {}
    in_flight = first or (post(rounds[0]) if rounds else ([], {}))
    for r in range(len(rounds)):
        requests, received = in_flight
        for request in requests:
            request.wait()
        if r + 1 < len(rounds):
            in_flight = post(rounds[r + 1])
        for key, data in received.items():
            if key[0] == "w":
                from_peers.pop(key[1]).copy_(data)
            else:
                received_kv[key] = data
    return received_kv


def switch_shard(worker, plan: SwitchPlan, live_blocks: list[int], num_blocks: int, block_size: int,
                 max_len: int, round_bytes: int = ROUND_BYTES, keep_pool: bool = True) -> tuple:
    """Run the transform on `worker` (a rempd.worker_pool.worker.Worker); returns its new
    (stage, kv, kv_shape, report). When the pool's memory holds `num_blocks` of the new shape and the transfers fit
    beside it, the new pool is a new view of the same bytes; otherwise the old pool is freed before the new one
    is allocated, so the two never coexist. In layer order (plan.in_place) the old shard is freed as the new one
    is built (migrate/in_place.py); else the new shard is built whole, then the old one freed."""
    from rempd.migrate.in_place import InPlaceBuild
    from rempd.migrate.shards import shard_of
    from rempd.migrate.transform_memory import transform_extra
    from rempd.worker_pool.device_memory import reusable_blocks
    from rempd.worker_pool.stage_builder import build_stage

    me, cfg, geo, dev, dtype = worker.setup.index, worker.setup.model, worker.geometry, worker.device, worker.dtype
    old_shard, new_shard = shard_of(cfg, plan.old, me), shard_of(cfg, plan.new, me)
    times = ReshardTimes()
    clock = Clock(times, dev)
    worker._wait_sends()
    live = torch.tensor(live_blocks, dtype=torch.long, device=dev)
    packed = pack_kv(plan, me, old_shard, geo.kv_heads(old_shard) if old_shard else None, worker.kv, live)
    clock.mark("kv_pack")
    reuse = keep_pool and reusable_blocks(worker, plan, block_size, round_bytes) >= num_blocks > 0
    if not reuse:
        worker.drop_pool()
        if dev.type == "cuda":  # hand the old pool back now, so the new weights cannot split its memory
            torch.cuda.empty_cache()
        clock.mark("kv_free")
    if dev.type == "cuda":  # the weights' peak is measured from here (for the GPU test of plan's memory model)
        torch.cuda.reset_peak_memory_stats(dev)
        base_bytes = torch.cuda.memory_allocated(dev) - sum(t.numel() * t.element_size() for t in packed.values())

    old_weights = worker.stage.named_weights() if worker.stage is not None else {}
    old_rows = geo.holdings(old_shard) if old_shard else {}

    def kv_piece_shape(i: int) -> tuple:
        piece = plan.kv[i]
        return (len(piece.layers), 2, len(live_blocks), block_size, len(piece.heads), cfg.head_dim)

    def post(keys: list[PieceKey]) -> tuple[list, dict[PieceKey, torch.Tensor]]:
        return post_round(plan, keys, me, old_weights, old_rows, packed, kv_piece_shape, worker.row_shape, dtype,
                          dev, times, worker.world)

    def build(fill: FillRows, before: Callable[[str, int], None] | None = None, order: list[int] | None = None):
        return None if new_shard is None else build_stage(worker, plan.new, new_shard, fill, max_len, before, order)

    report: dict = {"in_place": plan.in_place}
    if plan.in_place:
        worker.stage = None  # the views in old_weights are now the old tensors' only owners
        layered = InPlaceBuild(worker, plan, old_weights, old_rows, times)
        layered.start()
        stage = build(layered.fill, layered.before, [unit for step in plan.layer_steps for unit in step])
        layered.finish()
        report["in_place_log"] = layered.log
        clock.mark("weights")
        received_kv = exchange(exchange_rounds(replace(plan, weights=[]), round_bytes), post, {})
        clock.mark("exchange")
    else:
        rounds = exchange_rounds(plan, round_bytes)
        first = post(rounds[0]) if rounds else ([], {})  # in flight while the host loads and local copies run
        clock.mark("exchange_post")
        from_peers: dict[int, torch.Tensor] = {}
        mine: dict[str, list[tuple[int, WeightPiece]]] = {}
        for i, piece in enumerate(plan.weights):
            if piece.dst == me:
                mine.setdefault(piece.name, []).append((i, piece))

        def fill(name: str, rows: tuple[int, int], out: torch.Tensor) -> None:
            assemble_rows(mine[name], rows, me, old_weights, old_rows,
                          lambda n, a, b: worker.store.rows(n, a, b), out, from_peers)

        stage = build(fill)
        clock.mark("weights")
        received_kv = exchange(rounds, post, from_peers, first)
        clock.mark("exchange")
        old_weights.clear()  # drop the views, so the old tensors can go
        worker.stage = None  # the old shard's tensors go once every peer has read them
        if not reuse and dev.type == "cuda":  # a kept pool stays where it is; freed weights stay cached for the next
            torch.cuda.empty_cache()
            clock.mark("weights_free")
    if dev.type == "cuda":  # beyond the old shard, at the transform's peak: measured, and as plan priced it
        report |= {"extra_bytes": torch.cuda.max_memory_allocated(dev) - base_bytes,
                   "predicted_extra_bytes": transform_extra(plan, geo, me, round_bytes)}
    kv = kv_shape = None
    if new_shard is not None:
        kv_shape = worker.kv_shape_for(new_shard, block_size)
        # live blocks were packed out above, so the kept bytes may be overwritten
        kv = kv_shape.view(worker.kv_buffer, num_blocks) if reuse else worker.new_pool(kv_shape, num_blocks)
        clock.mark("kv_alloc")
        install_kv(plan, me, new_shard, geo.kv_heads(new_shard), kv, packed, received_kv, len(live_blocks))
    clock.mark("kv_install")
    report |= {"phases": times.phases, "bytes_sent": times.bytes_sent, "bytes_received": times.bytes_received,
               "pool_reused": reuse}
    return stage, kv, kv_shape, report
