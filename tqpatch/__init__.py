"""tqpatch: TurboQuant-compressed K/V caches for Hugging Face transformers.

    import tqpatch
    tqpatch.apply(model, recipe="qwen2.5-7b")   # or key_bits=4, value_bits=4, ...
    model.generate(...)                          # K/V stored as packed codes + scales
    tqpatch.unapply(model)
"""

from __future__ import annotations

import logging

from .codebook import lloyd_max
from .quantizer import QuantizedVectors, SplitQuantizer, TurboQuantizer

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["lloyd_max", "QuantizedVectors", "SplitQuantizer", "TurboQuantizer", "__version__"]

from .cache import TurboQuantCache, cache_nbytes  # noqa: E402
from .patch import SUPPORTED_MODEL_TYPES, apply, is_patched, unapply  # noqa: E402

__all__ += ["TurboQuantCache", "cache_nbytes", "apply", "unapply", "is_patched", "SUPPORTED_MODEL_TYPES"]

from .step import compile_step  # noqa: E402

__all__ += ["compile_step"]

from .recipe import Recipe, RecipeError, RecipeMismatchError, RecipeNotFoundError, list_recipes  # noqa: E402

__all__ += ["Recipe", "RecipeError", "RecipeMismatchError", "RecipeNotFoundError", "list_recipes"]
