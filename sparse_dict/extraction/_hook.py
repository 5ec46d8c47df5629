"""Where in a model to read activations, and the forward hook that reads them.

:func:`locate_hook` turns an extractor's ``layer``/``hook``/``module`` into a
:class:`HookSite`; :class:`ActivationHook` sits there during a forward pass and
captures the activations, stops the pass, or replaces them.
"""

import inspect
import threading
from difflib import get_close_matches
from typing import NamedTuple

import torch

from sparse_dict.extraction._loading import _join, _submodule

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
        # DistilBERT's FFN; T5's (its blocks' last layer: 1 in an encoder
        # block, 2 after a decoder block's cross-attention), gated or not.
        ("ffn.lin2", "input"),
        ("layer.2.DenseReluDense.wo", "input"),
        ("layer.1.DenseReluDense.wo", "input"),
    ),
    "mlp_out": (
        ("mlp", "output"),
        ("output.dense", "output"),
        ("fc2", "output"),
        ("ffn", "output"),
        ("layer.2.DenseReluDense", "output"),
        ("layer.1.DenseReluDense", "output"),
    ),
    "resid_pre": (("", "input"),),
    "resid_post": (("", "output"),),
}


# An MLP's output projection, by the names its families give it (the
# analysis of logit effects uses them too); those that an activation
# module feeds directly, as gated MLPs' down_proj is not.
_OUT_PROJECTION_NAMES = ("dense_4h_to_h", "c_proj", "down_proj", "fc_out", "fc2")
_UNGATED_OUT_PROJECTION_NAMES = ("fc_out", "c_proj", "dense_4h_to_h")


def _own_output(mlp, path):
    """``path``, or its output projection's where the MLP's forward takes the residual."""
    try:
        takes_residual = "residual" in inspect.signature(mlp.forward).parameters
    except (TypeError, ValueError):
        return path
    if takes_residual:
        for name in _OUT_PROJECTION_NAMES:
            if isinstance(getattr(mlp, name, None), torch.nn.Module):
                return f"{path}.{name}"
    return path


class StopForward(Exception):
    """Raised by the hook to end the forward pass once the activations are taken."""


class HookSite(NamedTuple):
    """Where the activations are read.

    Attributes
    ----------
    module_path : str
        Dotted path of the hooked module.
    direction : {"input", "output"}
        Whether the activations are that module's input or its output.
    name : str
        Readable name, such as "layer0.mlp_post" or the module path.
    """

    module_path: str
    direction: str
    name: str


def locate_hook(loaded, *, layer, hook, module):
    """The :class:`HookSite` of an extractor's ``layer``, ``hook`` and ``module``.

    Parameters
    ----------
    loaded : LoadedModel
    layer : int
    hook : str
        One of :data:`HOOK_POINTS`.
    module : str or None
        A dotted module path that overrides ``layer`` and ``hook``.

    Returns
    -------
    HookSite
    """
    model = loaded.model
    if module is not None:
        if module == "" or _submodule(model, module) is None:
            names = [n for n, _ in model.named_modules() if n]
            close = get_close_matches(module, names, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"module={module!r} is not a module of this model.{hint} "
                f"Valid module paths: {names}"
            )
        return HookSite(module, "output", module)
    if loaded.blocks is None:
        names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            "Could not find the model's list of blocks (an nn.ModuleList), so "
            f"layer/hook cannot be used; pass module=... one of {names}"
        )
    n_layers = len(loaded.blocks)
    if not -n_layers <= layer < n_layers:
        raise ValueError(
            f"layer={layer} is out of range: this model has {n_layers} layers "
            f"({loaded.blocks_path}); valid layers are 0 to {n_layers - 1} "
            f"(or -{n_layers} to -1)."
        )
    layer = layer % n_layers
    block = loaded.blocks[layer]
    block_path = f"{loaded.blocks_path}.{layer}"
    for relative_path, direction in _SITES[hook]:
        found = _submodule(block, relative_path)
        if found is not None:
            if hook == "mlp_out" and relative_path == "mlp":
                # An MLP that adds the residual stream itself (BLOOM's
                # forward(hidden_states, residual)) outputs the stream: its
                # own contribution is its output projection's output.
                relative_path = _own_output(found, relative_path)
            return HookSite(_join(block_path, relative_path), direction, f"layer{layer}.{hook}")
    available = [
        h for h in HOOK_POINTS
        if any(_submodule(block, rel) is not None for rel, _ in _SITES[h])
    ]
    raise ValueError(
        f"hook={hook!r} is not found in this model's blocks; valid hooks "
        f"here are {available}, or pass module=... (a dotted path such as "
        f"{block_path}.<submodule>)."
    )


