#!/usr/bin/env python3
"""Generate the mail corpus of gpgfilter's tests: raw ``*.eml`` files and ``MANIFEST.md``.

Run ``python tests/corpus/make_corpus.py`` (from anywhere). Needs ``gpg`` (2.2+) and ``openssl``
(3.0+). The keys under ``signer/`` and ``recipient/`` are created only when missing
(``--new-keys`` replaces them); every ``*.eml`` and the manifest are rewritten on every run.
Output is byte-identical between runs except where the tools add randomness: OpenPGP and CMS
encryption (random session keys) and CMS signatures (their signingTime attribute). OpenPGP
signatures are reproducible (Ed25519, with gpg's clock fixed by ``--faked-system-time``).
"""

from __future__ import annotations

import argparse
import base64
import quopri
import random
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIGNER = HERE / "signer"
RECIPIENT = HERE / "recipient"
KEY_TIME = "20240101T000000!"  # creation time of the OpenPGP keys
SIG_TIME = "20250301T120000!"  # gpg's clock when signing and encrypting
DATE = "Sat, 01 Mar 2025 12:00:00 +0000"
ALICE = "Alice Example <alice@example.org>"
CRLF = b"\r\n"
LF = b"\n"

Line = str | bytes


# ---------------------------------------------------------------------------- byte helpers


def as_bytes(item: Line) -> bytes:
    """ASCII-encode a ``str``; pass ``bytes`` through."""
    return item.encode("ascii") if isinstance(item, str) else item


def lines(*items: Line, eol: bytes = CRLF) -> bytes:
    """Each item followed by ``eol``."""
    return b"".join(as_bytes(i) + eol for i in items)


def to_crlf(data: bytes) -> bytes:
    """Every line ending as CRLF."""
    return data.replace(CRLF, LF).replace(LF, CRLF)


def b64(data: bytes, eol: bytes = CRLF, width: int = 76) -> bytes:
    """Base64 in lines of ``width`` characters."""
    enc = base64.b64encode(data)
    return b"".join(enc[i : i + width] + eol for i in range(0, len(enc), width))


def qp(data: bytes) -> bytes:
    """Quoted-printable with CRLF line endings (input lines end in LF)."""
    return to_crlf(quopri.encodestring(data))


def crc24(data: bytes) -> int:
    """The OpenPGP ASCII armor checksum (RFC 4880, 6.1)."""
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(kind: str, data: bytes) -> bytes:
    """ASCII armor (CRLF) around arbitrary bytes, with a correct checksum."""
    checksum = base64.b64encode(crc24(data).to_bytes(3, "big"))
    return (
        lines(f"-----BEGIN PGP {kind}-----", "")
        + b64(data, width=64)
        + lines(b"=" + checksum, f"-----END PGP {kind}-----")
    )


def envelope(name: str, subject: Line, sender: Line = ALICE) -> list[Line]:
    """From, To, Subject, Date and Message-ID header lines."""
    return [
        b"From: " + as_bytes(sender),
        "To: Bob Recipient <bob@example.net>",
        b"Subject: " + as_bytes(subject),
        f"Date: {DATE}",
        f"Message-ID: <{name}@corpus.example.org>",
    ]


# ---------------------------------------------------------------------------- tools


def run(cmd: Sequence[str | Path], data: bytes | None = None) -> bytes:
    """Run a command, return its stdout; raise with its stderr on failure."""
    proc = subprocess.run([str(c) for c in cmd], input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} {cmd[1]} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


@dataclass
class Gpg:
    """A throwaway GnuPG home directory."""

    home: Path

    def __call__(self, *args: str, data: bytes | None = None, at: str = SIG_TIME) -> bytes:
        """Run gpg in this home with gpg's clock set to ``at``."""
        return run(
            [
                "gpg", "--homedir", self.home, "--batch", "--no-tty", "--quiet",
                "--pinentry-mode", "loopback", "--passphrase", "",
                "--faked-system-time", at, *args,
            ],
            data,
        )  # fmt: skip

    def fingerprints(self) -> list[str]:
        """Fingerprints of the primary keys in the keyring."""
        out = self("--with-colons", "--list-keys").decode()
        fprs, want = [], False
        for row in out.splitlines():
            cols = row.split(":")
            if cols[0] == "pub":
                want = True
            elif cols[0] == "fpr" and want:
                fprs.append(cols[9])
                want = False
        return fprs


