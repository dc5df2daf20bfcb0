"""Models by Hugging Face Hub id: a cache laid out by hand exactly as huggingface_hub lays it
out (blobs, snapshots of symlinks, refs), with and without HF_HUB_OFFLINE."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from harvest.engine import SamplingParams
from harvest.models.resolve import ModelUnavailable, hub_cache_dir, parse_model, resolve_model
from tests.helpers import make_engine, make_prompts

REPO = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_hub_cache(cache: Path, repo_id: str, model_dir: Path, commit: str = COMMIT,
                     ref: str | None = "main") -> Path:  # fmt: skip
    """`model_dir`'s files as huggingface_hub caches a download of `repo_id` at `commit`:
    blobs named by content hash, `snapshots/<commit>/` symlinks to them, `refs/<ref>`."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            blob = repo / "blobs" / digest
            if not blob.exists():
                shutil.copyfile(f, blob)
            (snapshot / f.name).symlink_to(Path("..", "..", "blobs", digest))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model) -> Path:
    """An HF_HOME whose hub cache holds the tiny model as REPO (main); offline by default."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hf" / "hub"
    add_to_hub_cache(cache, REPO, tiny_model)
    return cache


def test_hub_id_resolves_to_the_cached_snapshot_offline(hub_cache, tiny_model):
    assert hub_cache_dir() == hub_cache
    path = resolve_model(REPO)
    assert path == hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (path / "config.json").read_bytes() == (tiny_model / "config.json").read_bytes()


def test_absent_model_offline_is_a_clear_error_naming_the_cache_path(hub_cache):
    with pytest.raises(ModelUnavailable) as err:
        resolve_model("tiny-org/absent")
    message = str(err.value)
    assert str(hub_cache / "models--tiny-org--absent") in message and "HF_HUB_OFFLINE" in message


def test_cached_model_needs_no_network_when_online_and_an_absent_one_says_the_download_failed(
    hub_cache, monkeypatch
):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    # a Hub that refuses connections: a cached model must not need it, an absent one fails fast
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    assert resolve_model(REPO).name == COMMIT
    with pytest.raises(ModelUnavailable) as err:
        resolve_model("tiny-org/absent")
    assert "could not download" in str(err.value) and str(hub_cache) in str(err.value)


def test_revision_picks_its_snapshot_by_ref_or_by_commit(hub_cache, tiny_models):
    other = "fedcba9876543210fedcba9876543210fedcba98"
    add_to_hub_cache(hub_cache, REPO, tiny_models["qwen2"], commit=other, ref="v2")
    assert parse_model(f"{REPO}@v2").revision == "v2"
    assert resolve_model(f"{REPO}@v2").name == other
    assert resolve_model(f"{REPO}@{other}").name == other
    assert resolve_model(REPO).name == COMMIT  # main is unchanged
    with pytest.raises(ModelUnavailable, match="@v3"):
        resolve_model(f"{REPO}@v3")


@pytest.mark.parametrize("spec", ["./no/such/dir", "/no/such/dir", "a/b/c", "org/name@", "bad id/x"])
def test_neither_a_directory_nor_a_hub_id_is_refused(spec, hub_cache):
    with pytest.raises(ModelUnavailable, match="neither a local model directory nor a Hugging Face Hub id"):
        parse_model(spec)


def test_engine_from_hub_id_generates_what_it_does_from_the_directory(hub_cache, tiny_model):
    by_dir = make_engine(tiny_model, max_num_seqs=4)
    by_id = make_engine(REPO, max_num_seqs=4)
    prompts = make_prompts(by_dir, [5, 12, 20])
    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = [o.token_ids for o in by_dir.generate(prompts, params)]
    assert [o.token_ids for o in by_id.generate(prompts, params)] == expected
    assert by_id.config.dtype == "float32"  # the default "auto" on CPU


def test_dtype_auto_is_float32_on_cpu_and_a_kv_fraction_needs_cuda(tiny_model):
    assert make_engine(tiny_model, dtype="auto", num_blocks=8).config.dtype == "float32"
    with pytest.raises(ValueError, match="needs CUDA"):
        make_engine(tiny_model, kv_cache_fraction=0.5)
