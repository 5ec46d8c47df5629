"""The forward hook that captures, stops at or replaces a model's activations."""

import threading

import torch

HOOK_POINTS = ("mlp_post", "mlp_out", "resid_pre", "resid_post")

# Candidate sites of a named point, relative to one block, as (submodule,
# "output" of that module or "input" to it). The MLP post-activation is the
# input of the MLP's output projection where the activation module alone would
# miss a gate (Llama's act_fn output is multiplied by up_proj afterwards).
_SITES = {
    "mlp_post": (
        ("mlp.act", "output"),
        ("intermediate", "output"),
        ("mlp.down_proj", "input"),
        ("mlp.fc_out", "input"),
        ("mlp.c_proj", "input"),
        ("mlp.fc2", "input"),
        ("mlp.dense_4h_to_h", "input"),
        ("fc2", "input"),
    ),
    "mlp_out": (
        ("mlp", "output"),
        ("output.dense", "output"),
        ("fc2", "output"),
    ),
    "resid_pre": (("", "input"),),
    "resid_post": (("", "output"),),
}


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the activations are taken."""





class _Tap:
    """One hook at the chosen site that captures, stops or replaces.

    Only the first call of the module in a forward pass counts, so a module
    reused inside the model is tapped once. Models are shared between
    extractors through the process cache, so a tap ignores forward passes run
    by other threads (GridSearchCV with a threading backend).
    """

    def __init__(self, module, where):
        self.module = module
        self.where = where
        self.mode = "stop"
        self.captured = None
        self.replacement = None
        self._calls = 0
        self._thread = threading.get_ident()

    def __enter__(self):
        if self.where == "output":
            self._handle = self.module.register_forward_hook(self._on_output)
        else:
            self._handle = self.module.register_forward_pre_hook(
                self._on_input, with_kwargs=True
            )
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def reset(self, mode, replacement=None):
        self.mode, self.replacement = mode, replacement
        self.captured, self._calls = None, 0
        self._thread = threading.get_ident()

    def _visit(self, tensor):
        if threading.get_ident() != self._thread:
            return None
        self._calls += 1
        if self._calls > 1:
            return None
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            raise ValueError(
                f"The hooked point gives {shape}, not a (batch, tokens, features) "
                "tensor; choose another layer, hook or module."
            )
        self.captured = tensor
        if self.mode == "stop":
            raise _StopForward
        if self.mode == "replace":
            if self.replacement.shape != tensor.shape:
                raise ValueError(
                    f"Replacement of shape {tuple(self.replacement.shape)} does not match "
                    f"the activations' {tuple(tensor.shape)}."
                )
            return self.replacement.to(dtype=tensor.dtype)
        return None

    def _on_output(self, module, args, output):
        first = output[0] if isinstance(output, tuple) else output
        new = self._visit(first)
        if new is None:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def _on_input(self, module, args, kwargs):
        if args:
            new = self._visit(args[0])
            return None if new is None else ((new,) + tuple(args[1:]), kwargs)
        key = "hidden_states" if "hidden_states" in kwargs else next(
            (k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None
        )
        new = self._visit(kwargs.get(key))
        return None if new is None else (args, {**kwargs, key: new})


