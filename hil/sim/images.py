"""Firmware images for the simulated boards, in the formats their real bootloaders take, with the
version inside the image where the bootloader and the OTA client read it.

- **esp32**: an ESP-IDF application image, written by esptool's own ``ESP32FirmwareImage``:
  the 0xE9 header with an entry point in IRAM, the extended header (chip id 0, SHA-256
  appended), a DROM segment at 0x3F400020 that starts with ``esp_app_desc_t`` (magic
  0xABCD5432, the version in its 32-byte ``version`` field), IROM code (the payload), IRAM and
  DRAM segments, the checksum byte and the SHA-256 of all of it. ``esptool image-info`` reads it.
  ``esp_app_desc_t.secure_version`` is the anti-rollback version (``ESP32_SECURE_VERSION`` unless
  asked otherwise). It is signed as ESP-IDF's Secure Boot V2 signs an app (``espsecure sign-data
  --version 2``): padded with 0xFF to a 4 KiB boundary, then a 4 KiB signature sector whose first
  1216 bytes are the signature block (RSA-3072, RSA-PSS/SHA-256, salt 32) made with the test key
  ``esp32_signing_key(key)`` (``root``, the key the simulated ESP32's bootloader trusts, by
  default; ``other``, one it does not). ``check_esp32_signature`` is the bootloader's check. A
  build made to fail its self-test starts its DROM rodata, right after ``esp_app_desc_t``, with
  ``ESP32_SELF_TEST_FAILS``: inside the hashed and signed part, so the build's own.
- **nrf52832**, **gd32**: an MCUboot image, written by imgtool's ``Image``: a 0x200-byte header
  holding the version (major.minor.revision+build), the payload (a Cortex-M vector table, then
  code-like bytes), and the TLV area with the SHA256 TLV, the KEYHASH TLV and an ED25519
  signature of the hash made with an imgtool key (``signing_key``: ``root``, the key the
  simulated boards' MCUboot is built with, by default; ``other``, a key it does not trust).
  ``imgtool verify -k`` accepts it with the key's public half. A build made to fail its
  self-test (``fails_self_test``) carries a protected custom TLV (``SELF_TEST_TLV``) that the
  simulated firmware reads at boot: covered by the hash and the signature, it is the build's,
  not something a transfer can add.

Payloads are pseudo-random but deterministic: the same (board, version, size) gives the same
bytes, so a test image is rebuilt, not stored, and a misplaced byte always changes its hash.

    image = build_image("nrf52832", "1.1.0")
    assert image_version("nrf52832", image) == "1.1.0"

``image_span`` is how many bytes an image's header says it fills, as a bootloader reads it before
it trusts the image (MCUboot's header size plus image size; ESP-IDF's segments walked from
their headers, without the Secure Boot V2 padding and signature sector that follow them);
``claim_span`` rewrites a header to say another length (a package whose image says it is larger
than its slot), leaving the rest of the bytes as they are.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esptool.bin_image import ELFSection, ESP32FirmwareImage
from esptool.targets import ESP32ROM
from esptool.util import FatalError

from hil.boards import board_family
from hil.sim.layout import LAYOUTS

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

ESP_APP_DESC_MAGIC = 0xABCD5432
# esp_app_desc_t (ESP-IDF's esp_app_format.h), 256 bytes: magic_word, secure_version, reserv1[2],
# version[32], project_name[32], time[16], date[16], idf_ver[32], app_elf_sha256[32],
# min_efuse_blk_rev_full, max_efuse_blk_rev_full, mmu_page_size (log2), reserv3[3], reserv2[18].
ESP_APP_DESC = struct.Struct("<II8s32s32s16s16s32s32sHHB3s72s")

# ESP32 memory the segments load to (esptool's ESP32ROM memory map).
ESP32_DROM = 0x3F400020     # flash-mapped rodata; the app descriptor comes first
ESP32_IROM = 0x400D0020     # flash-mapped code
ESP32_IRAM = 0x40080000     # code copied to IRAM by the bootloader; the entry point is here
ESP32_DRAM = 0x3FFB0000     # initialised data

# The anti-rollback version (esp_app_desc_t.secure_version) every ordinary ESP32 build carries;
# a downgrade is a build with a lower one.
ESP32_SECURE_VERSION = 1
# The start of the DROM rodata (right after esp_app_desc_t) of an ESP32 build whose self-test
# fails: hashed and signed with the rest, so it is the build's, not a transfer's.
ESP32_SELF_TEST_FAILS = b"SELF_TEST_FAILS\0"

# ESP-IDF Secure Boot V2 (espsecure's layout): the signed image is padded with 0xFF to a sector,
# then one sector holds up to three 1216-byte signature blocks (one here), the rest 0xFF.
SBV2_SECTOR = 0x1000
SBV2_MAGIC = 0xE7
SBV2_VERSION_RSA = 0x02
SBV2_SALT_LENGTH = 32
# magic, version, 2 pad, image SHA-256, n (LE), e, R^-1 mod n (LE), M' (-n^-1 mod 2^32), the
# signature (LE); then CRC32 of those 1196 bytes and 16 zero bytes.
SBV2_BLOCK = struct.Struct("<BBxx32s384sI384sI384sI16x")
SBV2_KEY = slice(36, 812)      # the key material whose SHA-256 eFuse holds (n, e, R^-1, M')

MCUBOOT_HEADER_SIZE = 0x200
# The slot an image must fit (hil.sim.layout).
SLOT_SIZE = {board: layout.primary.size for board, layout in LAYOUTS.items()}
# None asks for this payload size: 64 KiB, less where the slot is smaller.
DEFAULT_PAYLOAD_SIZE = {"esp32": 64 * 1024, "nrf52832": 64 * 1024, "gd32": 16 * 1024}
# Top of RAM, the initial stack pointer in a Cortex-M vector table.
STACK_TOP = {"nrf52832": 0x20010000, "gd32": 0x20005000}
MIN_PAYLOAD = 256

# The imgtool keys the simulated MCUboot images are signed with: ed25519, each derived from its
# name (the same key on every machine, none stored). ``root`` is the key the simulated boards'
# MCUboot trusts (built into the base build's bootloader); ``other`` a key it does not.
ROOT_KEY = "root"
SIGNING_KEYS = (ROOT_KEY, "other")
# A protected custom TLV (imgtool's custom TLV range starts at 0xa0) marking a build whose
# self-test fails: the simulated firmware resets before confirming such an image.
SELF_TEST_TLV = 0xA0
SELF_TEST_FAILS = b"self-test:fail"

_MCUBOOT_VERSION = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:\+([1-9]\d*))?")
_ESP_VERSION = re.compile(r"[!-~]{1,31}")      # printable ASCII, no spaces; NUL-terminated in 32


# ---------------------------------------------------------------------------------- payload
def _stream(seed: bytes, size: int) -> bytes:
    return hashlib.shake_256(seed).digest(size)


def _seed(board: str, version: str, size: int, seed: int | str | bytes | None) -> bytes:
    if seed is None:
        return f"{board}|{version}|{size}".encode()
    if isinstance(seed, bytes):
        return seed
    return str(seed).encode()


def _check_board(board: str) -> None:
    try:
        board_family(board)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    if board not in SLOT_SIZE:
        raise ValueError(f"no image format for board {board!r}")


def _check_size(board: str, size: int) -> None:
    if size < MIN_PAYLOAD or size % 4:
        raise ValueError(f"payload size {size} is not a multiple of 4 of at least {MIN_PAYLOAD}")
    if size > SLOT_SIZE[board]:
        raise ValueError(f"payload size {size} does not fit {board}'s "
                         f"{SLOT_SIZE[board]:#x}-byte slot")


# ---------------------------------------------------------------------------------- keys
@functools.cache
def signing_key(name: str) -> Any:
    """The imgtool key (``imgtool.keys.Ed25519``) named ``name`` (``SIGNING_KEYS``)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from imgtool.keys import Ed25519

    if name not in SIGNING_KEYS:
        raise ValueError(f"unknown signing key {name!r}; known: {', '.join(SIGNING_KEYS)}")
    seed = hashlib.sha256(f"hil-sim mcuboot signing key {name}".encode()).digest()
    return Ed25519(ed25519.Ed25519PrivateKey.from_private_bytes(seed))


