"""A trainer's state as named arrays and plain numbers, for a file to hold.

A pickle of a :class:`~sparse_dict._torch.train.Trainer` keeps everything a
further ``partial_fit`` goes on from; a saved folder holds no pickles. This
module gives the same state as arrays (for a safetensors file) and numbers
(for JSON), and builds the trainer back from them, so that training goes on
after a save and a load exactly as it would have without them: the model in
the trainer's scaled units, Adam's moments and step counts, the resampling
draws' generator and the counts that decide which features are dead.

Left out, because the caller keeps them already: the record of steps (the
estimator's ``history_``) and the sparsity mechanism (rebuilt from its
parameters).
"""

import numpy as np
import torch

from sparse_dict._torch.model import BASE_TENSORS, UNSCALED_TENSORS, SparseAutoencoder

# The numbers a state holds: what each is ("count", an integer from 0;
# "amount", a real from 0; "positive", a real above 0) and whether it may be
# None (a trainer rebuilt from fitted attributes has seen no rows yet).
NUMBERS = {
    "seed": ("count", False),
    "scale": ("positive", False),
    "variance": ("amount", True),
    "seen_count": ("amount", True),
    "seen_variance": ("amount", True),
    "run_start": ("count", False),
    "step": ("count", False),
    "n_resampled": ("count", False),
    "pass_rows": ("amount", False),
    "resample_checked": ("count", True),
    "residual_power": ("amount", True),
}
_MOMENTS = ("step", "exp_avg", "exp_avg_sq")


def _plain(value):
    """A JSON number (or None) from a Python, numpy or 0-d torch number."""
    if value is None:
        return None
    if torch.is_tensor(value):
        value = value.item()
    return value.item() if isinstance(value, np.generic) else value


def resume_state(trainer):
    """``trainer``'s state as ``(arrays, numbers)``; see :func:`trainer_from_state`.

    Examples
    --------
    >>> import torch
    >>> from sparse_dict._torch import Trainer
    >>> arrays, numbers = resume_state(Trainer(4, 8, torch.device("cpu"), seed=0))
    >>> sorted(name for name in arrays if name.startswith("model.")), numbers["step"]
    (['model.W_dec', 'model.W_enc', 'model.b_dec', 'model.b_enc'], 0)
    """
    state = trainer._state(on_device=False)
    arrays = {f"model.{name}": value.numpy() for name, value in state["model_state"].items()}
    names = [name for name, _ in trainer.model.named_parameters()]
    for index, moments in state["optim_state"]["state"].items():
        for key in _MOMENTS:
            arrays[f"adam.{names[index]}.{key}"] = moments[key].numpy()
    arrays["resample_generator"] = state["resample_generator"].numpy()
    arrays["steps_since_fired"] = state["steps_since_fired"].numpy()
    arrays["pass_fired"] = np.asarray(state["pass_fired"], dtype=np.float64)
    arrays["history_rows"] = np.asarray(state["history_rows"], dtype=np.float64)
    seen = state["seen"]
    if seen is not None:
        arrays["seen_mean"] = np.asarray(seen[1], dtype=np.float64)
    numbers = {
        "seed": state["seed"],
        "scale": state["scale"],
        "variance": state["variance"],
        "seen_count": None if seen is None else seen[0],
        "seen_variance": None if seen is None else seen[2],
        "run_start": state["run_start"],
        "step": state["step"],
        "n_resampled": state["n_resampled"],
        "pass_rows": state["pass_rows"],
        "resample_checked": state["resample_checked"],
        "residual_power": state["residual_power"],
    }
    return arrays, {name: _plain(value) for name, value in numbers.items()}


def state_schema(n_features, n_components, activation):
    """What each array of a state must be: ``{name: (shape, dtype, optional, minimum)}``.

    A dimension of ``None`` may have any length; ``minimum`` is None where
    any value goes. Adam's entries are optional (a trainer that has not
    stepped has none), as is ``seen_mean``.
    """
    model = SparseAutoencoder(n_features, n_components, activation, initialize=False)
    schema = {f"model.{name}": (tuple(value.shape), str(value.dtype).removeprefix("torch."),
                                False, None)
              for name, value in model.state_dict().items()}
    for name, parameter in model.named_parameters():
        schema[f"adam.{name}.step"] = ((), "float32", True, 0)
        schema[f"adam.{name}.exp_avg"] = (tuple(parameter.shape), "float32", True, None)
        schema[f"adam.{name}.exp_avg_sq"] = (tuple(parameter.shape), "float32", True, 0)
    schema["resample_generator"] = ((None,), "uint8", False, None)
    schema["steps_since_fired"] = ((n_components,), "int64", False, 0)
    schema["pass_fired"] = ((n_components,), "float64", False, 0)
    schema["history_rows"] = ((None,), "float64", False, 0)
    schema["seen_mean"] = ((n_features,), "float64", True, None)
    return schema


