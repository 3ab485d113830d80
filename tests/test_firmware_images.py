"""Reading firmware files for any board (hil.boards.images): the format, the board family it is
for, its version, whether it is intact; anything else is UnknownImage, never a crash."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hil.boards import BOARDS
from hil.boards.images import (
    MCUBOOT_MAGIC,
    FirmwareImage,
    ImageFormat,
    UnknownImage,
    read_image,
)
from hil.sim.images import MCUBOOT_HEADER_SIZE, build_image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "images"
CHIP_ID_OFFSET = 12          # esp_image_header_t.chip_id
APP_DESC_OFFSET = 32         # after the image header (24) and the first segment header (8)


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


@pytest.mark.parametrize(("name", "image_format", "board", "version"), [
    ("esp32-1.0.0.bin", ImageFormat.ESP_APP, "esp32", "1.0.0"),
    ("esp32-1.1.0.bin", ImageFormat.ESP_APP, "esp32", "1.1.0"),
    ("nrf52832-1.0.0.bin", ImageFormat.MCUBOOT, "nrf52832", "1.0.0"),
    ("nrf52832-1.1.0.bin", ImageFormat.MCUBOOT, "nrf52832", "1.1.0"),
    ("gd32-1.0.0.bin", ImageFormat.MCUBOOT, "gd32", "1.0.0"),
    ("gd32-1.1.0.bin", ImageFormat.MCUBOOT, "gd32", "1.1.0"),
])
def test_the_fixture_images_are_told_apart(name, image_format, board, version):
    image = read_image((FIXTURES / name).read_bytes())
    assert (image.format, image.board, image.version, image.damage) == \
        (image_format, board, version, None)
    assert image.describe() == f"{image_format}, version {version}, for {board}"


def test_an_esp_app_image_names_its_project_and_chip():
    image = read_image(build_image("esp32", "v5.3.1-dirty"))
    assert (image.version, image.project, image.target) == ("v5.3.1-dirty", "hil-sim", "esp32")


@pytest.mark.parametrize("board", ["nrf52832", "gd32"])
@pytest.mark.parametrize("version", ["0.0.0", "2.10.300", "1.0.0+5", "255.255.65535+7"])
def test_mcuboot_versions_are_read_with_their_build_number(board, version):
    image = read_image(build_image(board, version))
    assert (image.format, image.board, image.version) == (ImageFormat.MCUBOOT, board, version)


@pytest.mark.parametrize("board", ["nrf52832", "gd32"])
def test_a_cortex_m_binary_without_a_header_is_raw_with_no_version(board):
    # What a build writes before `imgtool sign`: the vector table at offset 0.
    raw = build_image(board, "1.0.0")[MCUBOOT_HEADER_SIZE:]
    image = read_image(raw)
    assert (image.format, image.board, image.version) == (ImageFormat.RAW, board, None)
    assert image.describe() == f"raw Cortex-M binary, no version, for {board}"


@pytest.mark.parametrize("board", ["esp32", "nrf52832", "gd32"])
def test_a_changed_byte_is_damage_and_says_which_check(board):
    image = build_image(board, "1.0.0")
    damaged = read_image(flip(image, len(image) // 2))
    assert damaged.board == board
    assert damaged.version == "1.0.0"
    assert damaged.damage is not None
    assert ("SHA256" in damaged.damage) if board != "esp32" else \
        ("checksum" in damaged.damage or "SHA-256" in damaged.damage)


def test_a_truncated_mcuboot_image_is_damaged():
    image = build_image("nrf52832", "1.0.0")
    damaged = read_image(image[: len(image) - 100])
    assert damaged.damage is not None
    assert damaged.damage.startswith("truncated")


def test_an_image_for_another_esp_chip_has_no_hil_board():
    image = bytearray(build_image("esp32", "1.0.0"))
    struct.pack_into("<H", image, CHIP_ID_OFFSET, 9)           # ESP32-S3's image chip id
    read = read_image(bytes(image))
    assert (read.format, read.board, read.target) == (ImageFormat.ESP_APP, None, "esp32s3")


def test_an_esp_image_without_an_app_descriptor_is_unknown():
    image = bytearray(build_image("esp32", "1.0.0"))
    image[APP_DESC_OFFSET:APP_DESC_OFFSET + 4] = b"\0\0\0\0"   # e.g. a second-stage bootloader
    with pytest.raises(UnknownImage, match="without an application descriptor"):
        read_image(bytes(image))


def test_an_mcuboot_image_for_a_part_hil_does_not_know_has_no_board():
    image = bytearray(build_image("nrf52832", "1.0.0"))
    # An STM32H7's vector table: RAM at 0x24000000 (AXI SRAM), flash at 0x08000000 beyond the
    # GD32F103's 3 MiB.
    struct.pack_into("<II", image, MCUBOOT_HEADER_SIZE, 0x24080000, 0x08400301)
    read = read_image(bytes(image))
    assert (read.format, read.board, read.version) == (ImageFormat.MCUBOOT, None, "1.0.0")
    assert "no family" in read.target


def test_random_bytes_are_unknown_and_the_message_says_what_they_were():
    data = random.Random(12).randbytes(4096)
    with pytest.raises(UnknownImage) as caught:
        read_image(data)
    message = str(caught.value)
    assert message.startswith(f"not a firmware image: 4096 bytes starting {data[:4].hex()}")
    assert "\n" not in message


@given(st.binary(max_size=600))
@settings(max_examples=300, deadline=None)
def test_any_bytes_are_read_or_refused_never_a_crash(data):
    for candidate in (data, struct.pack("<I", MCUBOOT_MAGIC) + data, b"\xe9" + data):
        try:
            image = read_image(candidate)
        except UnknownImage as refused:
            refusal = str(refused)
            image = None
        if image is None:
            assert "\n" not in refusal
        else:
            assert isinstance(image, FirmwareImage)
            assert image.board in (None, *BOARDS)
            assert image.version is not None or image.format is ImageFormat.RAW

