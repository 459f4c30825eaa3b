"""Hub ids with the hub out of reach: the CLI as a user runs it, with HF_ENDPOINT at a closed local port (nothing
listens on the discard port) and a private cache. Before, each hub id took 30-50 s of retry messages."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from conftest import ForkedCli, embedded_records, write_jsonl

CLOSED = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The private cache, one for the module: the hub ids the tests leave out of it are not in it."""
    return tmp_path_factory.mktemp("hub") / "cache"


@pytest.fixture(scope="module")
def cli_off_the_hub(tmp_path_factory: pytest.TempPathFactory, hub_cache: Path) -> Iterator[ForkedCli]:
    """The CLI as a user runs it (conftest's ForkedCli), in the environment above: huggingface_hub reads it when
    imported, so the server that imports it once for every command has it."""
    env = {**os.environ, "HF_ENDPOINT": CLOSED, "HF_HUB_CACHE": str(hub_cache), "PYTHONSAFEPATH": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    forked = ForkedCli(tmp_path_factory.mktemp("cli-off-the-hub"), env)
    yield forked
    forked.close()


def cache_model(model_dir: Path, cache: Path, repo_id: str) -> None:
    """``model_dir`` laid out as huggingface_hub caches a download of ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_an_uncached_hub_id_fails_at_once_with_the_fix(tmp_path: Path, cli_off_the_hub: ForkedCli,
                                                        hub_cache: Path) -> None:
    result = cli_off_the_hub.run("--model", "some-org/not-downloaded", "--max-steps", "1", "--output-dir",
                                 str(tmp_path / "run"))
    assert result.returncode != 0
    assert "Retrying" not in result.stderr  # no round of retries before the answer
    assert (f"could not load a tokenizer for 'some-org/not-downloaded': it is not in the local Hugging Face cache "
            f"({hub_cache}) and {CLOSED} cannot be reached") in result.stderr
    assert "hf download some-org/not-downloaded" in result.stderr
    dataset = cli_off_the_hub.run("--dataset", "some-org/not-downloaded-set", "--max-steps", "1", "--output-dir",
                                  str(tmp_path / "run"))
    assert "Retrying" not in dataset.stderr
    assert "could not load dataset 'some-org/not-downloaded-set': it is not in the local Hugging Face cache" \
        in dataset.stderr


def test_a_cached_hub_id_trains_from_the_cache(tmp_path: Path, tiny_model_dir: Path, cli_off_the_hub: ForkedCli,
                                               hub_cache: Path) -> None:
    cache_model(tiny_model_dir, hub_cache, "some-org/tiny-llama")
    data = write_jsonl(tmp_path / "d.jsonl", embedded_records(8))
    result = cli_off_the_hub.run("--model", "some-org/tiny-llama", "--dataset", str(data), "--finetune", "lora",
                                 "--max-steps", "2", "--eval-split-ratio", "0", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "Retrying" not in result.stderr
    assert f"some-org/tiny-llama loaded from the local Hugging Face cache: {CLOSED} cannot be reached" \
        in result.stdout + result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2


@pytest.mark.parametrize("offline", [True, False])
def test_the_probe_and_the_offline_mode_it_sets(offline: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    from lamelm_fast.train import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)  # restored afterwards, as are the two below
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    hub.offline_reason.cache_clear()
    try:
        assert hub.cache_only_if_offline(str(Path(__file__).parent)) is None  # a local directory never asks
        reason = hub.cache_only_if_offline("some-org/model")
        assert reason == "HF_HUB_OFFLINE is set" if offline else reason.startswith(f"{CLOSED} cannot be reached (")
        assert constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    finally:
        hub.offline_reason.cache_clear()


def test_saving_an_adapter_asks_the_hub_nothing(tmp_path: Path, tiny_model_dir: Path, embedded_tokenizer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT asks the hub at each save whether the base's vocabulary changed (retried for ~30 s offline); the trainer
    never resizes it, so it says so and keeps the adapter file to the adapter."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import save_and_load
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lamelm_fast.train.checkpoint import save_checkpoint
    from lamelm_fast.train.distributed import Distributed

    asked = []
    monkeypatch.setattr(save_and_load, "check_file_exists_on_hf_hub", lambda *args: asked.append(args))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    model.peft_config["default"].base_model_name_or_path = "some-org/tiny-llama"  # as when loaded by hub id
    path = save_checkpoint(tmp_path, 1, model, embedded_tokenizer, {}, Distributed(torch.device("cpu")))
    assert not asked
    assert all("lora_" in name for name in load_file(str(path / "adapter_model.safetensors")))


def test_offline_a_cached_model_that_fails_says_why(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, only missing files mean "download it": a cached model that fails for another reason (an
    architecture this transformers does not know) gets the loader's own words."""
    from huggingface_hub import constants

    from lamelm_fast.train import hub

    cache_model(tiny_model_dir, tmp_path / "cache", "some-org/tiny-llama")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hub, "offline_reason", lambda: "HF_HUB_OFFLINE is set")
    cached = hub.load_error("model", "some-org/tiny-llama", ValueError("unrecognized model type 'llama9'"), "fix it")
    assert str(cached) == "could not load model 'some-org/tiny-llama': unrecognized model type 'llama9'; fix it"
    missing = hub.load_error("model", "some-org/elsewhere", OSError("couldn't find them in the cached files"), "x")
    assert "it is not in the local Hugging Face cache" in str(missing)
    wrong_split = hub.load_error("dataset", "some-org/set", ValueError('Unknown split "tran"'), "y", dataset=True)
    assert "Unknown split" in str(wrong_split)


def test_the_offline_mode_a_run_sets_ends_with_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that found the hub out of reach (here: a hub id that then fails) leaves the process as it found it: a
    notebook's next load asks the hub again, instead of being cache-only for good."""
    from huggingface_hub import constants

    from lamelm_fast.train import ConfigError, TrainConfig, hub, train

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.offline_reason.cache_clear()
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    dataset = write_jsonl(tmp_path / "d.jsonl", embedded_records(4))
    with pytest.raises(ConfigError, match="some-org/not-cached"):
        train(TrainConfig(model="some-org/not-cached", dataset=str(dataset), output_dir=str(tmp_path / "run")))
    assert "HF_HUB_OFFLINE" not in os.environ and constants.HF_HUB_OFFLINE is False
    assert hub.offline_reason.cache_info().currsize == 0  # the next run probes again
