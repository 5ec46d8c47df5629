"""Splicing: run a model with its activations replaced by a dictionary's reconstruction."""

import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from sparse_dict.extraction._extractor import TransformerActivationExtractor
from sparse_dict.extraction._hook import StopForward
from sparse_dict.extraction._provenance import check_compatible, check_width
from sparse_dict.extraction._texts import _check_texts



@dataclass
class SpliceResult:
    """What survives when a dictionary's reconstruction replaces the activations.

    Losses are mean next-token cross-entropies in nats over the positions that
    have a next real token; they, ``loss_recovered`` and ``kl_divergence`` are
    None for a model without a language-model head, which gets the cosine
    similarities of its mean-pooled final outputs instead (and, with a
    warning, for texts of one token each: nothing to predict).

    Attributes
    ----------
    loss_original, loss_spliced, loss_ablated : float or None
        With the real activations, the reconstruction, and the ablation.
    loss_recovered : float or None
        ``(loss_ablated - loss_spliced) / (loss_ablated - loss_original)``:
        1 when splicing costs nothing, 0 when it is as bad as ablation.
    kl_divergence : float or None
        Mean KL(original || spliced) of the next-token distributions, nats.
    cosine_spliced, cosine_ablated : float or None
        Mean over texts of the cosine similarity between the mean-pooled
        final outputs with real activations and with the reconstruction
        (or the ablation).
    explained_variance : float
        Pooled fraction of the activations' variance the reconstruction
        explains, as :func:`sparse_dict.metrics.explained_variance`.
    l0 : float
        Mean number of non-zero codes per token.
    n_texts, n_tokens : int
    ablation : str
    """

    loss_original: float | None
    loss_spliced: float | None
    loss_ablated: float | None
    loss_recovered: float | None
    kl_divergence: float | None
    cosine_spliced: float | None
    cosine_ablated: float | None
    explained_variance: float
    l0: float
    n_texts: int
    n_tokens: int
    ablation: str

    def to_dict(self):
        """The fields as a plain dict."""
        return asdict(self)


def _final_output(out, vocab_size, causal=True):
    """("lm", logits) or ("hidden", final hidden states) from a model's output.

    Logits of a model that is not ``causal`` (a masked-language or a
    classification head) are ("other", logits): neither a next-token loss
    nor hidden states.
    """
    if hasattr(out, "logits") and out.logits is not None:
        return ("lm" if causal else "other"), out.logits
    if hasattr(out, "last_hidden_state"):
        return "hidden", out.last_hidden_state
    if isinstance(out, (tuple, list)):
        out = out[0]
    if vocab_size is not None and out.shape[-1] == vocab_size:
        return "lm", out
    return "hidden", out


def _count_nonzero(codes):
    import scipy.sparse as sp

    return int(codes.count_nonzero()) if sp.issparse(codes) else int(np.count_nonzero(codes))


