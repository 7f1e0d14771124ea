"""Models and tokenizers by name, loaded as transformers loads them: a local directory, or a hub id
resolved through the Hugging Face cache (HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, cache_dir,
revision, token). Every loader of the library (the policy, its tokenizer, the reference, the
critic, reward models) goes through `from_pretrained`, so the errors read the same everywhere:

  - a name that can only be a path (absolute, ./, ../, ~, or more than one "/") and is not a
    directory: "no model at PATH";
  - offline (HF_HUB_OFFLINE=1, or local_files_only=True) and the id is not in the local cache:
    "'org/name' is not in the local cache (...)", naming the cache and how to fill it;
  - otherwise transformers' own message (a missing id, no network, a gated repository).
"""
from __future__ import annotations

import os
from typing import Any, Dict

from huggingface_hub import constants as hub_constants

__all__ = ["TOKENIZER_KWARGS", "from_pretrained", "looks_like_path", "tokenizer_kwargs"]

# model_init_kwargs that say where a name is found: they apply to its tokenizer too
TOKENIZER_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "trust_remote_code", "subfolder")


def looks_like_path(name: str) -> bool:
    """True for names that can only mean a local path (a hub id is 'name' or 'org/name')."""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", "." + os.sep)) or name in (".", "..")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def tokenizer_kwargs(model_init_kwargs) -> Dict[str, Any]:
    """The part of model_init_kwargs that locates the files (for the tokenizer of the same name)."""
    return {k: v for k, v in (model_init_kwargs or {}).items() if k in TOKENIZER_KWARGS}


def _offline(kwargs) -> bool:
    return bool(kwargs.get("local_files_only")) or bool(hub_constants.is_offline_mode())


def from_pretrained(loader, name, *, what: str = "model", **kwargs):
    """loader.from_pretrained(name, **kwargs) (loader: an Auto class or a model class), with an error
    naming `name` when it is neither a directory nor, offline, in the local cache."""
    name = os.fspath(name)
    if os.path.isdir(name):
        return loader.from_pretrained(name, **kwargs)
    if looks_like_path(name):
        raise OSError(f"no {what} at {name!r}: no such directory (a local path was given; a hub id is "
                      "'name' or 'org/name')")
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as e:
        if not _offline(kwargs):
            raise
        cache = kwargs.get("cache_dir") or hub_constants.HF_HUB_CACHE
        why = "local_files_only=True" if kwargs.get("local_files_only") else "HF_HUB_OFFLINE is set"
        raise OSError(f"{what} {name!r} is not in the local cache ({cache}; {why}, so nothing is downloaded): "
                      f"download it once while online (hf download {name}), or pass a local directory") from e
