"""A worker's weights in a layer-ordered switch: the new stage is built one step of layers at a time
(migrate/layer_steps.py), and each old tensor is freed right after the last step that reads it.

LlamaStage builds its parts in the plan's unit order through a WeightSource; `before` runs every step before
the one of the unit about to be allocated, so a step runs once all of its new tensors exist. A step posts its peer
transfers straight from the old tensors into the new ones (no round buffers), then queues its local copies (rows
that stay, rows from the host store) so that they overlap the transfers, waits, and frees the old tensors it was
the last reader of. On CUDA the freed memory goes back to the device at once: the caching allocator would
otherwise carve later, smaller tensors out of the freed blocks and strand the rest, which a larger KV pool then
cannot use."""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from rempd.migrate.layer_steps import free_steps, step_of_units, step_pieces, unit_of
from rempd.migrate.plan import SwitchPlan, WeightPiece
from rempd.migrate.shards import shard_of


class InPlaceBuild:
    def __init__(self, worker, plan: SwitchPlan, old_weights: dict[str, torch.Tensor],
                 old_rows: dict[str, tuple[int, int]], times):
        self.worker, self.plan, self.times = worker, plan, times
        self.old_weights, self.old_rows = old_weights, old_rows  # the only references left to the old tensors
        self.me = me = worker.setup.index
        geo, steps = worker.geometry, plan.layer_steps
        self.steps, self.pieces, self.step_of = steps, step_pieces(plan, steps), step_of_units(steps)
        new = shard_of(geo.cfg, plan.new, me)
        self.new_is_first = new is not None and new.is_first
        old = shard_of(geo.cfg, plan.old, me)
        self.old_is_first = old is not None and old.is_first
        self.free_after: dict[int, list[str]] = {}  # step → old tensors it is the last to read; -1: none reads them
        for name, step in free_steps(plan, geo, me, steps).items():
            self.free_after.setdefault(step, []).append(name)
        self.mine: dict[str, list[tuple[int, WeightPiece]]] = {}
        for i, piece in enumerate(plan.weights):
            if piece.dst == me:
                self.mine.setdefault(piece.name, []).append((i, piece))
        self.targets: dict[int, torch.Tensor] = {}  # peer piece index → its rows in a new tensor
        self.local: list[tuple[torch.Tensor, torch.Tensor]] = []  # (target, source) copies of the step
        self.done = 0  # steps run
        # what this worker allocated and freed, in order: ("build", step, unit, bytes) for each new tensor, ("free",
        # step, unit, bytes, released) for each old allocation dropped, released: nothing else kept it alive
        self.log: list[tuple] = []

    def old_view(self, piece: WeightPiece) -> torch.Tensor:
        start = self.old_rows[piece.name][0]
        return self.old_weights[piece.name][piece.start - start:piece.stop - start]

    def before(self, name: str, nbytes: int) -> None:
        """WeightSource calls this before it allocates the new tensor that starts with `name`."""
        unit = unit_of(name, self.new_is_first, self.plan.num_layers)
        self.reach(self.step_of[unit])
        self.log.append(("build", self.step_of[unit], unit, nbytes))

    def fill(self, name: str, rows: tuple[int, int], out: torch.Tensor) -> None:
        for i, piece in self.mine[name]:
            target = out[piece.start - rows[0]:piece.stop - rows[0]]
            if piece.src == self.me:
                self.local.append((target, self.old_view(piece)))
            elif piece.src is None:
                self.local.append((target, self.worker.store.rows(piece.name, piece.start, piece.stop)))
            else:
                self.targets[i] = target

    def start(self) -> None:
        """Free what no new shard reads, before anything new is allocated."""
        self.free(-1)

    def reach(self, step: int) -> None:
        """Run every step before `step`."""
        while self.done < step:
            self.run(self.done)
            self.done += 1

    def finish(self) -> None:
        self.reach(len(self.steps))

    def run(self, k: int) -> None:
        self.move(k)  # its own frame: no local name may keep an old tensor alive past it
        self.free(k)

    def move(self, k: int) -> None:
        """Post the step's peer transfers, queue its local copies behind them, and wait for both."""
        me, world, ops = self.me, self.worker.world, []
        for i in self.pieces[k]:
            piece = self.plan.weights[i]
            if piece.src == me:
                ops.append(dist.P2POp(dist.isend, self.old_view(piece), piece.dst, world))
                self.times.bytes_sent += piece.nbytes
            elif piece.dst == me:
                ops.append(dist.P2POp(dist.irecv, self.targets.pop(i), piece.src, world))
                self.times.bytes_received += piece.nbytes
        requests = dist.batch_isend_irecv(ops) if ops else []
        for target, source in self.local:
            target.copy_(source, non_blocking=True)
        self.local.clear()
        for request in requests:
            request.wait()

    def free(self, k: int) -> None:
        bases = []
        for name in self.free_after.get(k, []):
            view = self.old_weights.pop(name)
            base = view._base if view._base is not None else view
            if all(ref() is not base for _, _, ref in bases):  # fused tensors: one allocation, several names
                unit = unit_of(name, self.old_is_first, self.plan.num_layers)
                bases.append((unit, base.numel() * base.element_size(), weakref.ref(base)))
        if not bases:
            return
        del view, base  # the loop's names: the last tensor would outlive the step
        if self.worker.device.type == "cuda":
            torch.cuda.empty_cache()  # waits for this step's copies and transfers, then returns the old blocks
        self.log += [("free", k, unit, nbytes, ref() is None) for unit, nbytes, ref in bases]
