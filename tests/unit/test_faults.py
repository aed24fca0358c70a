"""Faults: one request's fault fails that request only; a dead engine thread fails every waiting caller within a
second and the next call starts a fresh engine; KeyboardInterrupt while streaming aborts cleanly; damaged or
half-written model and engine files are refused, never loaded. (Engine-cache damage of FP8 builds: see
test_engine_cache.py.)"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import threading
import time

import pytest
import torch

from optimum_nvidia_core import LLM, SamplingParams
from optimum_nvidia_core.request_stream import EngineError
from engine_idle import wait_idle
from fault_injection import use_faulty_runner

LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = [[5 + i, 40 + 3 * i, 77, 100 + i] for i in range(4)]


@pytest.fixture
def faults(monkeypatch):
    runner = use_faulty_runner(monkeypatch)
    yield runner
    runner.hook = None


@pytest.fixture
def llm(tiny_llama_dir, faults):
    """An engine on a thread of this process, so the faulty runner (a test double) is the one it uses."""
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=512, engine_process=False)
    yield llm
    llm.shutdown()


def _assert_idle_and_serving(llm: LLM) -> None:
    stats = wait_idle(llm)
    assert stats["running_requests"] == 0
    assert stats["free_blocks"] == stats["total_blocks"], "KV blocks leaked"
    assert len(llm.generate([PROMPTS[0]], GREEDY)[0].token_ids) == 10  # still serving


def _poison_requests(request_ids: set[str], value: float = float("nan")):
    """A fault hook that writes `value` into one logit of every row owned by a request in `request_ids`."""
    def hook(logits: torch.Tensor, seqs) -> None:
        for row, seq in enumerate(seqs):
            if seq.request_id in request_ids:
                logits[row, 7] = value
    return hook


# ---- one request's fault fails that request only ----------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_fail_that_request_only(llm, faults, value):
    expected = [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    victims: set[str] = set()
    faults.hook = _poison_requests(victims, value)
    victim = llm.stream(PROMPTS[0], LONG)
    others = [llm.stream(p, GREEDY) for p in PROMPTS[1:]]
    got = [next(victim) for _ in range(2)]  # it decodes normally, then its logits turn bad mid-stream
    victims.add(victim.request_id)
    with pytest.raises(EngineError, match="non-finite logits"):
        for delta in victim:
            got.append(delta)
    assert len(got) < LONG.max_tokens
    for stream, want in zip(others, expected[1:]):
        assert [t for d in stream for t in d.token_ids] == want  # the batch-mates are untouched
    assert llm.stats()["errors"] == 1
    faults.hook = None
    _assert_idle_and_serving(llm)


def test_non_finite_logits_in_the_first_token_fail_that_request(llm, faults):
    faults.hook = lambda logits, seqs: logits.fill_(float("nan"))
    with pytest.raises(EngineError, match="non-finite logits"):
        llm.generate([PROMPTS[1]], GREEDY)
    faults.hook = None
    _assert_idle_and_serving(llm)


def test_grammar_that_allows_no_token_fails_that_request_only(llm):
    # The grammar can only close the string '"a"' and stop, while min_tokens forbids stopping: no token is allowed.
    stuck = SamplingParams(max_tokens=10, min_tokens=8, temperature=0.0, guided_json={"const": "a"})
    expected = llm.generate([PROMPTS[2]], GREEDY)[0].token_ids
    stuck_stream = llm.stream(PROMPTS[1], stuck)
    other = llm.stream(PROMPTS[2], GREEDY)
    with pytest.raises(EngineError, match="grammar is complete after .* but min_tokens=8 forbids stopping"):
        list(stuck_stream)
    assert [t for d in other for t in d.token_ids] == expected
    guided = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=10, temperature=0.0, guided_json={"const": "a"}))
    assert json.loads(guided[0].text) == "a"  # the same grammar without the conflict works
    _assert_idle_and_serving(llm)


def test_model_step_exception_fails_the_batch_and_keeps_serving(llm, faults):
    calls = {"n": 0}

    def explode_once(logits, seqs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated CUDA error")

    faults.hook = explode_once
    with pytest.raises(EngineError, match="simulated CUDA error"):
        llm.generate([PROMPTS[3]], GREEDY)
    assert llm.generate([PROMPTS[3]], GREEDY)[0].finish_reason == "length"  # same engine, next step fine
    faults.hook = None
    _assert_idle_and_serving(llm)


# ---- the engine thread dies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("death", ["core_process_killed", "system_exit_on_the_engine_thread"])
def test_dead_engine_fails_every_waiting_caller_within_a_second(tiny_llama_dir, faults, death):
    in_process = death == "core_process_killed"
    llm = LLM(str(tiny_llama_dir), device="cpu", block_size=4, max_seq_len=512, engine_process=in_process)
    first = llm.stats()
    died_at: list[float] = []
    armed = threading.Event()

    def die(*_):
        if armed.is_set():
            died_at.append(time.monotonic())
            raise SystemExit("simulated fatal error")

    faults.hook = die

    # Waiting callers of every kind: sync streams on threads, async streams, a blocked generate().
    errors: dict[str, float] = {}

    def sync_reader(name, prompt):
        try:
            list(llm.stream(prompt, LONG))
        except EngineError:
            errors[name] = time.monotonic()

    async def async_readers():
        async def one(name, prompt):
            try:
                async for _ in llm.astream(prompt, LONG):
                    pass
            except EngineError:
                errors[name] = time.monotonic()
        await asyncio.gather(*(one(f"async{i}", p) for i, p in enumerate(PROMPTS)))

    threads = [threading.Thread(target=sync_reader, args=(f"sync{i}", p)) for i, p in enumerate(PROMPTS)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_readers())))
    threads.append(threading.Thread(target=_generate, args=(llm, errors)))
    for t in threads:
        t.start()
    time.sleep(0.5)  # everyone is waiting on a running engine
    if in_process:
        died_at.append(time.monotonic())
        os.kill(first["pid"], signal.SIGKILL)
    else:
        armed.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a caller hung after the engine died"
    assert died_at, "the fault never fired"
    assert sorted(errors) == sorted([f"sync{i}" for i in range(4)] + [f"async{i}" for i in range(4)] + ["generate"])
    assert max(errors.values()) - died_at[0] < 1.0
    with pytest.raises(EngineError, match="engine"):  # the dead worker refuses work it cannot do
        _submit_to_the_dead_worker(llm)
    # The next call starts a fresh engine.
    faults.hook = None
    out = llm.generate([PROMPTS[1]], GREEDY)[0]
    assert llm.stats()["requests"] == 1, "the dead engine was reused"
    assert len(out.token_ids) == 10
    _assert_idle_and_serving(llm)
    llm.shutdown()


def _generate(llm: LLM, errors: dict[str, float]) -> None:
    try:
        llm.generate([PROMPTS[2]], LONG)
    except EngineError:
        errors["generate"] = time.monotonic()


def _submit_to_the_dead_worker(llm: LLM) -> None:
    """Submit straight to the handle's dead worker, as a caller that raced the death would."""
    llm._worker.submit("late", PROMPTS[0], GREEDY)


