"""What a firmware file is: read from its own bytes, for any board, real or simulated.

``read_image(data)`` recognises the formats the families' bootloaders take and says which board
family an image is for, its version, and whether it is intact:

- **MCUboot** (nRF52832, GD32): the 32-byte ``struct image_header`` (magic 0x96f3b83d,
  ``ih_hdr_size``, ``ih_img_size``, version major.minor.revision+build), the application, then
  the TLV area whose SHA256/384/512 entry covers header, application and protected TLVs. The
  family is told by the Cortex-M vector table right after the header: the initial stack
  pointer must lie in the part's RAM, the (Thumb) reset handler in its flash (an nRF52832's flash
  starts at 0, a GD32F103's at 0x08000000).
- **ESP-IDF application** (ESP32): ``esp_image_header_t`` (magic 0xE9, segment count, SPI
  settings, entry point) and its extended header, whose ``chip_id`` names the chip (0 ESP32, 2
  ESP32-S2, 9 ESP32-S3, 5 ESP32-C3...: esptool's table); the first segment starts with
  ``esp_app_desc_t`` (magic 0xABCD5432, ``version[32]``, ``project_name[32]``). Intact: the
  segments' XOR checksum and the appended SHA-256 match (esptool's own reader checks them).
- **raw Cortex-M binary**: no header, a vector table at offset 0 that fits one family. It
  carries no version: what hil allows of one is decided by its caller (``hil.rig.inputs``).

Anything else (random bytes, a text file, an ESP image without an app descriptor such as a
bootloader) is ``UnknownImage``, a ValueError saying what was found.

    image = read_image(path.read_bytes())
    image.board, image.version, image.damage, image.describe()
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import StrEnum

from hil.boards import BOARDS

try:            # imgtool is a dependency; its constants are MCUboot's own
    from imgtool.image import IMAGE_MAGIC as MCUBOOT_MAGIC
    from imgtool.image import TLV_INFO_MAGIC, TLV_PROT_INFO_MAGIC
except ImportError:  # pragma: no cover - the values of bootutil/image.h
    MCUBOOT_MAGIC, TLV_INFO_MAGIC, TLV_PROT_INFO_MAGIC = 0x96F3B83D, 0x6907, 0x6908

# bootutil's struct image_header: magic, load_addr, hdr_size, protect_tlv_size, img_size, flags,
# version (major u8, minor u8, revision u16, build u32), pad.
MCUBOOT_HEADER = struct.Struct("<IIHHIIBBHII")
TLV_HEADER = struct.Struct("<HH")
# The hash TLVs (image_tlv.h): type -> (name, digest).
MCUBOOT_HASHES = {0x10: ("SHA256", hashlib.sha256), 0x11: ("SHA384", hashlib.sha384),
                  0x12: ("SHA512", hashlib.sha512)}

ESP_IMAGE_MAGIC = 0xE9
# esp_image_header_t: magic, segment_count, spi_mode, spi_speed/size, entry_addr, wp_pin,
# spi_pin_drv[3], chip_id, min_chip_rev, min_chip_rev_full, max_chip_rev_full, reserved[4],
# hash_appended. Then esp_image_segment_header_t: load_addr, data_len.
ESP_IMAGE_HEADER = struct.Struct("<BBBBIB3sHBHH4sB")
ESP_SEGMENT_HEADER = struct.Struct("<II")
ESP_APP_DESC_MAGIC = 0xABCD5432
# esp_app_desc_t's first fields: magic_word, secure_version, reserv1[2], version[32],
# project_name[32].
ESP_APP_DESC_HEAD = struct.Struct("<II8s32s32s")


class ImageFormat(StrEnum):
    MCUBOOT = "MCUboot image"
    ESP_APP = "ESP-IDF app image"
    RAW = "raw Cortex-M binary"


class UnknownImage(ValueError):
    """Not a firmware image hil can read; the message says what the bytes were."""


@dataclass(frozen=True)
class FirmwareImage:
    format: ImageFormat
    board: str | None          # the hil board family it is for; None: a part hil has no family for
    target: str                # what the image says it runs on, for messages
    version: str | None        # None: the format carries none (a raw binary)
    size: int
    damage: str | None = None  # why it is not intact (hash, checksum, truncated); None: intact
    project: str | None = None     # ESP-IDF's project_name

    def describe(self) -> str:
        """``MCUboot image, version 1.1.0, for nrf52832``."""
        version = f"version {self.version}" if self.version is not None else "no version"
        return f"{self.format}, {version}, for {self.board or self.target}"


def read_image(data: bytes) -> FirmwareImage:
    """What ``data`` is (module docstring); UnknownImage when it is none of the formats."""
    if len(data) >= 4 and struct.unpack_from("<I", data)[0] == MCUBOOT_MAGIC:
        return _read_mcuboot(data)
    if data[:1] == bytes([ESP_IMAGE_MAGIC]):
        return _read_esp_app(data)
    found = _cortex_m_family(data, 0)
    if found is not None:
        board, target = found
        return FirmwareImage(ImageFormat.RAW, board, target, None, len(data))
    head = data[:4].hex() or "nothing"
    raise UnknownImage(f"not a firmware image: {len(data)} bytes starting {head}, neither an "
                       f"MCUboot image (magic {MCUBOOT_MAGIC:#010x}), an ESP-IDF app image "
                       f"(magic {ESP_IMAGE_MAGIC:#04x}) nor a Cortex-M vector table")


# ---------------------------------------------------------------------------------- MCUboot
def _cortex_m_family(data: bytes, offset: int) -> tuple[str | None, str] | None:
    """Whose vector table is at ``offset``: (board or None, what it looks like); None when the
    two first words are no vector table of any part."""
    if len(data) < offset + 8:
        return None
    stack, reset = struct.unpack_from("<II", data, offset)
    table = f"initial SP {stack:#010x}, reset handler {reset:#010x}"
    if not reset & 1 or stack % 4:
        return None     # a Cortex-M resets into Thumb code with an aligned stack
    fits = [name for name, family in BOARDS.items()
            if family.flash_range and family.ram_range
            and family.flash_range[0] <= reset & ~1 < family.flash_range[1]
            and family.ram_range[0] < stack <= family.ram_range[1]]
    if len(fits) == 1:
        return fits[0], f"{fits[0]} ({table})"
    return (None, f"a Cortex-M part hil has no family for ({table})") if 0x20000000 < stack \
        <= 0x40000000 else None


def _read_mcuboot(data: bytes) -> FirmwareImage:
    if len(data) < MCUBOOT_HEADER.size:
        raise UnknownImage(f"an MCUboot magic but only {len(data)} bytes, shorter than the header")
    _, _, header_size, protected, image_size, _, major, minor, revision, build, _ = \
        MCUBOOT_HEADER.unpack_from(data)
    version = f"{major}.{minor}.{revision}" + (f"+{build}" if build else "")
    found = _cortex_m_family(data, header_size)
    board, target = found if found is not None else \
        (None, "no Cortex-M part (no vector table after the header)")
    return FirmwareImage(ImageFormat.MCUBOOT, board, target, version, len(data),
                         damage=_mcuboot_damage(data, header_size + image_size, protected))


def _mcuboot_damage(data: bytes, body_end: int, protected: int) -> str | None:
    """Why the image's hash TLV does not vouch for it; None when it does."""
    offset = body_end + protected
    if len(data) < offset + TLV_HEADER.size:
        return f"truncated: {len(data)} bytes, the header says the TLV area starts at {offset:#x}"
    magic, total = TLV_HEADER.unpack_from(data, offset)
    if magic != TLV_INFO_MAGIC:
        return f"no TLV area at {offset:#x} (magic {magic:#06x}, expected {TLV_INFO_MAGIC:#06x})"
    end, entry = offset + total, offset + TLV_HEADER.size
    if len(data) < end:
        return f"truncated: {len(data)} bytes, its TLVs end at {end:#x}"
    while entry + TLV_HEADER.size <= end:
        kind, length = TLV_HEADER.unpack_from(data, entry)
        kind &= 0xFF          # imgtool writes the type as a byte and a pad byte
        if kind in MCUBOOT_HASHES:
            name, digest = MCUBOOT_HASHES[kind]
            stored = data[entry + 4: entry + 4 + length]
            if digest(data[:offset]).digest() != stored:
                return f"its {name} does not match its contents"
            return None
        entry += TLV_HEADER.size + length
    return "no hash TLV (SHA256/384/512) in its TLV area"


