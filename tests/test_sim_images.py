"""Firmware images for the simulated boards: the version inside round-trips, and the vendors' own
tools (esptool's image-info, imgtool verify) accept what ``hil.sim.images`` writes."""

import hashlib
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from esptool.bin_image import LoadFirmwareImage
from esptool.cmds import image_info
from imgtool.image import Image, VerifyResult

from hil.cli import main
from hil.sim.images import (
    ESP32_SECURE_VERSION,
    MCUBOOT_HEADER_SIZE,
    build_image,
    check_esp32_signature,
    claim_span,
    esp32_key_digest,
    esp32_secure_version,
    esp32_signing_key,
    fails_self_test,
    image_span,
    image_version,
)

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
    if keep < 0 and board == "esp32":
        # Counted from the image's own end: the signature sector after it is not the image's.
        keep += image_span(board, image) - len(image)
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
    (["--board", "gd32", "--version", "1.0.0", "--secure-version", "2"],
     "--secure-version: only the ESP32's images carry a secure version"),
    (["--board", "esp32", "--version", "1.0.0", "--secure-version", "-1"],
     "argument --secure-version: '-1' is negative"),
    (["--board", "esp32", "--version", "1.0.0", "--secure-version", str(2**32)],
     "secure version 4294967296 does not fit esp_app_desc_t.secure_version"),
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