def public_key_der(name: str) -> bytes:
    """The public half of ``signing_key(name)`` as MCUboot embeds it (SubjectPublicKeyInfo
    DER; its SHA-256 is what an image's KEYHASH TLV holds)."""
    der: bytes = signing_key(name).get_public_bytes()
    return der


@functools.cache
def esp32_signing_key(name: str) -> RSAPrivateKey:
    """The RSA-3072 Secure Boot V2 key named ``name`` (``SIGNING_KEYS``), from
    ``hil/sim/keys/esp32-secure-boot-NAME.pem``: public test keys, made once with ``espsecure
    generate-signing-key --version 2 --scheme rsa3072``. ``root`` is the key whose digest the
    simulated ESP32's eFuse holds; ``other`` one it does not."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if name not in SIGNING_KEYS:
        raise ValueError(f"unknown signing key {name!r}; known: {', '.join(SIGNING_KEYS)}")
    pem = resources.files("hil.sim").joinpath("keys", f"esp32-secure-boot-{name}.pem")
    key = load_pem_private_key(pem.read_bytes(), password=None)
    assert isinstance(key, RSAPrivateKey)
    assert key.key_size == 3072
    return key


def _sbv2_key_material(key: RSAPrivateKey) -> bytes:
    """n, e, R^-1 mod n and M' as the signature block and eFuse digest hold them (espsecure's
    ``_get_sbv2_rsa_primitives``: little-endian numbers for the ESP32's RSA peripheral)."""
    numbers = key.public_key().public_numbers()
    rinv = (1 << (2 * 3072)) % numbers.n
    m_prime = -pow(numbers.n, -1, 1 << 32) & 0xFFFFFFFF
    return (numbers.n.to_bytes(384, "little") + struct.pack("<I", numbers.e)
            + rinv.to_bytes(384, "little") + struct.pack("<I", m_prime))


