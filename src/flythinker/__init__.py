"""flythinker: think-while-generating personalized long-form generation (FlyThinker, arXiv 2512.06690).

Public API only; importing this package has no side effects (no thread, device or logging changes).
"""

from .methods.flythinker.config import FlyThinkerConfig
from .methods.flythinker.model import FlyThinker, FlyThinkerOutput
from .models import truncated_reasoner

__all__ = ["FlyThinker", "FlyThinkerConfig", "FlyThinkerOutput", "truncated_reasoner"]
__version__ = "0.1.0"
