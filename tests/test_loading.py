"""Loading weights: offline by default, paths named in errors, safetensors only, base paths
recorded absolute, tokenizer files named (issue 11 point 8, issue 12 point 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipeline.hub import (
    ALLOW_DOWNLOADS_ENV,
    OFFLINE_ENVIRONMENT,
    apply_offline_default,
    resolve_weights,
)
from pipeline.models import load_model
from pipeline.models.codecs import build_tiny_vae
from pipeline.models.components import build_tiny_text_encoder, build_tiny_unet
from pipeline.models.multistep import MultiStepSR
from pipeline.models.onestep import OneStepSR, sd_scheduler_config

ROOT = Path(__file__).resolve().parents[1]


def write_tiny_sd_folder(folder: Path, tokenizer_files: str = "tokenizer.json") -> Path:
    """A tiny SD 2.1-base-layout folder; ``tokenizer_files="vocab"`` writes the tokenizer as
    SD's own folders hold it (vocab.json + merges.txt, no tokenizer.json)."""
    torch.manual_seed(0)
    text_encoder, tokenizer = build_tiny_text_encoder(hidden_size=16)
    build_tiny_unet(4, 4, 16, 16, (16, 32)).save_pretrained(folder / "unet")
    build_tiny_vae().save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    DDPMScheduler.from_config(sd_scheduler_config()).save_pretrained(folder / "scheduler")
    if tokenizer_files == "vocab":
        tokenizer_json = folder / "tokenizer" / "tokenizer.json"
        bpe = json.loads(tokenizer_json.read_text())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
        (folder / "tokenizer" / "vocab.json").write_text(json.dumps(bpe["vocab"]))
        (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges))
        tokenizer_json.unlink()
    return folder


