"""Where a Taobao run's data comes from: ``data.root``, or files generated in the real format.

:func:`taobao_source` is what ``data=taobao*`` configs build; without ``data.root`` and with
``data.generate_if_missing=true`` it generates CloudTheme-format files once (cached) and
reads them through the same protocol as the real data (:func:`~.taobao.prepare_taobao`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from moe_mlora.data.cache import default_cache_dir, generated_dir, write_atomically
from moe_mlora.data.processed import DataError, ProcessedData
from moe_mlora.data.taobao import missing_root_message, prepare_taobao
from moe_mlora.data.taobao_files import NEEDED_FILES
from moe_mlora.data.taobao_negatives import CTR_RATIO_RANGE

log = logging.getLogger("moe_mlora.data.taobao")

GENERATOR_DEFAULTS = {
    "themes": 30,
    "users": 20_000,
    "items": 8_000,
    "clicks": 1_000_000,
    "seed": 0,
    "dim": 128,
    "heterogeneity": 0.5,
}


def _generator_kwargs(options: Mapping | None) -> dict:
    params = {**GENERATOR_DEFAULTS, **dict(options or {})}
    unknown = sorted(set(params) - set(GENERATOR_DEFAULTS))
    if unknown:
        raise DataError(
            f"unknown data.generator option(s) {unknown}; valid: {sorted(GENERATOR_DEFAULTS)}"
        )
    return params


def _generate_into(root: Path, params: dict) -> Path:
    """Generate the files into ``root`` atomically, so concurrent runs (a sweep) and crashes
    never leave a half-written folder (see :func:`write_atomically`)."""
    from moe_mlora.data.synthetic_taobao import generate_taobao

    def write(folder: Path) -> None:
        try:
            generate_taobao(
                folder,
                n_themes=int(params["themes"]),
                n_users=int(params["users"]),
                n_items=int(params["items"]),
                n_clicks=int(params["clicks"]),
                seed=int(params["seed"]),
                dim=int(params["dim"]),
                heterogeneity=float(params["heterogeneity"]),
            )
        except ValueError as error:  # the generator's sizes are config values: name them
            raise DataError(f"data.generator ({params}): {error}") from None

    write_atomically(root, write)
    log.info("generated Taobao CloudTheme-format files (%s) in %s", params, root)
    return root


def resolve_root(
    root: str | Path | None, generate_if_missing: bool, generator: Mapping | None, cache_dir
) -> Path:
    """The folder to read: ``root`` as given, or generated stand-ins when allowed.

    With ``generate_if_missing``: no ``root`` -> files generated once under
    ``<cache_dir>/generated/taobao-<hash of the generator options>``; a ``root``
    that does not exist or is an empty folder -> files generated there. A
    ``root`` holding anything else is never written to.
    """
    if root:
        path = Path(root).expanduser().resolve()
        empty = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        if generate_if_missing and empty:
            return _generate_into(path, _generator_kwargs(generator))
        return path
    if not generate_if_missing:
        raise DataError(missing_root_message())
    params = _generator_kwargs(generator)
    path = generated_dir(Path(cache_dir or default_cache_dir()), "taobao", params)
    if all((path / n).is_file() for n in NEEDED_FILES):
        return path
    if path.exists():  # an earlier attempt died half-way
        shutil.rmtree(path)
    return _generate_into(path, params)


def taobao_source(
    root: str | None,
    themes: int,
    generate_if_missing: bool = False,
    generator: Mapping | None = None,
    freeze_pretrained: bool = True,
    seed: int = 123,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    ctr_ratio: Sequence[float] = CTR_RATIO_RANGE,
    cache_dir: Path | None = None,
    progress: bool | None = None,
) -> ProcessedData:
    """Taobao-``themes`` for the datamodule (``source: taobao`` in conf/data/taobao*.yaml).

    ``freeze_pretrained`` is a model-side choice, so it is not part of the cache
    key: it is set on the user and item :class:`FieldSpec` after loading, and
    :mod:`moe_mlora.models.features` reads it.
    """
    path = resolve_root(root, generate_if_missing, generator, cache_dir)
    data = prepare_taobao(path, int(themes), seed, fractions, ctr_ratio, cache_dir, progress)
    for spec in data.fields:
        if spec.pretrained is not None:
            spec.freeze_pretrained = bool(freeze_pretrained)
    data.meta["freeze_pretrained"] = bool(freeze_pretrained)
    return data
