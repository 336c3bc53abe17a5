"""PyPI's gcp-storage-emulator (a GCS JSON API server in Python, in memory), with the two things real
GCS does that it lacks and the code under test relies on:

- a download answers with the object's generation (x-goog-generation): TensorStore, which writes
  Orbax's array data, reads it to make its next write of an OCDBT manifest conditional on it, and
  refuses a write conditional on the generation 0 the emulator's silence stands for;
- an upload with ifGenerationMatch is refused (412) when the object's generation differs, 0 meaning
  "absent": the create-if-absent that takes a bucket workdir's lease.

  python tests/gcs_emulator.py PORT BUCKET
"""
from __future__ import annotations

import sys
import threading
from http import HTTPStatus

from gcp_storage_emulator import storage as storage_lib
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_lock = threading.Lock()
_request = threading.local()


class _PreconditionFailed(Exception):
  pass


_create_file = storage_lib.Storage.create_file


def _create_file_if_matching(self, bucket_name, file_name, content, file_obj, file_id=None):
  want = getattr(_request, 'if_generation_match', None)
  with _lock:
    if want is not None:
      try:
        have = str(self.get_file_obj(bucket_name, file_name)['generation'])
      except NotFound:
        have = '0'
      if have != str(want):
        raise _PreconditionFailed(f'{file_name}: generation {have}, not {want}')
    return _create_file(self, bucket_name, file_name, content, file_obj, file_id)


_insert = objects.insert


def _insert_with_precondition(request, response, storage, *args, **kwargs):
  _request.if_generation_match = (request.query.get('ifGenerationMatch') or [None])[0]
  try:
    return _insert(request, response, storage, *args, **kwargs)
  except _PreconditionFailed as e:
    response.status = HTTPStatus.PRECONDITION_FAILED
    response.json({'error': {'code': 412, 'message': str(e),
                             'errors': [{'domain': 'global', 'reason': 'conditionNotMet', 'message': str(e)}]}})
    return None
  finally:
    _request.if_generation_match = None


_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  out = _download(request, response, storage, *args, **kwargs)
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except NotFound:
    return out
  response['x-goog-generation'] = str(obj['generation'])
  response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
  return out


storage_lib.Storage.create_file = _create_file_if_matching
objects.insert = _insert_with_precondition
objects.download = _download_with_generation


def main(argv) -> None:
  # The server module reads its handler table when imported: after the patches above.
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel
  port, bucket = int(argv[1]), argv[2]
  create_server('127.0.0.1', port, True, bucket).run()


if __name__ == '__main__':
  main(sys.argv)