def _lq(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- resolve_weights ---------------------------------------------------------------------------
def test_resolve_weights_local_absolute_missing_named_hub_only_when_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_DOWNLOADS_ENV, raising=False)
    (tmp_path / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_weights("models/sd", "pretrain.weights") == str(tmp_path / "models" / "sd")
    for missing in ("models/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"):
        with pytest.raises(FileNotFoundError) as error:
            resolve_weights(missing, "pretrain.onestep.weights")
        message = str(error.value)
        assert message.startswith(f"pretrain.onestep.weights: {missing} ")
        assert "downloads are off (allow_downloads: false)" in message
        assert "cache" not in message
    monkeypatch.setenv(ALLOW_DOWNLOADS_ENV, "1")
    hub_id = "stabilityai/stable-diffusion-2-1-base"
    assert resolve_weights(hub_id, "pretrain.weights") == hub_id
    with pytest.raises(FileNotFoundError, match="not a hub id"):
        resolve_weights("models/a/b", "pretrain.weights")


def test_allow_downloads_leaves_the_environment_alone(monkeypatch):
    monkeypatch.setenv(ALLOW_DOWNLOADS_ENV, "1")
    for name in OFFLINE_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    assert apply_offline_default() is False
    assert not any(name in os.environ for name in OFFLINE_ENVIRONMENT)


# -- missing folders --------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [OneStepSR, MultiStepSR])
def test_missing_relative_base_folder_is_named_not_taken_for_a_hub_id(cls, tmp_path, monkeypatch):
    """Issue 11.8: models/stable-diffusion-2-1-base looks like org/name; offline it is a missing
    folder, named with its config key, and the error says nothing about the hub cache."""
    monkeypatch.delenv(ALLOW_DOWNLOADS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        cls.from_sd_base("models/stable-diffusion-2-1-base", weights_key="pretrain.weights")
    message = str(error.value)
    assert "pretrain.weights: models/stable-diffusion-2-1-base" in message
    assert f"relative to {tmp_path}" in message and "downloads are off" in message
    assert "cache" not in message
    with pytest.raises(
        FileNotFoundError, match="models/stable-diffusion-2-1-base .*does not exist"
    ):
        load_model("models/stable-diffusion-2-1-base", framework=cls.framework)


# -- no connection ----------------------------------------------------------------------------
NO_NETWORK_SCRIPT = """
import json, socket, sys
attempts = []

def connect(self, address):
    attempts.append(("connect", str(address)))
    raise OSError("network disabled by the test")

def getaddrinfo(host, *args, **kwargs):
    attempts.append(("dns", str(host)))
    raise socket.gaierror("network disabled by the test")

socket.socket.connect = connect
socket.socket.connect_ex = connect
socket.getaddrinfo = getaddrinfo
import huggingface_hub.constants as constants
import huggingface_hub.utils._detect_agent as detect_agent
from huggingface_hub.utils import build_hf_headers

constants.AGENT_HARNESSES_PATH = sys.argv[2] + "/no-cache/agent_harnesses.json"
build_hf_headers()  # the user-agent lookup, as the old code ran it on every load
before = list(attempts)
attempts.clear()
detect_agent._registry = None

from pipeline.hub import OFFLINE_ENVIRONMENT, apply_offline_default
import os
applied = apply_offline_default()
build_hf_headers()
from pipeline.models import build_tiny_model, load_model
from pipeline.models.onestep import OneStepSR
OneStepSR.from_sd_base(sys.argv[1])
build_tiny_model("onestep", codec="vae", block_out_channels=(16, 32)).save_pretrained(
    sys.argv[2] + "/onestep")
load_model(sys.argv[2] + "/onestep")
print(json.dumps({"before": before, "after": attempts, "applied": applied,
                  "env": {k: os.environ.get(k) for k in OFFLINE_ENVIRONMENT}}))
"""


def test_loading_a_tiny_model_folder_opens_no_connection(tmp_path):
    """Issue 11.8: with the offline default applied (as python -m pipeline does first), neither
    huggingface_hub's user-agent lookup nor loading model folders opens a connection. The
    script's first lookup, before the default, shows the check would see one."""
    sd = write_tiny_sd_folder(tmp_path / "sd")
    script = tmp_path / "no_network.py"
    script.write_text(textwrap.dedent(NO_NETWORK_SCRIPT))
    switches = {*OFFLINE_ENVIRONMENT, "DISABLE_TELEMETRY", "DO_NOT_TRACK", ALLOW_DOWNLOADS_ENV}
    env = {k: v for k, v in os.environ.items() if k not in switches}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    result = subprocess.run(
        [sys.executable, str(script), str(sd), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["before"], "the control lookup should have tried the network"
    assert report["applied"] is True
    assert report["after"] == []
    assert report["env"] == OFFLINE_ENVIRONMENT


# -- tokenizer files --------------------------------------------------------------------------
def test_tokenizer_folder_missing_merges_names_file_and_folder(tmp_path):
    sd = write_tiny_sd_folder(tmp_path / "sd", tokenizer_files="vocab")
    model = OneStepSR.from_sd_base(sd)  # SD's own layout loads
    assert model.tokenizer("the").input_ids
    (sd / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError) as error:
        OneStepSR.from_sd_base(sd)
    message = str(error.value)
    assert "merges.txt" in message and str(sd / "tokenizer") in message
    assert "vocab.json" not in message.split("(")[0]
    saved = tmp_path / "multistep"
    MultiStepSR.build_tiny(block_out_channels=(16, 32), text_hidden_size=16).save_pretrained(saved)
    (saved / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing vocab.json and merges.txt"):
        load_model(saved)


# -- safetensors only -------------------------------------------------------------------------
def test_pickle_only_weights_are_refused_with_how_to_convert(tmp_path):
    sd = write_tiny_sd_folder(tmp_path / "sd")
    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    for file in (sd / "unet").glob("*.safetensors"):
        file.unlink()
    unet.save_pretrained(sd / "unet", safe_serialization=False)
    assert (sd / "unet" / "diffusion_pytorch_model.bin").is_file()
    for cls in (OneStepSR, MultiStepSR):
        with pytest.raises(ValueError) as error:
            cls.from_sd_base(sd)
        message = str(error.value)
        assert str(sd / "unet") in message and "diffusion_pytorch_model.bin" in message
        assert "use_safetensors=False" in message and "safe_serialization=True" in message
    # the conversion the message gives, then the folder loads
    UNet2DConditionModel.from_pretrained(sd / "unet", use_safetensors=False).save_pretrained(
        sd / "unet", safe_serialization=True
    )
    (sd / "unet" / "diffusion_pytorch_model.bin").unlink()
    assert OneStepSR.from_sd_base(sd).unet is not None


# -- base paths -------------------------------------------------------------------------------
def test_relative_base_weights_are_recorded_absolute_and_load_elsewhere(tmp_path, monkeypatch):
    """Issue 12.3: a one-step model built from a relative base path loads from another working
    directory; a path relative to the model folder loads too."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    write_tiny_sd_folder(work / "models" / "sd")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    model = OneStepSR.from_sd_base("models/sd").eval()
    assert model.settings.base_weights == str(work / "models" / "sd")
    lq = _lq()
    before = model.sample(lq, prompts=["a"])
    model.save_pretrained(work / "out" / "m")
    monkeypatch.chdir(elsewhere)
    loaded = load_model(work / "out" / "m")
    torch.testing.assert_close(loaded.sample(lq, prompts=["a"]), before, rtol=0, atol=0)
    # a model folder that names its base relative to itself (moved together)
    description_file = work / "out" / "m" / "dspo_model.json"
    description = json.loads(description_file.read_text())
    description["settings"]["base_weights"] = "../../models/sd"
    description_file.write_text(json.dumps(description))
    relative = load_model(work / "out" / "m")
    assert relative.settings.base_weights == str(work / "models" / "sd")
    torch.testing.assert_close(relative.sample(lq, prompts=["a"]), before, rtol=0, atol=0)
    description["settings"]["base_weights"] = "models/nowhere"
    description_file.write_text(json.dumps(description))
    with pytest.raises(FileNotFoundError) as error:
        load_model(work / "out" / "m")
    assert "models/nowhere" in str(error.value) and str(description_file) in str(error.value)
