"""The in-process engine (Sequoia) and the per-key choice between it and gpg.

Keys come from every generator our users meet: gpg (RSA and Curve25519), OpenPGP.js as our
signup page runs it, Debian's ``sq``, and Sequoia 2 (pysequoia), whose keys advertise SEIPDv2
and so must be served by gpg. Every output is decrypted by gpg, sq and rnp.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pysequoia
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpgfilter.openpgp.check import check_ciphertext
from gpgfilter.openpgp.choice import AutoEngine
from gpgfilter.openpgp.engine import EngineError, Plaintext, Recipient
from gpgfilter.openpgp.gnupg import GnuPGEngine
from gpgfilter.openpgp.sequoia import SequoiaEngine, Unsupported, key_id
from keystore.validate import validate_key
from tests.support.openpgp_tools import (
    KeyFactory,
    TestKey,
    decrypt_all,
    decrypt_gpg,
    packet_recipients,
    packet_versions,
)

ROOT = Path(__file__).resolve().parents[2]
OPENPGP_JS = ROOT / "keystore/service/web/node_modules/openpgp/dist/node/openpgp.mjs"
PLAINTEXT = b"Content-Type: text/plain\r\n\r\nline\r\nbare lf\nlone\rcr \x00\xff\x80\r\n"


def recipient_of(key: TestKey) -> Recipient:
    stored = validate_key(key.public).key
    return Recipient(stored.key_data, stored.usable_encryption_keys())


def run(engine: SequoiaEngine | AutoEngine, plaintext: Plaintext, recipient: Recipient) -> bytes:
    armored = asyncio.run(engine.encrypt(plaintext, recipient))
    check_ciphertext(armored, recipient)
    return armored


@pytest.fixture(scope="module")
def gnupg(tmp_path_factory: pytest.TempPathFactory) -> GnuPGEngine:
    return GnuPGEngine(home=tmp_path_factory.mktemp("gnupg"))


@pytest.fixture(scope="module")
def js_key(key_factory: KeyFactory) -> TestKey:
    """Made exactly as the signup page makes it (keystore/service/web/static/app.js)."""
    script = (
        f"import * as openpgp from {json.dumps(str(OPENPGP_JS))};\n"
        "const k = await openpgp.generateKey({type: 'ecc', curve: 'curve25519Legacy',"
        " userIDs: [{email: 'js@example.test'}], format: 'armored'});\n"
        "process.stdout.write(k.privateKey);\n"
    )
    made = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return key_factory.adopt("js@example.test", made.stdout)


@pytest.fixture(scope="module")
def sq_key(key_factory: KeyFactory, tmp_path_factory: pytest.TempPathFactory) -> TestKey:
    """Debian's sq 0.27 (Sequoia 1.x): its keys advertise MDC only."""
    path = tmp_path_factory.mktemp("sq") / "key.asc"
    subprocess.run(
        ["sq", "key", "generate", "--userid", "<sq@example.test>", "--export", str(path)],
        capture_output=True,
        check=True,
        timeout=60,
    )
    return key_factory.adopt("sq@example.test", path.read_bytes())


@pytest.mark.parametrize("which", ["alice", "bob", "js_key", "sq_key"])
def test_fast_engine_serves_common_keys_readably(
    which: str, gnupg: GnuPGEngine, request: pytest.FixtureRequest
) -> None:
    key: TestKey = request.getfixturevalue(which)
    recipient = recipient_of(key)
    auto = AutoEngine(SequoiaEngine(), gnupg)
    assert auto.decide(recipient) == "sequoia"
    armored = run(auto, [PLAINTEXT[:9], memoryview(PLAINTEXT)[9:]], recipient)
    assert auto.counts == {"sequoia": 1}
    assert armored.count(b"\r\n") == armored.count(b"\n"), "mail needs CRLF line ends"
    assert decrypt_all(key, armored) == PLAINTEXT
    assert packet_versions(armored) == ({3}, {1})
    assert packet_recipients(armored) == {f[-16:] for f in recipient.encryption_keys}


def test_seipdv2_key_is_served_by_gpg(seipdv2_key: TestKey, gnupg: GnuPGEngine) -> None:
    recipient = recipient_of(seipdv2_key)
    bare = pysequoia.encrypt(b"x", [pysequoia.Cert.from_bytes(recipient.key_data)])
    assert packet_versions(bare) == ({6}, {2}), "what Sequoia alone would deliver"
    with pytest.raises(EngineError):
        check_ciphertext(bare, recipient)
    with pytest.raises(Unsupported, match="trial"):
        SequoiaEngine().prepare(recipient)
    auto = AutoEngine(SequoiaEngine(), gnupg)
    assert auto.decide(recipient) == "gnupg"
    armored = run(auto, PLAINTEXT, recipient)
    assert auto.counts == {"gnupg": 1}
    assert decrypt_all(seipdv2_key, armored) == PLAINTEXT
    assert packet_versions(armored) == ({3}, {1})


