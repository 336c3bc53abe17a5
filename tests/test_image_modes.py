"""Training images of every PIL mode (issue 47 line 4): the data sources read float and 32-bit integer
images from their own range, as --mode=edit does, or skip them with the reason; 16-bit greyscale reads
the same whichever mode Pillow opens it in."""
from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from srdd_jax.data import preprocess as pp
from srdd_jax.data.arrays import ArraySource
from srdd_jax.data.pipeline import build_source

SIZE = 8
# Every uint8 level a ramp over [0, 1] can land on, an 8x8 image of them (no resize: resize_ratio=1).
RAMP = np.linspace(0, 1, SIZE * SIZE).reshape(SIZE, SIZE)
WANT = np.rint(RAMP * 255).astype(np.uint8)


def _encoded(image: Image.Image, fmt: str) -> bytes:
  out = io.BytesIO()
  image.save(out, format=fmt)
  return out.getvalue()


def _pixels(images, **options) -> np.ndarray:
  """The uint8 pixels (n, SIZE, SIZE, 3) an ArraySource of encoded `images` gives, in order."""
  s = ArraySource(images, np.arange(len(images)), len(images), image_size=SIZE, description='modes',
                  resize_ratio=1.0, **options)
  return np.stack([s.decode(i, 0, 0, 0)[0] for i in range(len(images))])


def test_float_tiff_in_0_1_is_read_from_its_range():
  """PIL's convert('RGB') clips floats at 255: a float image in [0, 1] was black (0.5 -> 0)."""
  ramp = _encoded(Image.fromarray(RAMP.astype(np.float32), 'F'), 'TIFF')
  grey = _encoded(Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32), 'F'), 'TIFF')
  got = _pixels([ramp, grey])
  np.testing.assert_array_equal(got[0], np.repeat(WANT[..., None], 3, -1))
  assert (got[1] == 128).all()


def test_32_bit_integer_tiff_is_read_from_its_range():
  """A 32-bit TIFF says its bits per sample (32, signed): white is 2**31 - 1. Taken as 16-bit (>> 8, then
  uint8) it wrapped into noise: half scale, 2**30, read as 0."""
  full = 2**31 - 1
  ramp = _encoded(Image.fromarray(np.rint(RAMP * full).astype(np.int32), 'I'), 'TIFF')
  half = _encoded(Image.fromarray(np.full((SIZE, SIZE), 2**30, np.int32), 'I'), 'TIFF')
  assert Image.open(io.BytesIO(ramp)).mode == 'I'
  got = _pixels([ramp, half])
  np.testing.assert_array_equal(got[0], np.repeat(WANT[..., None], 3, -1))
  assert (got[1] == 128).all()


def test_16_bit_grey_reads_the_same_in_either_mode(tmp_path):
  """A 16-bit PNG opens as 'I;16' (Pillow >= 10) and a 16-bit PGM as 'I' with no tags (what older Pillows
  made of the PNG too): both the high byte, not clipped to white and not taken as a 32-bit range (65535 of
  2**31 - 1 would be black)."""
  grey = np.rint(RAMP * 65535).astype(np.uint16)
  (tmp_path / 'a').mkdir()
  Image.fromarray(grey).save(tmp_path / 'a' / 'grey16.png')
  assert Image.open(tmp_path / 'a' / 'grey16.png').mode.startswith('I;16')
  folder = build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'subfolder', 'resize_ratio': 1.0},
                        SIZE, train=False)
  from_png = folder.decode(0, 0, 0, 0)[0]
  pgm = _encoded(Image.fromarray(grey), 'PPM')
  assert Image.open(io.BytesIO(pgm)).mode == 'I'
  from_pgm = _pixels([pgm])[0]
  want = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, -1)
  np.testing.assert_array_equal(from_png, want)
  np.testing.assert_array_equal(from_pgm, want)
  assert from_png[-1, -1, 0] == 255 and from_png[0, 0, 0] == 0


@pytest.mark.parametrize('image, reason', [
    (Image.fromarray((RAMP * 3 - 1).astype(np.float32), 'F'),
     r'a float image with values in [-1, 2]: only [0, 1] has a known meaning'),
    (Image.fromarray(np.where(RAMP < 0.5, RAMP, np.nan).astype(np.float32), 'F'),
     r'a float image with 32 NaN or infinite values'),
    (Image.fromarray(np.rint(RAMP * 1000 - 500).astype(np.int32), 'I'),
     r'a signed 32-bit image with negative values (down to -500)'),
], ids=['float outside [0, 1]', 'float NaN', '32-bit negative'])
def test_an_image_without_a_meaning_is_skipped_with_its_reason(image, reason, caplog):
  """Refused as unreadable, named in the warning with the reason, and its position takes the next readable
  example. PIL's convert('RGB') had clipped these into some image (a float outside [0, 1] to black and
  white; negative 32-bit values to 0) and trained on it."""
  images = [_encoded(image, 'TIFF'), _encoded(Image.fromarray(np.full((SIZE, SIZE), 77, np.uint8), 'L'), 'PNG')]
  s = ArraySource(images, [0, 1], 2, image_size=SIZE, description='modes', resize_ratio=1.0)
  with caplog.at_level(logging.WARNING):
    pixels, labels = s.batch(0, 0, 2, raw=True)
  assert s.skipped == 1
  assert (pixels == 77).all() and (labels == 1).all()
  assert f'skipping unreadable example[0] (ValueError: {reason}' in caplog.text


