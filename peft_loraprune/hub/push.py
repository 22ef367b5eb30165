"""Uploading a LoRAPrune adapter with its model card.

``PeftModel.push_to_hub`` (transformers' ``PushToHubMixin``) uploads the adapter files, masks included, but in
transformers 5.x it replaces the ``README.md`` that ``save_pretrained`` wrote with the Hub repository's card (or a
generic template), so the LoRAPrune section is lost. :func:`push_to_hub` saves the adapter exactly as
``save_pretrained`` does (adapter_config.json, adapter_model.safetensors, README.md with the LoRAPrune section) and
uploads that folder unchanged with ``huggingface_hub``.
"""

from __future__ import annotations

import tempfile
from typing import Optional

from huggingface_hub import HfApi

from ..lookup import find_tuner


def push_to_hub(
    model,
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload LoRAPrune adapter",
    revision: Optional[str] = None,
    create_pr: bool = False,
    api: Optional[HfApi] = None,
):
    """Save ``model`` (a LoRAPrune ``PeftModel``) and upload the folder to ``repo_id``; returns the commit info."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string such as 'user/my-adapter', got {repo_id!r}.")
    find_tuner(model, "push_to_hub")  # a clear TypeError for anything else
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"push_to_hub expects the PeftModel itself (it saves it), got {type(model).__name__}.")
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, token=token).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            token=token,
        )
