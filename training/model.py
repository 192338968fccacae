"""The base model in NF4 (bitsandbytes, double quantization) with LoRA adapters (PEFT).

The adapters are PEFT's own, so what Baton saves loads in plain `PeftModel.from_pretrained`.
LoRA weights stay fp32 whatever the compute dtype: small updates to bf16 weights get lost.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from baton.state_schema import RunSpec

from .classify import auto_class, head_kwargs, is_classifier, keep_head_unquantized
from .data import DataError
from .devices import DeviceInfo

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The base model or its tokenizer cannot be loaded: the config names a model or revision
    that is not there, or that this token may not read. Fix the input."""


class ModelUnavailableError(RuntimeError):
    """The Hub did not answer (network down, timeout, 5xx, 429): nothing is wrong with the
    config, and the same command may work in a minute."""


# HTTP answers that say "not now" rather than "not there".
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

# transformers 5.x "kernelizes" every model it loads unless told otherwise (`use_kernels`
# defaults to True when HF's `kernels` package is enabled): it fetches kernels from the Hub and
# swaps layer forwards, and with `kernels` uninstalled it refuses to load at all. Baton patches
# its own, tested ops over HF's plain modules (kernels/patch.py), and a session must not
# download code mid-run, so every model Baton loads asks for the plain modules. (`use_kernels`
# exists since transformers 4.54; requirements.txt asks for 4.56 or newer.)
PLAIN_MODULES = {"use_kernels": False}


def is_local(name: str) -> bool:
    return Path(name).expanduser().is_dir()


def resolve_revision(name: str, revision: str) -> str:
    """Pin a revision: a Hub commit sha, or for a local folder "local:<sha256 of config.json>"."""
    if is_local(name):
        config = Path(name).expanduser() / "config.json"
        if not config.is_file():
            raise ModelLoadError(f"{name} is a folder without config.json; point model.name at a "
                                 "folder written by save_pretrained, or at a Hub id")
        return "local:" + hashlib.sha256(config.read_bytes()).hexdigest()
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        # HF_ENDPOINT is read now, not at import, so a mirror set late is still honoured.
        info = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).model_info(name, revision=revision)
    except OfflineModeIsEnabled as exc:
        raise ModelLoadError(f"HF_HUB_OFFLINE is set, so model {name!r} cannot be pinned on the "
                             "Hub; unset it, or name a local folder as model.name") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status is None or status in TRANSIENT_STATUS:
            raise _unavailable(name, exc) from exc
        raise ModelLoadError(
            f"cannot find model {name!r} at revision {revision!r} on the Hub ({exc}); check "
            "model.name and model.revision, and HF_TOKEN for a private or gated model"
        ) from exc
    except (_transport_error(), ConnectionError, TimeoutError) as exc:
        raise _unavailable(name, exc) from exc
    return info.sha


def _transport_error() -> type:
    """The HTTP client's base error (httpx in huggingface_hub 1.x and later, requests before)."""
    from huggingface_hub import errors

    return getattr(errors, "HTTPError", OSError)


def _unavailable(name: str, exc: BaseException) -> ModelUnavailableError:
    endpoint = os.environ.get("HF_ENDPOINT") or "the Hub"
    return ModelUnavailableError(f"{endpoint} did not answer while pinning model {name!r} "
                                 f"({type(exc).__name__}: {str(exc)[:200]}); check the network "
                                 "and run again")


def _source(spec: RunSpec) -> tuple[str, Optional[str]]:
    """Where to load from and which revision to pass (none for a local folder)."""
    revision = spec.model.revision
    if is_local(spec.model.name) or revision.startswith("local:"):
        return spec.model.name, None
    return spec.model.name, revision


def bnb_supported(device_info: DeviceInfo) -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return device_info.type in ("cpu", "cuda")


def quantization_config(spec: RunSpec, device_info: DeviceInfo):
    if not spec.model.load_in_4bit:
        return None
    if not bnb_supported(device_info):
        log.warning("bitsandbytes does not support %s; loading the base model unquantized",
                    device_info.device)
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=device_info.dtype,
    )


@contextlib.contextmanager
def loading_bars(stream=None):
    """transformers' "Loading weights" bar only on a terminal: in a notebook cell or a CI log
    it is 25 lines of carriage returns. The bar's switch is transformers' global; it is put
    back as it was."""
    from transformers.utils import logging as hf_logging

    stream = sys.stderr if stream is None else stream
    on_terminal = bool(getattr(stream, "isatty", lambda: False)())
    was = hf_logging.is_progress_bar_enabled()
    if was and not on_terminal:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not on_terminal:
            hf_logging.enable_progress_bar()


