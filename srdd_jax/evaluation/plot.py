"""A chart drawn with PIL for the studies' figures (the ablation's quality against sampling cost, the
scaling fit's loss against compute): white canvas, two axes with five ticks each, the axis titles, and
the maps from data to pixels; each figure draws its own points, bars, curves and legend on it."""
from __future__ import annotations

from srdd_jax import files


class Chart:
  """`size` (w, h) pixels; the plot area leaves `left`, `right`, `top`, `bottom` pixels of margin (the
  right one holds a legend where a figure has one). x_tick / y_tick: str.format patterns of the tick
  labels ('{:.2g}'); the x axis title starts at x_title_at pixels, the y title sits top left."""

  def __init__(self, size, x_range, y_range, *, x_title: str, y_title: str, x_title_at: int,
               x_tick: str = '{:.2g}', y_tick: str = '{:.3g}', left: int = 80, right: int = 30, top: int = 30,
               bottom: int = 60):
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
    self.image = Image.new('RGB', size, 'white')
    self.draw = ImageDraw.Draw(self.image)
    self.size = (w, h) = size
    self.left, self.right, self.top, self.bottom = left, right, top, bottom
    (self.x0, self.x1), (self.y0, self.y1) = x_range, y_range
    d = self.draw
    d.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill='black')
    for i in range(5):
      xv, yv = self.x0 + (self.x1 - self.x0) * i / 4, self.y0 + (self.y1 - self.y0) * i / 4
      d.text((self.px(xv) - 15, h - bottom + 5), x_tick.format(xv), fill='black')
      d.text((5, self.py(yv) - 5), y_tick.format(yv), fill='black')
    d.text((x_title_at, h - 25), x_title, fill='black')
    d.text((5, 5), y_title, fill='black')

  def px(self, x):
    return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.size[0] - self.left - self.right)

  def py(self, y):
    h = self.size[1]
    return h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (h - self.top - self.bottom)

  def save(self, path: str) -> None:
    files.save_image(path, self.image)
