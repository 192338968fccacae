"""Precision policy and the refusal of a GPU the installed torch has no kernels for."""

from __future__ import annotations

import pytest
import torch

from baton.training.devices import (UnsupportedGPUError, arch_supported, check_gpu, detect_device,
                              precision_for)


def test_precision_policy():
    assert precision_for(None) == "fp32"
    assert precision_for((6, 0)) == "fp16"  # P100
    assert precision_for((7, 5)) == "fp16"  # T4
    assert precision_for((8, 0)) == "bf16"  # A100
    assert precision_for((9, 0)) == "bf16"


def test_cpu_device():
    info = detect_device("cpu")
    assert (info.device, info.precision, info.dtype, info.gpu_count) == (
        "cpu", "fp32", torch.float32, 0)
    assert not info.uses_scaler
    with pytest.raises(ValueError, match="cuda:N"):
        detect_device("tpu")


def test_arch_list_matching():
    sm70_up = ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]
    assert not arch_supported((6, 0), sm70_up)
    assert arch_supported((7, 5), sm70_up)
    assert arch_supported((8, 9), sm70_up)  # sm_86 binaries run on sm_89
    assert arch_supported((9, 0), ["sm_80", "sm_90a"])
    assert arch_supported((12, 0), ["sm_80", "compute_90"])  # PTX JIT-compiles upward
    assert not arch_supported((12, 0), ["sm_80", "sm_90"])


def test_p100_under_a_torch_without_sm60_is_refused_with_a_build_to_install(monkeypatch):
    # No GPU here: stand in for the CUDA runtime's answers about a P100.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_70", "sm_75", "sm_80"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    with pytest.raises(UnsupportedGPUError) as info:
        check_gpu(0)
    message = str(info.value)
    assert "Tesla P100" in message and "sm_60" in message
    assert "torch==2.5.1" in message and "cu121" in message


def test_asking_for_cuda_without_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UnsupportedGPUError, match="sees no CUDA GPU"):
        detect_device("cuda")


# Kaggle's GPUs as of 2026 (kaggle-cli docs/kernels.md, September 2026): T4 (the default),
# T4 x2 and L4, plus paid and competition kinds (A100, H100). The P100 is retired (the kaggle
# client warns that NvidiaTeslaP100 runs on a T4 instead) and Kaggle's default image has no
# sm_60 kernels (kaggle-cli #1151).
KAGGLE_2026 = [
    ("Tesla T4", (7, 5), "fp16", "triton"),  # the default, and T4 x2 (DDP)
    ("NVIDIA L4", (8, 9), "bf16", "triton"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", "triton"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16", "triton"),
    ("Tesla P100-PCIE-16GB", (6, 0), "fp16", "reference"),  # elsewhere, under a torch for sm_60
]
# torch 2.11 built for CUDA 13.0 (Kaggle's 2026 image): no sm_60, nor sm_70.
CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


@pytest.mark.parametrize("name, capability, precision, kernels", KAGGLE_2026)
def test_each_gpu_gets_its_precision_and_kernel_path(name, capability, precision, kernels):
    from baton.kernels.dispatch import backend_for_capability
    from baton.training.devices import resolve_precision

    assert precision_for(capability) == resolve_precision("auto", capability) == precision
    assert backend_for_capability(capability, has_triton=True) == kernels
    assert backend_for_capability(capability, has_triton=False) == "reference"


def test_an_l4_trains_in_bf16_on_the_triton_path(monkeypatch):
    """Through the functions a session calls (detect_device, select_backend), with the CUDA
    runtime's answers for one L4 (sm_89) under torch 2.11+cu130."""
    from baton.kernels.dispatch import select_backend, triton_available

    if not triton_available():
        pytest.skip("triton does not import here: the automatic choice is the reference")
    monkeypatch.delenv("BATON_KERNELS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130_ARCHS)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA L4")
    info = detect_device()
    assert (info.name, info.device, info.capability, info.precision) == (
        "NVIDIA L4", "cuda:0", (8, 9), "bf16")
    assert not info.uses_scaler and info.dtype == torch.bfloat16
    assert select_backend(info.device) == "triton"
    assert detect_device(precision="fp16").uses_scaler, "fp16 stays possible on an L4"


def test_kaggles_2026_image_refuses_a_p100_with_the_torch_that_runs_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: CU130_ARCHS)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Tesla P100-PCIE-16GB")
    with pytest.raises(UnsupportedGPUError, match=r"sm_60.*torch==2\.5\.1"):
        check_gpu(0)
    assert arch_supported((8, 9), CU130_ARCHS) and arch_supported((7, 5), CU130_ARCHS)


def test_more_ranks_than_gpus_share_them_over_gloo(monkeypatch):
    # The GPU check runs 2 ranks on 1 GPU: NCCL refuses two ranks on one device, gloo does not.
    from baton.training.devices import rank_cuda_index
    from baton.training.dist import process_group_backend

    assert process_group_backend(2, 2) == "nccl" and process_group_backend(2, 4) == "nccl"
    assert process_group_backend(2, 1) == "gloo" and process_group_backend(2, 0) == "gloo"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_cuda_index() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert rank_cuda_index() == 1