def load_base(spec: RunSpec, device_info: DeviceInfo):
    from transformers import AutoTokenizer

    source, revision = _source(spec)
    quant = quantization_config(spec, device_info)
    head = {}
    if is_classifier(spec):  # a sequence-classification head (training/classify.py)
        check_classifier_family(source, revision)
        keep_head_unquantized(quant)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        if tokenizer.pad_token_id is None:
            # Padding is masked out of attention and loss, so eos is a safe stand-in.
            tokenizer.pad_token = tokenizer.eos_token
        if is_classifier(spec):
            head = head_kwargs(spec, tokenizer.pad_token_id)
            torch.manual_seed(spec.train.seed)  # the fresh head: the same on every machine
        with loading_bars():
            model = auto_class(spec).from_pretrained(
                source, revision=revision, quantization_config=quant,
                dtype=device_info.dtype, device_map={"": device_info.device}, **head,
                **PLAIN_MODULES,
            )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load model {source!r} (revision {revision or 'local'}): {exc}. Check "
            "model.name, model.revision and, for a gated model, HF_TOKEN"
        ) from exc
    return model, tokenizer, quant is not None


class ClassifierFamilyError(DataError):
    """task: classification on a model family with no sequence-classification class: the
    run's input asks for what this model cannot do (exit 2, nothing written)."""


def check_classifier_family(source: str, revision: Optional[str]) -> None:
    """Refuse, before any weight loads, a classification run on a family transformers has no
    sequence-classification class for (Granite, for one), naming the fix."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError):
        return  # load_base's own error says what is wrong with the model
    if type(config) not in AutoModelForSequenceClassification._model_mapping:
        raise ClassifierFamilyError(
            f"model {source!r} ({config.model_type}) has no sequence-classification class in "
            "transformers, so task: classification cannot train it; pick a model of a family "
            "that has one (Llama, Qwen, Gemma, Phi-3, ...), or train it as a causal LM on "
            "prompt/completion pairs")


def lora_config(lora, task_type: str = "CAUSAL_LM", model=None):
    """PEFT's LoraConfig of a spec's `lora` settings (state_schema.LoraConfig); task_type
    SEQ_CLS makes PEFT put the head (score / classifier) in modules_to_save. With the base
    `model` given, a mixture of experts gets LoRA on its experts' weights too (`moe_targets`)
    and never on its router."""
    from peft import LoraConfig

    targets = moe_targets(model, lora.target_modules) if model is not None else None
    modules, parameters = targets if targets else (lora.target_modules, None)
    parameters = parameters or None
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules,
        target_parameters=parameters, task_type=task_type, bias="none",
    )


def _expert_parameters(model) -> list[str]:
    """Leaf names of the experts' stacked [experts, in, out] weights (Qwen3-MoE's and GPT-OSS's
    gate_up_proj and down_proj): 3D parameters of a module whose class ends in "Experts"."""
    names = {name for module in model.modules() if type(module).__name__.endswith("Experts")
             for name, p in module.named_parameters(recurse=False) if p.dim() == 3}
    return sorted(names)


def _is_router_or_head(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]  # Qwen2-MoE's shared_expert_gate is a gate too
    return (leaf in ("gate", "router", "lm_head", "score", "classifier") or "router" in name
            or leaf.endswith("_gate"))


def moe_targets(model, target_modules) -> Optional[tuple[list[str], list[str]]]:
    """(target_modules, target_parameters) for a mixture of experts, None for a dense model.

    The experts are stacked 3D parameters, not Linear modules: PEFT reaches them through
    `target_parameters`. The router stays frozen: transformers' and PEFT's "all-linear" remap
    for MoE (peft.utils.transformers_weight_conversion) would put LoRA on the router's weight
    too, so "all-linear" is resolved here to the Linear layers other than the router and the
    head, plus every expert weight; a list loses any router name and trains the experts'
    weights it names ("experts" for all of them)."""
    experts = _expert_parameters(model)
    if not experts:
        return None
    if isinstance(target_modules, str):
        from torch import nn

        target_modules = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, nn.Linear)}
    else:  # a list trains the experts where it names them ("experts", or their weights)
        named = set(target_modules)
        experts = experts if "experts" in named else [e for e in experts if e in named]
    modules = sorted(n for n in target_modules
                     if not _is_router_or_head(n) and n != "experts")
    return modules, experts


def peft_model(model, config, **kwargs):
    """PEFT's get_peft_model, less one warning it causes: it asks the model for
    `is_gradient_checkpointing`, transformers' deprecated alias, to decide whether to hook
    the inputs. Only that FutureWarning is dropped, and only during this call."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        return get_peft_model(model, config, **kwargs)


