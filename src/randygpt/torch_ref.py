"""The same GPT in PyTorch, for parity tests and benchmarks only.

randygpt never depends on torch: it is imported inside the functions. This module imports
nothing from randygpt either, so a benchmark can load it by path into a process that never loads
our kernels (and their OpenMP runtime). Parameters use our
names and PyTorch's (out_features, in_features) layout, so load_params / export_grads move
tensors across by name. Dropout here is nn.Dropout (its masks differ from ours), so parity
is checked with dropout 0.
"""
import contextlib

import numpy as np

__all__ = ["build_torch_gpt", "autocast", "load_params", "export_grads", "torch_name", "our_name"]


def build_torch_gpt(config, dtype=None):
    """A torch.nn.Module with forward(idx, targets=None): mean cross-entropy if targets are
    given, else logits (B, T, V). Its initial values are torch's; load ours with load_params."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, V, H, NH = config.n_embd, config.vocab_size, 4 * config.n_embd, config.n_head

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(C, eps=config.norm_eps) if config.norm == "layernorm" else None

        def forward(self, x):
            if self.ln is not None:
                return self.ln(x)
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk, self.wv, self.wo = (nn.Linear(C, C, bias=False) for _ in range(4))
            self.fc1 = nn.Linear(C, H, bias=False)
            self.fc2 = nn.Linear(H, C, bias=False)
            self.norm1, self.norm2 = Norm(), Norm()
            self.drop = nn.Dropout(config.dropout)

        def forward(self, x):
            B, T, _ = x.shape
            h = self.norm1(x)
            # (B, T, C) -> (B, NH, T, HS)
            q, k, v = (w(h).view(B, T, NH, C // NH).transpose(1, 2)
                       for w in (self.wq, self.wk, self.wv))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).reshape(B, T, C)
            x = x + self.drop(self.wo(y))
            return x + self.drop(self.fc2(F.relu(self.fc1(self.norm2(x))).square()))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Parameter(torch.zeros(V, C))
            self.wpe = nn.Parameter(torch.zeros(config.block_size, C))
            self.h = nn.ModuleList(Block() for _ in range(config.n_layer))
            self.lm_head = nn.Linear(C, V, bias=False)

        def forward(self, idx, targets=None):
            T = idx.shape[1]
            x = self.wte[idx] + self.wpe[:T]
            for block in self.h:
                x = block(x)
            logits = self.lm_head(x)
            if targets is None:
                return logits
            return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))

    model = TorchGPT()
    if dtype is not None:
        model = model.to(dtype)
    return model


def autocast(config):
    """The context to run the forward and loss in for config.precision, as a PyTorch user turns
    on mixed precision: "bf16" is torch.autocast("cpu", dtype=torch.bfloat16) (the parameters
    stay fp32; the matmuls and attention run in bf16, the ops on autocast's fp32 list such as
    the loss in fp32), "fp32" no context at all. Backward runs outside it, as autocast wants."""
    import torch

    if config.precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if config.precision == "fp32":
        return contextlib.nullcontext()
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {config.precision!r}")


def torch_name(name):
    """Our parameter name -> the torch module's: 'h.0.wq' -> 'h.0.wq.weight',
    'h.0.ln1.weight' -> 'h.0.norm1.ln.weight', 'lm_head' -> 'lm_head.weight'."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias"):  # LayerNorm gain / bias: h.{i}.ln{1,2}.{weight,bias}
        return f"h.{parts[1]}.norm{parts[2][-1]}.ln.{parts[3]}"
    if name in ("wte", "wpe"):
        return name
    return name + ".weight"


def load_params(module, params_dict):
    """Copy {our name: np.ndarray} into the module's parameters (every one must be given)."""
    import torch

    named = dict(module.named_parameters())
    wanted = {torch_name(n): n for n in params_dict}
    if set(wanted) != set(named):
        missing = sorted(set(named) - set(wanted))
        extra = sorted(set(wanted) - set(named))
        raise ValueError(f"parameter names differ: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for tname, ours in wanted.items():
            p = named[tname]
            src = np.asarray(params_dict[ours])
            if tuple(p.shape) != src.shape:
                raise ValueError(f"{ours}: shape {src.shape} != torch {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.array(src)).to(p.dtype))


def our_name(tname):
    """The inverse of torch_name."""
    parts = tname.split(".")
    if len(parts) == 5:  # h.{i}.norm{k}.ln.{weight,bias}
        return f"h.{parts[1]}.ln{parts[2][-1]}.{parts[4]}"
    if tname in ("wte", "wpe"):
        return tname
    return tname[:-len(".weight")]


def export_grads(module, names=None):
    """{our name: gradient as np.ndarray}, for every parameter or the given names (zeros
    where torch computed none)."""
    named = dict(module.named_parameters())
    if names is None:
        names = [our_name(t) for t in named]
    out = {}
    for n in names:
        p = named[torch_name(n)]
        out[n] = (np.zeros(tuple(p.shape)) if p.grad is None
                  else p.grad.detach().cpu().numpy().copy())
    return out
