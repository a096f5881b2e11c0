from __future__ import annotations

import asyncio
import random
import time

import pytest

from llama_mpi.mpi_server.engine.async_engine import AsyncEngine
from llama_mpi.mpi_server.engine.engine_api import EngineDeadError, EngineFullError
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from tests.mpi_server.fakes import FakeExecutor, make_engine, run_to_completion

EOS = 1


def workload(n: int = 16, seed: int = 0) -> dict[str, tuple[list[int], SamplingParams]]:
    """Prompts of mixed lengths, half on a shared 'system prompt', some sampled with seeds."""
    rng = random.Random(seed)
    system = [rng.randrange(2, 64) for _ in range(10)]
    reqs = {}
    for i in range(n):
        tail = [rng.randrange(2, 64) for _ in range(rng.randrange(1, 12))]
        prompt = system + tail if i % 2 == 0 else tail
        params = SamplingParams(max_tokens=rng.randrange(4, 12), temperature=0.0)
        if i % 4 == 3:
            params = SamplingParams(max_tokens=8, temperature=0.8, seed=1000 + i)
        reqs[f"r{i}"] = (prompt, params)
    return reqs


def alone(reqs, **executor_kw):
    """Reference: every request on its own, big pool, no prefix cache, one-shot prefill."""
    ref = {}
    for rid, req in reqs.items():
        ex = FakeExecutor(**{**executor_kw, "num_blocks": 64})
        eng = make_engine(ex, n_parallel=1, enable_prefix_caching=False)
        ref.update(run_to_completion(eng, {rid: req}))
    return {rid: (ids, text) for rid, (ids, text, _) in ref.items()}


def together(reqs, executor: FakeExecutor, **config):
    eng = make_engine(executor, **config)
    res = run_to_completion(eng, reqs)
    return eng, {rid: (ids, text) for rid, (ids, text, _) in res.items()}


def test_16_requests_over_4_slots_match_running_alone() -> None:
    reqs = workload()
    eng, got = together(reqs, FakeExecutor(num_blocks=64), n_parallel=4, max_queue=16)
    assert got == alone(reqs)
    assert max(eng.executor.batch_sizes) > 1  # requests really were batched


@pytest.mark.parametrize(
    "name, num_blocks, config",
    [
        ("prefix cache", 64, dict(enable_prefix_caching=True)),
        ("tiny pool, preemption", 10, dict(enable_prefix_caching=True)),
        ("tiny pool, no cache", 10, dict(enable_prefix_caching=False)),
        ("chunked prefill", 64, dict(n_batch=3)),
        ("chunked + tiny pool", 10, dict(n_batch=5)),
    ],
)
def test_prefix_reuse_preemption_and_chunking_do_not_change_outputs(name, num_blocks, config):
    reqs = workload(seed=1)
    executor = FakeExecutor(num_blocks=num_blocks, max_model_len=40, banned=(EOS,))
    eng, got = together(reqs, executor, n_parallel=4, max_queue=16, **config)
    assert got == alone(reqs, max_model_len=40, banned=(EOS,)), name
    if num_blocks == 10:
        assert eng.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    if config.get("enable_prefix_caching"):
        assert eng.block_manager.prefix_hits > 0
    assert eng.block_manager.num_used_blocks == 0


def test_next_chat_turn_reuses_the_previous_turn() -> None:
    eng = make_engine(FakeExecutor(banned=(EOS,)))
    first = [5, 6, 7, 8, 9, 10, 11]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    (ids, _, out1), = run_to_completion(eng, {"t1": (first, params)}).values()
    assert out1.cached_prompt_tokens == 0
    second = first + ids + [20, 21, 22]
    (ids2, _, out2), = run_to_completion(eng, {"t2": (second, params)}).values()
    assert out2.cached_prompt_tokens == 12  # (7 + 6 tokens of the 1st turn) // 4 * 4
    ref = alone({"t2": (second, params)}, banned=(EOS,))["t2"][0]
    assert ids2 == ref


def test_the_same_tokens_at_another_position_are_not_reused() -> None:
    block = [11, 12, 13, 14]
    reqs = {
        "first": ([5, 6, 7, 8] + block + [9], SamplingParams(max_tokens=4, temperature=0.0)),
        "moved": (block + [9, 9], SamplingParams(max_tokens=4, temperature=0.0)),
    }
    eng = make_engine(FakeExecutor(banned=(EOS,)), n_parallel=1)
    got = {rid: run_to_completion(eng, {rid: r})[rid][0] for rid, r in reqs.items()}
    assert got == {rid: ids for rid, (ids, _) in alone(reqs, banned=(EOS,)).items()}
    assert eng.block_manager.prefix_hits == 0


