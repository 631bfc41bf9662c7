"""The styles one server paints in.

``MONET_WEIGHTS`` names one weight file (one style) or a folder: each ``*.safetensors`` in it is a style named
by its file stem; its metadata gives a display name, a direction and scores when present (model/weights.py).
A style's version is the SHA-256 of its file (``file_version``).

- Styles load lazily, on their first request, and are warmed up before they serve; at most
  ``MONET_MAX_LOADED_STYLES`` are loaded at once, the least recently used one is unloaded first (never one with
  requests in progress). The default style is loaded at start-up.
- ``reload()`` (SIGHUP, or POST /admin/reload) reads the folder again. Every new or changed file is checked in
  full (it must load, be finite, and a loaded style's replacement must pass its warm-up) before it replaces
  anything: a bad file is refused with a log line and the old version keeps serving. Requests in progress
  finish on the version they started with: a swap replaces the catalogue's entry, not the object they hold.
  (A style that is not loaded has only its file: if that file goes bad, the style answers 503 until it is
  fixed. The default style is always loaded.)
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from app.errors import Busy, NotReady, Refusal, UnknownStyle
from model.translator import Translator
from model.weights import SHIPPED_WEIGHTS, GeneratorInfo, WeightsError, file_version, load_generator

log = logging.getLogger("monet.styles")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # a style's name: a URL query value and a metric label


@dataclass(frozen=True)
class StyleFile:
    """One style on disk, checked: its name, file, version and what the file says about it."""

    name: str
    path: Path
    version: str
    info: GeneratorInfo

    def describe(self) -> dict:
        i = self.info
        return {"name": self.name, "display_name": i.name or self.name, "direction": i.direction,
                "architecture": i.architecture, "settings": i.settings, "version": self.version,
                "scores": i.scores, "training": i.training}


@dataclass(eq=False)
class Style:
    """A loaded style: its file and the translator that paints in it. ``in_use`` counts the requests that hold it."""

    file: StyleFile
    translator: Translator
    in_use: int = field(default=0)

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def version(self) -> str:
        return self.file.version


def check_file(name: str, path: Path) -> StyleFile:
    """Read and check one weight file in full (safetensors only, shapes, finite values). Raises WeightsError."""
    version = file_version(path)
    _, info = load_generator(path)
    if file_version(path) != version:
        raise WeightsError(f"{path} changed while it was read; it is read again on the next reload")
    return StyleFile(name, path, version, info)


def style_files(source: Path, max_styles: int) -> tuple[dict[str, Path], dict[str, str]]:
    """The weight files ``source`` names (one file, or a folder's ``*.safetensors``) by style name, and the
    ones refused for their name or for being over ``max_styles``."""
    if source.is_dir():
        paths = sorted(p for p in source.glob("*.safetensors") if p.is_file() and not p.name.startswith("."))
    else:
        paths = [source] if source.is_file() else []
    found, refused = {}, {}
    for path in paths:
        if not NAME.match(path.stem):
            refused[path.name] = "a style's name (the file stem) takes letters, digits, '.', '_' and '-' only"
        elif len(found) >= max_styles:
            refused[path.name] = f"over MONET_MAX_STYLES ({max_styles})"
        else:
            found[path.stem] = path
    return found, refused


class Catalogue:
    """What styles there are (checked files) and which are loaded (an LRU of translators)."""

    def __init__(self, source: Path, default: str | None, max_loaded: int, max_styles: int,
                 make: Callable[[Path], Translator], on_change: Callable[[], None] | None = None):
        self.source, self.max_loaded, self.max_styles = Path(source), max_loaded, max_styles
        self._wanted_default, self._make, self._on_change = default, make, on_change
        self.files: dict[str, StyleFile] = {}
        self.refused: dict[str, str] = {}
        self.default = ""
        self.loaded: OrderedDict[str, Style] = OrderedDict()  # least recently used first
        self._loading: dict[tuple[str, str], asyncio.Task] = {}
        self._reloading = asyncio.Lock()

    # -- start-up ----------------------------------------------------------------------------------------------
    async def open(self) -> Style:
        """Read the styles and load the default one. Raises WeightsError (or the translator's errors)."""
        files, refused = await asyncio.to_thread(self._scan, {})
        for name, reason in refused.items():
            log.warning("style file %s refused: %s", name, reason)
        if not files:
            detail = f" ({'; '.join(f'{k}: {v}' for k, v in refused.items())})" if refused else ""
            raise WeightsError(f"no usable style in {self.source}: it should be a .safetensors weight file or a "
                               f"folder of them{detail}")
        self.files, self.refused = files, refused
        self.default = self._pick_default(files)
        style = await self._load(files[self.default])
        self._changed()
        return style

    def _pick_default(self, files: dict[str, StyleFile]) -> str:
        if self._wanted_default:
            if self._wanted_default not in files:
                raise WeightsError(f"MONET_DEFAULT_STYLE {self._wanted_default!r} is not among the styles in "
                                   f"{self.source}: {', '.join(sorted(files))}")
            return self._wanted_default
        return SHIPPED_WEIGHTS.stem if SHIPPED_WEIGHTS.stem in files else sorted(files)[0]

    def _scan(self, known: dict[str, StyleFile]) -> tuple[dict[str, StyleFile], dict[str, str]]:
        """Check every file (in a worker thread); one whose version is ``known`` already is not read again."""
        paths, refused = style_files(self.source, self.max_styles)
        files = {}
        for name, path in paths.items():
            try:
                if (old := known.get(name)) is not None and old.path == path and file_version(path) == old.version:
                    files[name] = old
                else:
                    files[name] = check_file(name, path)
            except (WeightsError, OSError) as exc:
                refused[path.name] = str(exc)
        return files, refused

    # -- requests ----------------------------------------------------------------------------------------------
    def resolve(self, name: str | None) -> StyleFile:
        """The style a request names (None: the default). Raises UnknownStyle listing the valid names."""
        name = name or self.default
        if name not in self.files:
            raise UnknownStyle(f"unknown style {name!r}; the styles are: {', '.join(sorted(self.files))} "
                               "(GET /styles describes them)")
        return self.files[name]

    @asynccontextmanager
    async def use(self, name: str | None, timeout_s: float):
        """The loaded style a request paints in, held (never unloaded) until the block ends. Loads it first
        when it is not loaded (Busy when that takes longer than ``timeout_s``)."""
        style = await self.get(self.resolve(name), timeout_s)
        style.in_use += 1
        try:
            yield style
        finally:
            style.in_use -= 1

    async def get(self, file: StyleFile, timeout_s: float) -> Style:
        style = self.loaded.get(file.name)
        if style is not None and style.version == file.version:
            self.loaded.move_to_end(file.name)
            return style
        try:
            return await asyncio.wait_for(asyncio.shield(self._load(file)), timeout_s)
        except asyncio.TimeoutError:
            raise Busy(f"style {file.name!r} is still loading; retry shortly") from None
        except Refusal:
            raise
        except Exception as exc:  # its file went bad after it was checked (a replacement not yet reloaded)
            log.error("style %s could not be loaded: %s", file.name, exc)
            raise NotReady(f"style {file.name!r} cannot be loaded now ({exc}); its file changed after the last "
                           "reload, and the version checked then is not in memory") from None

    async def _load(self, file: StyleFile) -> Style:
        """Load ``file`` once however many requests ask at the same time; make room in the LRU."""
        key = (file.name, file.version)
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._build(file))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        style = await task
        if self.files.get(file.name) is file:  # else a reload replaced it meanwhile: serve, don't keep
            self.loaded[file.name] = style
            self.loaded.move_to_end(file.name)
            self._evict()
        return style

    async def _build(self, file: StyleFile) -> Style:
        translator = await asyncio.to_thread(self._make, file.path)
        if file_version(file.path) != file.version:
            raise Busy(f"style {file.name!r} changed on disk while it loaded; retry shortly")
        log.info("style %s loaded (version %s, %s on %s, %s)", file.name, file.version, translator.backend,
                 translator.device, str(translator.dtype).removeprefix("torch."))
        self._changed()
        return Style(file, translator)

    def _evict(self) -> None:
        """Unload least recently used styles over ``max_loaded``; never the default, never one in use (the
        cap may then be passed until those requests finish)."""
        for name in list(self.loaded):
            if len(self.loaded) <= self.max_loaded:
                break
            style = self.loaded[name]
            if name != self.default and style.in_use == 0:
                del self.loaded[name]
                log.info("style %s unloaded (least recently used; MONET_MAX_LOADED_STYLES %d)", name,
                         self.max_loaded)
        self._changed()

    def translators(self) -> list[Translator]:
        return [s.translator for s in self.loaded.values()]

    # -- reload ------------------------------------------------------------------------------------------------
    async def reload(self, why: str) -> dict:
        """Read the styles again and swap in what changed (see the module's docstring). Returns what happened:
        the names added, replaced, removed, and the files refused with their reasons."""
        async with self._reloading:
            files, refused = await asyncio.to_thread(self._scan, self.files)
            report: dict = {"added": [], "replaced": [], "removed": [], "refused": {}}
            for name, old in list(self.files.items()):
                path_name = old.path.name
                if name not in files and path_name in refused:  # a bad replacement: the old version serves on
                    report["refused"][path_name] = f"{refused.pop(path_name)}; {self._kept(old)}"
                    files[name] = old
                elif name not in files and name == self.default:
                    report["refused"][path_name] = f"the default style cannot be removed; {self._kept(old)}"
                    files[name] = old
            report["refused"].update(refused)
            fresh: dict[str, Style] = {}
            for name, new in files.items():
                old = self.files.get(name)
                if old is None or old.version == new.version:
                    continue
                if name in self.loaded:  # warm the new version up before it takes over: nobody waits for it
                    try:
                        fresh[name] = await self._build(new)
                    except Exception as exc:  # noqa: BLE001 (warm-up NaN, a file changed again...)
                        report["refused"][new.path.name] = f"{exc}; {self._kept(old)}"
                        files[name] = old
            report["added"] = sorted(set(files) - set(self.files))
            report["replaced"] = sorted(n for n in set(files) & set(self.files)
                                        if files[n].version != self.files[n].version)
            report["removed"] = sorted(set(self.files) - set(files))
            # the swap, in one step on the event loop: requests holding a Style finish on it
            self.loaded = OrderedDict((n, fresh.get(n, style)) for n, style in self.loaded.items() if n in files)
            self.files, self.refused = files, dict(report["refused"])
            for name, reason in report["refused"].items():
                log.warning("reload (%s): style file %s refused: %s", why, name, reason)
            log.info("reload (%s): %d styles; added %s, replaced %s, removed %s", why, len(files),
                     ", ".join(report["added"]) or "none", ", ".join(report["replaced"]) or "none",
                     ", ".join(report["removed"]) or "none")
            self._changed()
            return {**report, "styles": sorted(files)}

    def _kept(self, old: StyleFile) -> str:
        if old.name in self.loaded:
            return f"version {old.version} keeps serving"
        return (f"version {old.version} stays listed, but it is not loaded: requests for it get 503 until the file "
                "is fixed")

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def describe(self) -> dict:
        return {"default": self.default, "max_loaded": self.max_loaded,
                "styles": [{**f.describe(), "default": name == self.default, "loaded": name in self.loaded}
                           for name, f in sorted(self.files.items())],
                "refused": self.refused}
