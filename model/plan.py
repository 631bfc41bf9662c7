"""How one image is painted: the one decision every caller (the translator, the service and its batcher, the
UI, the CLI) asks for instead of working it out itself.

From an image's size and a request's options (``stroke_scale``, ``tile``, ``max_side``) ``plan_painting`` says
at what size the painting comes back, at what size the network paints it, and how: batched with other images
of its size pixel for pixel, or on its own (shrunk by the stroke scale and brought back to size, and in tiles
that share one set of normalisation statistics when the painted image is still larger than a tile).
"""
from __future__ import annotations

from dataclasses import dataclass

from model.images import fitted_size
from model.stroke import default_stroke_scale, painted_size


@dataclass(frozen=True)
class PaintPlan:
    """How one image is painted. ``size``: (width, height) of the painting, the image's after ``max_side``;
    ``stroke_scale``: the scale it is painted at (>= 1); ``painted``: the (width, height) the network paints;
    ``tile``: the tile side (0: whole)."""

    size: tuple[int, int]
    stroke_scale: float
    painted: tuple[int, int]
    tile: int

    @property
    def tiled(self) -> bool:
        """Painted in tiles: the painted image has a side over the tile."""
        return bool(self.tile) and max(self.painted) > self.tile

    @property
    def batched(self) -> bool:
        """Painted pixel for pixel, whole, together with other images of its size (``Translator.translate_many``);
        else on its own (``Translator.paint``: shrunk, tiled, brought back to ``size``)."""
        return self.stroke_scale <= 1.0 and not self.tiled


def plan_painting(width: int, height: int, stroke_scale: float | None = None, tile: int = 0,
                  max_side: int | None = None) -> PaintPlan:
    """The plan for an image of ``width`` x ``height`` (as stored, upright): capped at ``max_side`` (None or
    0: no cap), painted at ``stroke_scale`` (None: ``default_stroke_scale`` of the capped size; values under 1
    count as 1), in tiles of ``tile`` where the painted image is larger (0: whole)."""
    size = fitted_size((int(width), int(height)), max_side)
    scale = default_stroke_scale(*size) if stroke_scale is None else max(1.0, float(stroke_scale))
    return PaintPlan(size, scale, painted_size(size[0], size[1], scale), int(tile or 0))
