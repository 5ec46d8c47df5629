"""Steering: run a language model with a feature written into its activations.

At the extractor's hook point, every position's activations get ``strength``
times the feature's atom added (or the feature's code clamped to a value)
while the model generates, or while the next-token distributions of some
texts are read with and without the edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_random_state

from sparse_dict.analysis._effects import _fitted_extractor, check_features
from sparse_dict.extraction._provenance import check_compatible, check_fitted_dictionary
from sparse_dict.extraction._splicing import _final_output
from sparse_dict.extraction._texts import _check_texts

__all__ = ["SteeringDistributions", "steer", "steering_distributions"]


@dataclass(frozen=True)
class SteeringDistributions:
    """Next-token log-probabilities with and without steering.

    Built by :func:`steering_distributions`; one row per predicting position.

    Attributes
    ----------
    plain : ndarray of shape (n_rows, vocab_size), dtype float32
        Log-probabilities of the next token, unedited model.
    steered : ndarray of shape (n_rows, vocab_size), dtype float32
        The same with the edit at the hook.
    text_index : ndarray of shape (n_rows,), dtype int64
        The text each row comes from.
    position : ndarray of shape (n_rows,), dtype int64
        The position, in the tokens the model read, whose next token is
        predicted (a text longer than the extractor's ``max_length`` is read
        from its end: its last ``max_length`` tokens).
    """

    plain: np.ndarray
    steered: np.ndarray
    text_index: np.ndarray
    position: np.ndarray

    def log_prob_increase(self, token_ids):
        """Mean increase of the log-probability of ``token_ids``, over rows and tokens.

        Parameters
        ----------
        token_ids : int or sequence of int

        Returns
        -------
        increase : float
            In nats; positive when steering makes the tokens more likely.
        """
        raw = np.atleast_1d(np.asarray(token_ids))
        vocab = self.plain.shape[1]
        if raw.ndim != 1 or not raw.size or raw.dtype.kind not in "iu" or (
                raw.min() < 0 or raw.max() >= vocab):
            raise ValueError(f"token_ids must be integer ids in 0..{vocab - 1}, got "
                             f"{token_ids!r:.80}.")
        ids = raw.astype(np.int64)
        diff = self.steered[:, ids].astype(np.float64) - self.plain[:, ids]
        return float(diff.mean())

    def kl_divergence(self):
        """Mean KL(plain || steered) over the rows, in nats."""
        p = np.exp(self.plain.astype(np.float64))
        return float((p * (self.plain - self.steered.astype(np.float64))).sum(axis=1).mean())


def _check_number(value, name, minimum=None):
    if getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) is not None \
            and not isinstance(value, bool):
        # A numpy or torch scalar (torch.tensor(1.0) was called not finite).
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return float(value)


def _edit(extractor, sae, feature, strength, clamp, direction):
    """The function that edits the hooked activations, and the checked feature.

    Adding ``strength`` times a unit atom moves every position the same way;
    clamping re-encodes each position and moves it by ``(clamp - code)`` times
    the atom, which keeps the dictionary's reconstruction error in place (the
    rest of the activations are not replaced by their reconstruction).
    """
    check_fitted_dictionary(sae)
    extractor = _fitted_extractor(extractor)
    check_compatible(extractor, sae)
    components = np.asarray(sae.components_)
    strength = _check_number(strength, "strength")
    if direction is not None:
        if feature is not None or clamp is not None:
            raise ValueError("Pass either feature (with strength or clamp) or direction, "
                             "not both.")
        vector = np.asarray(direction, dtype=np.float64)
        if vector.shape != (components.shape[1],):
            raise ValueError(
                f"direction must have shape ({components.shape[1]},), the width of the "
                f"hooked activations; got {vector.shape}."
            )
        if not np.all(np.isfinite(vector)):
            raise ValueError("direction has NaN or infinite values.")
    else:
        if feature is None:
            raise ValueError("Pass the feature to steer with (an index into components_).")
        if np.ndim(feature) != 0:
            raise TypeError(f"feature must be one int, got {feature!r}.")
        feature = int(check_features(feature, components.shape[0], name="feature")[0])
        vector = components[feature].astype(np.float64)
        # The atom at unit norm, so that strength is in the activations' units
        # whatever the dictionary's atom norms (scikit-learn's coders and
        # LassoCoder keep atoms as given).
        norm = float(np.linalg.norm(vector))
        if clamp is None and not (norm > 0 and np.isfinite(norm)):
            raise ValueError(f"Feature {feature}'s atom has norm {norm:g}: it has no "
                             "direction to steer with.")
        if clamp is None:
            vector = vector / norm
    if clamp is not None:
        clamp = _check_number(clamp, "clamp")
        largest = float(np.finfo(np.float32).max)
        if abs(clamp) > largest:
            # Codes are float32: the value would be infinite before the edit.
            raise ValueError(f"clamp={clamp:g} is beyond the largest float32 ({largest:g}), "
                             "the precision of the codes; use a smaller one.")
        if strength != 0:
            raise ValueError(
                "clamp sets the feature's code instead of adding strength times its atom; "
                f"pass strength=0 with clamp (got strength={strength:g})."
            )
        return extractor, _clamp_edit(sae, feature, clamp)
    delta = torch.as_tensor(strength * vector)

    def add(acts):
        return acts + delta.to(device=acts.device, dtype=acts.dtype)

    return extractor, add


def _overflowed(strength, clamp):
    """The error of an edit whose model's next-token logits came out NaN or infinite."""
    what = f"clamp={clamp:g}" if clamp is not None else f"strength={strength:g}"
    # Finite at the hook (1e30 is a float32), the edit overflows the layers
    # after it: argmax of NaN logits generated '\x00' tokens, silently.
    return ValueError(f"With {what} the model's next-token logits are NaN or infinite: the "
                      "edit overflows the model's arithmetic after the hook point. Use a "
                      "smaller one.")


