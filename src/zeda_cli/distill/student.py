"""The student in training form: zero experts live, routers in fp32, the trainable scope applied, activation
checkpointing on request. Every backend loads the weights its own way, then calls :func:`prepare_student`."""

from __future__ import annotations

import random

import torch
from torch import nn

from ..recipes import TrainCommon
from ..runtime.zeda_dynamic_moe import routers


def prepare_student(model: nn.Module, section: TrainCommon, *, fp32_routers: bool = True) -> nn.Module:
    """``fp32_routers``: the router rows train in fp32 (as the official code keeps them); a backend that casts
    every parameter itself (DeepSpeed bf16) says so by passing False."""
    if fp32_routers:
        for _, router in routers(model):
            router.float()
    select_trainable(model, section.trainable)
    if section.gradient_checkpointing:
        enable_checkpointing(model)
    return model.train()


def enable_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def select_trainable(model: nn.Module, scope: str) -> int:
    """``full``: every parameter; ``router``: only the router rows. Returns the number of trainable values."""
    router_params = {id(r.weight) for _, r in routers(model)}
    for p in model.parameters():
        p.requires_grad_(scope == "full" or id(p) in router_params)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
