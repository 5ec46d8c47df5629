"""Loading models for extraction: the built-in model, Hugging Face folders, user modules."""

import hashlib
import inspect
import json
import os
import pickle
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from difflib import get_close_matches
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sparse_dict._version import version_tuple

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

# The text models the extractor is known to drive, for the message that
# refuses a model of other inputs (images, sound): those whose blocks are
# listed above, and the encoders of encoder-decoder models.
_TEXT_MODELS = ("the built-in model and Hugging Face text models such as BERT-likes "
                "(MiniLM, RoBERTa), GPT-2, Llama/Mistral, GPT-NeoX, OPT, BLOOM, Falcon, "
                "and the encoders of T5 and BART")

# Forward arguments of transformers' models that carry inputs other than
# text, and what they carry; a model that takes one is not a text-only
# model even where its class does not say (transformers before
# ``input_modalities``).
_NON_TEXT_INPUTS = {
    "pixel_values": "image",
    "pixel_values_videos": "video",
    "input_values": "audio",
    "input_features": "audio",
}

# Loaded models by (source, device): clones and unpickled copies made by
# GridSearchCV or Pipeline(memory=...) then share one model instead of each
# reloading it. Two entries are enough for "one model, maybe two devices".
_MODEL_CACHE = OrderedDict()
_MODEL_CACHE_SIZE = 2
_MODEL_CACHE_LOCK = threading.Lock()


class LoadedModel:
    """A model ready to run: the module, its tokenizer and where its blocks are.

    Calling it as ``loaded(input_ids, attention_mask)`` runs the model's
    forward pass whatever the calling convention of its family.

    Attributes
    ----------
    model : torch.nn.Module
    tokenizer : callable or None
    device : torch.device
    kind : {"builtin", "hf", "module"}
    max_positions : int or None
        The longest sequence the model takes, when it says.
    blocks_path : str or None
        Dotted path of its list of residual blocks.
    blocks : torch.nn.ModuleList or None
    pad_token_id : int
    encoder_only : bool
        An encoder-decoder model (T5, BART) runs its encoder alone: the
        texts are its input, and a decoder would need inputs of its own.
    causal : bool
        Whether logits in its output predict each next token (a causal
        language model), as opposed to a masked or classification head.
    """

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
        # torch's nn.TransformerEncoder, batch-first with a padding mask, hands
        # its layers NestedTensors in its inference fast path, whose shape a
        # hook cannot read ("NestedTensorImpl doesn't support sizes").
        self.nests = any(isinstance(m, nn.TransformerEncoder) for m in model.modules())
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else 0
        config = getattr(model, "config", None)
        self.encoder_only = bool(getattr(config, "is_encoder_decoder", False)) and callable(
            getattr(model, "get_encoder", None))
        # transformers' models say whether they generate (a next-token head);
        # other modules with logits are taken as causal language models.
        can_generate = getattr(model, "can_generate", None)
        self.causal = not self.encoder_only and (
            bool(can_generate()) if callable(can_generate) else True)

    def vocab_size(self):
        """The number of token ids the model takes, or None if it does not say."""
        config = getattr(self.model, "config", None)
        size = getattr(config, "vocab_size", None)
        if size is None and self.tokenizer is not None:
            try:
                size = len(self.tokenizer)
            except TypeError:
                size = getattr(self.tokenizer, "vocab_size", None)
        return size

    def submodule(self, path):
        """The submodule at dotted ``path`` ("" for the model), or None."""
        return _submodule(self.model, path)

    def __call__(self, input_ids, attention_mask):
        if not self.nests:
            return self._forward(input_ids, attention_mask)
        with _nested_fast_path_off():
            return self._forward(input_ids, attention_mask)

    def _forward(self, input_ids, attention_mask):
        if self.encoder_only:
            return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        if self.kind == "hf":
            return self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.takes_mask:
            return self.model(input_ids, attention_mask=attention_mask)
        return self.model(input_ids)


_FAST_PATH_LOCK = threading.Lock()
_FAST_PATH_USERS = [0, None]  # forwards running with it off; the setting found