def _clamp_edit(sae, feature, value):
    def clamp(acts):
        flat = acts.reshape(-1, acts.shape[-1]).float().cpu().numpy()
        codes = np.asarray(sae.transform(flat))
        target = codes.copy()
        target[:, feature] = value
        # The difference of two decodings: only the feature's part changes.
        change = np.asarray(sae.inverse_transform(target)) - np.asarray(
            sae.inverse_transform(codes))
        change = torch.as_tensor(change, device=acts.device, dtype=acts.dtype)
        return acts + change.reshape(acts.shape)

    return clamp


def _logits(loaded, ids, mask):
    kind, out = _final_output(loaded(ids, mask), loaded.vocab_size(), loaded.causal)
    if kind != "lm":
        what = ("logits that are not next-token predictions (a masked-language or "
                "classification head)" if kind == "other" else "hidden states, not logits")
        raise ValueError(
            f"Steering needs a causal language model with a next-token head; "
            f"{type(loaded.model).__name__} gives {what} (an encoder such as MiniLM "
            "cannot generate)."
        )
    return out


def _eos(loaded):
    eos = getattr(loaded.tokenizer, "eot_token_id", None)
    if eos is None:
        eos = getattr(loaded.tokenizer, "eos_token_id", None)
    return None if eos is None else int(eos)


def _decode(loaded, ids):
    return loaded.tokenizer.decode(ids, skip_special_tokens=True)


