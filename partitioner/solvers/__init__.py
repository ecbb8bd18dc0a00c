"""Solvers, each registered by name in :mod:`partitioner.solvers.registry`.

Importing this package imports every solver module, so that each registers itself (the
aliases are private so that they never shadow the subpackages ``cpsat``, ``milp``, ...).
"""

from .baselines import greedy as _greedy  # noqa: F401
from .baselines import heft as _heft  # noqa: F401
from .baselines import metis as _metis  # noqa: F401
from .baselines import peft as _peft  # noqa: F401
from .baselines import pipeline_dp as _pipeline_dp  # noqa: F401
from .baselines import single as _single  # noqa: F401
from .cpsat import solver as _cpsat  # noqa: F401
from .milp import solver as _milp  # noqa: F401
from .split import solver as _split  # noqa: F401
from .symmetry import solver as _symmetry  # noqa: F401
