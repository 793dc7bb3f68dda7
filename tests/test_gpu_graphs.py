"""GPU tests of what makes decode steps fast across switches: CUDA graphs captured at a commit, before a staged
cut and while idle, and Triton kernels compiled at start-up only. CI has no GPU and skips these by marker."""
import asyncio

import pytest
import torch

from backfill_run import serve, wait_backfilled
from gpu_setup import FP32, GREEDY_LONG, LIVE_THROUGH, PROMPTS, need_gpus
from rempd import LLM
from rempd.engine.async_engine import AsyncEngine
from rempd.engine.config import EngineConfig
from rempd.migrate.report import SwitchReport
from rempd.topology import Topology
from token_log import TokenLog

pytestmark = pytest.mark.gpu


def test_graphs_are_recaptured_after_live_switches(llama1b, fp32_reference):
    """A switch captures only the buckets of its live batch; a batch of another size captures its bucket on
    first use, with the same tokens."""
    need_gpus(2)
    tokens, _ = fp32_reference
    # on 4 GPUs through every shape; on 2 between TP2 and PP2; both end at pp 2
    four = torch.cuda.device_count() >= 4
    start, chain = ((2, 2), [(4, 1), (1, 4), (2, 1), (2, 2)]) if four else ((2, 1), [(1, 2), (2, 1), (1, 2)])
    with LLM(llama1b, tp=start[0], pp=start[1], devices=[0, 1, 2, 3] if four else [0, 1], **FP32) as llm:
        engine = llm.engine
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{i}", prompt, GREEDY_LONG)
        got = TokenLog()
        for tp, pp in chain:
            got.steps(engine, 4)  # the 24-token requests are still running at the last switch
            report = got.switch(engine, Topology(tp, pp))
            assert report.state == "committed", report.error
            assert report.transform_detail["graph_capture"] > 0
        captured = engine.pool.call("info", workers=engine.active)
        # 6 live sequences in 2 micro-batches of 3: only the bucket of 4 is captured at the commit
        assert all(set(i["graph_capture_by_batch"]) == {4} for i in captured), captured
        for i, prompt in enumerate(PROMPTS):  # 12 sequences: micro-batches of 6 need the bucket of 8
            engine.add_request(f"r{len(PROMPTS) + i}", prompt, GREEDY_LONG)
        got.finish(engine)
        infos = engine.pool.call("info", workers=engine.active)
    assert [got[f"r{i}"] for i in range(2 * len(PROMPTS))] == tokens + tokens
    assert all(i["graph_steps"] > 0 and i["graph_lazy_captures"] > 0 for i in infos), infos


def test_staged_switch_captures_graphs_before_the_cut(llama1b, fp32_reference):
    """A staged switch keeps the pool and captures the new stage's graphs while the old one serves: the cut
    captures nothing for an unchanged batch, and the tokens stay those of the reference (its first 24: the
    requests run longer, to be live at the cut however many steps staging takes)."""
    from rempd.migrate.staging import StagedSwitch, StagingOptions

    need_gpus(2)
    tokens, _ = fp32_reference
    with LLM(llama1b, tp=2, pp=1, devices=[0, 1], **FP32) as llm:
        engine = llm.engine
        got = TokenLog()
        reports = []
        for tp, pp in [(1, 2), (2, 1)]:  # each switch with a fresh set of the requests live through it
            for i, prompt in enumerate(PROMPTS):
                engine.add_request(f"{tp}{pp}-{i}", prompt, LIVE_THROUGH)
            got.steps(engine, 4)
            report = SwitchReport(id=f"{tp}{pp}", source=str(engine.placement), target=f"TP{tp}PP{pp}")
            staged = StagedSwitch(engine, Topology(tp, pp), report, engine.links, StagingOptions())
            outputs = engine.quiesce() + staged.begin()  # as the daemon does: no micro-batch in flight
            while not staged.finished:
                outputs += engine.step() + staged.advance()
            got.add(outputs)
            assert report.state == "committed" and report.mode == "staged", (report.error, report.mode_reason)
            captured = [i["graph_capture_by_batch"] for i in engine.pool.call("info", workers=engine.active)]
            reports.append((report, captured))
            got.finish(engine)
    heads = [got[f"{tp}{pp}-{i}"][:GREEDY_LONG.max_tokens] for tp, pp in [(1, 2), (2, 1)] for i in range(len(PROMPTS))]
    assert heads == tokens + tokens
    for report, captured in reports:
        detail = (report.transform_detail, report.requests_live, captured)
        assert report.requests_live > 0 and report.kv_pool_kept, detail
        assert report.transform_detail["graph_precapture"] > report.transform_detail["graph_capture"], detail


