"""Loading models for extraction: the built-in model, Hugging Face folders, user modules."""

import inspect
from collections import OrderedDict

import torch
from torch import nn

# Where the list of residual blocks lives in the model families we know:
# the built-in model, BERT-likes, GPT-2, Llama/Mistral, GPT-NeoX, OPT/BART.
_BLOCK_LIST_PATHS = (
    "blocks",
    "encoder.layer",
    "transformer.h",
    "model.layers",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "encoder.layers",
    "layers",
    "h",
)

# Loaded models by (source, device): clones and unpickled copies made by
# GridSearchCV or Pipeline(memory=...) then share one model instead of each
# reloading it. Two entries are enough for "one model, maybe two devices".
_MODEL_CACHE = OrderedDict()
_MODEL_CACHE_SIZE = 2


class _Loaded:
    """A model ready to run: the module, its tokenizer and where its blocks are."""

    def __init__(self, model, tokenizer, device, kind, max_positions=None):
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.kind = kind
        self.max_positions = max_positions
        self.blocks_path, self.blocks = _find_blocks(model)
        forward = inspect.signature(model.forward).parameters
        self.takes_mask = "attention_mask" in forward or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in forward.values()
        )
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0

    def vocab_size(self):
        config = getattr(self.model, "config", None)
        size = getattr(config, "vocab_size", None)
        if size is None and self.tokenizer is not None:
            try:
                size = len(self.tokenizer)
            except TypeError:
                size = getattr(self.tokenizer, "vocab_size", None)
        return size

    def __call__(self, input_ids, attention_mask):
        if self.kind == "hf":
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.takes_mask:
            return self.model(input_ids, attention_mask=attention_mask)
        return self.model(input_ids)


def _find_blocks(model):
    for path in _BLOCK_LIST_PATHS:
        module = _submodule(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    return None, None


def _submodule(root, path):
    if path == "":
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _join(*parts):
    return ".".join(p for p in parts if p)




def _hf_model_dir(path):
    """The folder holding config.json: the path itself, or for a
    sentence-transformers folder the Transformer module's subfolder."""
    if (path / "config.json").is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():
        import json

        for entry in json.loads(modules.read_text()):
            if entry.get("type", "").endswith("models.Transformer"):
                sub = path / entry.get("path", "")
                if (sub / "config.json").is_file():
                    return sub
    raise ValueError(
        f"model={str(path)!r} is a folder but not a Hugging Face model: it has no "
        "config.json (nor a sentence-transformers modules.json pointing to one)."
    )


def _load_hf(path, device, verbose):
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is an optional extra
        raise ImportError(
            "Loading a model from a path needs the 'transformers' package: "
            "pip install 'sparse_dict[hf]'."
        ) from exc
    root = _hf_model_dir(path)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not verbose:
        transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        causal = any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or ())
        )
        auto = AutoModelForCausalLM if causal else AutoModel
        model = auto.from_pretrained(root, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True)
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    model = model.to(device).eval()
    max_positions = getattr(model.config, "max_position_embeddings", None)
    return _Loaded(model, tokenizer, device, "hf", max_positions)


def _load_builtin(device):
    from sparse_dict.models.builtin import load_builtin_model

    model, tokenizer = load_builtin_model(device=device)
    return _Loaded(model.eval(), tokenizer, device, "builtin", model.config.max_len)


def _load_module(model, tokenizer, device):
    if device is None:
        # With device="auto" a user's module stays where the user put it.
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    else:
        model.to(device)
    # Dropout and the like must not make activations random.
    model.eval()
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_len", None) or getattr(
        config, "max_position_embeddings", None
    )
    return _Loaded(model, tokenizer, device, "module", max_positions)

