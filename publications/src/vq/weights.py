"""Pretrained torchvision weights, offline: one place that finds them or says how to provide them.

The perceptual loss needs VGG19 and LPIPS needs AlexNet, both ImageNet weights
that torchvision downloads into `torch.hub.get_dir()/checkpoints/`. On a machine
without internet the file must be placed there by hand, or given by path in the
config. Missing weights are an error, never a silent fall-back to random ones.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import resolve_path

log = logging.getLogger(__name__)


class MissingWeightsError(RuntimeError):
    """Pretrained weights are neither in torchvision's cache nor at the configured path."""


def cache_file(weights_enum) -> Path:
    """Where torchvision caches (and looks for) the file of a weights enum."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name


def load_pretrained_state(weights_enum, local_path: str | Path | None = None,
                          purpose: str = "pretrained weights", config_key: str | None = None) -> dict:
    """State dict of `weights_enum` (e.g. VGG19_Weights.IMAGENET1K_V1) from a local file or torchvision's cache.

    `local_path` (a config value; relative to the repository root) wins when given.
    Otherwise torchvision's own path: the cached file, or a download into the cache
    when there is internet. Raises MissingWeightsError with a one-line fix when
    neither works.
    """
    name, url, cached = Path(weights_enum.url).name, weights_enum.url, cache_file(weights_enum)
    option = (f"set {config_key}: /path/to/{name} in the config (or --set {config_key}=/path/to/{name})"
              if config_key else "pass its path")

    if local_path is not None:
        path = resolve_path(local_path)
        if not path.is_file():
            raise MissingWeightsError(
                f"{purpose}: weights file {path} not found ({config_key or 'local_path'}); "
                f"download {name} from {url} to that path, or place it in {cached.parent}/ "
                f"and leave {config_key or 'local_path'} unset")
        log.info("%s: loading %s", purpose, path)
        return torch.load(path, map_location="cpu", weights_only=True)

    try:  # the cached file, or torchvision's download (hash-checked) when online
        return weights_enum.get_state_dict(progress=False, check_hash=True,
                                           map_location="cpu", weights_only=True)
    except Exception as err:  # offline: URLError/OSError; a broken cached file: RuntimeError
        cause = (str(err).strip().splitlines() or [""])[0]  # keep the message on one line
        state = "could not be read" if cached.is_file() else "is not cached and could not be downloaded"
        raise MissingWeightsError(
            f"{purpose}: {name} {state} ({type(err).__name__}: {cause}); "
            f"download {url} and place it in {cached.parent}/, or {option}") from err