def test_addressed_to_exactly_gpgs_subkeys(key_factory: KeyFactory) -> None:
    engine = SequoiaEngine()
    for key in (
        key_factory.make_with_two_encryption_subkeys("two@example.test"),
        key_factory.make_with_old_expired_and_new_valid_subkey("rot@example.test"),
        key_factory.make_with_revoked_subkey_and_new_valid("rev@example.test"),
    ):
        recipient = recipient_of(key)
        armored = run(engine, b"x", recipient)
        assert packet_recipients(armored) == {f[-16:] for f in key.encryption_subkeys}
        assert decrypt_gpg(key, armored) == b"x"
    # gpg's view is the judge even where Sequoia would choose more: one of two valid subkeys.
    two = key_factory.make_with_two_encryption_subkeys("one@example.test")
    only = Recipient(recipient_of(two).key_data, two.encryption_subkeys[1:])
    assert packet_recipients(run(engine, b"x", only)) == {two.encryption_subkeys[1][-16:]}


def test_unusable_keys_are_refused_cleanly(key_factory: KeyFactory, alice: TestKey) -> None:
    engine = SequoiaEngine()
    sign_only = key_factory.make_sign_only("signonly@example.test")
    data = validate_key(alice.public).key.key_data
    for recipient in (
        Recipient(recipient_of(alice).key_data, ()),
        Recipient(data, (sign_only.fingerprint,)),  # not a subkey of this key
        Recipient(data[: len(data) // 2], recipient_of(alice).encryption_keys),
        Recipient(b"\x00garbage" * 50, recipient_of(alice).encryption_keys),
    ):
        with pytest.raises(Unsupported) as caught:
            engine.prepare(recipient)
        assert "Stack backtrace" not in str(caught.value)
        assert "\n" not in str(caught.value)


class CountingSequoia(SequoiaEngine):
    """Counts trials and encryptions; ``bad_output`` makes it misbehave after a good trial."""

    def __init__(self) -> None:
        super().__init__()
        self.trials = 0
        self.calls = 0
        self.bad_output: bytes | None = None

    def prepare(self, recipient: Recipient) -> None:
        self.trials += 1
        super().prepare(recipient)

    async def encrypt(self, plaintext: Plaintext, recipient: Recipient) -> bytes:
        self.calls += 1
        armored = await super().encrypt(plaintext, recipient)
        return armored if self.bad_output is None else self.bad_output


def test_decided_once_per_key_and_again_when_it_changes(
    seipdv2_key: TestKey, alice: TestKey, key_factory: KeyFactory, gnupg: GnuPGEngine
) -> None:
    fast = CountingSequoia()
    auto = AutoEngine(fast, gnupg)
    declined = recipient_of(seipdv2_key)
    for _ in range(4):
        run(auto, b"m", declined)
    assert (fast.trials, fast.calls, auto.counts["gnupg"]) == (1, 0, 4)
    served = recipient_of(alice)
    for _ in range(3):
        run(auto, b"m", served)
    assert (fast.trials, fast.calls, auto.counts["sequoia"]) == (2, 3, 3)
    # The same key, changed (renewed): new key data, so it is decided again.
    renewed = key_factory.renew(key_factory.make("renew@example.test"), "2y")
    before = recipient_of(key_factory.make("renew2@example.test"))
    assert key_id(before) != key_id(recipient_of(renewed))
    run(auto, b"m", recipient_of(renewed))
    assert fast.trials == 3
    assert auto.summary() == {"gnupg": 1, "sequoia": 2}


def test_fast_engine_failing_later_moves_the_key_to_gpg_at_once(
    alice: TestKey, bob: TestKey, gnupg: GnuPGEngine
) -> None:
    fast = CountingSequoia()
    auto = AutoEngine(fast, gnupg)
    recipient = recipient_of(alice)
    run(auto, b"m", recipient)
    # Output addressed to someone else, after a good trial: served by gpg now, no deferral.
    fast.bad_output = asyncio.run(SequoiaEngine().encrypt(b"m", recipient_of(bob)))
    armored = run(auto, b"secret", recipient)
    assert decrypt_gpg(alice, armored) == b"secret"
    assert auto.decide(recipient) == "gnupg"
    run(auto, b"m", recipient)
    assert fast.calls == 2, "no second failed attempt once the key moved to gpg"
    assert auto.counts == {"sequoia": 1, "gnupg": 2}


def test_large_messages_go_to_gpg(alice: TestKey, gnupg: GnuPGEngine) -> None:
    fast = CountingSequoia()
    served: list[str] = []
    auto = AutoEngine(fast, gnupg, large=1000, served=served.append)
    recipient = recipient_of(alice)
    run(auto, b"s" * 1000, recipient)
    big = run(auto, [b"b" * 600, b"c" * 600], recipient)
    assert decrypt_gpg(alice, big) == b"b" * 600 + b"c" * 600
    assert served == ["sequoia", "gnupg"]
    assert fast.calls == 1


def test_cache_is_bounded(alice: TestKey, bob: TestKey, gnupg: GnuPGEngine) -> None:
    fast = SequoiaEngine(cache_size=1)
    auto = AutoEngine(fast, gnupg, cache_size=1)
    for key in (alice, bob, alice):
        run(auto, b"m", recipient_of(key))
    assert len(auto.summary()) == 1 and sum(auto.summary().values()) == 1
    assert len(fast._prepared) == 1


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(plaintext=st.binary(min_size=1, max_size=4096))
def test_round_trip_arbitrary_bytes(alice: TestKey, plaintext: bytes) -> None:
    armored = run(SequoiaEngine(), plaintext, recipient_of(alice))
    assert decrypt_gpg(alice, armored) == plaintext
