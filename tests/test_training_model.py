"""Model loading: NF4 + LoRA on the CPU, and a Hub id pinned to a commit (Hub double)."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures_tiny import make_spec
from baton.training.devices import detect_device
from baton.training.model import ModelLoadError, ModelUnavailableError, load_model, resolve_revision


def test_nf4_with_fp32_lora_on_all_linear_layers(tiny_model_dir, pairs_file):
    import bitsandbytes as bnb

    model, tokenizer = load_model(make_spec(tiny_model_dir, pairs_file, max_steps=1),
                                  detect_device("cpu"))
    base = model.get_base_model()
    four_bit = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q k v o gate up down, per layer
    assert four_bit[0].weight.quant_state.quant_type == "nf4"
    assert four_bit[0].weight.quant_state.nested  # double quantization
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable)
    assert base.is_activation_checkpointing and tokenizer.pad_token_id is not None


def test_local_revision_is_the_config_fingerprint(tiny_model_dir, tmp_path):
    pinned = resolve_revision(str(tiny_model_dir), "main")
    assert pinned.startswith("local:") and len(pinned) == len("local:") + 64
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_revision(str(tmp_path / "empty"), "main")


def test_hub_id_is_pinned_to_a_commit_and_loads(hub_server, tiny_model_dir, pairs_file,
                                                monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import HfApi

    # huggingface_hub reads HF_ENDPOINT and its cache folder once, at import: point the
    # download path at the double, and the cache at this test's own folder.
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo = hub_server.new_repo_uri().removeprefix("hf://")
    api.create_repo(repo, private=True)
    api.upload_folder(repo_id=repo, folder_path=str(tiny_model_dir))
    sha = resolve_revision(repo, "main")
    assert sha == api.model_info(repo).sha and len(sha) == 40
    spec = make_spec(tiny_model_dir, pairs_file, max_steps=1)
    spec.model.name, spec.model.revision = repo, sha
    model, _ = load_model(spec, detect_device("cpu"))
    assert model.get_base_model().config.hidden_size == 64
    assert list((tmp_path / "hub-cache").glob("models--*/snapshots/" + sha))
    with pytest.raises(ModelLoadError, match="model.revision"):
        resolve_revision(repo, "no-such-branch")


def test_a_hub_that_does_not_answer_is_unavailable_not_invalid(hub_server, monkeypatch):
    """A refused connection and a 503 say "try again", not "fix model.name": the session
    maps ModelUnavailableError to exit 1 (run again) and ModelLoadError to exit 2."""
    api_repo = hub_server.new_repo_uri().removeprefix("hf://")
    hub_server.fail_next(f"/api/models/{api_repo}", status=503, times=20)
    with pytest.raises(ModelUnavailableError, match="run again"):
        resolve_revision(api_repo, "main")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(ModelUnavailableError, match="127.0.0.1:9"):
        resolve_revision("someone/some-model", "main")
    assert not issubclass(ModelUnavailableError, ModelLoadError)
