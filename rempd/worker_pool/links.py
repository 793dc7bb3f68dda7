"""A worker's communication links: groups built and first used before they are needed, and link speeds
measured at start-up for plan's predictions. Every worker runs these together (they are collectives)."""
from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist

from rempd.topology import Placement

log = logging.getLogger("rempd.links")
WARM_BYTES = 64 << 20
SLOW_GROUPS_S = 0.05


def prepare_groups(worker, placement: Placement) -> int:
    """Build the groups of `placement` that are not cached, and use each link once: NCCL sets up a
    communicator on its first use, which belongs to this phase, not to the first step after the switch.
    Every worker calls this together."""
    marks = [time.perf_counter()]
    built = worker.groups.build(placement)
    marks.append(time.perf_counter())
    coords = placement.coords(worker.setup.index)
    if coords is not None:
        pp_rank, tp_rank = coords
        token = torch.zeros(1, device=worker.device)
        group = worker.groups.get(placement.tp_group(pp_rank))
        if group is not None:
            dist.all_reduce(token, group=group)
        marks.append(time.perf_counter())
        if pp_rank > 0:
            dist.recv(token, src=placement.worker(pp_rank - 1, tp_rank), group=worker.world)
        if pp_rank < placement.topology.pp - 1:
            dist.send(token, dst=placement.worker(pp_rank + 1, tp_rank), group=worker.world)
        marks.append(time.perf_counter())
        # this stream only: a staged switch's host-store loads run on a side stream meanwhile, and a device-wide
        # sync waited for all of them (0.38 s of 'groups' on 2x H200, where the groups themselves were warm)
        if worker.device.type == "cuda":
            torch.cuda.current_stream(worker.device).synchronize()
        marks.append(time.perf_counter())
    if marks[-1] - marks[0] > SLOW_GROUPS_S:  # warm groups take milliseconds: say where a slow one waited
        steps = ("build", "all_reduce", "hand_off", "sync")
        log.warning("worker %d: groups of %s took %.3f s (%s)", worker.setup.index, placement,
                    marks[-1] - marks[0], ", ".join(f"{name} {b - a:.3f}" for name, a, b in
                                                      zip(steps, marks, marks[1:])))
    return built


def warm_links(worker, member_sets: list[tuple[int, ...]]) -> float:
    """Build these groups and open every peer link now, at start-up: NCCL connects a group on its first
    collective and a pair of workers on their first transfer, which would otherwise land inside a switch.
    Every worker calls this together; returns the seconds it took."""
    start = time.perf_counter()
    worker.groups.build_sets(member_sets)
    token = torch.zeros(1, device=worker.device)
    for members in sorted({tuple(sorted(m)) for m in member_sets}):
        if worker.setup.index in members:
            group = worker.groups.get(members)
            dist.all_reduce(token, group=group)
            if worker.device.type == "cuda" and len(members) > 1:
                # the first switch into a TP group spent 0.2-0.4 s more capturing its decode graphs than later
                # switches into it (4x H100); the group's first collective inside a graph is one suspect: pay
                # that here, before any switch
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    dist.all_reduce(token, group=group)
                graph.replay()
    me, size = worker.setup.index, worker.setup.world_size
    peers = [rank for rank in range(size) if rank != me]
    # large enough that NCCL opens every channel to each peer, as a switch's exchange will: its buffers then
    # count among what the device holds before any switch measures its free memory
    out = torch.zeros(WARM_BYTES if worker.device.type == "cuda" else 1, dtype=torch.uint8, device=worker.device)
    ops = [dist.P2POp(dist.isend, out, peer, worker.world) for peer in peers]
    ops += [dist.P2POp(dist.irecv, torch.empty_like(out), peer, worker.world) for peer in peers]
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    # a lone send/recv (pipeline hand-offs) runs on a communicator of its own per pair, which NCCL creates on
    # first use, and connects each direction on its first transfer (~0.12 s each: the groups phase of every 4x H100
    # switch whose stages hand off from a higher to a lower device index). Open both directions of each pair
    # now, in one global order so that no two workers wait on each other
    for low, high in ((a, b) for a in range(size) for b in range(a + 1, size) if me in (a, b)):
        peer = high if me == low else low
        for sender in (low, high):
            if me == sender:
                dist.send(token, dst=peer, group=worker.world)
            else:
                dist.recv(token, src=peer, group=worker.world)
    worker._sync()
    return time.perf_counter() - start


def measure_links(worker, size_bytes: int = 32 << 20) -> dict:
    """Seconds to move `size_bytes` host store → device, within the device, and to a peer. All workers call
    this together, which also makes every worker take part in the world group's first batched transfer,
    as NCCL requires."""
    src = worker.store.buffer()[:size_bytes]
    dst = torch.empty(src.numel(), dtype=torch.uint8, device=worker.device)
    timings = {}
    for name, action in (("host", lambda: dst.copy_(src)), ("local", lambda: dst.clone())):
        action()
        worker._sync()
        start = time.perf_counter()
        action()
        worker._sync()
        timings[name] = time.perf_counter() - start
    size, me = worker.setup.world_size, worker.setup.index
    if size > 1:  # a ring: every worker sends to the next and receives from the previous, all at once
        for _ in range(2):  # the first exchange also sets up the connections
            worker._sync()
            start = time.perf_counter()
            ops = [dist.P2POp(dist.isend, dst, (me + 1) % size, worker.world),
                   dist.P2POp(dist.irecv, torch.empty_like(dst), (me - 1) % size, worker.world)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
            worker._sync()
            timings["peer"] = time.perf_counter() - start
        timings["step"] = step_seconds(worker)
    return {"bytes": src.numel(), **timings}


def step_seconds(worker, iterations: int = 5) -> float:
    """What a step of a layer-ordered switch costs beyond its bytes: a batched ring transfer waited for, then on
    CUDA the device waited for and cached memory handed back (see migrate/in_place.py)."""
    size, me = worker.setup.world_size, worker.setup.index
    token = torch.zeros(1, device=worker.device)
    start = time.perf_counter()
    for _ in range(iterations):
        ops = [dist.P2POp(dist.isend, token, (me + 1) % size, worker.world),
               dist.P2POp(dist.irecv, torch.empty_like(token), (me - 1) % size, worker.world)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if worker.device.type == "cuda":
            torch.cuda.empty_cache()
    return (time.perf_counter() - start) / iterations


def measure_all_reduce(worker, numels: list[int], iterations: int = 20) -> dict[int, float]:
    """Seconds of one all-reduce of each size (elements of the model dtype) on this worker's TP group, for the
    decode benchmark's floor. On CUDA the all-reduces run inside a CUDA graph, as decode steps run them: launched
    one by one from the host they cost several times more. Every active worker calls this together."""
    group = worker.stage.tp.group if worker.stage is not None else None
    if group is None:
        return {}
    timings = {}
    for numel in numels:
        x = torch.ones(numel, dtype=worker.dtype, device=worker.device)
        dist.all_reduce(x, group=group)  # warm
        worker._sync()

        def run() -> None:
            for _ in range(iterations):
                dist.all_reduce(x, group=group)

        if worker.device.type == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            graph.replay()  # warm
            worker._sync()
            run = graph.replay
        start = time.perf_counter()
        run()
        worker._sync()
        timings[numel] = (time.perf_counter() - start) / iterations
    return timings
