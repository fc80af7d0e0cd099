"""The Hugging Face libraries' settings that model sources and the tiny builders share: where diffguard caches
what it builds, quiet loading, the ``from_pretrained`` dtype keyword, short error lines. Cheap to import."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    return Path(os.environ.get("DIFFGUARD_CACHE", Path.home() / ".cache" / "diffguard"))


def quiet_libraries() -> None:
    """Silence the progress bars transformers and diffusers draw while loading and saving."""
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword for a torch dtype: ``dtype`` where diffusers has it, else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
