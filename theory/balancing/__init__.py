r"""The gradient-balancing class of Definition 2.1: one jittable contract for every method.

.. code-block:: python

    from theory.balancing import make, METHODS
    balancer = make("pcgrad")
    state = balancer.init(num_tasks)
    direction, weights, state = balancer.step(jacobian, losses, state, key)

See :mod:`theory.balancing.base` for the contract.
"""

# Importing the method modules registers them; the order here is the order of METHODS.
from theory.balancing import loss_weighting, gradnorm, mgda, pcgrad, cagrad  # noqa: F401  (registration)
from theory.balancing.base import Balancer, make, options_of, register, registered_names

METHODS: tuple[str, ...] = registered_names()

__all__ = ["METHODS", "Balancer", "make", "options_of", "register"]
