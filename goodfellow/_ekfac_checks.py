"""What EKFAC and KFAC accept: hyperparameters, layers, saved states and finite statistics.

:class:`goodfellow.EKFAC` (:mod:`goodfellow.ekfac`) checks its hyperparameters at construction
and again at every step (a scheduler may change them), a saved state before it is loaded, and
every curvature statistic before it reaches the optimizer's state; the two predicates say which
layers it preconditions and whether a layer's bias joins its weight matrix.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from goodfellow._checks import is_integer, is_real, real_number
from goodfellow._kronecker_checks import _check_damping

if TYPE_CHECKING:
    from goodfellow.ekfac import EKFAC


def _check_group(group: dict) -> dict:
    """Check the hyperparameters, at construction and again at every step.

    A scheduler or the user may have changed ``param_groups[0]`` in between. ``lr = 0`` is
    allowed, as in torch's optimizers: a warm-up schedule such as
    ``LambdaLR(optimizer, lambda s: s / 100)`` starts there, and the step then gathers the
    curvature statistics without moving the parameters. NumPy scalars count as numbers.

    Returns:
        The four hyperparameters as Python ``float`` and ``int``.
    """
    lr = real_number(group["lr"], "lr", "a non-negative number")
    if not (lr >= 0 and math.isfinite(lr)):
        raise ValueError(
            f"lr must be non-negative and finite, got {lr}: it scales every step (try 0.01 to "
            "1 for EKFAC; 0 gathers statistics without moving the parameters)."
        )
    damping = _check_damping(group["damping"])
    update_freq, decay = group["update_freq"], group["decay"]
    if not is_integer(update_freq) or update_freq < 1:
        raise ValueError(
            f"update_freq must be an integer >= 1, got {update_freq!r}: it is the number of "
            "steps between two eigendecompositions (1 = every step)."
        )
    if not is_real(decay) or not 0 <= decay < 1:
        raise ValueError(
            f"decay must be a number in [0, 1), got {decay!r}: it weighs the past in the "
            "running averages (0 = current batch only; 0.95 is common)."
        )
    return {"lr": lr, "damping": damping, "update_freq": int(update_freq), "decay": float(decay)}


def _check_finite(tensor: Tensor, what: str, layer: str, step: int) -> None:
    """Refuse a non-finite curvature statistic before it reaches the optimizer's state."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"EKFAC step {step}: the {what} of {layer} has non-finite entries (inf or "
            "nan), so no parameter was changed. The layer's inputs or output gradients "
            "overflowed or the loss is not finite: lower the learning rate, raise the damping, "
            "or check the data."
        )


def _check_state_dict(optimizer: EKFAC, state_dict: dict) -> None:
    """Refuse a saved state that does not fit ``optimizer``, before anything is loaded."""
    if not (
        isinstance(state_dict, dict)
        and isinstance(state_dict.get("state"), dict)
        and isinstance(state_dict.get("param_groups"), list)
    ):
        raise TypeError(
            "state_dict must be what EKFAC.state_dict() returned: a dict with 'state' and "
            f"'param_groups', got {type(state_dict).__name__}."
        )
    groups = state_dict["param_groups"]
    saved = sum(len(group.get("params", ())) for group in groups)
    own = len(optimizer.param_groups[0]["params"])
    if len(groups) != 1 or saved != own:
        layers = ", ".join(repr(name) for name in optimizer._layers)
        raise ValueError(
            f"the saved state holds {saved} parameters in {len(groups)} group(s), but this "
            f"EKFAC optimizes {own} in one group (preconditioned layers {layers}): it was "
            "saved for another model."
        )
    index = {id(p): k for k, p in enumerate(optimizer.param_groups[0]["params"])}
    saved_ids = list(groups[0]["params"])  # the saved indices, in this optimizer's order
    entries = state_dict["state"]
    mine = "EKFAC" if optimizer.mode == "ekfac" else "KFAC"
    for name, module in optimizer._layers.items():
        entry = entries.get(saved_ids[index[id(module.weight)]])
        if entry is None:
            continue  # the layer had not stepped yet when the state was saved
        kind = type(module).__name__
        # a conv's factors are over its patches: C_in * kernel entries in, C_out out
        d_out, d_in = module.weight.shape[0], module.weight[0].numel()
        d_in += int(_has_trainable_bias(module))
        shapes = {
            "A": (d_in, d_in),
            "G": (d_out, d_out),
            "input_eigenvalues": (d_in,),
            "input_eigenvectors": (d_in, d_in),
            "output_eigenvalues": (d_out,),
            "output_eigenvectors": (d_out, d_out),
        }
        if optimizer.mode == "ekfac":
            shapes["scalings"] = (d_out, d_in)
            if "scalings" not in entry and "A" in entry:
                raise ValueError(
                    f"{kind} {name!r}: the saved state has no 'scalings', so it was saved "
                    "by KFAC (mode='kfac'); load it into goodfellow.KFAC, or start EKFAC "
                    "afresh."
                )
        elif "scalings" in entry:
            raise ValueError(
                f"{kind} {name!r}: the saved state holds EKFAC's 'scalings', so it was "
                f"saved by EKFAC (mode='ekfac'), not by {mine}; load it into "
                "goodfellow.EKFAC."
            )
        missing = sorted(set(shapes) - set(entry))
        if missing:
            raise ValueError(
                f"{kind} {name!r}: the saved state lacks {missing}; it was not saved by "
                f"{mine} (keys {sorted(entry)})."
            )
        for key, shape in shapes.items():
            value = entry[key]
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            if got != shape:
                raise ValueError(
                    f"{kind} {name!r} ({_widths(module)}, "
                    f"{'with' if _has_trainable_bias(module) else 'without'} trainable bias): "
                    f"{key!r} has shape {got} in the saved state, but this layer needs "
                    f"{shape}; the state was saved for a model with other layer widths."
                )
    weights = {saved_ids[index[id(module.weight)]] for module in optimizer._layers.values()}
    stray = [key for key in entries if key not in weights]
    if stray:
        raise ValueError(
            f"the saved state holds statistics for parameters {stray} (by position), which "
            "are not the preconditioned layers' weights of this model: it was saved for "
            "another model."
        )


