r"""Layer rules: one module per layer kind.

A *rule* turns what the recorder saw of one module (its inputs and the gradients of its
outputs, call by call) into that module's per-example gradients, their norms, weighted sums,
second moments and, where KFAC defines them, Kronecker factors.

Which rule claims which parameters. Each trainable parameter of a recorded model belongs to
exactly one rule:

- ``nn.Linear``: :class:`~goodfellow.layers.linear.LinearRule`, factored outer products.
- ``nn.Conv1d/2d/3d``: :class:`~goodfellow.layers.conv.ConvRule`, the linear rule on unfolded
  patches.
- ``nn.Embedding``: :class:`~goodfellow.layers.embedding.EmbeddingRule`, token ids and output
  gradients; rows added where tokens repeat, none for ``padding_idx``.
- ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.InstanceNorm1d/2d/3d``:
  :class:`~goodfellow.layers.norm.NormRule`, :math:`\sum_t G \odot \hat x` and
  :math:`\sum_t G`.
- ``nn.MultiheadAttention``: :class:`~goodfellow.layers.attention.MultiheadAttentionRule`, all
  its parameters, ``out_proj``'s included (``out_proj`` is not recorded on its own): its
  projections as linear blocks, their inputs and output gradients captured inside the
  module's forward (:mod:`~goodfellow.layers.attention_capture`).
- Any other module with trainable parameters of its own (a custom layer, a bare
  ``nn.Parameter``): :class:`~goodfellow.layers.fallback.FallbackRule`, ``torch.func`` of that
  module alone, for its own parameters.

Where exact computations compete (a convolution's unfolded patches or its own kernel with
the examples as groups, on the whole batch or in chunks; Gram or materialized norms near their
crossover), :func:`~goodfellow.layers.routes.fastest` times them once per shape and keeps the
fastest.
The statistics add the layers' squared norms up through
:func:`~goodfellow.layers.shared_inputs.summed_sq_norms`, where linear layers that read one
input (q, k, v) share its Gram matrix.

BatchNorm with trainable parameters or in training mode is refused (it mixes the examples).
A layer of your own gets a faster rule than the fallback by subclassing
:class:`~goodfellow.layers.base.LayerRule` (implement ``gradients``, return a layer-gradients
object such as :class:`~goodfellow.layers.base.MaterializedGradients`) and registering it::

    goodfellow.layers.register_rule(MyLayer, MyLayerRule())
"""

import goodfellow.layers.attention
import goodfellow.layers.conv
import goodfellow.layers.embedding
import goodfellow.layers.norm  # noqa: F401  (each registers its rules on import)
from goodfellow.layers.base import norm_from_squares, register_rule, registered_rules, rule_for
from goodfellow.layers.linear import LinearFactors, batched_outer, linear_factors, outer_sq_norms

__all__ = [
    "LinearFactors",
    "batched_outer",
    "linear_factors",
    "norm_from_squares",
    "outer_sq_norms",
    "register_rule",
    "registered_rules",
    "rule_for",
]
