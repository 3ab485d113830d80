"""Firmware images for the simulated boards: the version inside round-trips, and the vendors' own
tools (esptool's image-info, imgtool verify) accept what ``hil.sim.images`` writes."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from esptool.bin_image import LoadFirmwareImage
from esptool.cmds import image_info
from imgtool.image import Image, VerifyResult

from hil.cli import main
from hil.sim.images import MCUBOOT_HEADER_SIZE, build_image, image_version

BOARDS = ["esp32", "nrf52832", "gd32"]
MCUBOOT = ["nrf52832", "gd32"]
ESP32_IROM_FILE_OFFSET = 0x10018        # the IROM (code) segment's data, 64 KiB-page aligned


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1:]


def payload_offset(board: str) -> int:
    return ESP32_IROM_FILE_OFFSET + 100 if board == "esp32" else MCUBOOT_HEADER_SIZE + 100


def imgtool_verify(data: bytes, tmp_path: Path) -> VerifyResult:
    path = tmp_path / "app.signed.bin"
    path.write_bytes(data)
    result, _, _, _ = Image.verify(str(path), None)
    return result


# ---------------------------------------------------------------------------------- versions
@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("version", ["1.1.0", "2.0.10", "1.0.0+5", "0.0.0", "255.255.65535+7"])
def test_version_round_trips(board: str, version: str) -> None:
    assert image_version(board, build_image(board, version)) == version


def test_esp32_takes_any_idf_version_string() -> None:
    for version in ["v5.3.1-dirty", "1.1", "x" * 31]:
        assert image_version("esp32", build_image("esp32", version)) == version


@pytest.mark.parametrize("board", MCUBOOT)
@pytest.mark.parametrize("version", ["1.1", "1", "v1.0.0", "1.0.0-rc1", "256.0.0", "1.256.0",
                                     "1.0.65536", "1.0.0+0", "1.0.0+4294967296", "01.0.0", ""])
def test_mcuboot_refuses_versions_it_cannot_hold(board: str, version: str) -> None:
    message = f"version '{version}' is not an MCUboot version"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_image(board, version)


@pytest.mark.parametrize("version", ["", "1.0 beta", "x" * 32, "1.0\0", "1.0.0é"])
def test_esp32_refuses_versions_the_app_descriptor_cannot_hold(version: str) -> None:
    with pytest.raises(ValueError, match=r"does not fit esp_app_desc_t\.version"):
        build_image("esp32", version)


# ---------------------------------------------------------------------------------- build
@pytest.mark.parametrize("board", BOARDS)
def test_images_are_deterministic(board: str) -> None:
    image = build_image(board, "1.1.0")
    assert build_image(board, "1.1.0") == image
    assert build_image(board, "1.2.0") != image
    assert build_image(board, "1.1.0", seed=7) != image
    assert build_image(board, "1.1.0", seed=7) == build_image(board, "1.1.0", seed=7)


@pytest.mark.parametrize("board", BOARDS)
def test_payload_size(board: str) -> None:
    small, large = build_image(board, "1.0.0", payload_size=4096), \
        build_image(board, "1.0.0", payload_size=8192)
    assert len(large) - len(small) == 4096
    assert image_version(board, large) == "1.0.0"


@pytest.mark.parametrize(("board", "size", "message"), [
    ("esp32", 100, "not a multiple of 4 of at least 256"),
    ("nrf52832", 1001, "not a multiple of 4"),
    ("gd32", 64 * 1024, "does not fit gd32's 0x8000-byte slot"),
    ("nrf52832", 0x31F00, "does not fit nrf52832's 0x32000-byte slot"),
])
def test_bad_payload_sizes(board: str, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_image(board, "1.0.0", payload_size=size)


def test_unknown_board() -> None:
    with pytest.raises(ValueError, match="unknown board 'stm32'"):
        build_image("stm32", "1.0.0")
    with pytest.raises(ValueError, match="unknown board 'stm32'"):
        image_version("stm32", b"")


@pytest.mark.parametrize("board", MCUBOOT)
def test_mcuboot_payload_starts_with_a_vector_table(board: str) -> None:
    from hil.boards import BOARDS as FAMILIES

    image = build_image(board, "1.0.0")
    sp = int.from_bytes(image[MCUBOOT_HEADER_SIZE:MCUBOOT_HEADER_SIZE + 4], "little")
    reset = int.from_bytes(image[MCUBOOT_HEADER_SIZE + 4:MCUBOOT_HEADER_SIZE + 8], "little")
    assert sp >> 28 == 0x2                               # top of SRAM
    app = FAMILIES[board].app_address
    assert reset & 1                                     # Thumb
    assert app < reset < app + len(image)                # inside the slot


# ---------------------------------------------------------------------------------- vendor tools
def test_esptool_image_info_accepts_the_esp32_image(capsys: pytest.CaptureFixture[str]) -> None:
    data = build_image("esp32", "2.0.10")
    image = LoadFirmwareImage("esp32", data)
    assert image.checksum == image.calculate_checksum()
    assert image.append_digest
    assert image.stored_digest == image.calc_digest
    assert 0x40080000 <= image.entrypoint < 0x400A0000         # IRAM

    image_info(data)
    out = capsys.readouterr().out
    assert "Detected image type: ESP32" in out
    assert "(valid)" in out.split("Checksum: ")[1].splitlines()[0]
    assert "(valid)" in out.split("Validation hash: ")[1].splitlines()[0]
    assert "App version: 2.0.10" in out
    assert "invalid" not in out.lower()


def test_esptool_sees_a_flipped_payload_byte(capsys: pytest.CaptureFixture[str]) -> None:
    image_info(flip(build_image("esp32", "1.1.0"), payload_offset("esp32")))
    out = capsys.readouterr().out
    assert "invalid" in out.split("Checksum: ")[1].splitlines()[0]
    assert "(invalid)" in out.split("Validation hash: ")[1].splitlines()[0]


@pytest.mark.parametrize("board", MCUBOOT)
def test_imgtool_verify_accepts_the_mcuboot_images(board: str, tmp_path: Path) -> None:
    assert imgtool_verify(build_image(board, "1.0.0+5"), tmp_path) is VerifyResult.OK


def test_imgtool_verify_command(tmp_path: Path) -> None:
    path = tmp_path / "app.signed.bin"
    path.write_bytes(build_image("nrf52832", "2.0.10+3"))
    done = subprocess.run([sys.executable, "-m", "imgtool.main", "verify", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Image was correctly validated" in done.stdout
    assert "Image version: 2.0.10+3" in done.stdout


# ---------------------------------------------------------------------------------- corruption
@pytest.mark.parametrize("board", BOARDS)
def test_a_flipped_payload_byte_fails(board: str, tmp_path: Path) -> None:
    bad = flip(build_image(board, "1.1.0"), payload_offset(board))
    with pytest.raises(ValueError, match=r"SHA-?256 does not match|checksum"):
        image_version(board, bad)
    if board != "esp32":
        assert imgtool_verify(bad, tmp_path) is VerifyResult.INVALID_HASH


@pytest.mark.parametrize("board", MCUBOOT)
def test_a_flipped_version_byte_fails(board: str) -> None:
    bad = flip(build_image(board, "1.1.0"), 20)          # ih_ver.iv_major
    with pytest.raises(ValueError, match="SHA256 does not match"):
        image_version(board, bad)


def test_esp32_flipped_version_fails() -> None:
    image = build_image("esp32", "1.1.0")
    offset = image.index(b"1.1.0\0")
    with pytest.raises(ValueError, match=r"checksum|SHA-256"):
        image_version("esp32", flip(image, offset))


@pytest.mark.parametrize(("board", "other", "message"), [
    ("esp32", "nrf52832", "not an ESP32 application image: magic 0x3d"),
    ("nrf52832", "esp32", "not an MCUboot image: magic 0x"),
    ("gd32", "esp32", "not an MCUboot image: magic 0x"),
])
def test_an_image_of_another_format_is_refused(board: str, other: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_version(board, build_image(other, "1.0.0"))


@pytest.mark.parametrize("board", BOARDS)
@pytest.mark.parametrize("keep", [0, 10, 0x300, -40])
def test_truncated_images_are_refused(board: str, keep: int) -> None:
    image = build_image(board, "1.0.0")
    with pytest.raises(ValueError, match=r"ESP32|MCUboot"):
        image_version(board, image[:keep])


@pytest.mark.parametrize("board", MCUBOOT)
def test_mcuboot_image_with_a_bad_tlv_magic(board: str) -> None:
    image = bytearray(build_image(board, "1.0.0"))
    tlv = MCUBOOT_HEADER_SIZE + int.from_bytes(image[12:16], "little")
    image[tlv] ^= 0xFF
    with pytest.raises(ValueError, match="no TLV area"):
        image_version(board, bytes(image))


def test_trailing_erased_flash_is_ignored() -> None:
    for board in BOARDS:
        assert image_version(board, build_image(board, "3.1.4") + b"\xff" * 4096) == "3.1.4"


# ---------------------------------------------------------------------------------- hil sim image
@pytest.mark.parametrize("board", BOARDS)
def test_cli_writes_an_image(board: str, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / f"{board}.bin"
    assert main(["sim", "image", "--board", board, "--version", "1.0.0+5", "-o", str(out),
                 "--size", "8192"]) == 0
    assert image_version(board, out.read_bytes()) == "1.0.0+5"
    assert out.read_bytes() == build_image(board, "1.0.0+5", payload_size=8192)
    assert "version 1.0.0+5" in capsys.readouterr().out


def test_cli_writes_a_build_the_simulated_mcuboot_refuses_or_reverts(tmp_path: Path) -> None:
    from hil.sim.images import check_signature, fails_self_test, public_key_der

    other, failing = tmp_path / "other.bin", tmp_path / "failing.bin"
    assert main(["sim", "image", "--board", "gd32", "--version", "1.1.0", "--key", "other",
                 "-o", str(other)]) == 0
    assert main(["sim", "image", "--board", "gd32", "--version", "1.1.0", "--fails-self-test",
                 "-o", str(failing)]) == 0
    with pytest.raises(ValueError, match="a key this bootloader does not know"):
        check_signature(other.read_bytes(), public_key_der("root"))
    check_signature(failing.read_bytes(), public_key_der("root"))
    assert fails_self_test("gd32", failing.read_bytes())
    assert not fails_self_test("gd32", other.read_bytes())


@pytest.mark.parametrize(("argv", "message"), [
    (["--board", "stm32", "--version", "1.0.0"], "argument --board: invalid choice: 'stm32'"),
    (["--board", "gd32", "--version", "1.1"], "version '1.1' is not an MCUboot version"),
    (["--board", "esp32", "--version", "1 0"], "version '1 0' does not fit esp_app_desc_t"),
    (["--board", "gd32", "--version", "1.0.0", "--size", "65536"], "does not fit gd32's"),
    (["--board", "gd32", "--version", "1.0.0", "--size", "-4"], "argument --size: '-4' is"),
    (["--board", "gd32", "--version", "1.0.0", "--size", "1k"], "argument --size: '1k' is"),
    (["--board", "gd32", "--version", "1.0.0", "-o", "/nonexistent/dir/x.bin"],
     "-o: cannot write /nonexistent/dir/x.bin"),
    (["--version", "1.0.0"], "the following arguments are required: --board"),
    (["--board", "esp32", "--version", "1.0.0", "--key", "other"],
     "the simulated ESP32's images are not signed"),
    (["--board", "gd32", "--version", "1.0.0", "--key", "mine"],
     "argument --key: invalid choice: 'mine'"),
])
def test_cli_bad_arguments(argv: list[str], message: str, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "x.bin")]
    with pytest.raises(SystemExit) as exit_info:
        main(["sim", "image", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("hil sim image: error: "), err
    assert message in err
    assert not (tmp_path / "x.bin").exists()


def test_cli_sim_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sim"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == \
        "hil sim: error: the following arguments are required: COMMAND\n"


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "images"


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.bin")), ids=lambda path: path.name)
def test_the_fixture_images_are_what_hil_sim_image_builds(path: Path) -> None:
    board, version = path.stem.split("-", 1)
    data = path.read_bytes()
    assert image_version(board, data) == version
    assert data == build_image(board, version), f"rebuild it: hil sim image --board {board} " \
        f"--version {version} -o {path}"


def test_every_board_has_a_base_and_an_update_fixture() -> None:
    assert sorted(path.name for path in FIXTURES.glob("*.bin")) == sorted(
        f"{board}-{version}.bin" for board in ("esp32", "nrf52832", "gd32")
        for version in ("1.0.0", "1.1.0"))
