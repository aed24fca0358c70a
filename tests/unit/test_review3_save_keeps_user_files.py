"""Review 3: writing an engine directory never deletes files the user owns.

`LLM.save(DIR)` / `optimum-nvidia build --output DIR` replace an existing engine directory at DIR. A directory is
taken for an engine directory when it merely holds a file named manifest.json, so a user's project folder with a
manifest.json of its own (a web app, a browser extension) was wiped whole, and so were the user's own files put
next to an engine's files."""
from __future__ import annotations

import json

import pytest

from optimum_nvidia_core.build import builder


def _write_weights(tmp):
    (tmp / builder.WEIGHTS_NAME).write_bytes(b"weights")
    return {"k": [1.0], "v": [1.0]}


def _manifest():
    return {"identity": {"format_version": 1, "recipe": {}}, "model_name": "m", "source_dir": "src"}


@pytest.fixture
def src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return src


def test_a_folder_with_a_foreign_manifest_json_is_not_replaced(src, tmp_path):
    project = tmp_path / "my-web-app"
    project.mkdir()
    (project / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/"}))
    (project / "index.html").write_text("<html>years of work</html>")
    with pytest.raises(FileExistsError, match="not an engine directory"):
        builder.write_engine_dir(src, project, _manifest(), _write_weights)
    assert (project / "index.html").read_text() == "<html>years of work</html>"


def test_files_the_user_added_to_an_engine_dir_are_not_deleted(src, tmp_path):
    out = tmp_path / "engine"
    builder.write_engine_dir(src, out, _manifest(), _write_weights)
    (out / "my_eval_results.csv").write_text("prompt,score\n")
    with pytest.raises(FileExistsError, match="my_eval_results.csv"):
        builder.write_engine_dir(src, out, _manifest(), _write_weights)
    assert (out / "my_eval_results.csv").is_file()


def test_an_engine_dir_is_still_replaced(src, tmp_path):
    out = tmp_path / "engine"
    builder.write_engine_dir(src, out, _manifest(), _write_weights)
    builder.write_engine_dir(src, out, _manifest(), _write_weights)  # saving again over our own engine: fine
    assert (out / builder.WEIGHTS_NAME).read_bytes() == b"weights"