def splice_evaluation(extractor, dictionary, texts, *, ablation="zero", verbose=0, label=None):
    """Run the model with its activations replaced by a dictionary's reconstruction.

    At the extractor's hook point, the activations of every real token are
    replaced by ``dictionary.inverse_transform(dictionary.transform(acts))``
    (padding is left alone), and the model's output is compared with the
    original run and with a run where the activations are ablated.

    Parameters
    ----------
    extractor : TransformerActivationExtractor, "builtin", str, path-like or nn.Module
        Gives the model, the hook point, the tokenizer, ``max_length``,
        ``batch_size`` and ``device``. Anything else is wrapped in a default
        extractor. Fitted on ``texts`` first if it is not fitted.
    dictionary : object with ``transform`` and ``inverse_transform``
        A fitted dictionary, such as
        :class:`~sparse_dict.SparseAutoencoderDictionary`, taking float32
        arrays of shape (n_tokens, n_features_out_).
    texts : list of str, or list of lists of int
    ablation : {"zero", "mean"}, default="zero"
        Replace the activations by zeros, or by their mean over all tokens of
        ``texts``.
    verbose : int, default=0
        Progress bar over batches when positive.
    label : str or None, default=None
        Names the dictionary in the progress bar; its class name when None.

    Returns
    -------
    result : SpliceResult
        Losses and loss recovered (language models) or cosine similarities
        (encoders), explained variance and L0. ``result.to_dict()`` gives a
        dict.

    Examples
    --------
    >>> import torch
    >>> from sklearn.preprocessing import FunctionTransformer
    >>> from sparse_dict.extraction import TransformerActivationExtractor, splice_evaluation
    >>> from sparse_dict.models.builtin import TinyTransformer, TinyTransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> lm = TinyTransformer(TinyTransformerConfig(vocab_size=300, max_len=16))
    >>> ext = TransformerActivationExtractor(lm, device="cpu")
    >>> identity = FunctionTransformer()  # a "dictionary" that reconstructs exactly
    >>> result = splice_evaluation(ext, identity, [[1, 2, 3, 4], [5, 6, 7]])
    >>> result.loss_recovered, result.kl_divergence, result.explained_variance
    (1.0, 0.0, 1.0)
    """
    if ablation not in ("zero", "mean"):
        raise ValueError(f"ablation must be 'zero' or 'mean', got {ablation!r}.")
    for method in ("transform", "inverse_transform"):
        if not callable(getattr(dictionary, method, None)):
            raise TypeError(
                f"dictionary must have transform and inverse_transform methods; "
                f"{type(dictionary).__name__} has no {method}."
            )
    if not isinstance(extractor, TransformerActivationExtractor):
        extractor = TransformerActivationExtractor(extractor)
    texts, _ = _check_texts(texts, "texts")
    try:
        check_is_fitted(extractor)
    except Exception:
        extractor = clone(extractor).set_params(pooling="none").fit(texts)
    # A dictionary that records where its activations came from is spliced
    # there only: one of another hook point of the same width (the built-in
    # model's resid_post against its mlp_out) scored 0.57 where its own
    # point gave 0.10.
    if getattr(dictionary, "provenance_", None) is not None:
        check_compatible(extractor, dictionary)
    elif getattr(dictionary, "n_features_in_", None) is not None:
        # Without a record, the width is all there is to check; checked here,
        # it is named as the hook's, not met as scikit-learn's error mid-splice.
        check_width(extractor.provenance(), dictionary.n_features_in_)
    # Only the extractor's public interface is used, so any extractor that
    # offers it (token_ids, batches, activation_hook, loaded_model) splices.
    loaded = extractor.loaded_model()
    seqs = extractor.token_ids(texts)
    if not any(seqs):
        raise ValueError(f"None of the {len(seqs):,} texts has a token: there are no "
                         "activations to splice.")
    vocab = loaded.vocab_size()
    label = label or type(dictionary).__name__
    point = getattr(extractor, "hook_name_", "the activations")

    acc = dict.fromkeys(
        ["nll_o", "nll_s", "nll_a", "kl", "n_pred", "cos_s", "cos_a", "n_texts",
         "sse", "sq", "n_tok", "nnz"], 0.0
    )
    sum_x = None
    mean_act = None
    training = loaded.model.training
    loaded.model.eval()
    try:
        with torch.inference_mode(), extractor.activation_hook() as hook:
            if ablation == "mean":
                total, count = None, 0
                desc = f"Splicing {label}: mean of {point} over {len(seqs):,} texts"
                for _, ids, mask in extractor.batches(seqs, desc if verbose else None):
                    hook.reset("stop")
                    try:
                        loaded(ids, mask)
                    except StopForward:
                        pass
                    real = hook.captured[mask.bool()].double()
                    total = real.sum(0) if total is None else total + real.sum(0)
                    count += real.shape[0]
                mean_act = total / count

            desc = (f"Splicing {label}'s reconstruction into {point} of {len(seqs):,} "
                    "texts")
            for _, ids, mask in extractor.batches(seqs, desc if verbose else None):
                keep = mask.bool()
                hook.reset("capture")
                kind, out_o = _final_output(loaded(ids, mask), vocab, loaded.causal)
                if kind == "other":
                    raise ValueError(
                        f"{type(loaded.model).__name__} gives logits that are not next-token "
                        "predictions (a masked-language or classification head), so there "
                        "is no next-token loss to splice; pass its base model (the module "
                        "under the head) for the cosine of the hidden states, or a causal "
                        "language model.")
                if not bool(torch.isfinite(out_o[keep]).all()):
                    # Said here: every figure computed from it would be NaN.
                    raise ValueError(
                        f"{type(loaded.model).__name__}'s own output, before any splice, "
                        "is not finite at real tokens of this batch: the model leaves NaN "
                        "or inf there (often from padded positions, which a masked "
                        "attention multiplies by zero). Pass an extractor with "
                        "batch_size=1, which pads nothing, or mend the model.")
                acts = hook.captured.clone()

                real = acts[keep].float().cpu().numpy()
                codes = dictionary.transform(real)
                recon = np.array(dictionary.inverse_transform(codes), dtype=np.float32)
                acc["nnz"] += _count_nonzero(codes)
                acc["sse"] += float(np.sum((real.astype(np.float64) - recon) ** 2))
                real64 = real.astype(np.float64)
                acc["sq"] += float(np.sum(real64**2))
                sum_x = real64.sum(0) if sum_x is None else sum_x + real64.sum(0)
                acc["n_tok"] += real.shape[0]

                spliced = acts.clone()
                spliced[keep] = torch.as_tensor(recon, device=acts.device, dtype=acts.dtype)
                hook.reset("replace", spliced)
                _, out_s = _final_output(loaded(ids, mask), vocab, loaded.causal)

                ablated = acts.clone()
                ablated[keep] = 0.0 if mean_act is None else mean_act.to(acts.dtype)
                hook.reset("replace", ablated)
                _, out_a = _final_output(loaded(ids, mask), vocab, loaded.causal)

                if kind == "lm":
                    _accumulate_lm(acc, ids, keep, out_o, out_s, out_a)
                else:
                    _accumulate_hidden(acc, keep, out_o, out_s, out_a)
    finally:
        loaded.model.train(training)

    n_tok = acc["n_tok"]
    sst = acc["sq"] - float(np.sum(sum_x**2)) / n_tok if n_tok else 0.0
    if sst > 0:
        ev = 1.0 - acc["sse"] / sst
    else:
        ev = 1.0 if acc["sse"] == 0 else 0.0
    result = dict(
        loss_original=None, loss_spliced=None, loss_ablated=None, loss_recovered=None,
        kl_divergence=None, cosine_spliced=None, cosine_ablated=None,
        explained_variance=float(ev), l0=acc["nnz"] / n_tok if n_tok else 0.0,
        n_texts=len(texts), n_tokens=int(n_tok), ablation=ablation,
    )
    if kind == "lm" and not acc["n_pred"]:
        warnings.warn(
            "No text has two tokens or more, so no next token is predicted: the losses, "
            "loss_recovered and kl_divergence are None. Splice texts of two tokens or more.",
            UserWarning, stacklevel=2)
    if acc["n_pred"]:
        n = acc["n_pred"]
        lo, ls, la = acc["nll_o"] / n, acc["nll_s"] / n, acc["nll_a"] / n
        denom = la - lo
        result.update(
            loss_original=lo, loss_spliced=ls, loss_ablated=la,
            loss_recovered=(la - ls) / denom if denom != 0 else float("nan"),
            kl_divergence=acc["kl"] / n,
        )
    if acc["n_texts"]:
        result.update(
            cosine_spliced=acc["cos_s"] / acc["n_texts"],
            cosine_ablated=acc["cos_a"] / acc["n_texts"],
        )
    return SpliceResult(**result)