@contextmanager
def _nested_fast_path_off():
    """torch's MHA fast path off (a global setting) while a forward runs.

    The plain path gives the same values. Counted, so that forwards running
    at once in several threads put back the setting found before the first.
    """
    mha = getattr(torch.backends, "mha", None)
    if not hasattr(mha, "set_fastpath_enabled"):  # an older torch, without the switch
        yield
        return
    with _FAST_PATH_LOCK:
        if _FAST_PATH_USERS[0] == 0:
            _FAST_PATH_USERS[1] = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _FAST_PATH_USERS[0] += 1
    try:
        yield
    finally:
        with _FAST_PATH_LOCK:
            _FAST_PATH_USERS[0] -= 1
            if _FAST_PATH_USERS[0] == 0:
                torch.backends.mha.set_fastpath_enabled(_FAST_PATH_USERS[1])


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


def _read_json(path, what):
    """The JSON in file ``path``, or a ValueError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read {what} {str(path)!r}: {err}") from None


def _hf_model_dir(path):
    """The folder holding config.json: the path itself, or for a
    sentence-transformers folder the Transformer module's subfolder."""
    if (path / "config.json").is_file():
        return path
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file, "the sentence-transformers modules file")
        if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
            raise ValueError(
                f"The sentence-transformers modules file {str(modules_file)!r} is "
                "malformed: expected a JSON list of objects with 'type' and 'path'."
            )
        for entry in modules:
            kind, sub = entry.get("type", ""), entry.get("path", "")
            if not isinstance(kind, str) or not isinstance(sub, str):
                raise ValueError(
                    f"The sentence-transformers modules file {str(modules_file)!r} is "
                    "malformed: 'type' and 'path' must be strings."
                )
            if kind.endswith("models.Transformer") and (path / sub / "config.json").is_file():
                return path / sub
    raise ValueError(
        f"model={str(path)!r} is a folder but not a Hugging Face model: it has no "
        "config.json (nor a sentence-transformers modules.json pointing to one)."
    )


def _refuse_custom_code(config, source, where):
    # A config (or tokenizer config) with an "auto_map" names Python classes
    # shipped with the model. Loading them would run that code, which this
    # package never does, whatever the user answers or passes.
    if isinstance(config, dict) and "auto_map" in config:
        raise ValueError(
            f"model={source!r} needs custom code ('auto_map' in its {where}), and "
            "sparse_dict never runs code from a model folder or the Hub. Use a model "
            "that transformers supports natively, or load it yourself and pass the "
            "torch module as model= with its tokenizer."
        )


def _check_local_hf_folder(root, source):
    config = _read_json(root / "config.json", "the model config")
    _refuse_custom_code(config, source, str(root / "config.json"))
    tokenizer_config = root / "tokenizer_config.json"
    if tokenizer_config.is_file():
        config = _read_json(tokenizer_config, "the tokenizer config")
        _refuse_custom_code(config, source, str(tokenizer_config))


def _hub_cache():
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_offline():
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE")


def _check_hub_model(model_id):
    """Fetch (or find in the cache) a Hub model's configs and refuse custom code.

    Failing to get the config means the model cannot be had at all, so this is
    where a missing cache or network gets its one clear error.
    """
    from transformers import PretrainedConfig
    from transformers.models.auto.tokenization_auto import get_tokenizer_config

    try:
        config, _ = PretrainedConfig.get_config_dict(model_id)
    except (OSError, ValueError) as err:
        if _hub_offline():
            why = (
                "HF_HUB_OFFLINE is set, so it cannot be downloaded; download it once "
                "while online (or unset HF_HUB_OFFLINE), or pass the path of a local "
                "model folder"
            )
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            why = (
                f"downloading it failed ({first}); check the id and the network, or "
                "set HF_HUB_OFFLINE=1 to use only models already in the cache"
            )
        raise ValueError(
            f"model={model_id!r} is not a local folder, so it was taken as a Hugging "
            f"Face Hub id, but it is not in the Hugging Face cache {str(_hub_cache())!r} "
            f"and {why}."
        ) from None
    _refuse_custom_code(config, model_id, "config.json")
    try:
        tokenizer_config = get_tokenizer_config(model_id)
    except (OSError, ValueError):
        tokenizer_config = {}  # AutoTokenizer below reports a missing tokenizer
    _refuse_custom_code(tokenizer_config, model_id, "tokenizer_config.json")