# ---- KeyboardInterrupt while streaming -------------------------------------------------------------------------

def test_keyboard_interrupt_in_the_consumer_loop_aborts(llm):
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(llm.stream(PROMPTS[0], LONG)):
            if i == 3:
                raise KeyboardInterrupt
    _assert_idle_and_serving(llm)


def test_ctrl_c_while_waiting_for_the_next_token_aborts(llm, faults):
    """A real SIGINT while the main thread blocks in the stream (the engine is slowed down so it waits)."""
    faults.hook = lambda logits, seqs: time.sleep(0.05)
    # Python's own Ctrl-C handler, whatever an earlier test's library (an asyncio runner, say) left installed.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.4, os.kill, args=(os.getpid(), signal.SIGINT))
    received = []
    with pytest.raises(KeyboardInterrupt):
        for delta in llm.stream(PROMPTS[1], LONG):
            received.append(delta)
            if len(received) == 1:
                timer.start()
    timer.join()
    signal.signal(signal.SIGINT, previous)
    assert 1 <= len(received) < LONG.max_tokens
    faults.hook = None
    _assert_idle_and_serving(llm)


# ---- damaged files ---------------------------------------------------------------------------------------------

def test_truncated_checkpoint_weights_are_a_clear_error(tiny_llama_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        LLM(str(broken), device="cpu", max_seq_len=64)


def test_llm_save_round_trip(llm, tmp_path):
    saved = llm.save(tmp_path / "engine")
    served = LLM(str(saved), device="cpu", block_size=4, max_seq_len=64)
    try:
        assert served.generate([PROMPTS[0]], GREEDY)[0].token_ids == llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    finally:
        served.shutdown()


def test_saved_engine_with_edited_manifest_or_truncated_weights_is_refused(llm, tmp_path):
    from optimum_nvidia_core.build import EngineDirError
    from optimum_nvidia_core.build import engine_dir as engine_dir_module

    saved = llm.save(tmp_path / "engine")
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["model_name"] = "something else"
    (edited / "manifest.json").write_text(json.dumps(manifest))
    truncated = tmp_path / "truncated"
    shutil.copytree(saved, truncated)
    weights = next(p for p in truncated.glob("*.safetensors"))
    os.truncate(weights, weights.stat().st_size - 100)
    engine_dir_module._verified.clear()  # as in a fresh process: nothing verified yet
    with pytest.raises(EngineDirError, match="modified"):
        LLM(str(edited), device="cpu", block_size=4, max_seq_len=64)
    with pytest.raises(EngineDirError, match="truncated"):
        LLM(str(truncated), device="cpu", block_size=4, max_seq_len=64)
    served = LLM(str(saved), device="cpu", block_size=4, max_seq_len=64)  # the intact one loads and serves
    try:
        assert served.generate([PROMPTS[0]], GREEDY)[0].token_ids == llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    finally:
        served.shutdown()
    _assert_idle_and_serving(llm)