# ---------------------------------------------------------------------------------- ESP-IDF
def _esp_chips() -> dict[int, str]:
    """esptool's chip id -> chip name (esp32, esp32s3...)."""
    from esptool.targets import CHIP_DEFS

    return {rom.IMAGE_CHIP_ID: name for name, rom in CHIP_DEFS.items()
            if getattr(rom, "IMAGE_CHIP_ID", None) is not None}


def _read_esp_app(data: bytes) -> FirmwareImage:
    first = ESP_IMAGE_HEADER.size + ESP_SEGMENT_HEADER.size
    if len(data) < first + ESP_APP_DESC_HEAD.size:
        raise UnknownImage(f"an ESP image magic but only {len(data)} bytes: no room for the "
                           "headers and esp_app_desc_t")
    fields = ESP_IMAGE_HEADER.unpack_from(data)
    segments, chip_id = fields[1], fields[7]
    magic, _, _, raw_version, raw_project = ESP_APP_DESC_HEAD.unpack_from(data, first)
    if segments == 0 or magic != ESP_APP_DESC_MAGIC:
        raise UnknownImage(f"an ESP image ({segments} segments) without an application "
                           f"descriptor: its first segment starts {magic:#010x}, not "
                           f"esp_app_desc_t's {ESP_APP_DESC_MAGIC:#010x} (a bootloader?)")
    chip = _esp_chips().get(chip_id)
    board = next((name for name, family in BOARDS.items()
                  if chip is not None and family.esp_chip == chip), None)
    target = chip or f"an ESP chip with id {chip_id}, unknown to esptool"
    return FirmwareImage(ImageFormat.ESP_APP, board, target, _c_string(raw_version), len(data),
                         damage=_esp_damage(data, chip) if chip else None,
                         project=_c_string(raw_project))


def _c_string(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", errors="replace")


def _esp_damage(data: bytes, chip: str) -> str | None:
    from esptool.bin_image import LoadFirmwareImage
    from esptool.util import FatalError

    try:
        image = LoadFirmwareImage(chip, data)
    except (FatalError, RuntimeError, struct.error, TypeError, ValueError) as error:
        return f"esptool cannot read it: {error}"
    if image.checksum != image.calculate_checksum():
        return (f"its checksum {image.checksum:#04x} does not match its segments "
                f"({image.calculate_checksum():#04x})")
    if image.append_digest and image.stored_digest != image.calc_digest:
        return "its appended SHA-256 does not match its contents"
    return None
