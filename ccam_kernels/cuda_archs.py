"""Which GPUs the built CUDA extension can run on, read from the extension itself.

A CUDA library carries, in its ELF section ``.nv_fatbin``, one or more fat binaries, each a
list of images: machine code (SASS, an ELF cubin) for one architecture, or PTX that the driver
compiles for the GPU at load time. Reading them from the loaded file, rather than recording the
build flags beside it, means the answer cannot go stale when the extension is rebuilt with
other flags. Without a matching image, a launch fails with "no kernel image is available".

The fat-binary layout is not documented by NVIDIA. What this module relies on was read off
nvcc 13.0's output and is checked in tests/test_cuda_archs.py against cuobjdump's listing of
a library compiled there:

    container: u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size of its entries
    entry:     u16 kind (1 PTX, 2 ELF), u16 version, u32 header size, u64 payload size,
               u32 architecture at byte 28 (80 for sm_80, 90 for sm_90a, 120 for sm_120),
               u64 flags at byte 40: 0x100000 arch-specific ("a"), 0x200000 family ("f")
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

_FATBIN_MAGIC = 0xBA55ED50
_KIND_PTX, _KIND_ELF = 1, 2
_FLAG_ARCH_SPECIFIC = 0x100000
_FLAG_FAMILY = 0x200000


@dataclass(frozen=True, order=True)
class Image:
    """One image of a fat binary: ``kind`` "sass" or "ptx", ``arch`` as nvcc numbers it (80,
    90, 120), ``variant`` "" (plain), "a" (arch-specific) or "f" (family-specific)."""

    arch: int
    kind: str
    variant: str = ""

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.arch, 10)

    def __str__(self) -> str:
        prefix = "sm" if self.kind == "sass" else "compute"
        return f"{prefix}_{self.arch}{self.variant}" + (" (PTX)" if self.kind == "ptx" else "")

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """CUDA's compatibility rules: machine code runs on its own major version at the same or
        a higher minor; arch-specific ("a") code on that exact GPU only; PTX is compiled by the
        driver for any GPU at least as new, except "a" PTX (exact GPU) and "f" PTX (its family)."""
        major, minor = capability
        own_major, own_minor = self.capability
        if self.variant == "a":
            return (major, minor) == (own_major, own_minor)
        if self.kind == "sass" or self.variant == "f":
            return major == own_major and minor >= own_minor
        return (major, minor) >= (own_major, own_minor)


def _elf_section(data: bytes, wanted: str) -> Optional[bytes]:
    """The contents of the named section of a 64-bit little-endian ELF file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i):  # (name offset, file offset, size)
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, names_at, _ = header(shstrndx)
    for i in range(shnum):
        name, offset, size = header(i)
        end = data.index(b"\0", names_at + name)
        if data[names_at + name:end].decode() == wanted:
            return data[offset:offset + size]
    return None


def parse_fatbin(section: bytes) -> tuple[Image, ...]:
    """Every image of the fat binaries in a ``.nv_fatbin`` section (a linked library holds one
    fat binary per object file, one after another, 8-byte aligned)."""
    images = []
    pos = 0
    while pos + 16 <= len(section):
        magic, _, header_size, size = struct.unpack_from("<IHHQ", section, pos)
        if magic != _FATBIN_MAGIC:
            pos += 8  # alignment padding between the objects' fat binaries
            continue
        entry, end = pos + header_size, pos + header_size + size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", section, entry)
            arch, = struct.unpack_from("<I", section, entry + 28)
            flags, = struct.unpack_from("<Q", section, entry + 40)
            if kind in (_KIND_PTX, _KIND_ELF):
                variant = "a" if flags & _FLAG_ARCH_SPECIFIC else ("f" if flags & _FLAG_FAMILY else "")
                images.append(Image(arch, "ptx" if kind == _KIND_PTX else "sass", variant))
            entry += entry_header + payload
        pos = end
    return tuple(sorted(set(images)))


@functools.cache
def images_in(path: str) -> tuple[Image, ...]:
    """The images of the library at ``path``. Cached per path: this is asked of a library that
    is already loaded, whose code cannot change for the life of the process."""
    with open(path, "rb") as f:
        section = _elf_section(f.read(), ".nv_fatbin")
    return parse_fatbin(section) if section else ()


def loaded_library() -> Optional[str]:
    """The file of the loaded cuda-backend extension: the installed module ccam_kernels._C, or
    the JIT build (cuda_build.load, registered through torch.ops.load_library)."""
    module = sys.modules.get("ccam_kernels._C")
    if module is not None and getattr(module, "__file__", None):
        return module.__file__
    import torch

    for path in sorted(torch.ops.loaded_libraries):
        if os.path.basename(path).startswith("ccam_kernels_cuda_jit"):
            return path
    return None


def describe(images: Iterable[Image]) -> str:
    return ", ".join(str(i) for i in images) or "none"


def why_not_built_for(capability: tuple[int, int], library: Optional[str] = None) -> Optional[str]:
    """None when the loaded extension holds an image that runs on a GPU of this compute
    capability, else why not (for the backend's why_unusable)."""
    library = library or loaded_library()
    if library is None:
        return "cannot find the loaded CUDA extension's file to check which GPUs it was built for"
    try:
        images = images_in(library)
    except (OSError, ValueError, struct.error) as exc:
        return f"cannot read which GPUs the CUDA extension {library} was built for ({exc})"
    if any(image.runs_on(capability) for image in images):
        return None
    major, minor = capability
    return (f"the CUDA extension holds no kernels for this sm_{major}{minor} GPU (built for: {describe(images)}); "
            f"rebuild it with CCAM_CUDA_ARCHS={major}{minor} (or include it in the list)")