def test_cli_writes_esp32_builds_the_simulated_bootloader_refuses_reverts_or_rolls_back(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other, failing, downgrade = (tmp_path / f"{name}.bin" for name in ("o", "f", "d"))
    argv = ["sim", "image", "--board", "esp32", "--version", "1.1.0"]
    assert main([*argv, "--key", "other", "-o", str(other)]) == 0
    assert main([*argv, "--fails-self-test", "-o", str(failing)]) == 0
    assert main([*argv, "--secure-version", "0", "-o", str(downgrade)]) == 0
    out = capsys.readouterr().out
    assert "secure version 1, signed with other" in out
    assert "signed with root, fails its self-test" in out
    assert "secure version 0, signed with root" in out
    with pytest.raises(ValueError, match="a key this bootloader does not know"):
        check_esp32_signature(other.read_bytes(), esp32_key_digest("root"))
    check_esp32_signature(failing.read_bytes(), esp32_key_digest("root"))
    check_esp32_signature(downgrade.read_bytes(), esp32_key_digest("root"))
    assert fails_self_test("esp32", failing.read_bytes())
    assert not fails_self_test("esp32", other.read_bytes())
    assert esp32_secure_version(downgrade.read_bytes()) == 0
    assert esp32_secure_version(failing.read_bytes()) == ESP32_SECURE_VERSION == 1


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


# ---------------------------------------------------------------------------------- ESP32 SBV2
SECTOR = 0x1000
BLOCK = 1216
KEYS = Path(__file__).resolve().parent.parent / "hil" / "sim" / "keys"


def test_esp32_image_is_signed_as_espsecure_lays_it_out() -> None:
    image = build_image("esp32", "1.1.0")
    end = image_span("esp32", image)
    padded = -(-end // SECTOR) * SECTOR
    assert len(image) == padded + SECTOR                   # the image, padding, one sector
    assert image[end:padded] == b"\xff" * (padded - end)
    block = image[padded:padded + BLOCK]
    assert block[:4] == b"\xe7\x02\0\0"
    assert block[1200:] == b"\0" * 16
    assert image[padded + BLOCK:] == b"\xff" * (SECTOR - BLOCK)
    assert hashlib.sha256(block[36:812]).digest() == esp32_key_digest("root")


def test_esp32_signature_verifies_with_root_only() -> None:
    image = build_image("esp32", "1.1.0")
    check_esp32_signature(image, esp32_key_digest("root"))
    other = build_image("esp32", "1.1.0", key="other")
    check_esp32_signature(other, esp32_key_digest("other"))
    digest = esp32_key_digest("other")[:4].hex()
    with pytest.raises(ValueError, match=re.escape(
            f"signed with a key this bootloader does not know (digest {digest}...)")):
        check_esp32_signature(other, esp32_key_digest("root"))


def test_esp32_key_digest_is_what_espsecure_burns(tmp_path: Path) -> None:
    from espsecure import digest_sbv2_public_key

    for name in ("root", "other"):
        out, pem = tmp_path / f"{name}.digest", KEYS / f"esp32-secure-boot-{name}.pem"
        with pem.open("rb") as keyfile:            # the shipped key file itself
            digest_sbv2_public_key(keyfile, str(out))
        assert out.read_bytes() == esp32_key_digest(name)
    assert esp32_key_digest("root") != esp32_key_digest("other")


def key_pem(name: str, public: bool = False) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = esp32_signing_key(name)
    if public:
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def test_esp32_signing_keys() -> None:
    assert esp32_signing_key("root").key_size == 3072
    assert esp32_signing_key("root") is esp32_signing_key("root")
    with pytest.raises(ValueError, match="unknown signing key 'mine'; known: root, other"):
        esp32_signing_key("mine")
    with pytest.raises(ValueError, match="unknown signing key 'mine'"):
        build_image("esp32", "1.0.0", key="mine")


@pytest.mark.parametrize("where", ["payload", "padding", "descriptor"])
def test_esp32_a_flipped_byte_fails_the_signature_digest(where: str) -> None:
    image = build_image("esp32", "1.1.0")
    offset = {"payload": payload_offset("esp32"), "padding": image_span("esp32", image) + 1,
              "descriptor": image.index(b"1.1.0\0")}[where]
    with pytest.raises(ValueError, match="SHA-256 does not match its signature block's digest"):
        check_esp32_signature(flip(image, offset), esp32_key_digest("root"))


def test_esp32_a_damaged_signature_block_is_refused() -> None:
    image = build_image("esp32", "1.1.0")
    block = -(-image_span("esp32", image) // SECTOR) * SECTOR
    with pytest.raises(ValueError, match=f"signature block at {block:#x} is corrupted"):
        check_esp32_signature(flip(image, block + 900), esp32_key_digest("root"))
    with pytest.raises(ValueError, match="is version 0x03, not RSA-3072's 0x02"):
        check_esp32_signature(flip(image, block + 1), esp32_key_digest("root"))
    # A forged signature with a consistent CRC: only the RSA check can tell.
    forged = bytearray(image)
    forged[block + 900] ^= 1
    forged[block + 1196:block + 1200] = struct.pack(
        "<I", zlib.crc32(forged[block:block + 1196]))
    with pytest.raises(ValueError, match="RSA-PSS signature does not verify"):
        check_esp32_signature(bytes(forged), esp32_key_digest("root"))


@pytest.mark.parametrize("cut", ["sector", "block", "erased"])
def test_esp32_unsigned_data_is_refused(cut: str) -> None:
    image = build_image("esp32", "1.1.0")
    block = -(-image_span("esp32", image) // SECTOR) * SECTOR
    data = {"sector": image[:block], "block": image[:block + BLOCK - 1],
            "erased": image[:block] + b"\xff" * SECTOR}[cut]
    with pytest.raises(ValueError, match=re.escape(
            f"the image is not signed (no signature block at {block:#x})")):
        check_esp32_signature(data, esp32_key_digest("root"))


def test_esp32_check_of_something_else_is_refused() -> None:
    with pytest.raises(ValueError, match="not an ESP32 application image"):
        check_esp32_signature(build_image("gd32", "1.0.0"), esp32_key_digest("root"))


def test_espsecure_verify_accepts_the_signed_image(tmp_path: Path) -> None:
    path, public = tmp_path / "app.bin", tmp_path / "root.pub.pem"
    path.write_bytes(build_image("esp32", "2.0.10", fails_self_test=True, secure_version=7))
    public.write_bytes(key_pem("root", public=True))
    done = subprocess.run([sys.executable, "-m", "espsecure", "verify-signature", "--version",
                           "2", "--keyfile", str(public), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verification successful" in done.stdout
    public.write_bytes(key_pem("other", public=True))
    done = subprocess.run([sys.executable, "-m", "espsecure", "verify-signature", "--version",
                           "2", "--keyfile", str(public), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "could not be verified" in done.stdout + done.stderr


def test_esp32_a_build_espsecure_signed_passes_the_check(tmp_path: Path) -> None:
    """Our parser reads what espsecure's own sign-data writes (random salt and all)."""
    from espsecure import sign_data

    image = build_image("esp32", "1.1.0")
    unsigned = image[:image_span("esp32", image)]
    source, key, out = tmp_path / "app.bin", tmp_path / "root.pem", tmp_path / "signed.bin"
    source.write_bytes(unsigned)
    key.write_bytes(key_pem("root"))
    with key.open("rb") as keyfile, source.open("rb") as datafile:
        sign_data("2", [keyfile], str(out), False, False, None, [], [], datafile)
    signed = out.read_bytes()
    assert len(signed) == len(image)
    assert signed[:-SECTOR] == image[:-SECTOR]              # the same padded image
    check_esp32_signature(signed, esp32_key_digest("root"))
    with pytest.raises(ValueError, match="a key this bootloader does not know"):
        check_esp32_signature(signed, esp32_key_digest("other"))


@pytest.mark.parametrize("secure_version", [0, 1, 2, 31, 2**32 - 1])
def test_esp32_secure_version_round_trips(secure_version: int) -> None:
    image = build_image("esp32", "1.1.0", secure_version=secure_version)
    assert esp32_secure_version(image) == secure_version
    assert image_version("esp32", image) == "1.1.0"
    check_esp32_signature(image, esp32_key_digest("root"))


def test_esp32_secure_version_defaults_to_the_module_constant(
        capsys: pytest.CaptureFixture[str]) -> None:
    image = build_image("esp32", "1.1.0")
    assert esp32_secure_version(image) == ESP32_SECURE_VERSION == 1
    assert image == build_image("esp32", "1.1.0", secure_version=1)
    image_info(image)
    assert "Secure version: 1" in capsys.readouterr().out


def test_esp32_secure_version_of_unreadable_data() -> None:
    with pytest.raises(ValueError, match="not an ESP32 application image"):
        esp32_secure_version(b"")
    image = build_image("esp32", "1.1.0")
    with pytest.raises(ValueError, match=r"checksum|SHA-256"):
        esp32_secure_version(flip(image, payload_offset("esp32")))
    with pytest.raises(ValueError, match=r"does not fit esp_app_desc_t\.secure_version"):
        build_image("esp32", "1.1.0", secure_version=-1)


@pytest.mark.parametrize("board", MCUBOOT)
def test_mcuboot_images_have_no_secure_version(board: str) -> None:
    with pytest.raises(ValueError, match="only the ESP32's images carry a secure version"):
        build_image(board, "1.0.0", secure_version=1)
    assert build_image(board, "1.0.0", secure_version=None) == build_image(board, "1.0.0")


def test_esp32_fails_self_test_round_trips() -> None:
    failing = build_image("esp32", "1.1.0", fails_self_test=True)
    assert fails_self_test("esp32", failing)
    assert not fails_self_test("esp32", build_image("esp32", "1.1.0"))
    assert image_version("esp32", failing) == "1.1.0"
    check_esp32_signature(failing, esp32_key_digest("root"))
    # Unreadable data is not a failing build; a marker a transfer damaged breaks the image.
    assert not fails_self_test("esp32", b"")
    assert not fails_self_test("esp32", failing[:1000])
    assert not fails_self_test("esp32", flip(failing, failing.index(b"SELF_TEST_FAILS")))
    assert not fails_self_test("esp32", build_image("gd32", "1.0.0", fails_self_test=True))


def test_esp32_signed_image_keeps_its_span_and_claims() -> None:
    image = build_image("esp32", "1.1.0", payload_size=4096)
    span = image_span("esp32", image)
    assert span < len(image) - SECTOR
    claimed = claim_span("esp32", image, 0x200000)
    assert image_span("esp32", claimed) == 0x200000
    assert len(claimed) == len(image)