def _is_kronecker_layer(module: nn.Module) -> bool:
    """A Linear, or a convolution of one group: a layer whose Fisher block KFAC factors."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1


def _kind(module: nn.Module) -> str:
    """``Linear`` or the convolution's class name, as messages name a layer."""
    return "Linear" if isinstance(module, nn.Linear) else type(module).__name__


def _widths(module: nn.Module) -> str:
    """A preconditioned layer's widths, as its constructor names them."""
    if isinstance(module, nn.Linear):
        return f"in_features={module.in_features}, out_features={module.out_features}"
    return (
        f"in_channels={module.in_channels}, out_channels={module.out_channels}, "
        f"kernel_size={module.kernel_size}"
    )


def _has_trainable_bias(module: nn.Module) -> bool:
    """A frozen bias is left out of the joint matrix (no ones column): it is not optimized."""
    return module.bias is not None and module.bias.requires_grad


def _check_model(model: nn.Module, mode: str) -> None:
    """Refuse an unknown mode, and a layer whose bias trains while its weight is frozen."""
    if mode not in ("ekfac", "kfac"):
        raise ValueError(f"mode must be 'ekfac' or 'kfac', got {mode!r}.")
    for name, module in model.named_modules():
        if (
            _is_kronecker_layer(module)
            and module.bias is not None
            and module.bias.requires_grad
            and not module.weight.requires_grad
        ):
            raise ValueError(
                f"{type(module).__name__} {name!r} has a frozen weight but a trainable "
                "bias; EKFAC treats "
                "weight and bias as one matrix: freeze both or neither."
            )


def _check_layers(model: nn.Module, linears: list[tuple[str, nn.Module]]) -> None:
    """Refuse a model with no layer to precondition, and weights tied between layers."""
    if not linears:
        raise ValueError(
            f"the model ({type(model).__name__}) has no nn.Linear layer with trainable "
            "weights, nor an ungrouped convolution: EKFAC preconditions nn.Linear and ungrouped "
            "nn.Conv1d/2d/3d layers only."
        )
    # every module holding each parameter, preconditioned or not (an embedding tied to the
    # output layer shares the layer's weight)
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{_kind(module)} {name!r}")
    preconditioned = {f"{_kind(module)} {name!r}" for name, module in linears}
    for name, module in linears:
        for param in module.parameters():
            here = f"{_kind(module)} {name!r}"
            others = [h for h in holders[id(param)] if h != here]
            # named at the later of two layers, or at the layer when the other is not one
            later = holders[id(param)][0] != here
            if others and (later or any(h not in preconditioned for h in others)):
                raise ValueError(
                    f"{_kind(module)} {name!r} shares a parameter with {others[0]}; "
                    "the Fisher of a tied weight is not one Kronecker product per layer, "
                    "so EKFAC does not handle tied weights (untie them, or apply one "
                    "Linear module twice instead)."
                )


def _refuse_param_group() -> None:
    """Refuse a parameter group added to a built EKFAC (it would never be preconditioned)."""
    raise ValueError(
        "EKFAC cannot take another parameter group: it is built from a model and "
        "optimizes that model's parameters as one group whose curvature it records. "
        "Give other parameters an optimizer of their own (torch.optim.SGD, say), and change "
        "lr or damping through optimizer.param_groups[0]."
    )