@contextmanager
def gpg_home() -> Iterator[Gpg]:
    """A Gpg in a new temporary home; its agent is stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="corpus-gpg-") as tmp:
        Path(tmp).chmod(0o700)
        try:
            yield Gpg(Path(tmp))
        finally:
            subprocess.run(
                ["gpgconf", "--homedir", tmp, "--kill", "all"], capture_output=True, check=False
            )


def make_pgp_key(dest: Path, uid: str, *, encryption: bool) -> None:
    """An Ed25519 key without expiry or passphrase (plus a Cv25519 subkey for encryption)."""
    with gpg_home() as gpg:
        usage = "cert" if encryption else "sign"
        gpg("--quick-gen-key", uid, "ed25519", usage, "never", at=KEY_TIME)
        fpr = gpg.fingerprints()[0]
        if encryption:
            gpg("--quick-add-key", fpr, "cv25519", "encr", "never", at=KEY_TIME)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "pgp-public.asc").write_bytes(gpg("--armor", "--export", fpr))
        (dest / "pgp-secret.asc").write_bytes(gpg("--armor", "--export-secret-keys", fpr))


def make_smime_cert(dest: Path, name: str, email: str, usage: str) -> None:
    """A self-signed RSA certificate for ``email``, valid for 100 years."""
    dest.mkdir(parents=True, exist_ok=True)
    run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-noenc", "-sha256",
            "-days", "36525", "-subj", f"/CN={name}/emailAddress={email}",
            "-addext", "basicConstraints=critical,CA:FALSE",
            "-addext", f"keyUsage=critical,{usage}",
            "-addext", "extendedKeyUsage=emailProtection",
            "-addext", f"subjectAltName=email:{email}",
            "-keyout", dest / "smime-key.pem", "-out", dest / "smime-cert.pem",
        ]
    )  # fmt: skip


def ensure_keys(force: bool) -> None:
    """Create the committed key material where it is missing (or everywhere when forced)."""
    if force or not (SIGNER / "pgp-secret.asc").exists():
        make_pgp_key(SIGNER, "Corpus Signer <signer@corpus.example.org>", encryption=False)
    if force or not (SIGNER / "smime-key.pem").exists():
        make_smime_cert(
            SIGNER, "Corpus Signer", "signer@corpus.example.org", "digitalSignature,nonRepudiation"
        )
    if force or not (RECIPIENT / "pgp-secret.asc").exists():
        make_pgp_key(RECIPIENT, "Corpus Recipient <bob@example.net>", encryption=True)
    if force or not (RECIPIENT / "smime-key.pem").exists():
        make_smime_cert(RECIPIENT, "Corpus Recipient", "bob@example.net", "keyEncipherment")


@dataclass
class Tools:
    """Signing and encryption with the committed keys."""

    gpg: Gpg
    signer: str = ""
    recipient: str = ""

    def __post_init__(self) -> None:
        self.gpg("--import", str(SIGNER / "pgp-secret.asc"))
        self.signer = self.gpg.fingerprints()[0]
        self.gpg("--import", str(RECIPIENT / "pgp-public.asc"))
        self.recipient = next(f for f in self.gpg.fingerprints() if f != self.signer)

    def detach_sign(self, data: bytes) -> bytes:
        """Armored detached binary-mode signature over exactly ``data``."""
        args = ("--digest-algo", "SHA256", "--local-user", self.signer, "--armor")
        return to_crlf(self.gpg(*args, "--detach-sign", data=data))

    def clearsign(self, text: bytes) -> bytes:
        """Cleartext signature (LF line endings, as gpg writes it)."""
        args = ("--digest-algo", "SHA256", "--local-user", self.signer)
        return self.gpg(*args, "--clearsign", data=text)

    def encrypt(self, data: bytes, *, armored: bool = True) -> bytes:
        """Encrypt to the committed recipient key (armored output has CRLF line endings)."""
        args = ["--trust-model", "always", "--recipient", self.recipient, "--encrypt"]
        if armored:
            return to_crlf(self.gpg("--armor", *args, data=data))
        return self.gpg(*args, data=data)

    @staticmethod
    def cms_sign(data: bytes, *, detached: bool) -> bytes:
        """DER CMS SignedData over exactly ``data`` (with signed attributes)."""
        cmd: list[str | Path] = [
            "openssl", "cms", "-sign", "-binary", "-md", "sha256", "-outform", "DER",
            "-signer", SIGNER / "smime-cert.pem", "-inkey", SIGNER / "smime-key.pem",
        ]  # fmt: skip
        if not detached:
            cmd.append("-nodetach")
        return run(cmd, data)

    @staticmethod
    def cms_encrypt(data: bytes, cipher: str) -> bytes:
        """DER CMS EnvelopedData (CBC) or AuthEnvelopedData (GCM) to the recipient cert."""
        cmd = ["openssl", "cms", "-encrypt", "-binary", f"-{cipher}", "-outform", "DER"]
        return run([*cmd, RECIPIENT / "smime-cert.pem"], data)


@dataclass
class Corpus:
    """The messages, with a one-line description each."""

    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)

    def add(self, name: str, description: str, data: bytes) -> None:
        """Register ``name.eml``."""
        if name in self.files:
            raise ValueError(f"duplicate {name}")
        self.files[name] = (description, data)


# ---------------------------------------------------------------------------- clear-*


def clear_messages(c: Corpus) -> None:
    """Messages that must be encrypted, chosen for their awkward bytes."""
    text_plain = ["MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii"]

    n = "clear-plain-ascii"
    c.add(n, "Plain 7-bit ASCII text/plain, CRLF.", lines(
        *envelope(n, "Lunch on Friday"), *text_plain, "Content-Transfer-Encoding: 7bit", "",
        "Hi Bob,", "", "are we still on for lunch on Friday at noon? The place on the corner",
        "reopened last week.", "", "Cheers,", "Alice",
    ))  # fmt: skip

    n = "clear-folded-headers"
    c.add(n, "Folded To/Subject (space and tab continuations); Content-Type parameters on tab"
          " continuation lines; folded Content-Disposition.", lines(
        "From: Alice Example <alice@example.org>",
        "To: Bob Recipient <bob@example.net>,", "\tCarol Third <carol@example.net>",
        "Subject: A rather long subject line that has been folded",
        " over two continuation lines by a careful", "\tmail user agent",
        f"Date: {DATE}", f"Message-ID: <{n}@corpus.example.org>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain;", '\tcharset="us-ascii";', "\tformat=flowed;", "\tdelsp=yes",
        "Content-Transfer-Encoding: 7bit", "Content-Disposition:", " inline",
        "X-Mailer: Corpus Mailer 2.1", "",
        "This paragraph is written with format=flowed, so its lines end in ", "a space when the"
        " paragraph goes on. ", "", "-- ", "Alice",
    ))  # fmt: skip

    n = "clear-latin1-8bit-body"
    body = "\n".join([
        "Sehr geehrte Frau M\u00fcller,", "",
        "anbei die \u00dcbersicht f\u00fcr M\u00e4rz: Gr\u00f6\u00dfe 5 m\u00b2,"
        " Temperatur 21 \u00b0C, Anteil \u00bd.",
        "S\u00ed, se\u00f1or; \u00bfqu\u00e9 tal? \u00c7a va tr\u00e8s bien.", "",
        "Mit freundlichen Gr\u00fc\u00dfen", "J\u00f6rg", "",
    ]).encode("latin-1")  # fmt: skip
    c.add(n, "8-bit ISO-8859-1 body, Content-Transfer-Encoding: 8bit (invalid as UTF-8).", lines(
        *envelope(n, "Monatsbericht"), "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=iso-8859-1", "Content-Transfer-Encoding: 8bit", "",
    ) + to_crlf(body))  # fmt: skip

    n = "clear-utf8-raw-headers"
    c.add(n, "Raw (unencoded) UTF-8 in Subject and From display name; UTF-8 8bit body.", lines(
        *envelope(n, "Gr\u00fc\u00dfe aus Z\u00fcrich \u2014 \u6771\u4eac \u2713".encode(),
                  "J\u00fcrgen Gro\u00df <juergen@example.org>".encode()),
        "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit", "",
        "Sch\u00f6ne Gr\u00fc\u00dfe, \u3053\u3093\u306b\u3061\u306f,"
        " \u043f\u0440\u0438\u0432\u0435\u0442!".encode(),
    ))  # fmt: skip

    n = "clear-latin1-raw-header"
    c.add(n, "Raw ISO-8859-1 bytes in From, Subject and in Content-Description (moved inside).",
          lines(
        *envelope(n, "R\u00fcckfrage zur Bestellung".encode("latin-1"),
                  "Ren\u00e9e C\u00f4t\u00e9 <renee@example.org>".encode("latin-1")),
        "MIME-Version: 1.0", "Content-Type: text/plain; charset=iso-8859-1",
        "Content-Transfer-Encoding: 8bit",
        "Content-Description: \u00dcbersicht der Positionen".encode("latin-1"), "",
        "Bitte pr\u00fcfen Sie Position 3.".encode("latin-1"),
    ))  # fmt: skip

    n = "clear-bare-lf"
    c.add(n, "Bare LF line endings throughout (headers, folded Content-Type, blank line, body).",
          lines(
        *envelope(n, "Unix line endings"), "MIME-Version: 1.0", "Content-Type: text/plain;",
        "\tcharset=us-ascii", "Content-Transfer-Encoding: 7bit", "",
        "Every line of this message ends in a bare LF.", "", "Even the empty ones.", eol=LF,
    ))  # fmt: skip

    n = "clear-mixed-crlf-lf"
    hdr = envelope(n, "Mixed line endings")
    c.add(n, "CRLF and LF mixed line by line; a folded Content-Type whose two lines end"
          " differently; the blank line is CRLF after an LF-terminated header (LF CR LF).",
          b"".join([
        lines(hdr[0]), lines(hdr[1], eol=LF), lines(hdr[2]), lines(hdr[3], eol=LF),
        lines(hdr[4]), lines("MIME-Version: 1.0", eol=LF), lines("Content-Type: text/plain;"),
        lines("\tcharset=us-ascii", eol=LF), lines("Content-Transfer-Encoding: 7bit", eol=LF),
        lines(""), lines("This line ends in CRLF."), lines("This one in LF.", eol=LF),
        lines("", eol=LF), lines(""), b"CRLF CRLF inside the body\r\n\r\nand LF LF\n\nend\r\n",
    ]))  # fmt: skip

    n = "clear-lone-cr"
    c.add(n, "Lone CR bytes inside lines: in Subject, in Content-Description, mid-line and CR CR LF"
          " in the body, and a final CR without LF.", lines(
        *envelope(n, b"Carriage\rreturn inside"), *text_plain,
        b"Content-Description: part\rone", "Content-Transfer-Encoding: 8bit", "",
        b"Total:\r42", b"Column A\rColumn B\rColumn C", b"ends in two CRs\r", "last line",
    ) + b"no LF after this CR\r")  # fmt: skip

    n = "clear-nul-bytes"
    c.add(n, "NUL bytes in the body (Content-Transfer-Encoding: binary), one line only NULs.",
          lines(
        *envelope(n, "Binary junk"), *text_plain, "Content-Transfer-Encoding: binary", "",
        b"before\x00after", b"\x00\x00\x00", b"tab\t\x00\x7f\xff end",
    ))  # fmt: skip

    n = "clear-long-line"
    long_body = " ".join(f"word{i:04d}" for i in range(600))  # 5,399 characters
    c.add(n, "A 5,399-character body line (over 998) in 7bit; no line ending at the very end.",
          lines(*envelope(n, "One very long line"), *text_plain,
                "Content-Transfer-Encoding: 7bit", "", "Short first line.")
          + long_body.encode())  # fmt: skip

    n = "clear-multipart-mixed-attachment"
    blob = random.Random(1).randbytes(3000) + b"\x00\r\n\r\r\n\n\xff"
    c.add(n, "multipart/mixed: text part plus a 3 KB binary (random) base64 attachment.", lines(
        *envelope(n, "The data you asked for"), "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="------------mixed-4f2a"', "",
        "This is a multi-part message in MIME format.", "--------------mixed-4f2a",
        "Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit", "",
        "Attached: the raw dump.", "", "--------------mixed-4f2a",
        'Content-Type: application/octet-stream; name="dump.bin"',
        'Content-Disposition: attachment; filename="dump.bin"',
        "Content-Transfer-Encoding: base64", "",
    ) + b64(blob) + lines("", "--------------mixed-4f2a--"))  # fmt: skip

    n = "clear-multipart-missing-final-boundary"
    c.add(n, "multipart/mixed whose closing delimiter (--boundary--) is missing.", lines(
        *envelope(n, "Truncated multipart"), "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="=_b7"', "",
        "This is a multi-part message in MIME format.", "--=_b7",
        "Content-Type: text/plain; charset=us-ascii", "", "First part.", "--=_b7",
        'Content-Type: text/plain; charset=us-ascii; name="notes.txt"',
        'Content-Disposition: attachment; filename="notes.txt"', "",
        "Second part, and then the message stops without a closing delimiter.",
    ))  # fmt: skip

    n = "clear-no-content-type"
    c.add(n, "RFC 822 style: no MIME-Version, no Content-* header at all.", lines(
        *envelope(n, "Old school"), "", "No MIME headers here, just text.",
    ))  # fmt: skip

    n = "clear-headers-only-eof"
    c.add(
        n,
        "Header block (with Content-Type) followed directly by EOF: no blank line, no body.",
        lines(*envelope(n, "Nothing to say"), *text_plain),
    )

    n = "clear-no-headers"
    c.add(
        n,
        "No header block at all: the file starts with the empty line (CRLF), then a body.",
        lines("", "This message has no header fields.", "Not even a From."),
    )

    n = "clear-duplicate-content-type"
    c.add(n, "Two Content-Type fields (text/plain, then text/html) with X-Mailer between them.",
          lines(
        *envelope(n, "Which type am I?"), "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii", "X-Mailer: Confused Mailer 0.1",
        "Content-Type: text/html; charset=utf-8", "Content-Transfer-Encoding: 7bit", "",
        "<p>Plain or <b>HTML</b>?</p>",
    ))  # fmt: skip

    n = "clear-odd-case-header-names"
    c.add(n, "Header names in odd case: content-type, CONTENT-TRANSFER-ENCODING, mime-VERSION,"
          " from, SUBJECT.", lines(
        "from: Alice Example <alice@example.org>", "TO: Bob Recipient <bob@example.net>",
        "SUBJECT: Shouting headers", f"date: {DATE}", f"message-id: <{n}@corpus.example.org>",
        "mime-VERSION: 1.0", "content-type: text/plain; charset=us-ascii",
        "CONTENT-TRANSFER-ENCODING: 7bit", "Content-DISPOSITION: inline", "",
        "Header names are case-insensitive.",
    ))  # fmt: skip

    n = "clear-mime-version-comment"
    c.add(n, "MIME-Version and Content-Type carrying RFC 5322 comments.", lines(
        *envelope(n, "Comments in headers"),
        "MIME-Version: 1.0 (Generated by Corpus Mailer 2.1)",
        "Content-Type: text/plain (plain text); charset=us-ascii (7-bit)", "",
        "Comments are allowed in structured header fields.",
    ))  # fmt: skip

    n = "clear-long-header-line"
    refs = " ".join(f"<thread-{i:03d}.a1b2c3d4@lists.example.org>" for i in range(30))
    note = "x" * 1100
    c.add(n, "Unfolded header lines over 998 characters: References (stays outside) and a"
          " Content-Type with a 1,100-character parameter (moved inside).", lines(
        *envelope(n, "Long header lines"), f"References: {refs}", "MIME-Version: 1.0",
        f'Content-Type: text/plain; charset=us-ascii; x-note="{note}"', "",
        "The header lines above are longer than RFC 5322 allows.",
    ))  # fmt: skip

    n = "clear-qp-alternative"
    plain = "Gr\u00fc\u00dfe! Price = 10 \u20ac, trailing space here \nA line that is long"
    plain += " enough to need a soft line break in quoted-printable encoding, by far.\n"
    html = '<html><body><p style="color: red">Gr\u00fc\u00dfe! Price = 10 &euro;</p>\n'
    html += "</body></html>\n"
    c.add(n, "multipart/alternative with quoted-printable text/plain and text/html (=3D, soft"
          " breaks, =20).", lines(
        *envelope(n, "Newsletter"), "MIME-Version: 1.0",
        "Content-Type: multipart/alternative;", '\tboundary="alt-9c1d"', "",
        "--alt-9c1d", "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable", "",
    ) + qp(plain.encode()) + lines(
        "--alt-9c1d", "Content-Type: text/html; charset=utf-8",
        "Content-Transfer-Encoding: quoted-printable", "",
    ) + qp(html.encode()) + lines("--alt-9c1d--"))  # fmt: skip

    n = "clear-mbox-from-dot-lines"
    c.add(n, "Body lines starting with 'From ' (an mbox separator line too), '>From ', '.', '..'.",
          lines(
        *envelope(n, "Dots and Froms"), *text_plain, "", "Hi,",
        "From the start of this line an mbox reader might split the mailbox.",
        "From alice@example.org Sat Mar  1 12:00:00 2025",
        ">From an already quoted line.", ".", "..two leading dots", ". a dot and a space",
        "From", "The end.",
    ))  # fmt: skip

    n = "clear-invalid-utf8-body"
    c.add(n, "charset=utf-8 declared, body with invalid UTF-8 (stray continuation, overlong,"
          " surrogate, 0xFF).", lines(
        *envelope(n, "Broken encoding"), "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit", "",
        b"valid: \xc3\xa4 stray: \x80 truncated: \xc3",
        b"overlong: \xc0\xaf surrogate: \xed\xa0\x80",
        b"ff: \xff\xfe",
    ))  # fmt: skip

    n = "clear-large-attachment"
    big = random.Random(2).randbytes(750_000)
    c.add(n, "About 1 MB: text part plus a 750,000-byte random attachment in base64.", lines(
        *envelope(n, "The big file"), "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="big-boundary"', "", "--big-boundary",
        "Content-Type: text/plain; charset=us-ascii", "", "Here it is.", "--big-boundary",
        'Content-Type: application/octet-stream; name="big.bin"',
        'Content-Disposition: attachment; filename="big.bin"',
        "Content-Transfer-Encoding: base64", "",
    ) + b64(big) + lines("--big-boundary--"))  # fmt: skip


# ---------------------------------------------------------------------------- signed-*


def signed_messages(c: Corpus, t: Tools) -> None:
    """Signed messages whose signatures must still verify after decryption."""
    n = "signed-pgp-mime"
    part = lines(
        "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable",
        "", "Hi Bob,", "", "the signed plan: we meet at noon.=20",
        "=46rom here it is a short walk.", "Gr=C3=BC=C3=9Fe,", "Alice",
    )  # fmt: skip
    c.add(n, "PGP/MIME multipart/signed (RFC 3156), QP text/plain first part, Ed25519 signature"
          " over its exact CRLF bytes.", lines(
        *envelope(n, "Signed plan"), "MIME-Version: 1.0",
        'Content-Type: multipart/signed; micalg=pgp-sha256; protocol="application/pgp-signature";'
        ' boundary="sig-7d1e"', "",
        "This is an OpenPGP/MIME signed message (RFC 4880 and 3156)", "--sig-7d1e",
    ) + part + lines(
        "", "--sig-7d1e", 'Content-Type: application/pgp-signature; name="signature.asc"',
        "Content-Description: OpenPGP digital signature",
        'Content-Disposition: attachment; filename="signature.asc"', "",
    ) + t.detach_sign(part) + lines("", "--sig-7d1e--", ""))  # fmt: skip

    n = "signed-pgp-mime-multipart"
    attachment = random.Random(3).randbytes(600)
    part = lines(
        'Content-Type: multipart/mixed; boundary="inner-3b"', "", "--inner-3b",
        "Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit", "",
        "The contract is attached; see you at noon.", "", "--inner-3b",
        'Content-Type: application/octet-stream; name="contract.bin"',
        'Content-Disposition: attachment; filename="contract.bin"',
        "Content-Transfer-Encoding: base64", "",
    ) + b64(attachment) + lines("--inner-3b--")  # fmt: skip
    c.add(n, "PGP/MIME signed, folded outer Content-Type (tabs), first part a multipart/mixed with"
          " a base64 attachment.", lines(
        *envelope(n, "Signed contract"), "MIME-Version: 1.0",
        "Content-Type: multipart/signed;", "\tmicalg=pgp-sha256;",
        '\tprotocol="application/pgp-signature";', '\tboundary="sig-22aa"', "", "--sig-22aa",
    ) + part + lines(
        "", "--sig-22aa", 'Content-Type: application/pgp-signature; name="signature.asc"', "",
    ) + t.detach_sign(part) + lines("--sig-22aa--"))  # fmt: skip

    text = (
        b"Hi Bob,\n\nthis text is clearsigned. We meet at noon.\n- a line starting with a dash\n"
        b"From a line starting with From\ntrailing spaces   \n\nAlice\n"
    )
    signed = t.clearsign(text)
    n = "signed-pgp-clearsigned"
    c.add(n, "Inline PGP: text/plain whose body is a cleartext-signed message (dash-escaped"
          " lines, trailing spaces), CRLF.", lines(
        *envelope(n, "Clearsigned note"), "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit", "",
    ) + to_crlf(signed))  # fmt: skip

    n = "signed-pgp-clearsigned-bare-lf"
    c.add(n, "The same kind of cleartext-signed text/plain, all line endings bare LF.", lines(
        *envelope(n, "Clearsigned note, LF"), "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii", "", eol=LF,
    ) + signed)  # fmt: skip

    n = "signed-smime-detached"
    part = lines(
        "Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: quoted-printable",
        "", "Hello Bob,", "", "S/MIME signed: the meeting is at noon.", "Gr=C3=BC=C3=9Fe, Alice",
    )  # fmt: skip
    c.add(n, "S/MIME multipart/signed, application/pkcs7-signature (openssl cms -sign, detached,"
          " -binary over the exact first part).", lines(
        *envelope(n, "S/MIME signed plan"), "MIME-Version: 1.0",
        'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;'
        ' boundary="----smime-5c0f"', "", "This is an S/MIME signed message", "",
        "------smime-5c0f",
    ) + part + lines(
        "", "------smime-5c0f", 'Content-Type: application/pkcs7-signature; name="smime.p7s"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="smime.p7s"',
        "Content-Description: S/MIME Cryptographic Signature", "",
    ) + b64(t.cms_sign(part, detached=True)) + lines("", "------smime-5c0f--", ""))  # fmt: skip

    n = "signed-smime-opaque"
    inner = lines(
        "Content-Type: text/plain; charset=us-ascii", "", "Opaque-signed: the meeting is at noon.",
    )  # fmt: skip
    c.add(n, "S/MIME opaque signed: application/pkcs7-mime; smime-type=signed-data (openssl cms"
          " -sign -nodetach).", lines(
        *envelope(n, "S/MIME opaque signed"), "MIME-Version: 1.0",
        'Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="smime.p7m"', "",
    ) + b64(t.cms_sign(inner, detached=False)))  # fmt: skip


# ---------------------------------------------------------------------------- encrypted-*

SECRET_ENTITY = lines(
    "Content-Type: text/plain; charset=us-ascii", "Content-Transfer-Encoding: 7bit", "",
    "The vault code is 4711.",
)  # fmt: skip


def pgp_mime(boundary: str, second_part: bytes, headers: Sequence[Line] = ()) -> bytes:
    """An RFC 3156 multipart/encrypted entity body whose second part is ``second_part``."""
    return lines(
        "MIME-Version: 1.0",
        f'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";'
        f' boundary="{boundary}"', "",
        "This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)", f"--{boundary}",
        "Content-Type: application/pgp-encrypted",
        "Content-Description: PGP/MIME version identification", "", "Version: 1", "",
        f"--{boundary}", *headers,
    ) + second_part + lines("", f"--{boundary}--", "")  # fmt: skip


def octet_stream_headers() -> list[Line]:
    """Headers of the second part of a PGP/MIME encrypted message."""
    return [
        'Content-Type: application/octet-stream; name="encrypted.asc"',
        "Content-Description: OpenPGP encrypted message",
        'Content-Disposition: inline; filename="encrypted.asc"',
        "",
    ]


def smime_mime(content_type: str, smime_type: str, der: bytes) -> bytes:
    """A base64 application/(x-)pkcs7-mime entity."""
    return lines(
        "MIME-Version: 1.0",
        f'Content-Type: {content_type}; smime-type={smime_type}; name="smime.p7m"',
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="smime.p7m"', "",
    ) + b64(der)  # fmt: skip


def encrypted_messages(c: Corpus, t: Tools) -> None:
    """Messages already encrypted to the recipient: must pass through unchanged."""
    n = "encrypted-pgp-mime"
    c.add(
        n,
        "Real PGP/MIME multipart/encrypted, encrypted to recipient/pgp-public.asc.",
        lines(*envelope(n, "Encrypted"))
        + pgp_mime("enc-6f1b", t.encrypt(SECRET_ENTITY), octet_stream_headers()),
    )

    note = b"Meet me at noon by the fountain.\n"
    n = "encrypted-pgp-inline"
    c.add(
        n,
        "Inline PGP: 7bit text/plain whose body is nothing but an armored PGP MESSAGE.",
        lines(
            *envelope(n, "Inline encrypted"),
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            "Content-Transfer-Encoding: 7bit",
            "",
        )
        + t.encrypt(note),
    )

    n = "encrypted-pgp-inline-qp"
    c.add(
        n,
        "Inline PGP armored message inside quoted-printable text/plain ('=' as =3D).",
        lines(
            *envelope(n, "Inline encrypted, QP"),
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: quoted-printable",
            "",
        )
        + qp(t.encrypt(note).replace(CRLF, LF)),
    )

    n = "encrypted-pgp-inline-blank-lines"
    c.add(
        n,
        "Inline PGP armored message with leading and trailing blank lines in the body.",
        lines(
            *envelope(n, "Inline encrypted, padded"),
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=us-ascii",
            "",
            "",
            "",
        )
        + t.encrypt(note)
        + lines("", "", ""),
    )

    n = "encrypted-smime-enveloped"
    c.add(
        n,
        "S/MIME application/pkcs7-mime; smime-type=enveloped-data (openssl cms -encrypt"
        " -aes-256-cbc) to recipient/smime-cert.pem.",
        lines(*envelope(n, "S/MIME encrypted"))
        + smime_mime(
            "application/pkcs7-mime", "enveloped-data", t.cms_encrypt(SECRET_ENTITY, "aes-256-cbc")
        ),
    )

    n = "encrypted-smime-authenveloped"
    c.add(
        n,
        "S/MIME smime-type=authEnveloped-data: CMS AuthEnvelopedData, AES-256-GCM (RFC 5083).",
        lines(*envelope(n, "S/MIME encrypted, GCM"))
        + smime_mime(
            "application/pkcs7-mime",
            "authEnveloped-data",
            t.cms_encrypt(SECRET_ENTITY, "aes-256-gcm"),
        ),
    )

    n = "encrypted-smime-x-pkcs7-mime"
    c.add(
        n,
        "S/MIME enveloped-data with the old application/x-pkcs7-mime spelling.",
        lines(*envelope(n, "S/MIME encrypted, old type"))
        + smime_mime(
            "application/x-pkcs7-mime",
            "enveloped-data",
            t.cms_encrypt(SECRET_ENTITY, "aes-128-cbc"),
        ),
    )


# ---------------------------------------------------------------------------- fake-*


def fake_messages(c: Corpus, t: Tools) -> None:
    """Messages that look encrypted but are not: they must be encrypted."""
    n = "fake-multipart-encrypted-plaintext"
    plain = lines("Dear Bob,", "", "this is not encrypted at all, only labelled so.")
    c.add(
        n,
        "multipart/encrypted (PGP/MIME layout) whose second part is plain text.",
        lines(*envelope(n, "Totally encrypted"))
        + pgp_mime("fake-1", plain, octet_stream_headers()),
    )

    n = "fake-inline-armor-in-text"
    c.add(n, "text/plain with clear text around one real armored PGP MESSAGE block.", lines(
        *envelope(n, "Blob inside"), "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii", "", "Hi Bob,", "",
        "here is the blob you asked for:", "",
    ) + t.encrypt(b"blob\n") + lines(
        "", "And in clear: the meeting is at noon.", "Alice",
    ))  # fmt: skip

    n = "fake-encrypted-attachment"
    c.add(n, "Clear multipart/mixed with encrypted attachments: binary report.pdf.pgp (base64) and"
          " armored notes.txt.asc (application/pgp-encrypted).", lines(
        *envelope(n, "Report attached"), "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="att-31"', "", "--att-31",
        "Content-Type: text/plain; charset=us-ascii", "",
        "The report is attached, encrypted. The summary in clear: we are over budget.", "",
        "--att-31", 'Content-Type: application/octet-stream; name="report.pdf.pgp"',
        'Content-Disposition: attachment; filename="report.pdf.pgp"',
        "Content-Transfer-Encoding: base64", "",
    ) + b64(t.encrypt(b"%PDF-1.4 pretend report\n", armored=False)) + lines(
        "", "--att-31", 'Content-Type: application/pgp-encrypted; name="notes.txt.asc"',
        'Content-Disposition: attachment; filename="notes.txt.asc"', "",
    ) + t.encrypt(b"notes\n") + lines("", "--att-31--"))  # fmt: skip

    n = "fake-forwarded-encrypted"
    inner = lines(
        "From: Carol Third <carol@example.net>", "To: Alice Example <alice@example.org>",
        "Subject: Encrypted for you", f"Date: {DATE}",
        "Message-ID: <forwarded-inner@corpus.example.org>",
    ) + pgp_mime("enc-fwd-9", t.encrypt(SECRET_ENTITY), octet_stream_headers())  # fmt: skip
    c.add(n, "Clear multipart/mixed forwarding a PGP/MIME encrypted message as message/rfc822.",
          lines(
        *envelope(n, "Fwd: Encrypted for you"), "MIME-Version: 1.0",
        'Content-Type: multipart/mixed; boundary="fwd-12"', "", "--fwd-12",
        "Content-Type: text/plain; charset=us-ascii", "",
        "Bob, Carol sent me this; I cannot read it. Can you?", "", "--fwd-12",
        "Content-Type: message/rfc822", "Content-Disposition: inline", "",
    ) + inner + lines("--fwd-12--"))  # fmt: skip

    n = "fake-smime-signed-labelled-enveloped"
    inner = lines("Content-Type: text/plain; charset=us-ascii", "", "Signed, not encrypted.")
    c.add(
        n,
        "application/pkcs7-mime labelled smime-type=enveloped-data, but the DER is"
        " SignedData (readable by anyone).",
        lines(*envelope(n, "Forged label"))
        + smime_mime("application/pkcs7-mime", "enveloped-data", t.cms_sign(inner, detached=False)),
    )

    n = "fake-x-encrypted-header"
    c.add(n, "Plaintext carrying forged marker headers (X-Encrypted: yes, X-PGP-Encrypted).",
          lines(
        *envelope(n, "Marked as encrypted"), "X-Encrypted: yes", "X-PGP-Encrypted: PGP/MIME",
        "MIME-Version: 1.0", "Content-Type: text/plain; charset=us-ascii", "",
        "A header saying so does not make this encrypted.",
    ))  # fmt: skip

    n = "fake-multipart-encrypted-garbage"
    junk = b"\x00" + random.Random(4).randbytes(383)
    c.add(
        n,
        "multipart/encrypted whose second part is armor (valid checksum) around random bytes"
        " that are no OpenPGP packets.",
        lines(*envelope(n, "Garbage inside"))
        + pgp_mime("fake-2", armor("MESSAGE", junk), octet_stream_headers()),
    )

    n = "fake-multipart-encrypted-pubkey"
    c.add(
        n,
        "multipart/encrypted whose second part is a PGP PUBLIC KEY BLOCK, not a message.",
        lines(*envelope(n, "My key"))
        + pgp_mime(
            "fake-3", to_crlf((RECIPIENT / "pgp-public.asc").read_bytes()), octet_stream_headers()
        ),
    )


# ---------------------------------------------------------------------------- main

KEY_FILES = {
    "signer/pgp-public.asc": "OpenPGP signing key, Ed25519, no expiry (public).",
    "signer/pgp-secret.asc": "The same key's secret, no passphrase.",
    "signer/smime-cert.pem": "S/MIME signer: self-signed RSA-2048 certificate, valid 100 years.",
    "signer/smime-key.pem": "Its private key, unencrypted.",
    "recipient/pgp-public.asc": "Throwaway OpenPGP recipient: Ed25519 + Cv25519 subkey (public).",
    "recipient/pgp-secret.asc": "Its secret, no passphrase: decrypts the encrypted-* messages.",
    "recipient/smime-cert.pem": "Throwaway S/MIME recipient certificate (RSA-2048, 100 years).",
    "recipient/smime-key.pem": "Its private key: decrypts the encrypted-smime-* messages.",
}


def write_manifest(c: Corpus) -> None:
    """MANIFEST.md: one line per file."""
    out = [
        "# Mail corpus",
        "",
        "Generated by `make_corpus.py` (re-run it to regenerate; do not edit by hand). Raw bytes:"
        " open in binary mode,",
        "never re-serialise. `clear-*` and `signed-*` and `fake-*` must be encrypted (`signed-*`"
        " must still verify",
        "afterwards); `encrypted-*` must pass through unchanged. Dates and texts are invented.",
        "A re-run reproduces every file byte for byte except those holding ciphertext or CMS"
        " signatures (random",
        "session keys, signingTime). Keys are reused; `--new-keys` replaces them.",
        "",
        "## Messages",
        "",
    ]
    out += [f"- `{name}.eml`: {desc}" for name, (desc, _) in sorted(c.files.items())]
    out += ["", "## Keys", ""]
    out += [f"- `{path}`: {desc}" for path, desc in KEY_FILES.items()]
    (HERE / "MANIFEST.md").write_text("\n".join(out) + "\n")


def main() -> None:
    """Create keys where missing, then rewrite every message and the manifest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--new-keys", action="store_true", help="replace all key material")
    args = parser.parse_args()
    ensure_keys(args.new_keys)
    corpus = Corpus()
    clear_messages(corpus)
    with gpg_home() as gpg:
        tools = Tools(gpg)
        signed_messages(corpus, tools)
        encrypted_messages(corpus, tools)
        fake_messages(corpus, tools)
    for old in HERE.glob("*.eml"):
        old.unlink()
    for name, (_, data) in corpus.files.items():
        (HERE / f"{name}.eml").write_bytes(data)
    write_manifest(corpus)
    print(f"wrote {len(corpus.files)} messages to {HERE}")


if __name__ == "__main__":
    main()