def test_idle_engine_captures_the_graphs_a_switch_left_out(llama1b, fp32_reference):
    """After a live switch the idle AsyncEngine captures every bucket the commit left out (engine/graph_backfill.py):
    a later batch of a new size captures nothing lazily, and the tokens stay the reference's; a staged switch given
    up before its cut leaves the old stages their graphs."""
    need_gpus(2)
    tokens, _ = fp32_reference

    async def main():
        engine = await AsyncEngine.create(EngineConfig(str(llama1b), tp=2, pp=1, devices=[0, 1], **FP32))

        async def info():  # on the engine's thread: the idle loop calls the workers too
            return await engine.on_engine_thread(lambda: engine.engine.pool.call("info", workers=engine.engine.active))

        try:
            live, report = await serve(engine, PROMPTS[:2], GREEDY_LONG, "live", Topology(1, 2), "stop_the_world")
            await wait_backfilled(engine)
            backfilled = await info()
            later, _ = await serve(engine, PROMPTS, GREEDY_LONG, "later")  # micro-batches of 3: the bucket of 4
            infos = await info()
            # a staged switch given up before its cut: the old stages keep their graphs
            kept, given_up = await serve(engine, PROMPTS[:2], LIVE_THROUGH, "kept", Topology(2, 1), "staged",
                                         ("stage", "raise"))
            after = await info()
            return live + later + [t[:GREEDY_LONG.max_tokens] for t in kept], report, backfilled, infos, given_up, after
        finally:
            await engine.shutdown()

    got, report, backfilled, infos, given_up, after = asyncio.run(main())
    assert report.state == "committed" and report.requests_live > 0, report
    assert (given_up.state, given_up.mode) == ("rolled_back", "staged"), (given_up.error, given_up.mode_reason)
    assert got == tokens[:2] + tokens + tokens[:2]
    assert all(set(i["graph_capture_by_batch"]) == {1, 2, 4, 8, 16} for i in after), after
    assert all(set(i["graph_capture_by_batch"]) == {1, 2, 4, 8, 16} for i in backfilled), backfilled
    assert [i["graph_lazy_captures"] for i in infos] == [i["graph_lazy_captures"] for i in backfilled], infos
    assert all(i["graph_steps"] > 0 for i in infos), infos



def compiled_variants() -> dict[str, int]:
    """How many variants of each attention kernel Triton has compiled on this device."""
    from rempd.model import triton_kernels

    device = torch.cuda.current_device()
    return {name: len(getattr(triton_kernels, name).device_caches[device][0])
            for name in ("paged_attention", "paged_decode_split", "paged_decode_combine")}


def test_no_prefill_compiles_a_kernel_after_the_warmup():
    """Prefills with block tables 1, 2, 16, 19 and 32 blocks wide launch only what the start-up warm-up compiled
    (Triton once specialized a table width of 16, and each metadata alignment met with it compiled while serving)."""
    from rempd.engine.kv_cache import KVShape
    from rempd.model.config import ModelConfig
    from rempd.model.rotary import Rotary
    from rempd.worker_pool.kernel_warmup import RankWeights, WarmupShape, prefill_step, rank_widths, run_layer, \
        run_warmup
    from rempd.worker_pool.step_tensors import to_device

    need_gpus(1)
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=256, intermediate_size=512,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=2048,
                      rope_theta=10000.0)
    device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
    shape = WarmupShape(block_size=16, max_len=2048, max_batch=8)
    run_warmup(cfg, dtype, device, [1], shape)
    before = compiled_variants()
    widths = rank_widths(cfg, 1)
    kv_shape, num_blocks = KVShape(1, shape.block_size, widths.kv_heads, cfg.head_dim, dtype), 128
    kv = kv_shape.view(kv_shape.allocate(num_blocks, device), num_blocks)[0]
    weights, rotary = RankWeights.empty(cfg, widths, dtype, device), Rotary(cfg, shape.max_len, device)
    with torch.inference_mode():
        # widths 1, 16 and 32 in several alignments of the packed metadata (odd and even token counts, one and two
        # sequences), and widths the warm-up ran
        for lens in ([5], [256], [249], [512], [256, 249], [256, 300], [16, 17]):
            _ids, positions, samples, meta = to_device(prefill_step(lens, shape.block_size), device)
            run_layer(cfg, widths, weights, rotary, kv, positions, samples, meta, dtype)
    torch.cuda.synchronize()
    assert compiled_variants() == before