def counting(ctx: list[int]) -> int:
    """Scripted model: 2 'he', 3 'llo', 4 ' wor', 5 'ld', 6 '!', 7 ' a', 8 'b', 9 'c', 2 ..."""
    return ctx[-1] + 1 if 2 <= ctx[-1] < 9 else 2


def stream(eng, rid, prompt, params):
    eng.add_request(rid, prompt, params)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    return outs


def test_stop_string_split_across_tokens_is_never_leaked() -> None:
    eng = make_engine(FakeExecutor(next_token=counting))
    outs = stream(eng, "s", [2], SamplingParams(max_tokens=20, temperature=0.0, stop=["o w"]))
    assert [o.new_text for o in outs] == ["ll", ""]  # "o" held back, then dropped
    assert outs[-1].finish_reason == "stop" and outs[-1].new_token_ids == [4]
    assert outs[-1].completion_tokens == 2


def test_held_text_is_released_when_the_stop_string_does_not_follow() -> None:
    eng = make_engine(FakeExecutor(next_token=counting))
    outs = stream(eng, "s", [2], SamplingParams(max_tokens=4, temperature=0.0, stop=["o x", "!!"]))
    assert [o.new_text for o in outs] == ["ll", "o wor", "ld", "!"]  # last: flushed at length
    assert outs[-1].finish_reason == "length"


def test_stop_string_spanning_three_tokens() -> None:
    eng = make_engine(FakeExecutor(next_token=counting))
    outs = stream(eng, "s", [2], SamplingParams(max_tokens=20, temperature=0.0, stop=["rld! a"]))
    assert "".join(o.new_text for o in outs) == "llo wo"
    assert outs[-1].finish_reason == "stop"


def test_eos_stop_token_ids_and_ignore_eos() -> None:
    def eos_after_3(ctx):
        return EOS if len(ctx) >= 4 else 2 + len(ctx)

    ex = FakeExecutor(next_token=eos_after_3)
    outs = stream(make_engine(ex), "e", [2], SamplingParams(max_tokens=10, temperature=0.0))
    assert outs[-1].finish_reason == "stop" and outs[-1].completion_tokens == 4
    assert "".join(o.new_text for o in outs) == "llo world"  # no EOS text
    p = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = stream(make_engine(ex), "e", [2], p)
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 6
    p = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[5])
    outs = stream(make_engine(ex), "e", [2], p)
    assert outs[-1].finish_reason == "stop" and outs[-1].new_token_ids == [5]


def test_max_tokens_and_context_limit_finish_with_length() -> None:
    ex = FakeExecutor(max_model_len=16, banned=(EOS,))
    outs = stream(make_engine(ex), "m", [3, 4, 5], SamplingParams(max_tokens=5))
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 5
    ex = FakeExecutor(max_model_len=16, banned=(EOS,))
    outs = stream(make_engine(ex), "c", list(range(2, 12)), SamplingParams(max_tokens=100))
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 6


def test_prompt_too_long_and_queue_full() -> None:
    eng = make_engine(FakeExecutor(max_model_len=16), n_parallel=1, max_queue=1)
    with pytest.raises(ValueError, match="prompt has 16 tokens; the context holds 16"):
        eng.add_request("x", list(range(2, 18)), SamplingParams())
    eng.add_request("a", [2, 3], SamplingParams())
    eng.add_request("b", [2, 3], SamplingParams())
    with pytest.raises(EngineFullError):
        eng.add_request("c", [2, 3], SamplingParams())
    with pytest.raises(ValueError, match="already"):
        eng.add_request("a", [2, 3], SamplingParams())


def test_abort_frees_blocks_and_slot_at_once() -> None:
    eng = make_engine(FakeExecutor(banned=(EOS,)), n_parallel=2)
    eng.add_request("a", list(range(2, 12)), SamplingParams(max_tokens=50))
    eng.add_request("b", [2, 3, 4], SamplingParams(max_tokens=50))
    eng.step()
    eng.step()
    used_by_b = len(eng.scheduler.slots[1].block_table)
    out = eng.abort("a")
    assert out.finished and out.finish_reason == "abort"
    assert eng.block_manager.num_used_blocks == used_by_b
    assert [s.state for s in eng.slots()] == ["idle", "decode"]
    assert eng.abort("a") is None
    eng.abort("b")
    assert eng.block_manager.num_used_blocks == 0 and not eng.has_unfinished()


