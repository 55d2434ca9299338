"""The OpenPGP packet reader, on real keys and ciphertexts made by gpg: it frames packets as
gpg does, reads who a ciphertext is addressed to, and hostile bytes only ever yield
PacketError."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keystore import packets
from tests.support.openpgp_tools import TestKey, list_packets


def gpg_encrypt(key: TestKey, plaintext: bytes, *, armor: bool) -> bytes:
    """A ciphertext made by plain gpg, never by product code."""
    argv = ["gpg", "--homedir", str(key.home), "--batch", "--trust-model", "always", "-z", "0"]
    argv += ["--armor"] if armor else []
    argv += ["--encrypt", "--recipient", f"{key.fingerprint}"]
    return subprocess.run(argv, input=plaintext, capture_output=True, check=True).stdout


def binary_key(key: TestKey) -> bytes:
    block = packets.find_armor(key.public)
    return block.data if block is not None else key.public


def test_frames_a_real_key_as_gpg_does(alice: TestKey) -> None:
    data = binary_key(alice)
    assert [p.tag for p in packets.iter_packets(data)] == [p.tag for p in list_packets(data)]


def test_reads_who_a_real_ciphertext_is_addressed_to(alice: TestKey) -> None:
    armored = gpg_encrypt(alice, b"hello\n", armor=True)
    block = packets.find_armor(b"text before\n" + armored)
    assert block is not None and block.label == "MESSAGE"
    assert block.before == b"text before\n"
    assert packets.is_encrypted_message(block.data)
    addressing = packets.read_addressing(block.data)
    assert addressing.key_ids == tuple(packets.key_id(f) for f in alice.encryption_subkeys)
    assert addressing.pkesk_versions == {3}
    assert addressing.data_tag == packets.TAG_SEIPD and addressing.data_version == 1


def test_a_prefix_is_read_only_when_asked(alice: TestKey) -> None:
    data = gpg_encrypt(alice, b"x" * 5000, armor=False)
    assert len(data) > 5000
    prefix = data[:700]
    assert packets.read_addressing(prefix).key_ids  # the session-key packets are all there
    with pytest.raises(packets.PacketError):
        list(packets.iter_packets(prefix))
    assert not packets.is_encrypted_message(prefix)


def test_a_key_is_no_encrypted_message(alice: TestKey) -> None:
    assert not packets.is_encrypted_message(binary_key(alice))


@given(st.binary(max_size=2048))
def test_hostile_bytes_only_yield_packet_error(data: bytes) -> None:
    try:
        list(packets.iter_packets(data))
        packets.read_addressing(data)
    except packets.PacketError:
        pass
    packets.is_encrypted_message(data)
    packets.find_armor(data)
