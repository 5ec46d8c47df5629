"""Train the built-in tokenizer and 1-layer transformer on the bundled corpus.

Run as::

    python -m sparse_dict.models.train_builtin --out sparse_dict/models/builtin

It trains the byte-level BPE tokenizer and then the model on the train split
of :func:`sparse_dict._corpus.load_corpus`, with fixed seeds, on the CPU, and
writes ``model.safetensors``, ``config.json``, ``tokenizer.json`` and
``training_report.json`` to ``--out``. The report holds the held-out loss per
token on the test split, with the MLP as trained and with its output
zero-ablated or mean-ablated, so that "loss recovered" by a dictionary spliced
in at the MLP has a scale.

The shipped files were made with the defaults on one thread of a CPU shared
with other work; ``training_report.json`` says how long it took.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sparse_dict._corpus import TEST_WORKS, load_corpus
from sparse_dict._persist import check_target
from sparse_dict.models.builtin import (
    BuiltinTokenizer,
    TinyTransformer,
    TinyTransformerConfig,
    BUILTIN_FOLDER,
    save_builtin_model,
)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="sparse_dict/models/builtin", help="output directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a built-in model (the shipped one, by default)")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--d-mlp", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=500)
    # One thread: on a CPU shared with other work, two threads spin-waiting on
    # each other ran about 3 times slower than one.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _token_stream(texts, tokenizer):
    """Documents joined by end-of-text tokens, and where each document starts."""
    ids, starts = [], []
    for text in texts:
        starts.append(len(ids))
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eot_token_id)
    return np.asarray(ids, dtype=np.int64), np.asarray(starts, dtype=np.int64)


def _sample_batch(stream, starts, batch_size, seq_len, rng):
    # Half the windows begin at a document start, as a text handed to the
    # model does at inference; the other half at any token, for variety.
    n_aligned = batch_size // 2
    last = len(stream) - seq_len - 1
    aligned = rng.choice(starts[starts <= last], size=n_aligned)
    anywhere = rng.integers(0, last + 1, size=batch_size - n_aligned)
    offsets = np.concatenate([aligned, anywhere])
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    batch = torch.from_numpy(stream[idx])
    return batch[:, :-1], batch[:, 1:]


@torch.inference_mode()
def heldout_loss(model, tokenizer, texts, batch_size=64):
    """Mean next-token cross-entropy (nats per token) over ``texts``.

    Each text is one sequence starting at position 0, truncated to the
    model's ``max_len``; every real token but the first is predicted.
    """
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], max_length=model.config.max_len)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        logits = model(ids, attention_mask=mask)
        target_mask = mask[:, 1:].bool()
        losses = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view_as(target_mask)
        total += losses[target_mask].sum().item()
        count += target_mask.sum().item()
    return total / count


def evaluate(model, tokenizer, test_texts):
    """Held-out loss as trained and with layer 0's MLP ablated in three ways.

    The ablations are splicing's (:func:`sparse_dict.extraction.splice_evaluation`
    with a dictionary that reconstructs exactly), so the report's ablated
    losses are the scale on which the demo's "loss recovered" is measured.
    ``mlp_zero_ablated`` sets the MLP's output (what it adds to the residual
    stream) to zero. ``mlp_acts_zero_ablated`` sets the 512 post-ReLU
    activations, the hook point, to zero, so the MLP adds only ``fc_out``'s
    bias. ``mlp_mean_ablated`` replaces the MLP's output by its mean over the
    real tokens of ``test_texts``.
    """
    from sklearn.preprocessing import FunctionTransformer

    from sparse_dict.extraction import TransformerActivationExtractor, splice_evaluation

    def splice(hook, ablation):
        extractor = TransformerActivationExtractor(
            model, tokenizer=tokenizer, hook=hook, max_length=model.config.max_len,
            batch_size=64, device="cpu",
        )
        return splice_evaluation(extractor, FunctionTransformer(), test_texts, ablation=ablation)

    zero = splice("mlp_out", "zero")
    return {
        "test_loss": zero.loss_original,
        "test_loss_mlp_zero_ablated": zero.loss_ablated,
        "test_loss_mlp_acts_zero_ablated": splice("mlp_post", "zero").loss_ablated,
        "test_loss_mlp_mean_ablated": splice("mlp_out", "mean").loss_ablated,
    }


def _lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    # Cosine decay to a tenth of the peak rate.
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main(argv=None):
    args = _parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    # Refused before an hour of training, not after it.
    check_target(out, BUILTIN_FOLDER, overwrite=args.overwrite, hint="--overwrite")
    t_start = time.time()

    train_texts = load_corpus("train")
    test_texts = load_corpus("test")
    print(f"corpus: {len(train_texts)} train / {len(test_texts)} test documents", flush=True)

    tokenizer = BuiltinTokenizer.train(train_texts, vocab_size=args.vocab_size)
    t_tok = time.time() - t_start
    stream, starts = _token_stream(train_texts, tokenizer)
    n_test_tokens = sum(len(tokenizer.encode(t)) for t in test_texts)
    print(
        f"tokenizer: vocab {tokenizer.vocab_size} in {t_tok:.0f}s; "
        f"{len(stream)} train tokens, {n_test_tokens} test tokens",
        flush=True,
    )

    config = TinyTransformerConfig(
        vocab_size=tokenizer.vocab_size,
        d_model=args.d_model,
        n_heads=args.n_heads,
        d_mlp=args.d_mlp,
        n_layers=args.n_layers,
        max_len=args.seq_len,
    )
    model = TinyTransformer(config)
    n_params = sum(p.numel() for p in model.parameters())
    # Embeddings, norms and biases are not decayed: decay would only pull
    # rare tokens' embeddings to zero.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() == 2 and not name.startswith(("embed", "pos_embed"))
        (decay if is_matrix else no_decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    eval_texts = test_texts[::4]
    history = []
    t_train = time.time()
    smooth = None
    for step in range(args.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args)
        x, y = _sample_batch(stream, starts, args.batch_size, args.seq_len, rng)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            elapsed = time.time() - t_train
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps} train loss {smooth:.3f} "
                  f"({elapsed:.0f}s, eta {eta:.0f}s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            test = heldout_loss(model, tokenizer, eval_texts)
            history.append({"step": step + 1, "train_loss": smooth, "test_loss_subset": test})
            print(f"  held-out loss (quarter of test split) {test:.3f}", flush=True)
    train_seconds = time.time() - t_train

    model.eval()
    metrics = evaluate(model, tokenizer, test_texts)
    print(json.dumps(metrics, indent=2), flush=True)

    report = {
        **metrics,
        "mlp_zero_ablation_loss_gap": (
            metrics["test_loss_mlp_zero_ablated"] - metrics["test_loss"]
        ),
        "loss_unit": (
            "nats per token, next-token cross-entropy, test split, "
            "each document from position 0"
        ),
        "log_vocab_size": math.log(tokenizer.vocab_size),
        "test_works": list(TEST_WORKS),
        "n_train_documents": len(train_texts),
        "n_test_documents": len(test_texts),
        "n_train_tokens": int(len(stream)),
        "n_test_tokens": int(n_test_tokens),
        "n_parameters": int(n_params),
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "epochs": args.steps * args.batch_size * args.seq_len / len(stream),
        "history": history,
        "tokenizer_seconds": round(t_tok, 1),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "args": vars(args),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "command": " ".join(
            [
                "python -m sparse_dict.models.train_builtin",
                *(sys.argv[1:] if argv is None else argv),
            ]
        ),
    }
    save_builtin_model(model, tokenizer, out, overwrite=args.overwrite, report=report)
    print(f"wrote {out}", flush=True)
    return report


if __name__ == "__main__":
    main()
