"""The weight path: model weights dumped to a raw ``.fvw`` file at bake and read back into the
same tensors at restore, at disk or memory speed, every byte checked against its checksum.

Read it in this order (each module says why it exists):
  * ``fileformat`` -- the bytes on disk: header, index, entries, checksums; ``read_index``.
  * ``write``      -- ``write_weights``: any device, atomically; CUDA tensors via ``dump``.
  * ``load``       -- ``load_into``: CPU targets directly; CUDA targets via ``pagecache``
                      (file already cached: no CPU copy) or ``ring`` (pinned buffers).
  * ``settings``   -- ``FV_LOAD_*`` / ``FV_GPU_LOADER`` parsed into one ``Config``.
  * ``plan``       -- where each byte goes: chunks and windows of ``Piece``s (pure Python).
  * ``pipeline``   -- what ``ring`` and ``dump`` share: copy engines, ordered hashing, workers.
  * ``ring``, ``pagecache``, ``dump`` -- the three GPU transfers.
  * ``stats``      -- what a load or a dump reports.
  * ``cpu``, ``gpu`` -- what the weights of a running vLLM worker are, per device (what is
                      dumped, released and refilled); ``collection`` -- what both share.

Importing this package needs torch but not CUDA; CUDA is touched only when a transfer runs.
The worker extension (``fvboot.worker_extension``) is its only caller inside fvboot.
"""

from .fileformat import (ChecksumMismatchError, CorruptHeaderError, Deferred, MissingKeyError,
                         TensorMismatchError, TruncatedFileError, WeightEntry, WeightFileError,
                         WeightIndex, read_index)
from .load import load_into
from .pipeline import release_pinned_cache
from .settings import GpuLoaderError
from .stats import LoadStats, TransferStats, WeightFileInfo
from .write import write_weights

__all__ = ["ChecksumMismatchError", "CorruptHeaderError", "Deferred", "GpuLoaderError",
           "LoadStats", "MissingKeyError", "TensorMismatchError", "TransferStats",
           "TruncatedFileError", "WeightEntry", "WeightFileError", "WeightFileInfo",
           "WeightIndex", "load_into", "read_index", "release_pinned_cache", "write_weights"]
