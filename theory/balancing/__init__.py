r"""The gradient-balancing class of Definition 2.1: one jittable contract for every method.

.. code-block:: python

    from theory.balancing import make, METHODS
    balancer = make("pcgrad")
    state = balancer.init(num_tasks)
    direction, weights, state = balancer.step(jacobian, losses, state, key)

See :mod:`theory.balancing.base` for the contract. Every module of this package registers its methods on import;
the first six are imported in the order users meet them, the rest alphabetically.
"""

import importlib
import pkgutil

from theory.balancing import loss_weighting, gradnorm, mgda, pcgrad, cagrad  # noqa: F401  (registration)
from theory.balancing.base import Balancer, make, options_of, register, registered_names

_NOT_METHODS = {"base", "simplex"}
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in _NOT_METHODS and not _module.startswith("_"):
        importlib.import_module(f"theory.balancing.{_module}")

METHODS: tuple[str, ...] = registered_names()

__all__ = ["METHODS", "Balancer", "make", "options_of", "register"]
