"""Whether a plan fits: the involved workers price the transform in both orders and the KV pool a target leaves
room for (one switch_budget call), and the driver concludes: the transform's order, a fresh or kept pool, or a
refusal. Asking and concluding are apart so that a switch can ask between two serving steps and read the answer
later, without holding the steps (staging.py, the engine's dry-run plans)."""
from __future__ import annotations

from dataclasses import dataclass

from rempd.migrate.layer_steps import layer_steps
from rempd.migrate.plan import SwitchPlan
from rempd.migrate.shards import ModelGeometry
from rempd.topology import Topology
from rempd.worker_pool.ticket import Ticket

REUSE_SHARE = 0.9  # a switch keeps the pools' memory if that costs at most a tenth of the KV capacity


class SwitchRefused(ValueError):
    """The target cannot run; nothing changed."""


@dataclass
class BudgetQuery:
    """The workers' part of a capacity check: `switch_budget(*args)` on `involved`, asked and waited for
    (call), or asked between steps and read later (post)."""
    plan: SwitchPlan
    involved: list[int]
    args: tuple

    def call(self, pool) -> list:
        return pool.call("switch_budget", *self.args, workers=self.involved)

    def post(self, pool) -> Ticket:
        return pool.post("switch_budget", *self.args, workers=self.involved)


def ask_budget(engine, plan: SwitchPlan) -> BudgetQuery:
    """What to ask the workers about `plan`; where both orders may run, plan.layer_steps is set for them to price."""
    config = engine.config
    # quiesce finishes the steps in flight (a micro-batch per stage and one sent ahead), each of which may give
    # every running sequence one more block: the live KV held beside the new pool is priced with that growth
    growth = len(engine.scheduler.running) * (engine.placement.topology.pp + 1)
    if config.switch_in_place != "never":
        plan.layer_steps = layer_steps(plan, ModelGeometry(engine.model_config, engine.template.dtype),
                                       config.switch_round_bytes)
    return BudgetQuery(plan, sorted(set(plan.old.workers) | set(plan.new.workers)),
                       (plan, config.block_size, config.switch_round_bytes, growth))


def conclude_capacity(engine, query: BudgetQuery, replies: list) -> tuple[int, int]:
    """(fresh, kept) from the workers' replies: the blocks a fresh pool would have, and those every new worker's
    pool memory holds in the target's shape if kept (0: the transform does not fit beside it). Chooses the
    transform's order (plan.layer_steps); refuses a target whose transform cannot fit or that cannot hold one
    full-length sequence."""
    plan, involved = query.plan, query.involved
    budgets = dict(zip(involved, replies))
    if not choose_order(engine.config.switch_in_place, plan.new.topology, [engine.devices[w] for w in involved],
                        [budgets[w].headroom for w in involved]):
        plan.layer_steps = None
    fresh = min(budgets[w].capacity for w in plan.new.workers)
    needed = engine.scheduler.blocks.blocks_for(engine.max_model_len)
    if fresh < needed:
        raise SwitchRefused(f"{plan.new.topology}: the model does not fit: room for {fresh} KV blocks, "
                            f"{needed} needed for one {engine.max_model_len}-token sequence")
    return fresh, min(budgets[w].kept_blocks[plan.in_place] for w in plan.new.workers)


def check_capacity(engine, plan: SwitchPlan) -> tuple[int, int]:
    """ask_budget and conclude_capacity in one call, for a caller that holds the steps anyway."""
    query = ask_budget(engine, plan)
    return conclude_capacity(engine, query, query.call(engine.pool))


def choose_order(mode: str, topology: Topology, devices: list[str], headrooms: list[tuple[int, int] | None]) -> bool:
    """Whether the transform runs in layer order, from each involved device's headroom (plain, layer order):
    "auto" keeps the plain order where it fits, since layer order waits for the device once per step. Refuses a
    target that fits neither way the mode allows."""
    def short(which: int) -> tuple[int, str] | None:
        worst = min(((left[which], device) for left, device in zip(headrooms, devices) if left is not None),
                     default=None)
        return worst if worst is not None and worst[0] < 0 else None

    plain, layered = short(0), short(1)
    if mode == "never" or (mode == "auto" and plain is None):
        if plain is not None:
            raise SwitchRefused(f"{topology}: {plain[1]} would run out of memory during the switch, where its old "
                                f"and new shards coexist: {-plain[0] / 1e9:.1f} GB short")
        return False
    if layered is not None:
        raise SwitchRefused(f"{topology}: {layered[1]} would run out of memory during the switch even with the new "
                            f"shard built layer by layer as the old one is freed: {-layered[0] / 1e9:.1f} GB short")
    return True


def choose_pool(engine, fresh_blocks: int, kept_blocks: int) -> tuple[int, bool]:
    """(blocks, kept): keep every new worker's pool memory, viewed in the new shape (nothing freed, allocated or
    zeroed), when it holds nearly what a fresh pool would; else size a fresh pool."""
    if kept_blocks >= max(engine.scheduler.blocks.blocks_for(engine.max_model_len), REUSE_SHARE * fresh_blocks):
        return kept_blocks, True
    return fresh_blocks, False