def steer(extractor, sae, texts, feature, strength, max_new_tokens=20, random_state=None, *,
          clamp=None, temperature=0.0, direction=None):
    """Continue ``texts`` with a feature written into the model's activations.

    At every position (of the prompt and of the tokens generated so far),
    ``strength`` times the feature's atom (its unit-norm row of
    ``sae.components_``) is added to the activations at ``extractor``'s hook
    point, and the model generates ``max_new_tokens`` tokens: greedily (the
    most likely token) by default, by sampling with ``temperature > 0``.
    With ``strength=0`` the continuations are exactly those of the plain
    model.

    Parameters
    ----------
    extractor : TransformerActivationExtractor
        Gives the causal language model and the hook point (fitted here if
        it is not fitted).
    sae : fitted dictionary
        With ``components_`` of the hook's width; if its ``provenance_``
        names another model or hook point, it is refused.
    texts : str or list of str
        Prompts, each continued on its own; a prompt longer than the
        extractor's ``max_length`` tokens is continued from its last
        ``max_length`` tokens.
    feature : int or None
        The feature (a row of ``sae.components_``); None with ``direction``.
    strength : float
        How much of the atom is added, in the units of the hooked activations
        (compare with the norms of the activations, or with the feature's own
        codes; ``sae.transform`` gives them). Negative values push the other
        way. Must be 0 with ``clamp``.
    max_new_tokens : int, default=20
        Tokens generated per text (fewer if the model ends the text); at
        least 1.
    random_state : int, RandomState instance or None, default=None
        Seeds the sampling when ``temperature > 0``; greedy generation does
        not use it. Every prompt is sampled from the same seed, so a prompt's
        continuation does not depend on the other prompts in ``texts``.
    clamp : float or None, default=None
        Instead of adding, set the feature's code to this value at every
        position: each position is encoded, its code for the feature is set,
        and the difference of the two decodings is added, so the part of the
        activations the dictionary does not reconstruct stays in place.
    temperature : float, default=0.0
        0 generates greedily; above 0 samples from the softmax of the logits
        divided by it.
    direction : array-like of shape (n_features_in_,) or None, default=None
        Add ``strength`` times this vector instead of an atom (a baseline
        such as a random direction); ``feature`` must then be None.

    Returns
    -------
    continuations : list of str
        The generated text of each prompt (the prompt not included).

    Raises
    ------
    ValueError
        For a model without a next-token head, a feature out of range, a
        dictionary of another width or hook point, or an empty text.

    See Also
    --------
    steering_distributions : The next-token distributions with and without
        the edit.
    logit_effects : The tokens a feature promotes when written at the hook.

    Examples
    --------
    >>> from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
    >>> from sparse_dict.analysis import steer
    >>> texts = ["To be, or not to be, that is the question.",
    ...          "Now is the winter of our discontent."]
    >>> ext = TransformerActivationExtractor("builtin", device="cpu").fit(texts)
    >>> sae = SparseAutoencoderDictionary(n_components=64, max_steps=20, random_state=0)
    >>> _ = sae.fit(ext.transform(texts), provenance=ext.provenance())
    >>> plain = steer(ext, sae, ["My lord,"], feature=3, strength=0.0, max_new_tokens=5)
    >>> steered = steer(ext, sae, ["My lord,"], feature=3, strength=50.0, max_new_tokens=5)
    >>> len(plain), isinstance(steered[0], str)
    (1, True)
    """
    extractor, edit = _edit(extractor, sae, feature, strength, clamp, direction)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or (
            max_new_tokens < 1):
        # 0 generated nothing to compare: two empty continuations.
        raise ValueError(f"max_new_tokens must be a positive integer, got "
                         f"{max_new_tokens!r}.")
    temperature = _check_number(temperature, "temperature", minimum=0.0)
    texts = [texts] if isinstance(texts, str) else texts
    texts, _ = _check_texts(texts, "texts")
    loaded = extractor.loaded_model()
    if not callable(getattr(loaded.tokenizer, "decode", None)):
        raise ValueError("Generating text needs a tokenizer with a decode method; "
                         f"{type(loaded.tokenizer).__name__} has none.")
    # A long prompt is continued from its end: its last max_length tokens.
    seqs = extractor.token_ids(texts, keep="end")
    for i, seq in enumerate(seqs):
        if not seq:
            raise ValueError(f"Text {i} has no tokens, so there is nothing to continue.")
    seed = None
    if temperature > 0:
        seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    limit = loaded.max_positions or None
    eos = _eos(loaded)
    continuations = []
    training = loaded.model.training
    loaded.model.eval()
    try:
        with torch.inference_mode(), extractor.activation_hook() as hook:
            for seq in seqs:
                ids, new = list(seq), []
                # Each prompt draws from the seed afresh: its continuation is
                # the same whatever prompts come before it in the list.
                generator = None if seed is None else torch.Generator().manual_seed(seed)
                for _ in range(max_new_tokens):
                    # The model sees at most its number of positions: the
                    # oldest tokens leave the window first.
                    window = ids[-limit:] if limit else ids
                    x = torch.tensor([window], dtype=torch.long, device=loaded.device)
                    hook.reset("edit", edit)
                    logits = _logits(loaded, x, torch.ones_like(x))[0, -1].float()
                    if not bool(torch.isfinite(logits).all()):
                        raise _overflowed(strength, clamp)
                    if generator is None:
                        token = int(torch.argmax(logits))
                    else:
                        probs = torch.softmax(logits / temperature, dim=-1).cpu()
                        token = int(torch.multinomial(probs, 1, generator=generator))
                    if token == eos:
                        break
                    ids.append(token)
                    new.append(token)
                continuations.append(_decode(loaded, new))
    finally:
        loaded.model.train(training)
    return continuations


