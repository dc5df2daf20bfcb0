"""Where a model's files are: a local directory, or a Hugging Face Hub id (`ORG/NAME[@REVISION]`).

One resolution for the engine and for `harvest up`'s early check, so that a model the CLI
accepts is the model the workers load. The local Hugging Face cache is tried first (no
network round trip, and it works on an air-gapped node that was seeded); a download
follows only where the Hub may be reached. The environment is read at each call, not at
import, so `HF_HOME`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE` set by a test or an operator's
shell after import are honoured.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# what the engine loads: config, tokenizer files and safetensors weights, never pickled
# .bin weights, other frameworks' weights or a repo's remote code
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


class ModelUnavailable(ValueError):
    """The model named cannot be loaded from here; the message says why and what to do."""


@dataclass(frozen=True)
class ModelSource:
    """A parsed `--model`: a local directory (`repo_id` None) or a Hub repo at a revision."""

    spec: str
    repo_id: str | None = None
    revision: str | None = None  # None: the repo's default branch

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def served_name(self) -> str | None:
        """The name clients pass as `model` when none is given: the Hub id, as `vllm serve`
        does; None for a directory (the service keeps its own default)."""
        return self.repo_id


def parse_model(spec: str) -> ModelSource:
    """A local directory if one exists at `spec`, else a Hub id; neither: ModelUnavailable."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"{spec}: not a Hugging Face model directory (no config.json)")
        return ModelSource(spec=str(path))
    repo_id, _, revision = spec.partition("@")
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") > 1
    if looks_like_path or not REPO_ID.match(repo_id) or (revision == "" and "@" in spec):
        raise ModelUnavailable(
            f"{spec}: neither a local model directory nor a Hugging Face Hub id (ORG/NAME[@REVISION])"
        )
    return ModelSource(spec=spec, repo_id=repo_id, revision=revision or None)


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub uses: $HF_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub (~/.cache by default)."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    home = os.environ.get("HF_HOME")
    if home is None:
        home = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model(spec: str | Path) -> Path:
    """The local directory holding `spec`'s config, tokenizer and weights (downloaded if needed)."""
    source = parse_model(str(spec))
    if source.repo_id is None:
        return Path(source.spec)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    where = cache / f"models--{source.repo_id.replace('/', '--')}"
    at = f"@{source.revision}" if source.revision else ""
    try:
        path = snapshot_download(source.repo_id, revision=source.revision, cache_dir=cache,
                                 local_files_only=True)  # fmt: skip
    except LocalEntryNotFoundError:
        if hub_offline():
            download = f"HF_HUB_CACHE={cache} hf download {source.repo_id}" + (
                f" --revision {source.revision}" if source.revision else ""
            )
            raise ModelUnavailable(
                f"{source.repo_id}{at} is not in the Hugging Face cache ({where} is missing or has no "
                f"snapshot for that revision) and HF_HUB_OFFLINE=1 forbids a download: fetch it where "
                f"the Hub is reachable (`{download}`) or unset HF_HUB_OFFLINE"
            ) from None
        try:
            path = snapshot_download(source.repo_id, revision=source.revision, cache_dir=cache,
                                     allow_patterns=DOWNLOAD_PATTERNS)  # fmt: skip
        except Exception as exc:  # unreachable Hub, unknown repo or revision, gated repo, full disk
            raise ModelUnavailable(f"{source.repo_id}{at}: could not download into {cache}: {exc}") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"{source.repo_id}{at}: the snapshot at {path} has no config.json")
    return path
