"""LAION's published embeddings: the `parquet_npy` layout that clip-retrieval's inference writes
and embedding-reader reads. A folder (local or on an object store) holds
`metadata/metadata_NNNN.parquet`, `img_emb/img_emb_NNNN.npy` and, optionally,
`text_emb/text_emb_NNNN.npy`: float16, one vector per metadata row, in the same order.

Each metadata file is one shard. Vectors are read in row ranges through pyarrow's filesystem
(local files and s3:// alike), never a whole file, so memory stays flat in the file size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from laion_assets.core.lake.errors import LaionAssetsError

METADATA, IMAGE, TEXT = "metadata", "img_emb", "text_emb"
_PART = re.compile(r"metadata_(\d+)\.parquet")


@dataclass(frozen=True)
class Part:
    """One metadata file and the vector files of the same number (URIs or local paths)."""

    metadata: str
    image: str
    text: str | None

    @property
    def number(self) -> str:
        return _PART.search(self.metadata).group(1)


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri if "://" in uri else str(Path(uri).expanduser().resolve()))


def _exists(uri: str) -> bool:
    fs, path = _fs(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def part_of(metadata: str) -> Part:
    """The vector files beside a metadata file: `<root>/metadata/metadata_0007.parquet` ->
    `<root>/img_emb/img_emb_0007.npy` and, if present, `<root>/text_emb/text_emb_0007.npy`."""
    m = re.search(rf"^(.*)/{METADATA}/{_PART.pattern}$", metadata)
    if m is None:
        raise LaionAssetsError(f"{metadata} is not in LAION's parquet_npy layout (<folder>/metadata/metadata_NNNN.parquet)")
    root, n = m.group(1), m.group(2)
    image, text = f"{root}/{IMAGE}/{IMAGE}_{n}.npy", f"{root}/{TEXT}/{TEXT}_{n}.npy"
    if not _exists(image):
        raise LaionAssetsError(f"{metadata} has no image embeddings: {image} is missing")
    return Part(metadata, image, text if _exists(text) else None)


def find_parts(location: str) -> list[Part]:
    """Every part of a parquet_npy folder, in file order."""
    location = location.rstrip("/")
    fs, root = _fs(location)
    if fs.get_file_info(f"{root}/{METADATA}").type != pafs.FileType.Directory:
        raise LaionAssetsError(f"{location} has no {METADATA}/ folder: point at the folder holding {METADATA}/, {IMAGE}/ (and {TEXT}/)")
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{root}/{METADATA}")) if _PART.fullmatch(i.base_name))
    if not names:
        raise LaionAssetsError(f"{location}/{METADATA} holds no metadata_NNNN.parquet files")
    return [part_of(f"{location}/{METADATA}/{name}") for name in names]


def metadata_rows(uri: str) -> int:
    fs, path = _fs(uri)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f).num_rows


class NpyRows:
    """Row ranges of a 2-d .npy file, read where they lie (header parsed with numpy's own
    format module; no mmap, so object stores work the same)."""

    def __init__(self, uri: str):
        self.uri = uri
        fs, path = _fs(uri)
        self._file = fs.open_input_file(path)
        try:
            version = np.lib.format.read_magic(self._file)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = header(self._file)
        except ValueError as e:
            raise LaionAssetsError(f"{uri} is not a .npy file ({e})") from None
        if len(shape) != 2 or fortran:
            raise LaionAssetsError(f"{uri} holds a {'Fortran-order ' if fortran else ''}array of shape {shape}, not rows of vectors")
        self.rows, self.dim = shape
        self.dtype = np.dtype(dtype)
        self._offset = self._file.tell()

    def read(self, start: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as stored (e.g. float16); in the first rows of `into` (an array
        of this file's dtype and width) when given. A loop over chunks passes the same `into`:
        a fresh 100 MB buffer per chunk cost 5x the read itself in page faults."""
        size = self.dim * self.dtype.itemsize
        if into is None:
            data = self._file.read_at((stop - start) * size, self._offset + start * size)
            return np.frombuffer(data, self.dtype).reshape(stop - start, self.dim)
        rows = into[: stop - start]
        self._file.seek(self._offset + start * size)
        if self._file.readinto(rows.reshape(-1).view(np.uint8)) != rows.nbytes:
            raise LaionAssetsError(f"{self.uri} ends before row {stop}: the file is truncated")
        return rows

    def buffer(self, rows: int) -> np.ndarray:
        """An array for `read(..., into=)` of up to `rows` rows."""
        return np.empty((min(rows, self.rows), self.dim), self.dtype)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