def _accumulate_lm(acc, ids, keep, out_o, out_s, out_a):
    # Position t predicts token t + 1; with right padding a position has a
    # target exactly when the next position is a real token.
    target = ids[:, 1:]
    valid = keep[:, 1:]
    logp = [torch.log_softmax(o[:, :-1].double(), dim=-1) for o in (out_o, out_s, out_a)]
    for key, lp in zip(("nll_o", "nll_s", "nll_a"), logp):
        nll = -lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        acc[key] += float(nll[valid].sum())
    kl = (logp[0].exp() * (logp[0] - logp[1])).sum(-1)
    acc["kl"] += float(kl[valid].sum())
    acc["n_pred"] += int(valid.sum())


def _accumulate_hidden(acc, keep, out_o, out_s, out_a):
    m = keep.unsqueeze(-1)

    def pooled(h):
        # Padded positions filled, not multiplied: a model may leave NaN there.
        return h.double().masked_fill(~m, 0.0).sum(1) / m.sum(1)

    e_o, e_s, e_a = pooled(out_o), pooled(out_s), pooled(out_a)
    acc["cos_s"] += float(torch.cosine_similarity(e_o, e_s, dim=-1).sum())
    acc["cos_a"] += float(torch.cosine_similarity(e_o, e_a, dim=-1).sum())
    acc["n_texts"] += e_o.shape[0]
