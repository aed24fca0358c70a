"""Host fast paths of the engine step: greedy batches build no sampling tensors, one async wake-up per loop."""
import asyncio

import torch

from optimum_nvidia_core.engine.sequence import Sequence
from optimum_nvidia_core.layers.sampler import Sampler, SamplingBatch
from optimum_nvidia_core.layers.sampling_table import sampling_batch
from optimum_nvidia_core.outputs import RequestOutput
from optimum_nvidia_core.request_stream import RequestStream, Wakeups
from optimum_nvidia_core.sampling_params import SamplingParams


def test_an_all_greedy_batch_builds_no_tensors_and_takes_the_argmax():
    seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(temperature=0.0)) for i in range(3)]
    batch = sampling_batch(seqs, "cpu", [2])
    assert batch.all_greedy and batch.temperature is None and batch.seeds is None
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    assert torch.equal(Sampler()(logits, batch).token_ids, logits.argmax(dim=-1))


def test_a_mixed_batch_gets_each_rows_parameters_from_the_packed_copy():
    greedy = Sequence("g", [1, 2], SamplingParams(temperature=0.0), seed=5)
    sampled = Sequence("s", [1, 2, 3], SamplingParams(temperature=0.7, top_k=4, presence_penalty=0.5), seed=9)
    batch = sampling_batch([greedy, sampled], "cpu", [2])
    assert batch.temperature.tolist() == [1.0, torch.tensor(0.7).item()]
    assert batch.is_greedy.tolist() == [True, False]
    assert batch.top_k.tolist() == [0, 4] and batch.seeds.tolist() == [5, 9] and batch.positions.tolist() == [2, 3]
    assert batch.presence_penalty.tolist() == [0.0, 0.5] and batch.top_k_top_p_rows.tolist() == [1]


def test_one_step_wakes_each_event_loop_once_and_every_reader_gets_its_delta():
    async def main():
        loop = asyncio.get_running_loop()
        streams = [RequestStream(f"r{i}", lambda _: None) for i in range(5)]
        readers = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.sleep(0)  # every reader now waits on its future
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: calls.append(args) or real(*args)
        wakeups = Wakeups()
        for s in streams:
            s.put(RequestOutput(request_id=s.request_id, text="x", token_ids=[7]), wakeups)
        assert calls == []  # nothing sent before the step's end
        wakeups.send()
        outs = await asyncio.wait_for(asyncio.gather(*readers), 5)
        assert len(calls) == 1 and [o.request_id for o in outs] == [s.request_id for s in streams]

    asyncio.run(main())
