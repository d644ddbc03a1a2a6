"""The layers ``llama_fast.hub`` maps transformers' hub-kernel marks to. The ``kernels`` package binds each
forward to the module it replaces (so ``self`` is a transformers module) and accepts only layer classes
with no constructor and no member but ``forward``, ``has_backward`` and ``can_torch_compile``: the work is
in ``llama_fast.hub``, where it is checked and tested."""

import torch

from llama_fast import hub


class RMSNorm(torch.nn.Module):
    """For ``use_kernel_forward_from_hub("RMSNorm")``: ``ops.rms_norm`` of the module's weight and epsilon."""

    can_torch_compile = True

    def forward(self, hidden_states):
        return hub.rms_norm(self, hidden_states)


class RotaryPosEmb(torch.nn.Module):
    """For ``use_kernelized_func(apply_rotary_pos_emb)`` ("rotary_pos_emb"): ``ops.apply_rotary_pos_emb``,
    with the signature of transformers' function (the kernels package compares it with the one it replaces)."""

    can_torch_compile = True

    def forward(self, q, k, cos, sin, unsqueeze_dim=1):
        return hub.apply_rotary_pos_emb(self, q, k, cos, sin, unsqueeze_dim)