def test_a_refused_file_in_a_folder_is_named_with_its_reason(tmp_path, caplog):
  """A float TIFF under a .png name (PIL reads by content) in an image folder: its path and the reason."""
  Image.fromarray((RAMP * 3 - 1).astype(np.float32), 'F').save(tmp_path / 'bad.png', format='TIFF')
  Image.fromarray(np.full((SIZE, SIZE), 77, np.uint8), 'L').save(tmp_path / 'good.png')
  with caplog.at_level(logging.WARNING):
    s = build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'none', 'resize_ratio': 1.0}, SIZE,
                     train=False)
    pixels, _ = s.batch(0, 0, 2, raw=True)
  assert s.skipped == 1 and (pixels == 77).all()
  assert (f"skipping unreadable {tmp_path / 'bad.png'} (ValueError: a float image with values in [-1, 2]: only "
          '[0, 1] has a known meaning') in caplog.text


def test_tiff_and_bmp_files_in_a_folder_are_read(tmp_path):
  """A folder source listed jpg/jpeg/png/webp only: a float TIFF saved as .tif (0.5 -> 128), a .TIFF and a
  .bmp in a training folder were skipped without a word (the class folder of only these had no images)."""
  (tmp_path / 'a').mkdir()
  Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32), 'F').save(tmp_path / 'a' / 'half.tif')
  Image.fromarray(np.full((SIZE, SIZE), 10, np.uint8), 'L').save(tmp_path / 'a' / 'ten.TIFF')
  Image.fromarray(np.full((SIZE, SIZE, 3), 200, np.uint8)).save(tmp_path / 'a' / 'two_hundred.bmp')
  s = build_source({'source': 'folder', 'path': str(tmp_path), 'labels': 'subfolder', 'resize_ratio': 1.0}, SIZE,
                   train=False)
  assert [p.rsplit('/', 1)[-1] for p in s.paths] == ['half.tif', 'ten.TIFF', 'two_hundred.bmp']
  # Each uniform, so its mean is its level; decode raises on a file it cannot read.
  assert [int(s.decode(i, 0, 0, 0)[0].mean()) for i in range(3)] == [128, 10, 200]


def test_a_32_bit_image_whose_file_does_not_say_its_range_is_refused():
  """A mode 'I' image with values above 16 bits and no TIFF tags: its white is unknown (taken as 16-bit, >> 8
  then uint8, 2**20 had read as 0)."""
  image = Image.fromarray(np.full((SIZE, SIZE), 2**20, np.int32), 'I')
  with pytest.raises(ValueError, match=r'a 32-bit integer image whose file does not say its range, with values '
                                       r'up to 1048576'):
    pp.to_rgb(image)
  # The same values within 16 bits are 16-bit greyscale (PNG and PNM store it in this mode).
  np.testing.assert_array_equal(np.asarray(pp.to_rgb(Image.fromarray(np.full((2, 2), 32768, np.int32), 'I'))),
                                np.full((2, 2, 3), 128, np.uint8))


def test_bytes_that_do_not_decode_are_named_without_an_address(caplog):
  """PIL names the file object it read, <_io.BytesIO object at 0x...>: an address that differs on every
  run and host, left out of the warning."""
  images = [b'not an image', _encoded(Image.fromarray(np.full((SIZE, SIZE), 77, np.uint8), 'L'), 'PNG')]
  s = ArraySource(images, [0, 1], 2, image_size=SIZE, description='modes', resize_ratio=1.0)
  with caplog.at_level(logging.WARNING):
    s.batch(0, 0, 2, raw=True)
  assert 'skipping unreadable example[0] (UnidentifiedImageError: cannot identify image file); 1 skipped' in \
      caplog.text


def test_inception_stats_reads_the_folders_training_reads(tmp_path):
  """tools/inception_stats listed .png/.jpg/.jpeg/.webp/.bmp only (a folder of TIFFs had 'no image files')
  and read every file with PIL's convert('RGB') (a float TIFF in [0, 1] black). It lists what the folder
  source lists and converts as it does."""
  from srdd_jax.tools import inception_stats  # pylint: disable=import-outside-toplevel
  Image.fromarray(np.full((4, 4), 128, np.uint8), 'L').save(tmp_path / 'a.png')
  Image.fromarray(np.full((4, 4), 0.5, np.float32), 'F').save(tmp_path / 'b.tif')
  Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(tmp_path / 'c.TIFF')
  paths = inception_stats.image_files(str(tmp_path))
  assert [p.rsplit('/', 1)[-1] for p in paths] == ['a.png', 'b.tif', 'c.TIFF']
  (chunk,) = list(inception_stats.folder_chunks(paths, 8))
  assert chunk.shape == (3, 4, 4, 3) and chunk.dtype == np.uint8 and (chunk == 128).all()