def test_logprobs_and_timings() -> None:
    eng = make_engine(FakeExecutor(next_token=counting))
    p = SamplingParams(max_tokens=3, temperature=0.0, logprobs=True, top_logprobs=2)
    outs = stream(eng, "l", [2], p)
    lp = outs[0].logprobs[0]
    assert (lp.token_id, lp.text) == (3, "llo") and lp.logprob == pytest.approx(0.0, abs=1e-3)
    assert len(lp.top) == 2 and lp.top[0][:2] == (3, "llo") and lp.top[1][2] < lp.top[0][2]
    last = outs[-1]
    assert last.time_to_first_token is not None and last.decode_seconds >= 0
    assert last.prompt_seconds >= 0 and outs[0].time_to_first_token is None
    eng = make_engine(FakeExecutor(next_token=counting), no_perf=True)
    outs = stream(eng, "l", [2], SamplingParams(max_tokens=2))
    assert outs[-1].time_to_first_token is None and outs[-1].logprobs == []


# -- AsyncEngine --------------------------------------------------------------------------------


async def collect(engine: AsyncEngine, rid, prompt, params):
    ids, text, last = [], "", None
    async for out in engine.generate(rid, prompt, params):
        ids += out.new_token_ids
        text += out.new_text
        last = out
    return ids, text, last


def test_async_streaming_matches_sync() -> None:
    reqs = workload(8, seed=2)

    async def main():
        eng = AsyncEngine(make_engine(FakeExecutor(banned=(EOS,)), n_parallel=4, max_queue=8))
        res = await asyncio.gather(*(collect(eng, rid, *req) for rid, req in reqs.items()))
        stats = eng.stats()
        await eng.shutdown()
        return res, stats, eng

    res, stats, eng = asyncio.run(main())
    got = {rid: (ids, text) for rid, (ids, text, _) in zip(reqs, res, strict=True)}
    assert got == alone(reqs, banned=(EOS,))
    assert all(last.finished for *_, last in res)
    assert stats.running == 0 and stats.kv_blocks_used == 0
    assert eng.engine.executor.shut_down


def test_async_client_disconnect_aborts_and_idle_thread_sleeps() -> None:
    async def main():
        eng = AsyncEngine(make_engine(FakeExecutor(banned=(EOS,)), n_parallel=2))
        agen = eng.generate("gone", [2, 3, 4], SamplingParams(max_tokens=10_000))
        first = await agen.__anext__()
        assert not first.finished
        await agen.aclose()  # the client went away
        for _ in range(200):
            if not eng.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        slots, used = eng.slots(), eng.stats().kv_blocks_used
        calls = eng.engine.executor.calls
        await asyncio.sleep(0.2)  # idle: no steps, no spinning
        idle_calls = eng.engine.executor.calls - calls
        await eng.shutdown()
        return slots, used, idle_calls

    slots, used, idle_calls = asyncio.run(main())
    assert [s.state for s in slots] == ["idle", "idle"] and used == 0 and idle_calls == 0