def load_model(spec: RunSpec, device_info: DeviceInfo):
    """(peft_model, tokenizer), NF4 + LoRA, gradient checkpointing on, ready to train."""
    model, tokenizer, quantized = load_base(spec, device_info)
    task_type = "SEQ_CLS" if is_classifier(spec) else "CAUSAL_LM"
    model = prepare_for_training(model, spec.lora, spec.train.seed, device_info.dtype, quantized,
                                 task_type)
    return model, tokenizer


def prepare_for_training(model, lora, seed: int, dtype: torch.dtype, quantized: bool,
                         task_type: str = "CAUSAL_LM"):
    """A loaded base model -> the PEFT model the trainer trains: gradient checkpointing, the
    embeddings and lm_head in the compute dtype, fp32 adapters. scripts/bench.py builds
    Baton's side of a preset with it too, so both train what a session trains."""
    from peft import prepare_model_for_kbit_training

    if quantized:
        # PEFT's own checkpointing switch calls transformers' deprecated name (a FutureWarning
        # each session): PEFT casts and freezes, transformers' current API checkpoints.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        embeddings_in_compute_dtype(model, dtype)
    # Non-reentrant: reentrant checkpointing breaks with DDP hooks. transformers' enable also
    # makes the embeddings' output require grad, so the frozen layers pass gradients on.
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # A fixed seed makes the fresh adapter (lora_A's random init) the same on every machine.
    torch.manual_seed(seed)
    model = peft_model(model, lora_config(lora, task_type, model), autocast_adapter_dtype=True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    model.config.use_cache = False
    keep_training_layout(model)
    if dtype == torch.float16:
        residual_stream_fp32(model)
    return model


def _upcast(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def residual_stream_fp32(model) -> None:
    """Under fp16, carry the residual stream in fp32 while the embedding weights stay fp16.

    The residual stream is the embedding's output plus every layer's; it takes the
    embedding's dtype. fp16 ends at 65504, and the outlier dimensions of some models (Qwen2 and
    2.5, QwenLM/Qwen3#868) grow past it across layers: the sum becomes inf, the next norm NaN,
    and no loss scale repairs a forward overflow. Upcasting the embedding's output keeps every
    sum in fp32 (the matmuls still run in fp16 under autocast), which is PEFT's numerics
    without PEFT's fp32 copies of the embedding and lm_head weights. Measured on a tiny Qwen2
    whose outlier dimension sums to 72752 over one layer (tests/test_overflow.py): fp16 stream
    NaN loss, fp32 stream the fp32 model's loss to 1e-5. Cost: 2 more bytes a hidden value of
    each layer's saved input (gradient checkpointing keeps one a layer): about 256 KiB a token
    for an 8B (hidden 4096, 32 layers). bf16 has fp32's range and keeps its bf16 stream."""
    model.get_input_embeddings().register_forward_hook(_upcast)


def embeddings_in_compute_dtype(model, dtype: torch.dtype) -> None:
    """Undo PEFT's upcast of the embeddings and lm_head to fp32.

    prepare_model_for_kbit_training upcasts every parameter that is not 4-bit: for a 128k
    vocabulary that is about 2 GB more for an 8B model and an fp32 residual stream. They are
    frozen, so 16 bits lose nothing; the norms (tiny) stay fp32, as the fastest trainers keep
    them. Tied weights are one tensor, so casting the input embedding casts lm_head too."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None and module.weight.dtype != dtype:
            module.to(dtype)


def keep_training_layout(model) -> None:
    """Stop bitsandbytes repacking NF4 weights for CPU inference when eval() runs.

    On CPUs with AVX512-BF16, a Linear4bit in eval mode converts its weight in place to a
    packed layout whose matmul has no autograd: training after the first evaluate() would then
    drop the gradients that flow through the base layers. Baton evaluates mid-run, so it keeps
    the training layout throughout.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def model_summary(spec: RunSpec, model) -> str:
    """'SmolLM2-135M-Instruct, 134.5M params (NF4), LoRA r 8: 2.4M trainable', for the one
    line a session prints once the model is loaded."""
    trainable, total = model.get_nb_trainable_parameters()
    quantized = any(type(m).__name__ == "Linear4bit" for m in model.modules())
    name = Path(spec.model.name).name if is_local(spec.model.name) else spec.model.name
    return (f"{name}, {(total - trainable) / 1e6:.1f}M params "
            f"({'NF4' if quantized else str(model.dtype).removeprefix('torch.')}), LoRA r "
            f"{spec.lora.r}: {trainable / 1e6:.2f}M trainable")


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