def esp32_key_digest(name: str) -> bytes:
    """The SHA-256 of the key ``name``'s public material as Secure Boot V2 burns it into eFuse
    (``espsecure digest-sbv2-public-key``): of a signature block's bytes 36 to 812."""
    return hashlib.sha256(_sbv2_key_material(esp32_signing_key(name))).digest()


# ---------------------------------------------------------------------------------- build
def build_image(board: str, version: str, *, payload_size: int | None = None,
                seed: int | str | bytes | None = None, key: str = ROOT_KEY,
                fails_self_test: bool = False, secure_version: int | None = None) -> bytes:
    """An application image for ``board`` carrying ``version``, with ``payload_size`` bytes of
    code (None: ``DEFAULT_PAYLOAD_SIZE[board]``). Deterministic for (board, version, size)
    unless ``seed`` is given. It is signed with the key named ``key`` (MCUboot: the imgtool key
    ``signing_key``; ESP32: the Secure Boot V2 key ``esp32_signing_key``) and, with
    ``fails_self_test``, marked as a build whose self-test fails (the simulated firmware resets
    before it confirms itself). ``secure_version`` is the ESP32's anti-rollback version
    (``esp_app_desc_t.secure_version``; None: ``ESP32_SECURE_VERSION``); MCUboot images have
    none here, so any other value than None is refused for them. ValueError for an unknown
    board, a version the format cannot hold (naming it), a payload size that is not a multiple
    of 4 or does not fit the slot, an unknown key or a secure version out of range."""
    _check_board(board)
    size = DEFAULT_PAYLOAD_SIZE[board] if payload_size is None else payload_size
    _check_size(board, size)
    stream = _stream(_seed(board, version, size, seed), size)
    if board == "esp32":
        secure = ESP32_SECURE_VERSION if secure_version is None else secure_version
        if not 0 <= secure <= 0xFFFFFFFF:
            raise ValueError(f"secure version {secure} does not fit esp_app_desc_t."
                             "secure_version: 0 to 2**32-1")
        image = _sign_esp32(_build_esp32(version, stream, secure, fails_self_test),
                            esp32_signing_key(key))
    else:
        if secure_version is not None:
            raise ValueError("only the ESP32's images carry a secure version (anti-rollback); "
                             f"{board}'s MCUboot images do not")
        image = _build_mcuboot(board, version, stream, signing_key(key), fails_self_test)
    if len(image) > SLOT_SIZE[board]:
        raise ValueError(f"a {len(image)}-byte image does not fit {board}'s "
                         f"{SLOT_SIZE[board]:#x}-byte slot; give a smaller payload size")
    return image


