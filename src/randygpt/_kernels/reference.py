"""NumPy reference implementations of every kernel, forward and backward.

They are written for clarity, work in float32 or float64 (finite-difference checks run
them in float64), and are used only by the tests and benchmarks: never in training.
Each family lives in its own ``_ref_<family>.py``; this module gathers them.
"""
from ._ref_matmul import *  # noqa: F401,F403
from ._ref_attention import *  # noqa: F401,F403
from ._ref_norm import *  # noqa: F401,F403
from ._ref_activation import *  # noqa: F401,F403
from ._ref_xent import *  # noqa: F401,F403
from ._ref_embedding import *  # noqa: F401,F403
from ._ref_adamw import *  # noqa: F401,F403
from ._ref_decode import *  # noqa: F401,F403
