"""Pushing a stage's trained model to the Hugging Face hub (`hub.*`), through `huggingface_hub`."""

from __future__ import annotations

import os
from pathlib import Path

from pbkd_cli.config.schema import HubConfig
from pbkd_cli.io import PbkdError


def hub_api(hub: HubConfig):
    """An authenticated `HfApi`, the token from `hub.token_env` (never from the config)."""
    from huggingface_hub import HfApi

    token = os.environ.get(hub.token_env)
    if not token:
        raise PbkdError(f"hub.token_env={hub.token_env}: the environment variable is unset or empty; "
                        f"export a Hugging Face write token there to push to hub.repo_id={hub.repo_id}")
    return HfApi(token=token)


def prepare_repo(hub: HubConfig) -> None:
    """Create the repository (and branch) before the stage trains, so that a bad token, name or network
    fails in one line at the start rather than after the training it would have lost."""
    api = hub_api(hub)
    try:
        api.create_repo(hub.repo_id, private=hub.private, repo_type="model", exist_ok=True)
        if hub.revision is not None:
            api.create_branch(hub.repo_id, branch=hub.revision, repo_type="model", exist_ok=True)
    except Exception as exc:  # huggingface_hub raises HTTP, connection and validation errors alike
        raise PbkdError(f"hub.repo_id={hub.repo_id}: cannot create or reach the repository: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def push_model(hub: HubConfig, model_dir: Path, message: str) -> str:
    """Upload `model_dir` (weights, config, tokenizer, LoRA adapter) as one commit; returns its URL."""
    if not (model_dir / "config.json").is_file():
        raise PbkdError(f"hub.repo_id={hub.repo_id}: {model_dir} holds no saved model to push")
    try:
        commit = hub_api(hub).upload_folder(repo_id=hub.repo_id, folder_path=str(model_dir), repo_type="model",
                                            revision=hub.revision, commit_message=message)
    except PbkdError:
        raise
    except Exception as exc:
        raise PbkdError(f"hub.repo_id={hub.repo_id}: the push of {model_dir} failed (the model is saved there; "
                        f"`huggingface-cli upload {hub.repo_id} {model_dir}` retries it): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return str(getattr(commit, "commit_url", commit))