def trainer_from_state(trainer_class, arrays, numbers, activation, history):
    """A trainer that goes on exactly as the one :func:`resume_state` read.

    Parameters
    ----------
    trainer_class : type
        :class:`~sparse_dict._torch.train.Trainer`.
    arrays, numbers : dict
        As :func:`resume_state` gave them, checked against
        :func:`state_schema` and :data:`NUMBERS`.
    activation : Activation
        The sparsity mechanism the model was trained with.
    history : ndarray of shape (n_steps, n_stats)
        The record of steps, float64.

    Raises
    ------
    ValueError
        Where the arrays do not fit together: Adam's moments for some
        parameters and not others, a record of rows of another length than
        the steps', a generator state torch refuses.
    """
    n_components, n_features = arrays["model.W_dec"].shape
    model = SparseAutoencoder(n_features, n_components, activation, initialize=False)
    names = [name for name, _ in model.named_parameters()]
    stepped = [f"adam.{name}.step" in arrays for name in names]
    if any(stepped) and not all(
            f"adam.{name}.{key}" in arrays for name in names for key in _MOMENTS):
        raise ValueError("Adam's state is incomplete: some parameters' moments are missing")
    if len(arrays["history_rows"]) != len(history):
        raise ValueError(f"the record of rows has {len(arrays['history_rows'])} steps, the "
                         f"history {len(history)}")
    seen = None
    parts = (numbers["seen_count"], arrays.get("seen_mean"), numbers["seen_variance"])
    if any(part is not None for part in parts):
        if any(part is None for part in parts):
            raise ValueError("the rows seen are recorded in part only")
        seen = (float(parts[0]), parts[1].copy(), float(parts[2]))
    residual = numbers["residual_power"]
    state = {
        "seed": int(numbers["seed"]),
        "activation": activation,
        "n_features": n_features,
        "n_components": n_components,
        "model_state": {key.removeprefix("model."): torch.from_numpy(value.copy())
                        for key, value in arrays.items() if key.startswith("model.")},
        "optim_state": None,
        "resample_generator": torch.from_numpy(arrays["resample_generator"].copy()),
        "scale": float(numbers["scale"]),
        "variance": None if numbers["variance"] is None else float(numbers["variance"]),
        "seen": seen,
        "run_start": int(numbers["run_start"]),
        "step": int(numbers["step"]),
        "steps_since_fired": torch.from_numpy(arrays["steps_since_fired"].copy()),
        "n_resampled": int(numbers["n_resampled"]),
        "history": np.asarray(history, dtype=np.float64),
        "history_rows": arrays["history_rows"],
        "pass_fired": arrays["pass_fired"],
        "pass_rows": numbers["pass_rows"],
        "resample_checked": (None if numbers["resample_checked"] is None
                             else int(numbers["resample_checked"])),
        "residual_power": None if residual is None else torch.tensor(float(residual)),
    }
    trainer = trainer_class.__new__(trainer_class)
    try:
        trainer.__setstate__(state)
    except RuntimeError as exc:  # the generator's state, from another torch build
        raise ValueError(f"the resampling generator's state does not load ({exc})") from None
    optimizer_state = trainer.optimizer.state_dict()
    optimizer_state["state"] = {
        index: {key: torch.from_numpy(arrays[f"adam.{name}.{key}"].copy()) for key in _MOMENTS}
        for index, name in enumerate(names) if stepped[index]
    }
    trainer.optimizer.load_state_dict(optimizer_state)
    return trainer


def holds_weights(trainer, params, scale, rtol=1e-5):
    """Whether ``trainer``'s model is the dictionary of ``params`` (the caller's units).

    The atoms, the encoder and the biases, within float32's rounding of the
    scale folded in and out; the mechanisms' state is left out, since a
    change of its settings (BatchTopK's ``k``) restarts it in the trainer
    alone.
    """
    fitted = trainer.model.fitted_tensors()
    for name in BASE_TENSORS:
        if name in UNSCALED_TENSORS:
            # The matrices, as exported, where nothing changed them since:
            # equal as they are, without the float64 copies of both (on a
            # 16384 x 512 dictionary those took 0.2 to 0.8 s and about half a
            # GB in every load of a training state).
            same = fitted[name].cpu().numpy()
            given = np.asarray(params[name])
            if (same.shape == given.shape and same.dtype == given.dtype
                    and np.array_equal(same, given)):
                continue
        expected = np.asarray(params[name], dtype=np.float64)
        held = fitted[name].double().cpu().numpy()
        if name not in UNSCALED_TENSORS:
            held = held / float(scale)
        bound = rtol * max(float(np.abs(expected).max(initial=0.0)), 1e-30)
        if held.shape != expected.shape or np.abs(held - expected).max(initial=0.0) > bound:
            return False
    return True