def _load_hf(source, device, verbose):
    """A Hugging Face model from a local folder (a Path) or the Hub (an id)."""
    try:
        import transformers
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - transformers is an optional extra
        raise ImportError(
            "Loading a Hugging Face model needs the 'transformers' package: "
            "pip install 'sparse_dict[hf]'."
        ) from exc
    if isinstance(source, Path):
        root = _hf_model_dir(source)
        _check_local_hf_folder(root, str(source))
        # A local folder never reaches the network.
        options = {"local_files_only": True, "trust_remote_code": False}
    else:
        root = source
        _check_hub_model(source)
        options = {"trust_remote_code": False}
    bars = transformers.utils.logging.is_progress_bar_enabled()
    if not verbose:
        transformers.utils.logging.disable_progress_bar()
    try:
        try:
            config = AutoConfig.from_pretrained(root, **options)
        except ValueError as exc:
            # transformers' own words (an unknown model_type, say) named no
            # model: the folder or id is put first.
            raise ValueError(f"model={str(source)!r} cannot be loaded: {exc}") from None
        nan = _nan_field(config.to_dict())
        if nan is not None:
            # Taken as is, a NaN dropout failed only at the first forward
            # pass, in torch's words, naming neither folder nor field.
            raise ValueError(f"model={str(source)!r}: config.json's field {nan!r} is NaN")
        causal = any(
            a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or ())
        )
        auto = AutoModelForCausalLM if causal else AutoModel
        # A folder saved as an encoder alone (T5EncoderModel) loads as one:
        # AutoModel would add a decoder of random weights. transformers' own
        # class only: nothing from the folder runs.
        encoder_class = next((a for a in (config.architectures or ())
                              if a.endswith("EncoderModel")), None)
        if encoder_class is not None and isinstance(getattr(transformers, encoder_class, None),
                                                    type):
            auto = getattr(transformers, encoder_class)
        try:
            model = auto.from_pretrained(root, **options, **_float32_option(transformers))
        except (RuntimeError, ValueError, TypeError, KeyError) as exc:
            # transformers builds the model from the config's values unchecked:
            # a dropout of NaN, say, stopped in torch with its words alone.
            raise ValueError(f"model={str(source)!r}: the model cannot be built from its "
                             f"config.json and weights ({_first_line(exc)})") from None
        except (pickle.UnpicklingError, OSError) as exc:
            # torch.load(weights_only=True) refused a pickled weights file
            # that holds more than tensors: nothing of it ran, and nothing will.
            # transformers before 5 wraps that refusal in an OSError of its
            # own, which advises from_tf=True.
            if not _caused_by(exc, pickle.UnpicklingError):
                raise
            raise ValueError(
                f"The weights of {source} are a pickle that holds more than tensors "
                f"({exc.__class__.__name__}); sparse_dict never runs code from a model "
                "folder, so it reads pickled weights only when they are plain tensors. "
                "Save the weights as model.safetensors from a copy you trust."
            ) from None
        # Before the tokenizer: an image or audio model's folder often has
        # none, and its error would hide the real one.
        _check_text_model(model, f"model={str(source)!r}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(root, **options)
        except ImportError:
            raise  # a missing package (sentencepiece, say): its own words say which
        except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions
            # A malformed tokenizer.json failed with a KeyError or a parser's
            # message naming no file. Nothing of the folder runs here.
            raise ValueError(f"model={str(source)!r}: its tokenizer files cannot be read "
                             f"({_first_line(exc)})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    _check_tokenizer_size(tokenizer, model.config, source)
    model = model.to(device).eval()
    return LoadedModel(model, tokenizer, device, "hf", _max_positions(model))


def _nan_field(config, where=""):
    """The first field of ``config`` (nested dicts included) that is NaN, or None."""
    for key, value in config.items():
        name = f"{where}.{key}" if where else str(key)
        if isinstance(value, float) and value != value:
            return name
        if isinstance(value, dict) and (found := _nan_field(value, name)) is not None:
            return found
    return None


def _caused_by(exc, kind):
    """Whether ``exc`` is a ``kind``, or was raised while handling or from one."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _first_line(exc):
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _float32_option(transformers):
    """The ``from_pretrained`` argument that loads a model's weights in float32.

    transformers 5 loads a checkpoint in the precision it was saved in
    (``dtype="auto"``): a bfloat16 or float16 checkpoint, as most recent
    language models are, ran in that precision on the CPU (slowly, and with
    activations other than the same folder gives under transformers 4,
    which loaded float32), without a word. The argument is ``dtype`` from
    transformers 4.56 (``torch_dtype`` is deprecated there), ``torch_dtype``
    before; ``from_pretrained`` takes both through ``**kwargs``, so its
    signature cannot tell.
    """
    newer = (version_tuple(transformers.__version__) or (0,)) >= (4, 56)
    return {"dtype" if newer else "torch_dtype": torch.float32}


def _max_positions(model):
    """The longest sequence ``model`` takes, from its config, or None.

    RoBERTa and its kin number positions from after the padding index, so
    ``padding_idx + 1`` of their ``max_position_embeddings`` are never a
    token's (roberta-base: 514 embeddings, 512 tokens). A limit that is not
    a positive int means none.
    """
    config = getattr(model, "config", None)
    limit = getattr(config, "max_len", None) or getattr(config, "max_position_embeddings", None)
    # XLNet's config says -1: relative positions, no limit. Read as a
    # limit, it cut every text to nothing (or to all but its last token).
    if not isinstance(limit, int) or limit <= 0:
        return None
    for name, module in model.named_modules():
        if (name.endswith("embeddings.position_embeddings")
                and isinstance(module, torch.nn.Embedding) and module.padding_idx is not None
                and module.num_embeddings == limit):
            return limit - module.padding_idx - 1
    return limit


def _check_text_model(model, what):
    """Refuse a transformers model that does not run on token ids alone.

    The extractor gives a model token ids (and an attention mask), nothing
    else. An image or audio model (ViT, Wav2Vec2, Whisper) takes no token
    ids, and a model of text and images (CLIP, SigLIP, LLaVA) runs its other
    towers on inputs it is not given. Both used to fail deep inside
    transformers (an AttributeError on ``pixel_values`` being None, or a
    missing argument), so they are refused here, by their class, before any
    forward pass.

    Parameters
    ----------
    model : torch.nn.Module
        Checked only when it is a transformers model (it has transformers'
        ``main_input_name``); a user's own module is called as it is.
    what : str
        How the messages name the model, such as ``"model='path'"``.

    Raises
    ------
    ValueError
        Naming the model's class and the inputs it takes.
    """
    main_input = getattr(model, "main_input_name", None)
    if not isinstance(main_input, str):
        return
    cls = type(model).__name__
    try:
        arguments = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return
    # transformers says which inputs a model's class reads ("text", or a
    # tuple such as ("image", "text")); older versions do not, and there the
    # forward's arguments tell.
    declared = getattr(model, "input_modalities", None) or ()
    declared = (declared,) if isinstance(declared, str) else tuple(declared)
    other_inputs = [name for name in _NON_TEXT_INPUTS if name in arguments]
    others = [m for m in declared if m != "text"]
    others += [_NON_TEXT_INPUTS[name] for name in other_inputs
               if _NON_TEXT_INPUTS[name] not in others]
    supported = (f"sparse_dict extracts activations from text-only transformer models "
                 f"({_TEXT_MODELS}), which it runs on token ids alone.")
    # A wrapper whose forward passes everything on (forward(*args, **kwargs),
    # as PEFT's) is judged by the main input it reports.
    passes_on = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in arguments.values())
    if main_input != "input_ids" or ("input_ids" not in arguments and not passes_on):
        of = f", a model of {_and(others)} inputs" if others else ","
        raise ValueError(
            f"{what} is a {cls}{of} whose forward pass takes {main_input!r}, not token "
            f"ids (input_ids). {supported}"
        )
    if others:
        takes = (f", whose forward pass takes {_and([repr(n) for n in other_inputs])}"
                 " as well as token ids" if other_inputs else "")
        raise ValueError(
            f"{what} is a {cls}, a model of {_and(others + ['text'])} inputs{takes}. "
            f"{supported} To read its text tower, load that tower alone with transformers "
            "(for CLIP, transformers.CLIPTextModel.from_pretrained on the same folder) and "
            "pass the torch module as model= with its tokenizer, or save it with its "
            "tokenizer to a folder of its own."
        )


def _and(words):
    """``words`` as a phrase: "image", "image and text", "image, video and text"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _check_tokenizer_size(tokenizer, config, source):
    """Refuse a tokenizer far smaller than the model's vocabulary.

    A folder without tokenizer files still gives a tokenizer (transformers
    builds an empty one), which turns every word into one unknown token.
    Models' vocabularies are often padded beyond their tokenizer's, but not
    to twice its size.
    """
    vocab = getattr(config, "vocab_size", None)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if isinstance(vocab, int) and vocab > 0 and size < vocab / 2:
        raise ValueError(
            f"The tokenizer of {source} has {size:,} tokens for a model of "
            f"vocab_size={vocab:,}: the folder seems to lack its tokenizer's files "
            "(tokenizer.json, or vocab.txt / merges.txt, with tokenizer_config.json). "
            "Add them, or pass a torch module and its tokenizer instead."
        )


def _load_builtin(device, path=None):
    from sparse_dict.models.builtin import load_builtin_model

    model, tokenizer = load_builtin_model(device=device, path=path)
    return LoadedModel(model.eval(), tokenizer, device, "builtin", model.config.max_len)


def _load_folder(path, device, verbose):
    """A local folder: in the built-in format (``train_builtin --out``), or Hugging Face's."""
    from sparse_dict.models.builtin import is_builtin_folder

    if is_builtin_folder(path):
        return _load_builtin(device, path)
    return _load_hf(path, device, verbose)


def _load_module(model, tokenizer, device):
    # Before the module is moved: a refused module is left as it was given.
    _check_text_model(model, "model= (a torch module)")
    if device is None:
        # With device="auto" a user's module stays where the user put it.
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    else:
        model.to(device)
    # Dropout and the like must not make activations random.
    model.eval()
    return LoadedModel(model, tokenizer, device, "module", _max_positions(model))



# A Hub id is "name" or "owner/name" (letters, digits, "-", "_", "."), as the
# Hub itself allows; anything else that is not an existing folder is a typo'd path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def weights_sample(module, n_tensors=16, per_tensor=4):
    """A few of ``module``'s weights, spread over its tensors: what tells one checkpoint from another.

    Up to ``per_tensor`` values at evenly spaced places of each of ``n_tensors``
    floating-point tensors, evenly spaced in the order of their names, as
    float32 numbers (a short JSON list, a few hundred bytes; parameters
    only, and finite values only). The same
    weights give the same list whether the model is on the CPU or a GPU;
    loaded in bfloat16 or float16 they give values within their rounding
    (:func:`same_weights`). Reads only those values: no pass over the model.

    Examples
    --------
    >>> import torch
    >>> sample = weights_sample(torch.nn.Linear(3, 2))
    >>> len(sample), sample == weights_sample(torch.nn.Linear(3, 2))  # 4 weights, 2 biases
    (6, False)
    """
    # Parameters, not buffers: a buffer can be a mask of -inf, which JSON
    # (and so the provenance) cannot hold.
    tensors = [t.detach() for _, t in sorted(module.named_parameters())
               if t.is_floating_point() and t.numel() > 0]
    if not tensors:
        return None
    picked = np.unique(np.linspace(0, len(tensors) - 1, n_tensors).astype(int))
    values = []
    with torch.no_grad():
        for i in picked:
            flat = tensors[i].reshape(-1)
            places = torch.as_tensor(np.unique(np.linspace(0, flat.numel() - 1, per_tensor)
                                               .astype(np.int64)), device=flat.device)
            values.append(flat[places].float())
    # A weight that overflowed is left out, the same places for the same weights.
    return [float(v) for v in torch.cat(values).cpu().numpy() if np.isfinite(v)]


def sample_of(record):
    """The ``weights_sample`` of a provenance record or manifest, or None (older, or edited)."""
    sample = record.get("weights_sample")
    if isinstance(sample, list) and sample and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in sample):
        return sample
    return None


def same_weights(recorded, current):
    """Whether two :func:`weights_sample` lists come from the same weights.

    Within a relative 1e-2, beyond bfloat16's rounding (2^-8), so that a
    model loaded in another precision is still itself; a checkpoint trained
    further, or other weights of the same shapes, differ far more.
    """
    if len(recorded) != len(current):
        return False
    return bool(np.allclose(np.asarray(recorded, dtype=np.float64),
                            np.asarray(current, dtype=np.float64), rtol=1e-2, atol=1e-6))


def folder_stamp(model):
    """What identifies the files of a local model folder: names, sizes and change times.

    ``None`` for anything that is not a folder (``"builtin"``, a Hub id, a
    module). Weights saved again into the same folder give another stamp,
    which keys the loaded models' cache and an extractor's pickled state
    (so that ``Pipeline(memory=...)`` computes their activations anew).

    Examples
    --------
    >>> folder_stamp("builtin") is None
    True
    """
    if isinstance(model, nn.Module) or (isinstance(model, str) and model == "builtin"):
        return None
    try:
        path = Path(model).expanduser()
        if not path.is_dir():
            return None
        entries = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                file = Path(root, name)
                info = file.stat()
                entries.append((str(file.relative_to(path)), info.st_size, info.st_mtime_ns))
    except (OSError, TypeError, ValueError):
        return None
    return hashlib.sha256(repr(entries).encode()).hexdigest()[:16]


def load_model(model, tokenizer, device, verbose=0):
    """The model that an extractor's ``model`` names, ready to run.

    Parameters
    ----------
    model : "builtin", str, path-like or torch.nn.Module
        As :class:`~sparse_dict.TransformerActivationExtractor` takes it.
    tokenizer : callable or None
        Used with an ``nn.Module`` only.
    device : torch.device or None
        None leaves a user's module where it is.
    verbose : int, default=0
        Shows transformers' download and loading bars when positive.

    Returns
    -------
    LoadedModel
        Shared through a small process-wide cache, except for a module.
    """
    if isinstance(model, nn.Module):
        return _load_module(model, tokenizer, device)
    if isinstance(model, str) and model == "builtin":
        source = "builtin"
    elif isinstance(model, (str, os.PathLike)) and not os.fspath(model).strip():
        # Path("") is the current folder: an empty name (a provenance's, a
        # command line's --model "") loaded whatever model that folder held.
        raise ValueError(f"model={str(model)!r} names no model: give 'builtin', a local "
                         "model folder or a Hugging Face Hub id.")
    else:
        path = Path(model).expanduser()
        if path.is_dir():
            source = path.resolve()
        elif path.exists():
            raise ValueError(f"model={str(model)!r} is a file, not a model folder.")
        elif isinstance(model, str) and _HUB_ID.match(model):
            if "/" not in model and get_close_matches(
                    model.lower(), ["builtin"], n=1, cutoff=0.7):
                # A typo of 'builtin' is a valid Hub id: offline, the Hub
                # client retried for half a minute before saying so.
                raise ValueError(f"model={model!r} is neither a local folder nor 'builtin'; "
                                 "did you mean 'builtin'?")
            source = model
        else:
            raise ValueError(
                f"model={str(model)!r} is neither 'builtin', an existing local model "
                "folder (Hugging Face's, or the built-in format's), nor a Hugging Face Hub "
                "id such as 'gpt2' or 'owner/name'."
            )
    key = (str(source), folder_stamp(source), str(device))
    # The cache's reads and writes under a lock (not the load itself, which
    # may take seconds): extractors fitted in several threads could evict
    # an entry between another's insertion and its move_to_end (a KeyError).
    with _MODEL_CACHE_LOCK:
        loaded = _MODEL_CACHE.get(key)
        if loaded is not None:
            _MODEL_CACHE.move_to_end(key)
            return loaded
    if source == "builtin":
        loaded = _load_builtin(device)
    elif isinstance(source, Path):
        loaded = _load_folder(source, device, verbose)
    else:
        loaded = _load_hf(source, device, verbose)
    with _MODEL_CACHE_LOCK:
        _MODEL_CACHE[key] = loaded
        _MODEL_CACHE.move_to_end(key)
        while len(_MODEL_CACHE) > _MODEL_CACHE_SIZE:
            _MODEL_CACHE.popitem(last=False)
    return loaded