def steering_distributions(extractor, sae, texts, feature, strength, *, clamp=None,
                           direction=None, positions="last"):
    """Next-token log-probabilities of ``texts`` with and without steering.

    The model reads each text twice: as it is, and with the edit of
    :func:`steer` at the hook point (``strength`` times the feature's atom,
    at unit norm, added at every position, or its code clamped). The two distributions
    show how far the feature moves the model, and towards which tokens.

    Parameters
    ----------
    extractor : TransformerActivationExtractor
    sae : fitted dictionary
    texts : str or list of str
    feature : int or None
    strength : float
    clamp : float or None, default=None
    direction : array-like of shape (n_features_in_,) or None, default=None
        As in :func:`steer`.
    positions : {"last", "all"}, default="last"
        The next token after each whole text, or after every position of
        every text (text after text, position after position). A text
        longer than the extractor's ``max_length`` is read from its end.

    Returns
    -------
    SteeringDistributions
        ``plain`` and ``steered`` log-probabilities, and where each row comes
        from; ``log_prob_increase(token_ids)`` gives the mean shift of some
        tokens.

    Examples
    --------
    >>> from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
    >>> from sparse_dict.analysis import logit_effects, steering_distributions
    >>> texts = ["To be, or not to be, that is the question.",
    ...          "Now is the winter of our discontent."]
    >>> ext = TransformerActivationExtractor("builtin", device="cpu").fit(texts)
    >>> sae = SparseAutoencoderDictionary(n_components=64, max_steps=20, random_state=0)
    >>> _ = sae.fit(ext.transform(texts), provenance=ext.provenance())
    >>> promoted = logit_effects(ext, sae, features=[3]).promoted_ids[0]
    >>> shift = steering_distributions(ext, sae, texts, feature=3, strength=20.0)
    >>> shift.plain.shape == shift.steered.shape
    True
    >>> shift.log_prob_increase(promoted) > 0
    True
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}.")
    extractor, edit = _edit(extractor, sae, feature, strength, clamp, direction)
    texts = [texts] if isinstance(texts, str) else texts  # as steer takes it
    texts, _ = _check_texts(texts, "texts")
    loaded = extractor.loaded_model()
    # The next token after a long text follows its last max_length tokens.
    seqs = extractor.token_ids(texts, keep="end")
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    if np.any(lengths == 0):
        raise ValueError(f"Text {int(np.flatnonzero(lengths == 0)[0])} has no tokens.")
    counts = lengths if positions == "all" else np.ones_like(lengths)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    vocab = None
    plain = steered = None
    training = loaded.model.training
    loaded.model.eval()
    try:
        with torch.inference_mode(), extractor.activation_hook() as hook:
            for chunk, ids, mask in extractor.batches(seqs):
                hook.reset("capture")
                before = torch.log_softmax(_logits(loaded, ids, mask).float(), dim=-1)
                hook.reset("edit", edit)
                after = torch.log_softmax(_logits(loaded, ids, mask).float(), dim=-1)
                if plain is None:
                    vocab = before.shape[-1]
                    plain = np.empty((int(offsets[-1]), vocab), dtype=np.float32)
                    steered = np.empty_like(plain)
                # One copy to the host per batch, then the rows of each text.
                before, after = before.cpu().numpy(), after.cpu().numpy()
                for row, i in enumerate(chunk):
                    n = int(lengths[i])
                    take = slice(0, n) if positions == "all" else slice(n - 1, n)
                    plain[offsets[i]:offsets[i + 1]] = before[row, take]
                    steered[offsets[i]:offsets[i + 1]] = after[row, take]
    finally:
        loaded.model.train(training)
    if not np.isfinite(steered).all():
        raise _overflowed(strength, clamp)
    text_index = np.repeat(np.arange(len(seqs), dtype=np.int64), counts)
    if positions == "all":
        position = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64)
    else:
        position = lengths - 1
    return SteeringDistributions(plain, steered, text_index, position)
