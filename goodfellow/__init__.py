"""goodfellow: per-example gradients in PyTorch, taught and tested.

Autograd returns the gradient of a summed (or averaged) loss. This package recovers each
example's own gradient, by four routes:

* :mod:`goodfellow.backprop`: Goodfellow's trick for an MLP that returns its intermediate
  tensors (:class:`goodfellow.MLP`), with the naive loop and ``torch.func`` as references;
* :mod:`goodfellow.hooks`: the same outer products recorded by module hooks on any model made
  of ``nn.Linear`` layers;
* :mod:`goodfellow.transforms`: averages of transformed per-example gradients, E[T(g_i)]
  (clipping, variance, norms, CABS);
* :mod:`goodfellow.ekfac`: KFAC and EKFAC preconditioning built on the recorded quantities;
* :mod:`goodfellow.gradiator`: a learned backward for black-box functions.
"""

from goodfellow.backprop import *  # noqa: F403
from goodfellow.backprop import __all__ as _backprop_all
from goodfellow.ekfac import *  # noqa: F403
from goodfellow.ekfac import __all__ as _ekfac_all
from goodfellow.gradiator import *  # noqa: F403
from goodfellow.gradiator import __all__ as _gradiator_all
from goodfellow.hooks import *  # noqa: F403
from goodfellow.hooks import __all__ as _hooks_all
from goodfellow.models import *  # noqa: F403
from goodfellow.models import __all__ as _models_all
from goodfellow.transforms import *  # noqa: F403
from goodfellow.transforms import __all__ as _transforms_all

__version__ = "0.1.0"

__all__ = [
    *_models_all,
    *_backprop_all,
    *_hooks_all,
    *_transforms_all,
    *_ekfac_all,
    *_gradiator_all,
]
