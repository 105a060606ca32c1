"""goodfellow: per-example gradients in PyTorch, taught and tested.

Autograd returns the gradient of a summed (or averaged) loss. This package recovers each
example's own gradient, by four routes:

* :mod:`goodfellow.backprop`: Goodfellow's trick for an MLP that returns its intermediate
  tensors (:class:`goodfellow.MLP`); :mod:`goodfellow.reference` holds the naive loop and
  ``torch.func``, the references everything is tested against;
* :mod:`goodfellow.hooks`: the same quantities recorded by hooks on any model, one rule per
  layer kind (:mod:`goodfellow.layers`);
* :mod:`goodfellow.statistics` and :mod:`goodfellow.transforms`: averages of transformed
  per-example gradients, E[T(g_i)] (clipping, variance, norms), and :mod:`goodfellow.cabs`;
* :mod:`goodfellow.privacy`: DP-SGD's noisy clipped mean (:func:`goodfellow.private_mean`);
* :mod:`goodfellow.distributed`: the gradient noise scale of a DDP model from its all-reduce;
* :mod:`goodfellow.kronecker` and :mod:`goodfellow.ekfac`: KFAC and EKFAC, their formulas and the
  optimizers built on the recorded quantities;
* :mod:`goodfellow.gradiator`: a learned backward for black-box functions (with
  :mod:`goodfellow.blackbox`, :mod:`goodfellow.jacobian_fit`, :mod:`goodfellow.online_jacobian`).
"""

from goodfellow import backprop as _backprop
from goodfellow import cabs as _cabs
from goodfellow import distributed as _distributed
from goodfellow import ekfac as _ekfac
from goodfellow import ghost_clipping as _ghost_clipping
from goodfellow import gradiator as _gradiator
from goodfellow import hooks as _hooks
from goodfellow import kronecker as _kronecker
from goodfellow import layers as _layers
from goodfellow import models as _models
from goodfellow import privacy as _privacy
from goodfellow import reduction as _reduction
from goodfellow import reference as _reference
from goodfellow import sampler as _sampler
from goodfellow import sources as _sources
from goodfellow import statistics as _statistics
from goodfellow import transforms as _transforms
from goodfellow.backprop import *  # noqa: F403
from goodfellow.cabs import *  # noqa: F403
from goodfellow.distributed import *  # noqa: F403
from goodfellow.ekfac import *  # noqa: F403
from goodfellow.ghost_clipping import *  # noqa: F403
from goodfellow.gradiator import *  # noqa: F403
from goodfellow.hooks import *  # noqa: F403
from goodfellow.kronecker import *  # noqa: F403
from goodfellow.layers import *  # noqa: F403
from goodfellow.models import *  # noqa: F403
from goodfellow.privacy import *  # noqa: F403
from goodfellow.reduction import *  # noqa: F403
from goodfellow.reference import *  # noqa: F403
from goodfellow.sampler import *  # noqa: F403
from goodfellow.sources import *  # noqa: F403
from goodfellow.statistics import *  # noqa: F403
from goodfellow.transforms import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    name
    for module in (
        _models,
        _reduction,
        _backprop,
        _reference,
        _layers,
        _hooks,
        _transforms,
        _sources,
        _statistics,
        _ghost_clipping,
        _cabs,
        _sampler,
        _privacy,
        _distributed,
        _kronecker,
        _ekfac,
        _gradiator,
    )
    for name in module.__all__
]
