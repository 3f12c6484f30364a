"""A checkpoint named by a Hugging Face hub id (``baidu/ERNIE-4.5-0.3B-PT``): its local snapshot,
from the Hugging Face cache when it is there (so it works offline, ``HF_HUB_OFFLINE=1``), else
downloaded into it. Only what a checkpoint needs is fetched: configs, weights, tokenizer files
(never the repository's remote code).
"""

from __future__ import annotations

import re
from pathlib import Path

HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")  # namespace/name


def looks_like_hub_id(name: str | Path) -> bool:
    """``namespace/name`` that is not a path on this machine."""
    return isinstance(name, str) and not Path(name).exists() and HUB_ID.fullmatch(name) is not None


def hub_snapshot(
    repo_id: str,
    what: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
) -> Path:
    """The directory of ``repo_id``'s snapshot; a FileNotFoundError naming ``what``, the id and HF_HOME
    when it is neither cached nor downloadable. The keywords are transformers' ``from_pretrained`` ones."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    where = dict(revision=revision, cache_dir=cache_dir, token=token)
    if not force_download:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **where))
        except HFValidationError:
            raise FileNotFoundError(f"{what} is neither a directory nor a hub id (namespace/name); pass an HF checkpoint directory") from None
        except FileNotFoundError:
            pass  # NOTE: not in the cache (LocalEntryNotFoundError)
    reason = "HF_HUB_OFFLINE is set, so nothing is downloaded" if constants.HF_HUB_OFFLINE else None
    if local_files_only:
        reason = "local_files_only=True, so nothing is downloaded"
    if reason is None:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, force_download=force_download, **where))
        except Exception as err:  # NOTE: network, authentication, a missing repo: all end in the same advice
            reason = f"downloading it failed: {' '.join(str(err).split())[:300]}"
    raise FileNotFoundError(
        f"{what} is not a local directory; as a hub id it is not in the Hugging Face cache "
        f"(HF_HOME={constants.HF_HOME}), and {reason}. Download it where there is a network "
        f"(`hf download {repo_id}`, with the same HF_HOME) or pass a local HF checkpoint directory"
    )
