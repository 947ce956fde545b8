"""Where checkpoints live: local paths and object stores (``s3://``, ``gs://``).

:mod:`distckpt.storage.location` parses a directory into a :class:`Location` (endpoint,
region and credentials of an object store) and lists, copies and removes files there;
:mod:`distckpt.storage.orbax_adapter` lets Orbax write to object stores. The storage API
is re-exported here, so ``from distckpt import storage`` then ``storage.Location``.
"""

from distckpt.storage.location import LIST_TIMEOUT_S as LIST_TIMEOUT_S
from distckpt.storage.location import Location as Location
from distckpt.storage.location import S3Credentials as S3Credentials
from distckpt.storage.location import StorageConfigError as StorageConfigError
from distckpt.storage.location import check_empty as check_empty
from distckpt.storage.location import copy_files as copy_files
from distckpt.storage.location import list_files as list_files
from distckpt.storage.location import list_objects as list_objects
from distckpt.storage.location import open_directory as open_directory
from distckpt.storage.location import prepare as prepare
from distckpt.storage.location import remove_files as remove_files
from distckpt.storage.location import remove_objects as remove_objects
from distckpt.storage.location import temporary_path_base as temporary_path_base
from distckpt.storage.location import warm as warm
