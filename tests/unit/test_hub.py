"""Pushing a trained model to the Hugging Face hub, with `huggingface_hub.HfApi` replaced by a recorder."""

from __future__ import annotations

import json

import huggingface_hub
import pytest

from pbkd_cli.config.compose import ConfigError, compose, to_typed
from pbkd_cli.config.schema import HubConfig
from pbkd_cli.hub import prepare_repo, push_model
from pbkd_cli.io import PbkdError
from tests.e2e.conftest import TINY


class RecordingApi:
    calls: list = []
    fail: Exception | None = None

    def __init__(self, token=None):
        self.calls.append(("token", token))

    def create_repo(self, repo_id, **kwargs):
        if self.fail:
            raise self.fail
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in __import__("pathlib").Path(kwargs["folder_path"]).iterdir())
        self.calls.append(("upload_folder", kwargs, files))
        return type("Commit", (), {"commit_url": f"https://hub.test/{kwargs['repo_id']}/commit/1"})()


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls, RecordingApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("PBKD_TEST_HF_TOKEN", "hf_secret")
    return RecordingApi


HUB = HubConfig(repo_id="me/student", token_env="PBKD_TEST_HF_TOKEN")


def test_the_token_comes_from_its_environment_variable_or_the_push_fails_in_one_line(api, monkeypatch):
    prepare_repo(HUB)
    assert api.calls[0] == ("token", "hf_secret")
    assert api.calls[1] == ("create_repo", "me/student", {"private": True, "repo_type": "model", "exist_ok": True})
    monkeypatch.delenv("PBKD_TEST_HF_TOKEN")
    with pytest.raises(PbkdError, match=r"^hub.token_env=PBKD_TEST_HF_TOKEN: the environment variable is unset"):
        prepare_repo(HUB)


def test_a_repository_the_hub_refuses_is_one_line_before_training(api):
    api.fail = OSError("401 Client Error: Unauthorized\nmore detail")
    with pytest.raises(PbkdError, match=r"^hub.repo_id=me/student: cannot create or reach the repository: 401 Client "
                                        r"Error: Unauthorized$"):
        prepare_repo(HUB)


def test_push_uploads_the_model_folder_to_the_branch(api, tmp_path):
    with pytest.raises(PbkdError, match="holds no saved model"):
        push_model(HUB, tmp_path, "m")
    (tmp_path / "config.json").write_text("{}")
    hub = HubConfig(repo_id="me/student", revision="seed-0", token_env="PBKD_TEST_HF_TOKEN")
    prepare_repo(hub)
    assert push_model(hub, tmp_path, "pbkd sft") == "https://hub.test/me/student/commit/1"
    (_, upload, files), = [c for c in api.calls if c[0] == "upload_folder"]
    assert upload == {"repo_id": "me/student", "folder_path": str(tmp_path), "repo_type": "model",
                      "revision": "seed-0", "commit_message": "pbkd sft"}
    assert ("create_branch", "me/student", {"branch": "seed-0", "repo_type": "model", "exist_ok": True}) in api.calls


def test_stages_without_one_trained_model_refuse_a_push():
    for stage in ("pipeline", "online", "eval", "collect_prefs"):
        with pytest.raises(ConfigError, match=rf"^hub.repo_id=me/x: stage {stage} trains no one model"):
            to_typed(compose([f"stage={stage}", "hub.repo_id=me/x"]))
    assert to_typed(compose(["stage=sft", "hub.repo_id=me/x"])).hub.repo_id == "me/x"


def test_sft_pushes_its_saved_model_and_never_writes_the_token(api, tmp_path):
    from pbkd_cli.runner import run_stage

    cfg = to_typed(compose(["stage=sft", *TINY, "trainer.max_steps=2", "hub.repo_id=me/student",
                            "hub.token_env=PBKD_TEST_HF_TOKEN"]))
    summary = run_stage(cfg, tmp_path, [])
    (_, upload, files), = [c for c in api.calls if c[0] == "upload_folder"]
    assert upload["folder_path"] == str(tmp_path / "model") and "model.safetensors" in files
    assert json.loads((tmp_path / "summary.json").read_text())["hub_repo_id"] == summary["hub_repo_id"] == "me/student"
    written = "".join(p.read_text(errors="ignore") for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".safetensors")
    assert "hf_secret" not in written
