"""Image folders: one class per top-level sub-folder (ImageNet, AFHQ) or flat and unlabelled (FFHQ).

Files are found recursively (symbolic links followed), jpg/jpeg/png/webp/tif/tiff/bmp in any letter case
(a float or 32-bit TIFF is read from its own range: preprocess.to_rgb); names that start with '.' (macOS
'._x.jpg' forks, '.cache' folders) are ignored. The file list is sorted, so indices and therefore batches
are the same on every host and after a restart. Nothing is decoded at start-up: a corrupt file is found
when it is first read and handled by the policy of `source.py`.
"""
from __future__ import annotations


from absl import logging

from srdd_jax import files
from srdd_jax.data import preprocess as pp
from srdd_jax.data.source import DataError, ImageSource, Unreadable

EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.tif', '.tiff', '.bmp')
LABEL_MODES = ('subfolder', 'none')


def _visible(name: str) -> bool:
  return not name.startswith('.')


def list_images(root: str) -> list[str]:
  """Image files under root, recursively, as sorted paths."""
  found, seen = [], set()
  for dirpath, dirnames, filenames in files.walk(root):
    real = files.realpath(dirpath)
    if real in seen:  # A link back up the tree would otherwise walk forever.
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = sorted(d for d in dirnames if _visible(d))
    found += [files.join(dirpath, f) for f in filenames
              if _visible(f) and f.lower().endswith(EXTENSIONS)]
  return sorted(found)


class FolderSource(ImageSource):

  def __init__(self, path: str, labels: str, image_size: int, **options):
    if not path:
      raise DataError("config.data.path is empty: set it to a folder of images")
    if not files.isdir(path):
      raise DataError(f'config.data.path={path!r} does not exist or is not a folder')
    if labels not in LABEL_MODES:
      raise DataError(f'config.data.labels={labels!r} must be one of {LABEL_MODES}')
    exts = '/'.join(e[1:] for e in EXTENSIONS)
    if labels == 'none':
      self.paths = list_images(path)
      self.labels = [0] * len(self.paths)
      classes = ['']
      if not self.paths:
        raise DataError(f'config.data.path={path!r} has no images ({exts}, searched recursively)')
    else:
      classes = sorted(d for d in files.listdir(path) if _visible(d) and files.isdir(files.join(path, d)))
      if not classes:
        raise DataError(f'config.data.path={path!r} has no class sub-folders (config.data.labels='
                        f"'subfolder'); for a flat folder of images set config.data.labels='none'")
      loose = [f for f in files.listdir(path) if _visible(f) and f.lower().endswith(EXTENSIONS)]
      if loose:
        logging.warning('%d images directly in %s are ignored: with config.data.labels=\'subfolder\' only '
                        'images inside class sub-folders count', len(loose), path)
      self.paths, self.labels = [], []
      for k, c in enumerate(classes):
        found = list_images(files.join(path, c))
        if not found:
          raise DataError(f'config.data.path={path!r}: class folder {c!r} has no images ({exts}); remove it '
                          'or it would be a class without examples')
        self.paths += found
        self.labels += [k] * len(found)
    super().__init__(num_examples=len(self.paths), num_classes=len(classes), image_size=image_size,
                     description=f'folder {path} ({len(self.paths)} images, {len(classes)} '
                                 f"class{'es' if len(classes) > 1 else ''}, labels={labels})", **options)
    self.classes = classes

  def name(self, index: int) -> str:
    return self.paths[index]

  def load(self, index: int):
    try:
      # Decoded now, inside the try: PIL decodes lazily and a truncated file fails in load().
      with files.load_image(self.paths[index]) as f:
        image = pp.to_rgb(f)
    # Whatever goes wrong while opening or decoding one file is a property of that file's bytes (PIL
    # raises OSError, ValueError, SyntaxError, DecompressionBombError, ... for broken files).
    except Exception as e:  # pylint: disable=broad-except
      raise Unreadable(pp.decode_error(e)) from e
    return image, self.labels[index]
