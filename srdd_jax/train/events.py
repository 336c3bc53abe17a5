"""TensorBoard event files written through srdd_jax.files, for workdirs in a bucket.

clu's writer goes through TensorFlow's file system, whose GCS client cannot be pointed at anything
but Google's endpoint (and which an object store cannot append to): in a bucket the driver uses this
writer instead. Records are TensorBoard's own (its protos and record framing); the event file is an
object rewritten whole at each flush (at most every FLUSH_SECONDS while writing, and at the end), so
TensorBoard reading the bucket sees the run as of the last flush.
"""
from __future__ import annotations

import io
import os
import socket
import time
import uuid

import numpy as np

from srdd_jax import files

FLUSH_SECONDS = 60.0


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  a = np.asarray(image)
  if a.dtype != np.uint8:  # Floats in [0, 1], as clu takes them.
    a = (np.clip(a, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  buf = io.BytesIO()  # In memory: the event file, not the image, is what is written.
  image = Image.fromarray(a)
  image.save(buf, format='PNG')
  return buf.getvalue()


class EventWriter:
  """write_scalars / write_images / flush / close, as clu's SummaryWriter, into one event file."""

  def __init__(self, root: str):
    # pylint: disable=import-outside-toplevel
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    # The run's own name: two runs of one process in the same second must not write one object.
    self.path = files.join(root, f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}.'
                                 f'{uuid.uuid4().hex[:6]}')
    self._buf = io.BytesIO()
    self._records = RecordWriter(self._buf)
    self._dirty, self._flushed = False, time.time()
    self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._dirty = True
    if time.time() - self._flushed > FLUSH_SECONDS:
      self.flush()

  def _summary(self, step: int, values) -> None:
    self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                      summary=self._summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: dict) -> None:
    v = self._summary_pb2.Summary.Value
    self._summary(step, [v(tag=k, simple_value=float(x)) for k, x in scalars.items()])

  def write_images(self, step: int, images: dict) -> None:
    s = self._summary_pb2.Summary
    values = []
    for tag, batch in images.items():
      batch = np.asarray(batch)
      for i, image in enumerate(batch):
        height, width = image.shape[:2]
        channels = image.shape[2] if image.ndim == 3 else 1
        values.append(s.Value(tag=tag if len(batch) == 1 else f'{tag}/image/{i}', image=s.Image(
            height=height, width=width, colorspace=channels, encoded_image_string=_png(image))))
    self._summary(step, values)

  def flush(self) -> None:
    if self._dirty:
      files.write_bytes(self.path, self._buf.getvalue())
      self._dirty, self._flushed = False, time.time()

  def close(self) -> None:
    self.flush()
