"""Review 3: LLM(path) after the checkpoint at ``path`` changed serves the new weights. Engines are shared in the
process by their options, and the options only name the path: while any handle on the old engine was alive (the
old `llm` in a notebook: `llm = LLM(path)` makes the new handle before the old one is dropped; a LangChain model
built earlier), a fine-tune saved over the same folder was never loaded, and the old weights answered."""
from __future__ import annotations

import shutil

from tiny_models import write_tiny_checkpoint

from optimum_nvidia_core.llm import LLM
from optimum_nvidia_core.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_a_checkpoint_saved_over_the_same_folder_is_served(tiny_llama_dir, tmp_path):
    folder = shutil.copytree(tiny_llama_dir, tmp_path / "my-finetune")
    other = shutil.copytree(tiny_llama_dir, tmp_path / "other")
    weights = write_tiny_checkpoint(tmp_path / "seed1", "llama3", seed=1)[0] / "model.safetensors"
    shutil.copyfile(weights, other / "model.safetensors")
    old = LLM(str(folder), device="cpu", engine_process=False)
    try:
        before = old.generate([[5, 6, 7, 8]], GREEDY)[0].token_ids
        shutil.copyfile(other / "model.safetensors", folder / "model.safetensors")  # "trainer.save_model(folder)"
        fresh_engine = LLM(str(other), device="cpu", engine_process=False)  # what the new weights answer
        expected = fresh_engine.generate([[5, 6, 7, 8]], GREEDY)[0].token_ids
        fresh_engine.shutdown()
        assert expected != before, "the two random checkpoints must differ for this test"
        new = LLM(str(folder), device="cpu", engine_process=False)  # `old` is still alive
        try:
            assert new.generate([[5, 6, 7, 8]], GREEDY)[0].token_ids == expected
            assert old.generate([[5, 6, 7, 8]], GREEDY)[0].token_ids == before  # the old handle keeps its engine
        finally:
            new.shutdown()
    finally:
        old.shutdown()