class ActivationHook:
    """One hook at a site that captures, stops or replaces the activations.

    Used as a context manager around forward passes; :meth:`reset` sets what
    the next pass does ("stop", "capture", "replace" by a tensor, or "edit"
    by a function of the activations), and ``captured`` holds the
    activations it saw.

    Only the first call of the module in a forward pass counts, so a module
    reused inside the model is hooked once. Models are shared between
    extractors through the process cache, so a hook ignores forward passes run
    by other threads (GridSearchCV with a threading backend).

    Some models flatten the tokens inside a block (OPT's decoder layer runs
    its MLP on a (batch * tokens, features) matrix). Given the ``root``
    module, the hook reads each forward pass's (batch, tokens) from its
    ``input_ids`` and sees such a matrix as (batch, tokens, features); what
    it puts back is flattened again.

    Others lay a block's tensors out as (tokens, batch, features) (XLNet;
    torch's ``nn.TransformerEncoderLayer`` without ``batch_first``): with
    ``seq_first=True`` the hook sees them transposed, and puts back what it
    is given transposed again. With ``seq_first=None`` it takes either
    layout as it comes (the extractor's probe, which finds out which);
    otherwise a tensor whose first two sizes are not the pass's (batch,
    tokens) is refused, where it would be read in the wrong order.
    """

    def __init__(self, module, direction, root=None, seq_first=False):
        self.module = module
        self.direction = direction
        self.root = root
        self.seq_first = seq_first
        self.mode = "stop"
        self.captured = None
        self.replacement = None
        self._calls = 0
        self._thread = threading.get_ident()
        self._tokens = None  # (batch, tokens) of the forward pass under way

    def __enter__(self):
        if self.direction == "output":
            handle = self.module.register_forward_hook(self._on_output)
        else:
            handle = self.module.register_forward_pre_hook(self._on_input, with_kwargs=True)
        self._handles = [handle]
        if self.root is not None:
            self._handles.append(self.root.register_forward_pre_hook(self._on_root,
                                                                     with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return False

    def _on_root(self, module, args, kwargs):
        if threading.get_ident() == self._thread:
            ids = kwargs.get("input_ids", args[0] if args else None)
            self._tokens = tuple(ids.shape[:2]) if (isinstance(ids, torch.Tensor)
                                                    and ids.dim() == 2) else None

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
        flat = (isinstance(tensor, torch.Tensor) and tensor.dim() == 2
                and self._tokens is not None
                and tensor.shape[0] == self._tokens[0] * self._tokens[1])
        if flat:
            new = self._visit_tokens(tensor.view(*self._tokens, tensor.shape[1]))
            return None if new is None else new.reshape(tensor.shape)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            raise ValueError(
                f"The hooked point gives {shape}, not a (batch, tokens, features) "
                "tensor; choose another layer, hook or module."
            )
        if self.seq_first is not None and self._tokens is not None:
            expected = self._tokens[::-1] if self.seq_first else self._tokens
            if tuple(tensor.shape[:2]) != expected:
                layout = "(tokens, batch, features)" if self.seq_first else \
                    "(batch, tokens, features)"
                raise ValueError(
                    f"The hooked point gives {tuple(tensor.shape)} for a batch of "
                    f"{self._tokens[0]} texts of {self._tokens[1]} tokens, where it gave "
                    f"{layout} when the extractor was fitted; choose another layer, hook "
                    "or module."
                )
        if self.seq_first:
            new = self._visit_tokens(tensor.transpose(0, 1))
            return None if new is None else new.transpose(0, 1)
        return self._visit_tokens(tensor)

    def _visit_tokens(self, tensor):
        """Capture, stop at or replace a (batch, tokens, features) tensor."""
        # Kept as it is here: the model may change it in place later in the
        # pass (Falcon adds the attention output to its MLP's output), and a
        # pass that goes on reads the change. A pass that stops cannot.
        self.captured = tensor if self.mode == "stop" else tensor.clone()
        if self.mode == "stop":
            raise StopForward
        if self.mode == "replace":
            if self.replacement.shape != tensor.shape:
                raise ValueError(
                    f"Replacement of shape {tuple(self.replacement.shape)} does not match "
                    f"the activations' {tuple(tensor.shape)}."
                )
            return self.replacement.to(dtype=tensor.dtype)
        if self.mode == "edit":
            # A function of the activations themselves (steering adds a
            # direction, clamping re-encodes), so no first pass is needed.
            edited = self.replacement(tensor)
            if edited.shape != tensor.shape:
                raise ValueError(
                    f"The edit gave shape {tuple(edited.shape)}, not the activations' "
                    f"{tuple(tensor.shape)}."
                )
            return edited.to(dtype=tensor.dtype)
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