def _esp_version(version: str) -> bytes:
    if not _ESP_VERSION.fullmatch(version):
        raise ValueError(f"version {version!r} does not fit esp_app_desc_t.version: "
                         "1 to 31 printable ASCII characters, no spaces")
    return version.encode("ascii")


def _build_esp32(version: str, code: bytes, secure_version: int, fails_self_test: bool) -> bytes:
    desc = ESP_APP_DESC.pack(
        ESP_APP_DESC_MAGIC, secure_version, b"", _esp_version(version), b"hil-sim", b"00:00:00",
        b"Jan  1 2025", b"v5.3.1", hashlib.sha256(code).digest(), 0, 99, 16, b"", b"")
    rodata = _stream(b"rodata|" + code[:32], 0x400)
    if fails_self_test:
        rodata = ESP32_SELF_TEST_FAILS + rodata[len(ESP32_SELF_TEST_FAILS):]
    iram = _stream(b"iram|" + code[:32], 0x800)
    dram = _stream(b"dram|" + code[:32], 0x100)
    image = ESP32FirmwareImage()
    image.flash_mode = 2                  # DIO
    image.flash_size_freq = 0x20          # 4 MB, 40 MHz
    image.entrypoint = ESP32_IRAM + 0x400
    image.max_rev_full = 399              # ESP-IDF's default for the ESP32: up to v3.99
    # Named like ESP-IDF's ELF sections: esptool's writer names its padding after them.
    image.segments = [ELFSection(b".flash.rodata", ESP32_DROM, desc + rodata, 0),
                      ELFSection(b".flash.text", ESP32_IROM, code, 0),
                      ELFSection(b".iram0.text", ESP32_IRAM, iram, 0),
                      ELFSection(b".dram0.data", ESP32_DRAM, dram, 0)]
    data: bytes = image.save(None)
    return data