def test_async_explicit_abort_ends_the_stream() -> None:
    async def main():
        eng = AsyncEngine(make_engine(FakeExecutor(banned=(EOS,))))
        agen = eng.generate("a", [2, 3], SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        eng.abort("a")
        outs = [o async for o in agen]
        await eng.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"


def slowed(ex: FakeExecutor, seconds: float = 0.005) -> FakeExecutor:
    real = ex.execute

    def execute(batch):
        time.sleep(seconds)
        return real(batch)

    ex.execute = execute
    return ex


def test_async_errors_at_submission() -> None:
    async def main():
        ex = slowed(FakeExecutor(banned=(EOS,)))  # 'a' outlives the test: ~250 slow steps
        eng = AsyncEngine(make_engine(ex, n_parallel=1, max_queue=0))
        with pytest.raises(ValueError, match="prompt has 300 tokens; the context holds 256"):
            await eng.generate("x", [2] * 300, SamplingParams()).__anext__()
        long_run = eng.generate("a", [2, 3], SamplingParams(max_tokens=10_000))
        await long_run.__anext__()
        with pytest.raises(EngineFullError):
            await eng.generate("b", [2, 3], SamplingParams()).__anext__()
        await long_run.aclose()
        await eng.shutdown()

    asyncio.run(main())


def test_async_step_failure_fails_everyone_and_marks_dead() -> None:
    async def main():
        ex = FakeExecutor(banned=(EOS,))
        ex.fail_on_call = 3
        eng = AsyncEngine(make_engine(ex, n_parallel=2))
        res = await asyncio.gather(
            *(collect(eng, f"r{i}", [2, 3, 4], SamplingParams(max_tokens=50)) for i in range(3))
        )
        with pytest.raises(EngineDeadError):
            await eng.generate("late", [2], SamplingParams()).__anext__()
        await eng.shutdown(drain_timeout=0.1)
        return res

    res = asyncio.run(main())
    for _, _, last in res:
        assert last.finished and last.finish_reason == "error" and "rank 3 died" in last.error


def test_async_shutdown_drains_then_aborts() -> None:
    async def main():
        slow = slowed(FakeExecutor(banned=(EOS,)))
        eng = AsyncEngine(make_engine(slow))
        short = asyncio.create_task(collect(eng, "short", [2], SamplingParams(max_tokens=3)))
        endless = asyncio.create_task(
            collect(eng, "endless", [2], SamplingParams(max_tokens=100_000))
        )
        await asyncio.sleep(0.05)
        await eng.shutdown(drain_timeout=0.2)
        with pytest.raises(EngineDeadError):
            await eng.generate("late", [2], SamplingParams()).__anext__()
        return await short, await endless, slow

    short, endless, ex = asyncio.run(main())
    assert short[2].finish_reason == "length"
    assert endless[2].finish_reason == "abort"
    assert ex.shut_down


def test_with_the_real_sampler_tokenizer_and_detokenizer() -> None:
    from llama_mpi.models.gguf.builtin_vocab import builtin_vocab
    from llama_mpi.models.tokenizer.tokenizer import Tokenizer
    from llama_mpi.mpi_server.engine.engine import Engine, EngineConfig

    tok = Tokenizer.from_metadata(builtin_vocab(vocab_size=512, n_merges=200))
    ex = FakeExecutor(vocab_size=512, banned=tuple(tok.eos_ids))
    eng = Engine(ex, tok, EngineConfig(n_parallel=2))  # default Sampler and detokenizer
    prompt = tok.encode("hello world", add_bos=True)
    reqs = {
        "greedy": (prompt, SamplingParams(max_tokens=12, temperature=0.0, logprobs=True)),
        "seeded": (prompt, SamplingParams(max_tokens=12, temperature=0.9, seed=7, top_k=40)),
    }
    res = run_to_completion(eng, reqs)
    for ids, text, final in res.values():
        assert final.finish_reason == "length" and len(ids) == 12
        assert text == tok.decode(ids)
    again = run_to_completion(Engine(ex, tok, EngineConfig(n_parallel=2)), reqs)
    assert again["seeded"][0] == res["seeded"][0]  # per-request seeded generator
    assert again["greedy"][2].cached_prompt_tokens == 0  # a fresh engine, a fresh cache


@pytest.mark.parametrize("wait_s,first_step_prompts", [(0.05, 2), (0.0, 1)])
def test_async_idle_engine_batches_a_burst_of_prompts(wait_s, first_step_prompts) -> None:
    """Waking from idle, the engine lets a burst finish so its prompts share the first step;
    with batch_wait 0 it starts with the first prompt alone."""
    async def main():
        ex = slowed(FakeExecutor(banned=(EOS,)))
        eng = AsyncEngine(make_engine(ex, n_parallel=4), batch_wait_s=wait_s)
        first = asyncio.create_task(collect(eng, "a", [2, 3, 4, 5], SamplingParams(max_tokens=2)))
        await asyncio.sleep(0.01)  # the second prompt of the burst, 10 ms later
        second = asyncio.create_task(collect(eng, "b", [6, 7, 8], SamplingParams(max_tokens=2)))
        await first, await second
        await eng.shutdown(drain_timeout=0.1)
        return ex

    ex = asyncio.run(main())
    assert ex.batch_sizes[0] == (7 if first_step_prompts == 2 else 4)
