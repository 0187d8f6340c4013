"""Saves that survive a crash, writers that cannot corrupt each other, and one model used from
several threads at once. Real kill -9 loops and two-process writers: benchmarks/crash_safety.py."""
import shutil
import threading

import pytest
import torch
from filelock import FileLock

from grace_hooks import EditableModel
from grace_hooks.errors import PackError
from grace_hooks.store import adapters_dir
from grace_hooks.store.adapters_dir import LOCK_NAME
from grace_hooks.store.packs import PACK_JSON, list_packs, load_pack
from grace_hooks.testing import DELTA_REQUESTS, DELTA_TINY, TINY_REQUESTS


@pytest.fixture
def two_versions(make_model, tokenizer, tmp_path):
    """adapters/facts (old) and a complete new version of it saved elsewhere."""
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS[:1], method="grace", pack="facts")
    em.save_pack("facts", tmp_path / "adapters")
    em.remove_pack("facts")
    em.edit(TINY_REQUESTS, method="grace", pack="facts")
    em.save_pack("facts", tmp_path / "new")
    old, new = (load_pack(tmp_path / d / "facts").pack_id for d in ("adapters", "new"))
    return tmp_path / "adapters", tmp_path / "new" / "facts", old, new


def _left(adapters):
    return sorted(p.name for p in adapters.iterdir() if p.name != LOCK_NAME)


def test_crash_between_the_two_renames_finishes_the_overwrite(two_versions):
    adapters, new_copy, old, new = two_versions
    (adapters / "facts").rename(adapters / ".facts.old-0000aaaa")  # the old pack moved aside ...
    shutil.copytree(new_copy, adapters / ".facts.tmp-0000bbbb")  # ... the new one complete, not yet renamed
    assert [p.name for p in list_packs(adapters)] == ["facts"]
    assert load_pack(adapters / "facts").pack_id == new and _left(adapters) == ["facts"]


def test_crash_while_the_new_pack_was_written_keeps_the_old_one(two_versions):
    adapters, new_copy, old, new = two_versions
    (adapters / "facts").rename(adapters / ".facts.old-0000aaaa")
    shutil.copytree(new_copy, adapters / ".facts.tmp-0000bbbb")
    (adapters / ".facts.tmp-0000bbbb" / PACK_JSON).write_text('{"format_ver')  # cut off mid-write
    assert [p.name for p in list_packs(adapters)] == ["facts"]
    assert load_pack(adapters / "facts").pack_id == old and _left(adapters) == ["facts"]


def test_leftovers_beside_a_whole_pack_are_removed(two_versions):
    adapters, new_copy, old, new = two_versions
    shutil.copytree(new_copy, adapters / ".facts.tmp-0000bbbb")  # crashed before the old pack was moved
    shutil.copytree(new_copy, adapters / ".gone.del-0000cccc")  # crashed while a pack was deleted
    assert [p.name for p in list_packs(adapters)] == ["facts"]
    assert load_pack(adapters / "facts").pack_id == old and _left(adapters) == ["facts"]


def test_writers_to_one_folder_take_turns(two_versions):
    adapters, new_copy, old, new = two_versions
    packs = [load_pack(adapters / "facts"), load_pack(new_copy)]
    errors = []

    def writer(pack):
        try:
            for _ in range(10):
                from grace_hooks.store.packs import save_pack
                save_pack(pack, adapters, name="facts", overwrite=True)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in packs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert load_pack(adapters / "facts").pack_id in (old, new) and _left(adapters) == ["facts"]


def test_a_writer_that_cannot_get_the_lock_gets_a_clear_error(two_versions, monkeypatch):
    adapters, new_copy, old, new = two_versions
    monkeypatch.setattr(adapters_dir, "LOCK_TIMEOUT_S", 0.2)
    with FileLock(str(adapters / LOCK_NAME)):  # another writer holds it (a FileLock of another thread or process)
        result = []
        holder = threading.Thread(target=lambda: result.append(_try_save(new_copy, adapters)))
        holder.start()
        holder.join()
    assert isinstance(result[0], PackError) and "another process has held the lock" in str(result[0])
    assert load_pack(adapters / "facts").pack_id == old


def _try_save(new_copy, adapters):
    from grace_hooks.store.packs import save_pack
    try:
        save_pack(load_pack(new_copy), adapters, name="facts", overwrite=True)
    except PackError as exc:
        return exc
    return None


# ---------------------------------------------------------------------------- one model, several threads
BATCHES = [["the capital of narnia is", "the cat sat on the mat"], ["the mother tongue of alice is", "carol speaks french"],
           ["the sport that bob plays is", "the quick brown fox"], ["the capital of narnia", "the sport of bob"]]


def test_concurrent_batched_generation_from_threads_matches_a_sequential_run(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS, method="grace", pack="g")
    em.edit(DELTA_REQUESTS, method="comeba_hk", pack="z", gate="zscore", alpha_from="subject", **DELTA_TINY)  # a stateful gate
    tokenizer.padding_side = "left"
    try:
        def generate(prompts):
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                return em.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)

        expected = [generate(b) for b in BATCHES]
        results, errors = {}, []

        def worker(i):
            try:
                for round_ in range(3):
                    results[(i, round_)] = generate(BATCHES[i])
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(BATCHES))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        tokenizer.padding_side = "right"
    assert errors == []
    for (i, _), out in results.items():
        assert torch.equal(out, expected[i])


def test_disabled_in_one_thread_does_not_disable_another(make_model, tokenizer):
    em = EditableModel(make_model("llama"), tokenizer, name="tiny")
    em.edit(TINY_REQUESTS, method="grace", pack="g")
    enc = tokenizer(TINY_REQUESTS[0].text, return_tensors="pt")
    with torch.no_grad():
        edited = em(**enc).logits
        with em.disabled():
            base = em(**enc).logits
            seen = []
            t = threading.Thread(target=lambda: seen.append(em(**enc).logits))
            t.start()
            t.join()
    assert not torch.equal(edited, base) and torch.equal(seen[0], edited)