def _sign_esp32(image: bytes, key: RSAPrivateKey) -> bytes:
    """``image`` as ``espsecure sign-data --version 2 --keyfile KEY`` writes it, but with a
    deterministic PSS salt (espsecure's is random) so a build is reproducible: padded with 0xFF
    to a sector, then the signature sector. espsecure's own code lays out the block (from a
    pre-calculated signature, which it verifies first)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    from espsecure import generate_signature_block_using_pre_calculated_signature

    padded = image + b"\xff" * (-len(image) % SBV2_SECTOR)
    digest = hashlib.sha256(padded).digest()
    salt = hashlib.sha256(b"hil-sim sbv2 salt|" + digest).digest()[:SBV2_SALT_LENGTH]
    signature = _rsa_pss_sign(key, digest, salt)
    public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    block: bytes = generate_signature_block_using_pre_calculated_signature(
        [io.BytesIO(signature)], [io.BytesIO(public)], padded)
    return padded + block + b"\xff" * (SBV2_SECTOR - len(block))


def _mgf1(seed: bytes, length: int) -> bytes:
    out = b"".join(hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
                   for counter in range((length + 31) // 32))
    return out[:length]


def _rsa_pss_sign(key: RSAPrivateKey, digest: bytes, salt: bytes) -> bytes:
    """RSASSA-PSS (RFC 8017 9.1.1 EMSA-PSS-ENCODE, SHA-256, MGF1-SHA-256) of a SHA-256
    ``digest`` with the given ``salt``: what cryptography's ``sign`` does with a random salt."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    em_bits = n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    h = hashlib.sha256(b"\0" * 8 + digest + salt).digest()
    db = b"\0" * (em_len - len(salt) - len(h) - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1(h, len(db)), strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = int.from_bytes(bytes(masked) + h + b"\xbc", "big")
    # m^d mod n by the CRT (RFC 8017 5.1.2): a quarter of the time of pow(em, d, n).
    m1, m2 = pow(em, numbers.dmp1, numbers.p), pow(em, numbers.dmq1, numbers.q)
    signature = m2 + numbers.q * (numbers.iqmp * (m1 - m2) % numbers.p)
    return signature.to_bytes((n.bit_length() + 7) // 8, "big")


def _mcuboot_version(version: str) -> tuple[int, int, int, int]:
    match = _MCUBOOT_VERSION.fullmatch(version)
    parts = tuple(int(part or 0) for part in match.groups()) if match else ()
    if len(parts) != 4 or parts[0] > 0xFF or parts[1] > 0xFF or parts[2] > 0xFFFF \
            or parts[3] > 0xFFFFFFFF:
        raise ValueError(f"version {version!r} is not an MCUboot version: MAJOR.MINOR.REVISION"
                         "[+BUILD], major and minor < 256, revision < 65536, build 1 to 2**32-1")
    major, minor, revision, build = parts
    return major, minor, revision, build


def _build_mcuboot(board: str, version: str, stream: bytes, key: Any,
                   fails_self_test: bool) -> bytes:
    import click
    from imgtool import image as imgtool_image
    from imgtool.version import decode_version

    _mcuboot_version(version)
    family = board_family(board)
    # A vector table: initial SP, then the reset handler (Thumb) right after the table.
    reset = family.app_address + MCUBOOT_HEADER_SIZE + 0x100 + 1
    code = struct.pack("<II", STACK_TOP[board], reset) + stream[8:]
    image = imgtool_image.Image(version=decode_version(version), header_size=MCUBOOT_HEADER_SIZE,
                                pad_header=True, slot_size=SLOT_SIZE[board])
    with tempfile.TemporaryDirectory(prefix="hil-image-") as tmp:
        source, target = Path(tmp, "app.bin"), Path(tmp, "app.signed.bin")
        source.write_bytes(code)
        image.load(str(source))
        custom = {SELF_TEST_TLV: SELF_TEST_FAILS} if fails_self_test else None
        try:
            # imgtool says "sign the digest" on stdout: not the caller's output.
            with contextlib.redirect_stdout(io.StringIO()):
                image.create(key, "hash", None, custom_tlvs=custom)
        except click.ClickException as error:       # imgtool's way of saying no
            raise ValueError(f"payload size {len(code)} does not fit {board}'s "
                             f"{SLOT_SIZE[board]:#x}-byte slot: {error}") from None
        image.save(str(target))
        return target.read_bytes()


# ---------------------------------------------------------------------------------- read
def image_version(board: str, data: bytes) -> str:
    """The version inside an image for ``board``, after checking the image: ValueError saying
    what is wrong when it is not of the board's format or is corrupted (bad magic, bad
    checksum, bad hash, truncated)."""
    _check_board(board)
    return _esp32_version(data) if board == "esp32" else _mcuboot_version_of(data)


def _esp32_version(data: bytes) -> str:
    raw: bytes = _esp32_app_desc(data)[0][3].split(b"\0", 1)[0]
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"esp_app_desc_t.version {raw!r} is not ASCII") from None


def _esp32_app_desc(data: bytes) -> tuple[tuple[Any, ...], bytes]:
    """The fields of an intact ESP32 image's ``esp_app_desc_t`` and the DROM segment holding
    it; ValueError saying what is wrong."""
    if not data or data[0] != 0xE9:
        found = f"{data[0]:#04x}" if data else "nothing"
        raise ValueError(f"not an ESP32 application image: magic {found}, expected 0xe9")
    try:
        image = ESP32FirmwareImage(io.BytesIO(data))
    except (FatalError, RuntimeError, struct.error, TypeError) as error:
        raise ValueError(f"not a valid ESP32 application image: {error}") from None
    if image.chip_id != ESP32ROM.IMAGE_CHIP_ID:
        raise ValueError(f"an image for chip id {image.chip_id}, not the ESP32's "
                         f"{ESP32ROM.IMAGE_CHIP_ID}")
    if image.checksum != image.calculate_checksum():
        raise ValueError(f"ESP32 image checksum {image.checksum:#04x} is wrong: the segments "
                         f"give {image.calculate_checksum():#04x}")
    if not image.append_digest:
        raise ValueError("ESP32 image has no SHA-256 appended")
    if image.stored_digest != image.calc_digest:
        raise ValueError("ESP32 image SHA-256 does not match its contents")
    drom = [s for s in image.segments if "DROM" in s.get_memory_type(image)]
    if not drom or len(drom[0].data) < ESP_APP_DESC.size:
        raise ValueError("ESP32 image has no DROM segment to hold esp_app_desc_t")
    fields = ESP_APP_DESC.unpack(bytes(drom[0].data[:ESP_APP_DESC.size]))
    if fields[0] != ESP_APP_DESC_MAGIC:
        raise ValueError(f"ESP32 image's first DROM segment starts with {fields[0]:#010x}, "
                         f"not esp_app_desc_t's magic {ESP_APP_DESC_MAGIC:#010x}")
    return fields, bytes(drom[0].data)


def esp32_secure_version(data: bytes) -> int:
    """``esp_app_desc_t.secure_version`` of an ESP32 image, the version ESP-IDF's anti-rollback
    compares with eFuse; ValueError when the image cannot be read or is corrupted."""
    return int(_esp32_app_desc(data)[0][1])


def check_esp32_signature(data: bytes, trusted_digest: bytes) -> None:
    """ESP-IDF's Secure Boot V2 check of an app (``esp_secure_boot_verify_sbv2_signature``
    with one key digest in eFuse): the signature block sits in the sector after the image (its
    end from its segment headers, checksum and SHA-256, padded to 4 KiB); its magic, version
    and CRC are right; its image digest is the SHA-256 of the padded image; the SHA-256 of its
    key material is ``trusted_digest`` (``esp32_key_digest``); and its RSA-PSS signature of the
    digest verifies with that key. ValueError with a one-line reason for the first failure."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicNumbers

    end = image_span("esp32", data)
    padded = end + (-end % SBV2_SECTOR)
    block = data[padded:padded + SBV2_BLOCK.size]
    if len(block) < SBV2_BLOCK.size or block[0] != SBV2_MAGIC:
        raise ValueError(f"the image is not signed (no signature block at {padded:#x})")
    _, version, digest, n, e, _, _, signature, crc = SBV2_BLOCK.unpack(block)
    if version != SBV2_VERSION_RSA:
        raise ValueError(f"the signature block at {padded:#x} is version {version:#04x}, not "
                         f"RSA-3072's {SBV2_VERSION_RSA:#04x}")
    if crc != zlib.crc32(block[:1196]):
        raise ValueError(f"the signature block at {padded:#x} is corrupted (bad CRC32)")
    if digest != hashlib.sha256(data[:padded]).digest():
        raise ValueError("the image's SHA-256 does not match its signature block's digest")
    key_digest = hashlib.sha256(block[SBV2_KEY]).digest()
    if key_digest != trusted_digest:
        raise ValueError(f"the image is signed with a key this bootloader does not know "
                         f"(digest {key_digest[:4].hex()}...)")
    key = RSAPublicNumbers(e, int.from_bytes(n, "little")).public_key()
    try:
        key.verify(signature[::-1], digest,
                   padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=SBV2_SALT_LENGTH),
                   utils.Prehashed(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError("the image's RSA-PSS signature does not verify") from None


# MCUboot's header (bootutil's struct image_header, imgtool's add_header), little-endian.
_MCUBOOT_HEADER = struct.Struct("<IIHHIIBBHII")
_TLV_HEADER = struct.Struct("<HH")      # magic, total size (info) / type, length (entries)


@dataclass(frozen=True)
class McubootImage:
    """What MCUboot reads of an image: its version, the hash it checked, and its TLVs
    (protected and not) by type."""

    version: tuple[int, int, int, int]        # major, minor, revision, build
    digest: bytes                             # the SHA256 TLV, checked against the image
    signed_part: bytes                        # what the hash covers (header, payload, prot. TLVs)
    tlvs: dict[int, bytes]

    @property
    def version_text(self) -> str:
        major, minor, revision, build = self.version
        return f"{major}.{minor}.{revision}" + (f"+{build}" if build else "")


def read_mcuboot(data: bytes) -> McubootImage:
    """Parse and check an MCUboot image as bootutil does before it trusts one: the header's
    magic, the TLV areas, the SHA256 TLV against the hashed part. ValueError saying what is
    wrong."""
    from imgtool.image import (
        IMAGE_MAGIC,
        TLV_INFO_MAGIC,
        TLV_PROT_INFO_MAGIC,
        TLV_VALUES,
    )

    if len(data) < _MCUBOOT_HEADER.size:
        raise ValueError(f"not an MCUboot image: {len(data)} bytes, shorter than the header")
    magic, _, header_size, protected, image_size, _, major, minor, revision, build, _ = \
        _MCUBOOT_HEADER.unpack_from(data)
    if magic != IMAGE_MAGIC:
        raise ValueError(f"not an MCUboot image: magic {magic:#010x}, expected {IMAGE_MAGIC:#010x}")
    tlvs: dict[int, bytes] = {}
    offset = header_size + image_size
    hashed_end = offset
    if len(data) >= offset + 4 and _TLV_HEADER.unpack_from(data, offset)[0] == TLV_PROT_INFO_MAGIC:
        total = _TLV_HEADER.unpack_from(data, offset)[1]
        if len(data) < offset + total:
            raise ValueError(f"MCUboot image truncated: {len(data)} bytes, its protected TLVs "
                             f"end at {offset + total:#x}")
        _read_tlvs(data, offset + 4, offset + total, tlvs)
        offset += total
        hashed_end = offset
    if len(data) < offset + 4:
        raise ValueError(f"MCUboot image truncated: {len(data)} bytes, the TLV area starts at "
                         f"{offset:#x}")
    tlv_magic, total = _TLV_HEADER.unpack_from(data, offset)
    if tlv_magic != TLV_INFO_MAGIC:
        raise ValueError(f"MCUboot image has no TLV area at {offset:#x}: magic {tlv_magic:#06x}, "
                         f"expected {TLV_INFO_MAGIC:#06x}")
    end = offset + total
    if len(data) < end:
        raise ValueError(f"MCUboot image truncated: {len(data)} bytes, its TLVs end at {end:#x}")
    _read_tlvs(data, offset + 4, end, tlvs)
    stored = tlvs.get(TLV_VALUES["SHA256"])
    if stored is None:
        raise ValueError("MCUboot image has no SHA256 TLV")
    if hashlib.sha256(data[:hashed_end]).digest() != stored:
        raise ValueError("MCUboot image SHA256 does not match its contents")
    del protected
    return McubootImage((major, minor, revision, build), stored, data[:hashed_end], tlvs)


def _read_tlvs(data: bytes, offset: int, end: int, into: dict[int, bytes]) -> None:
    while offset + 4 <= end:
        kind, length = _TLV_HEADER.unpack_from(data, offset)
        into[kind] = data[offset + 4: offset + 4 + length]
        offset += 4 + length


def _mcuboot_version_of(data: bytes) -> str:
    return read_mcuboot(data).version_text


def check_signature(data: bytes, trusted: bytes) -> None:
    """MCUboot's signature check (``bootutil_img_validate`` with one ED25519 key built in): the
    image's KEYHASH TLV names ``trusted`` (its public key, DER) and its ED25519 TLV is that
    key's signature of the image's SHA-256. ValueError saying what is missing or wrong."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    from imgtool.image import TLV_VALUES

    image = read_mcuboot(data)
    keyhash = image.tlvs.get(TLV_VALUES["KEYHASH"])
    signature = image.tlvs.get(TLV_VALUES["ED25519"])
    if keyhash is None or signature is None:
        raise ValueError("the image is not signed (no KEYHASH and ED25519 TLVs)")
    if keyhash != hashlib.sha256(trusted).digest():
        raise ValueError(f"the image is signed with a key this bootloader does not know "
                         f"(KEYHASH {keyhash[:4].hex()}...)")
    key = load_der_public_key(trusted)
    assert isinstance(key, Ed25519PublicKey)
    try:
        key.verify(signature, image.digest)
    except InvalidSignature:
        raise ValueError("the image's ED25519 signature does not verify") from None


def fails_self_test(board: str, data: bytes) -> bool:
    """Whether the image was built to fail its self-test (``build_image(fails_self_test=
    True)``): an MCUboot image's protected TLVs carry the marker, an ESP32 image's DROM
    rodata starts with it. False for an image that cannot be read."""
    if board == "esp32":
        try:
            drom = _esp32_app_desc(data)[1]
        except ValueError:
            return False
        return drom[ESP_APP_DESC.size:].startswith(ESP32_SELF_TEST_FAILS)
    try:
        return read_mcuboot(data).tlvs.get(SELF_TEST_TLV) == SELF_TEST_FAILS
    except ValueError:
        return False


# ---------------------------------------------------------------------------------- span
_ESP32_HEADER = 24          # esp_image_header_t: the common 8 bytes and the extended 16
_ESP32_SEGMENT = struct.Struct("<II")      # esp_image_segment_header_t: load address, length


def _esp32_segments(data: bytes) -> list[int]:
    """Where each segment header of an ESP32 image sits, as its headers chain them (a segment's
    length says where the next header is)."""
    if len(data) < _ESP32_HEADER or data[0] != 0xE9:
        raise ValueError("not an ESP32 application image: no 0xe9 header")
    offsets, offset = [], _ESP32_HEADER
    for _ in range(data[1]):
        if offset + _ESP32_SEGMENT.size > len(data):
            raise ValueError(f"ESP32 image truncated: a segment header at {offset:#x} lies past "
                             f"its {len(data)} bytes")
        offsets.append(offset)
        offset += _ESP32_SEGMENT.size + _ESP32_SEGMENT.unpack_from(data, offset)[1]
    return offsets


def image_span(board: str, data: bytes) -> int:
    """How many bytes the image's header says it fills: MCUboot's ``ih_hdr_size +
    ih_img_size`` (what ``boot_check_header_valid`` compares with the slot), or the end of an
    ESP32 image's last segment as its segment headers chain them, with the checksum byte's
    padding and the SHA-256 (what ESP-IDF's image loader compares with the partition): the
    Secure Boot V2 padding and signature sector after it are not included. ValueError when the
    header cannot be read."""
    _check_board(board)
    if board == "esp32":
        offsets = _esp32_segments(data)
        end = _ESP32_HEADER
        if offsets:
            last = offsets[-1]
            end = last + _ESP32_SEGMENT.size + _ESP32_SEGMENT.unpack_from(data, last)[1]
        return (end + 16) // 16 * 16 + 32     # checksum in the last byte of a 16-byte block
    return mcuboot_span(data)


def mcuboot_span(data: bytes) -> int:
    """``image_span`` of an MCUboot image: ``ih_hdr_size + ih_img_size``."""
    if len(data) < _MCUBOOT_HEADER.size:
        raise ValueError(f"not an MCUboot image: {len(data)} bytes, shorter than the header")
    magic, _, header_size, _, image_size, *_ = _MCUBOOT_HEADER.unpack_from(data)
    from imgtool.image import IMAGE_MAGIC

    if magic != IMAGE_MAGIC:
        raise ValueError(f"not an MCUboot image: magic {magic:#010x}, expected {IMAGE_MAGIC:#010x}")
    return int(header_size) + int(image_size)


def claim_span(board: str, image: bytes, span: int) -> bytes:
    """``image`` with its header saying it fills ``span`` bytes (``image_span``), every other
    byte unchanged: MCUboot's ``ih_img_size``, or the length of an ESP32 image's last segment.
    Such an image no longer passes ``image_version`` when ``span`` differs from its own."""
    data = bytearray(image)
    if board == "esp32":
        offsets = _esp32_segments(image)
        if not offsets:
            raise ValueError("ESP32 image has no segment to lengthen")
        last = offsets[-1]
        address, length = _ESP32_SEGMENT.unpack_from(image, last)
        grow = span - image_span(board, image)
        if length + grow < 0:
            raise ValueError(f"an ESP32 image cannot claim {span} bytes: shorter than its "
                             "headers")
        _ESP32_SEGMENT.pack_into(data, last, address, length + grow)
        return bytes(data)
    header_size = image_span(board, image) - _MCUBOOT_HEADER.unpack_from(image)[4]
    if span < header_size:
        raise ValueError(f"an MCUboot image cannot claim {span} bytes: its header alone is "
                         f"{header_size}")
    struct.pack_into("<I", data, 12, span - header_size)        # ih_img_size
    return bytes(data)
