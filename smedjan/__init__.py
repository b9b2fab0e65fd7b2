"""smedjan: a language-model forge. A C engine with hand-written kernels,
used from Python."""
from . import _C

__version__ = "0.1.0"
