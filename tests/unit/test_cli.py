"""The ``optimum-nvidia`` command, run as a subprocess on a tiny random LLaMA (CPU), with a private cache dir."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_nvidia_core.cli import build_parser, main

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cache: Path, stdin: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPTIMUM_NVIDIA_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "core"), str(REPO_ROOT)]))
    return subprocess.run([sys.executable, "-m", "optimum_nvidia_core", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["build"], ["chat"], ["bench"], ["info"], ["cache"], ["cache", "clear"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: optimum-nvidia" in capsys.readouterr().out


def test_parser_rejects_unknown_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["info", "--no-such-flag"])
    assert "unrecognized arguments" in capsys.readouterr().err
    assert build_parser().parse_args(["build", "m", "--fp8", "--output", "d"]).output == "d"


def test_build_info_and_cache_clear(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    (cache / "projects").mkdir(parents=True)  # a user's files in the folder $OPTIMUM_NVIDIA_CACHE points at
    (cache / "my_notes.txt").write_text("mine")
    (cache / "projects" / "code.py").write_text("print('mine')\n")
    calibration = tmp_path / "calib.txt"
    calibration.write_text("The quick brown fox jumps over the lazy dog.\nParis is the capital of France.\n")
    built = run_cli("build", str(tiny_llama_dir), "--fp8", "--device", "cpu", "--calibration", str(calibration),
                    "--calibration-samples", "2", "--calibration-max-length", "16", cache=cache)
    assert built.returncode == 0, built.stderr
    assert "Engine ready" in built.stdout
    engines = [p for p in cache.rglob("manifest.json")]
    assert len(engines) == 1, "the FP8 engine is cached under $OPTIMUM_NVIDIA_CACHE"

    info = run_cli("info", cache=cache)
    assert info.returncode == 0, info.stderr
    assert "FP8:" in info.stdout and str(cache) in info.stdout
    assert re.search(r"Cache: .* \(1 entries, [\d.]+ [KMG]iB\)", info.stdout), info.stdout
    assert "engine" in info.stdout

    cleared = run_cli("cache", "clear", cache=cache)
    assert cleared.returncode == 0 and "Removed 1 cache entries" in cleared.stdout, cleared.stdout
    assert not list(cache.rglob("manifest.json"))
    assert (cache / "my_notes.txt").read_text() == "mine" and (cache / "projects" / "code.py").is_file()
    assert "Left alone 2 path(s) that are not cache entries: my_notes.txt, projects" in cleared.stdout
    assert "(0 entries" in run_cli("info", cache=cache).stdout


def test_build_output_writes_a_loadable_engine(tiny_llama_dir, tmp_path):
    out = tmp_path / "engine"
    built = run_cli("build", str(tiny_llama_dir), "--device", "cpu", "--output", str(out), cache=tmp_path / "c")
    assert built.returncode == 0, built.stderr
    assert (out / "manifest.json").is_file()
    from optimum_nvidia_core import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    saved, original = LLM(str(out), device="cpu"), LLM(str(tiny_llama_dir), device="cpu")
    try:
        assert saved.generate([[5, 6, 7]], greedy)[0].token_ids == original.generate([[5, 6, 7]], greedy)[0].token_ids
    finally:
        saved.shutdown()
        original.shutdown()


def test_chat_streams_and_keeps_history(tiny_llama_dir, tmp_path):
    turns = "The quick brown fox\nParis is the capital\n/reset\nThe quick brown fox\n/exit\nnever read\n"
    chat = run_cli("chat", str(tiny_llama_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "4",
                   "-v", cache=tmp_path, stdin=turns)
    assert chat.returncode == 0, chat.stderr
    counts = [tuple(map(int, m)) for m in re.findall(r"\[(\d+) prompt tokens, (\d+) new tokens", chat.stderr)]
    assert len(counts) == 3, chat.stderr  # /exit stops before the last line
    (first_prompt, first_new), (second_prompt, _), (third_prompt, _) = counts
    assert second_prompt > first_prompt + first_new  # turn 2 sees turn 1 and its answer
    assert third_prompt == first_prompt  # /reset forgot them
    assert "(history cleared)" in chat.stdout
    before_reset, after_reset = chat.stdout.split("(history cleared)\n")
    assert before_reset.startswith(after_reset)  # greedy: after /reset the same question gets the same answer


def test_bench_builtin_prints_throughput(tiny_llama_dir, tmp_path):
    bench = run_cli("bench", "--builtin", "--model", str(tiny_llama_dir), "--device", "cpu", "--num-prompts", "3",
                    "--new-tokens", "4", cache=tmp_path)
    assert bench.returncode == 0, bench.stderr
    assert "3 requests" in bench.stdout and "12 output tokens" in bench.stdout
    assert re.search(r"throughput: [\d.]+ output tok/s", bench.stdout)


def test_bench_runs_the_benchmark_script_with_its_arguments(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("import sys\nprint('bench args:', sys.argv[1:])\nsys.exit(3)\n")
    bench = run_cli("bench", "--script", str(script), "--shapes", "7b", cache=tmp_path)
    assert "bench args: ['--shapes', '7b']" in bench.stdout
    assert bench.returncode == 3  # the script's exit status is the command's


def test_errors_are_one_line_with_the_fix(tmp_path):
    missing = run_cli("chat", str(tmp_path / "no-such-model"), cache=tmp_path, stdin="hi\n")
    assert missing.returncode == 1
    assert missing.stderr.strip().startswith("error:") and "Traceback" not in missing.stderr
    assert "does not exist" in missing.stderr


def test_chat_survives_an_over_long_line_and_a_conversation_that_outgrows_the_context(tiny_llama_dir, tmp_path):
    """Issue 15, item 13: the tiny model's context is 512 tokens. A line longer than that is refused with a
    message and the chat goes on; a conversation that outgrows the context drops its oldest turns, with a notice."""
    long_line = "The quick brown fox jumps over the lazy dog. " * 80  # ~900 tokens
    turn = "Paris is the capital of France; Berlin is the capital of Germany. " * 6  # ~150 tokens
    turns = [long_line, "The quick brown fox"] + [turn] * 6 + ["/exit"]
    chat = run_cli("chat", str(tiny_llama_dir), "--device", "cpu", "--temperature", "0", "--max-new-tokens", "4",
                   "-v", cache=tmp_path, stdin="\n".join(turns) + "\n")
    assert chat.returncode == 0, chat.stderr
    assert "Traceback" not in chat.stderr
    assert re.search(r"error: the prompt has \d+ tokens but max_seq_len is 512.*That message was not sent: send a "
                     r"shorter one", chat.stderr), chat.stderr
    prompts = [int(m) for m in re.findall(r"\[(\d+) prompt tokens, \d+ new tokens", chat.stderr)]
    assert len(prompts) == 7, chat.stderr  # every line but the over-long one got an answer
    assert "(the conversation outgrew the context: dropped the oldest turn)" in chat.stderr
    assert max(prompts) + 4 <= 512 and prompts[-1] < max(prompts)  # dropping made room, the chat went on
