"""What `rempctl status` and /metrics show of the engine: topology, placement, each worker's state and holdings,
the weight store, host time per step and recoveries."""
from __future__ import annotations


def engine_status(engine) -> dict:
    topo, alive, pids = engine.placement.topology, engine.pool.alive(), engine.pool.pids()
    workers = []
    for index, device in enumerate(engine.devices):
        coords = engine.placement.coords(index)
        info = engine.shard_infos[index]
        workers.append({
            "index": index, "device": device, "pid": pids[index],
            "state": ("active" if coords else "standby") if alive[index] else "dead",
            "pp_rank": coords[0] if coords else None, "tp_rank": coords[1] if coords else None,
            "weight_bytes": info["weight_bytes"], "kv_blocks": info["kv_blocks"],
        })
    return {"topology": {"tp": topo.tp, "pp": topo.pp}, "placement": list(engine.placement.workers),
            "workers": workers, "max_model_len": engine.max_model_len,
            "store": {"name": engine.store.name, "bytes": engine.store.nbytes},
            # from a batch's tokens to its outputs, the next batch's scheduling and sending included (see
            # finish_oldest); a median of the recent steps, which a first step's compilation cannot skew
            "driver_host_ms_per_step": engine.step_log.median_ms(("replied", "done")),
            # start-up compilation of every TP size's kernels (0 off CUDA)
            "kernel_warm_s": engine.kernel_warm_seconds,
            # decode-graph buckets the last switch left out, still to capture while idle (engine/graph_backfill.py)
            "graphs_pending": list(engine.graph_backfill.pending),
            "graphs_backfilled": engine.graph_backfill.backfilled,
            "num_recoveries": engine.num_recoveries, "lost_devices": list(engine.device_slots.lost),
            "last_recovery": engine.recoveries[-1].to_dict() if engine.recoveries else None}
