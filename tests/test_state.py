"""Persisted state: resume is bitwise identical; corrupt, newer or foreign state is refused, never reset."""

from __future__ import annotations

import json

import pytest
import torch

from ckptavg import Engine, open_checkpoint
from ckptavg.errors import StateError, StateLockedError
from ckptavg.oneshot import AverageSpec, build_averages
from ckptavg.writing.state import StateStore

SPECS = [AverageSpec("ema", {"half_life": 150.0}), AverageSpec("lawa", {"window": 3}),
         AverageSpec("swa", {"start_step": 300}), AverageSpec("uniform")]


def _fold(engine, averages, ckpts, history):
    for c in ckpts:
        history[c.step] = c
        engine.fold(c, averages, ident=c.step, history=history)


def _results(averages):
    return {(a.name, n): a.result(n) for a in averages for n in a.slots}


def test_resume_is_bitwise_identical(tmp_path, make_run):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200, 250, 400, 500, 700, 720])]
    with Engine() as engine:
        straight = build_averages(SPECS)
        _fold(engine, straight, ckpts, {})
        first = build_averages(SPECS)
        history: dict = {}
        _fold(engine, first, ckpts[:4], history)
        store = StateStore(tmp_path / "state")
        gen = store.save(first, extra={"last_step": 400})
        resumed = build_averages(SPECS)
        assert StateStore(tmp_path / "state").load(resumed) == {"last_step": 400}
        _fold(engine, resumed, ckpts[4:], history)
    a, b = _results(straight), _results(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r.step for r in resumed[0].folded] == [100, 200, 250, 400, 500, 700, 720]
    assert gen == 1


def test_generations_fall_back_and_refuse(tmp_path, make_run, caplog):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200, 300])]
    store = StateStore(tmp_path / "state")
    with Engine() as engine:
        avgs = build_averages(SPECS)
        _fold(engine, avgs, ckpts[:2], {})
        store.save(avgs, {"gen": 1})
        _fold(engine, avgs, ckpts[2:], {c.step: c for c in ckpts})
        store.save(avgs, {"gen": 2})
        store.save(avgs, {"gen": 3})
    assert store.generations() == [2, 3]  # the previous generation is kept as the fallback
    acc = tmp_path / "state" / "accumulators-3.safetensors"
    data = bytearray(acc.read_bytes())
    data[-5] ^= 0xFF  # flip a byte in the data section
    acc.write_bytes(bytes(data))
    assert store.load(build_averages(SPECS)) == {"gen": 2}
    assert "generation 3 is unusable" in caplog.text
    (tmp_path / "state" / "manifest-2.json").write_text("{not json")
    with pytest.raises(StateError, match="no saved generation verifies"):
        store.load(build_averages(SPECS))


def test_newer_schema_and_other_configuration_are_refused(tmp_path, make_run):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200])]
    store = StateStore(tmp_path / "state")
    with Engine() as engine:
        avgs = build_averages(SPECS)
        _fold(engine, avgs, ckpts, {})
        store.save(avgs)
    with pytest.raises(StateError, match="'ema-999'"):
        store.load(build_averages([AverageSpec("ema", {"half_life": 999.0})] + SPECS[1:]))
    # same name, other options: refused too, and nothing was restored into the first average
    avgs = build_averages([AverageSpec("lawa", {"window": 3}), AverageSpec("ema", {"half_life": 999.0}, name="ema-150")])
    with pytest.raises(StateError, match="'ema-150'"):
        store.load(avgs)
    assert not avgs[0].slots
    manifest = tmp_path / "state" / "manifest-1.json"
    data = json.loads(manifest.read_text())
    data["schema"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(StateError, match="newer ckptavg"):
        store.load(build_averages(SPECS))


def test_one_owner_at_a_time(tmp_path):
    a, b = StateStore(tmp_path / "s"), StateStore(tmp_path / "s")
    a.lock()
    with pytest.raises(StateLockedError, match=str(__import__("os").getpid())):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


# -- verified generations: docs/FAULTS.md row 43 ------------------------------------------------------------------

FUZZ_SPECS = SPECS


def _snapshot(averages, extra):
    """Everything a load restores: every slot buffer, every slot's bookkeeping, the folded records, ``extra``."""
    bufs = {(a.name, t, b): x.clone() for a in averages for t, s in a.slots.items() for b, x in s.bufs.items()}
    meta = {(a.name, t): s.meta() for a in averages for t, s in a.slots.items()}
    folded = {a.name: [r.to_json() for r in a.folded] for a in averages}
    return bufs, meta, folded, extra


def _same(x, y) -> bool:
    (bx, mx, fx, ex), (by, my, fy, ey) = x, y
    return (bx.keys() == by.keys() and all(bx[k].dtype == by[k].dtype and torch.equal(bx[k], by[k]) for k in bx)
            and mx == my and fx == fy and ex == ey)


def _load(folder, **kw):
    avgs = build_averages(FUZZ_SPECS)
    extra = StateStore(folder).load(avgs, **kw)
    return _snapshot(avgs, extra)


@pytest.fixture
def two_generations(tmp_path, make_run):
    """A state folder with generation 1 (steps 100-300) and generation 2 (steps 100-500, last_step 500)."""
    ckpts = [open_checkpoint(p) for p in make_run([100, 200, 300, 400, 500])]
    folder = tmp_path / "state"
    store = StateStore(folder)
    history: dict = {}
    with Engine() as engine:
        avgs = build_averages(FUZZ_SPECS)
        _fold(engine, avgs, ckpts[:3], history)
        store.save(avgs, {"last_step": 300, "folded": {"100": 1, "200": 1, "300": 1}})
        _fold(engine, avgs, ckpts[3:], history)
        # "lr" and "note" give the manifest the two spellings JSON allows of one content: 1e-05 / 1E-05, \u00e9 / \u00E9
        store.save(avgs, {"last_step": 500, "folded": {"100": 1, "200": 1, "300": 1, "400": 1, "500": 1},
                          "lr": 1e-05, "note": "caf\u00e9"})
    return folder


def _flip_and_load(folder, target, pos, bit, caplog):
    """Flip one bit of ``target`` (restored afterwards); the load's snapshot, or the StateError it raised."""
    original = target.read_bytes()
    data = bytearray(original)
    data[pos] ^= 1 << bit
    target.write_bytes(bytes(data))
    caplog.clear()
    try:
        return _load(folder), caplog.text
    except StateError as e:  # anything else fails the test
        return e, caplog.text
    finally:
        target.write_bytes(original)


def _fuzz(folder, target, positions, caplog, rng):
    old, new = _load(folder, at_most=1), _load(folder)
    assert not _same(old, new) and old[3]["last_step"] == 300 and new[3]["last_step"] == 500
    fell_back = harmless = 0
    for pos in positions:
        bit = rng.randrange(8)
        got, text = _flip_and_load(folder, target, pos, bit, caplog)
        assert not isinstance(got, StateError), (pos, bit, got)  # generation 1 is intact: never a refusal
        if _same(got, old):
            fell_back += 1
            assert text.count("resumed from generation 1") == 1 and "generation 2 is unusable" in text, (pos, bit)
        else:
            assert _same(got, new), (pos, bit)  # the only other outcome: the newest, bit for bit
            harmless += 1
    return fell_back, harmless


def test_row43_manifest_bit_flips_fall_back_or_change_nothing(two_generations, caplog):
    """docs/FAULTS.md row 43: 300 seeded single-bit flips over the newest manifest. Each load gives generation 1's
    exact state (with one warning naming generation 2) or — only where the flip left the manifest's content as it
    was (the checksum covers the content, not its spelling: ``1e-05`` and ``1E-05`` are one number) — generation
    2's exact state. Never a changed number, never another exception."""
    import random

    rng = random.Random(43)
    target = two_generations / "manifest-2.json"
    original = target.read_bytes()
    positions = [rng.randrange(len(original)) for _ in range(300)]
    caplog.set_level("INFO")
    fell_back, harmless = _fuzz(two_generations, target, positions, caplog, rng)
    print(f"manifest: 300 flips, {fell_back} fell back, {harmless} harmless")
    assert fell_back + harmless == 300 and fell_back >= 290
    # every flip that leaves the content as it was (there are few: exponent and \u-escape letters) loads the newest
    new = _load(two_generations)
    parsed = json.loads(original)
    spelled = []
    for pos in range(len(original)):
        for bit in range(8):
            data = bytearray(original)
            data[pos] ^= 1 << bit
            try:
                if json.loads(bytes(data)) == parsed:
                    spelled.append((pos, bit))
            except (ValueError, UnicodeDecodeError):
                pass
    assert {chr(original[p]) for p, _ in spelled} == {"e"} and len(spelled) == 2, spelled
    for pos, bit in spelled:
        got, _ = _flip_and_load(two_generations, target, pos, bit, caplog)
        assert not isinstance(got, StateError) and _same(got, new)


def test_row43_accumulator_bit_flips_fall_back(two_generations, caplog):
    """docs/FAULTS.md row 43: seeded single-bit flips in the newest accumulator file — every byte of its header
    (length prefix included: the checksum covers the whole file) and 300 places in its data. Each load gives
    generation 1's exact state; never a changed number, never another exception."""
    import random

    from ckptavg.reading.formats.safetensors import read_header

    rng = random.Random(4343)
    target = two_generations / "accumulators-2.safetensors"
    data_start = read_header(target).data_start
    size = target.stat().st_size
    header = list(range(data_start))
    data = [rng.randrange(data_start, size) for _ in range(300)]
    fell_back, harmless = _fuzz(two_generations, target, header + data, caplog, rng)
    print(f"accumulators: {len(header)} header + 300 data flips, {fell_back} fell back, {harmless} harmless")
    assert harmless == 0


def test_whole_accumulator_file_is_checksummed(two_generations):
    """Schema 2: ``sha256`` is what ``sha256sum accumulators-N.safetensors`` prints; the manifest checksums itself."""
    import hashlib

    manifest = json.loads((two_generations / "manifest-2.json").read_text())
    body = (two_generations / "accumulators-2.safetensors").read_bytes()
    assert manifest["schema"] == 2 and manifest["sha256"] == hashlib.sha256(body).hexdigest()
    claimed = manifest.pop("manifest_sha256")
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert claimed == hashlib.sha256(canonical).hexdigest()


def _as_schema_1(folder, gen):
    """Rewrite generation ``gen`` as ckptavg wrote it before schema 2: no manifest checksum, data-only sha256."""
    import hashlib

    from ckptavg.reading.formats.safetensors import read_header

    acc = folder / f"accumulators-{gen}.safetensors"
    manifest = json.loads((folder / f"manifest-{gen}.json").read_text())
    del manifest["manifest_sha256"]
    manifest["schema"] = 1
    manifest["sha256"] = hashlib.sha256(acc.read_bytes()[read_header(acc).data_start:]).hexdigest()
    (folder / f"manifest-{gen}.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def test_schema_1_still_loads_and_the_next_save_is_schema_2(two_generations, caplog):
    clean = _load(two_generations)
    _as_schema_1(two_generations, 2)
    caplog.set_level("INFO")
    got = _load(two_generations)
    assert _same(got, clean) and caplog.text.count("no manifest checksum (schema 1") == 1
    avgs = build_averages(FUZZ_SPECS)
    store = StateStore(two_generations)
    store.load(avgs)
    assert store.save(avgs, {"last_step": 500}) == 3
    assert json.loads((two_generations / "manifest-3.json").read_text())["schema"] == 2


def _rewrite_header(path, change):
    """Re-encode ``path``'s safetensors header through ``change(header_dict)``, keeping its data bytes."""
    import struct

    from ckptavg.reading.formats.safetensors import read_header

    start = read_header(path).data_start
    blob = path.read_bytes()
    header = json.loads(blob[8:start])
    change(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[start:])


@pytest.mark.parametrize("change, message", [
    (lambda h: h["ema-150/embed.weight/ema"].update(dtype="I32"), "is int32 [1024] in the file, float32 [1024]"),
    (lambda h: h["ema-150/embed.weight/ema"].update(shape=[512, 2]), "is float32 [512, 2] in the file"),
    (lambda h: h.__setitem__("ema-150/embed.weight/ema2", h.pop("ema-150/embed.weight/ema")), "lacks ema-150/embed"),
    (lambda h: h["__metadata__"].update({"ckptavg.state": "1"}), "is not generation 2's"),
])
def test_accumulator_header_must_match_the_manifest(two_generations, caplog, change, message):
    """The header is checked against the manifest on its own, not only through the checksum: in a schema-1 state
    the data-only checksum does not see a dtype or shape changed in the header (same bytes, other numbers)."""
    old = _load(two_generations, at_most=1)
    _as_schema_1(two_generations, 2)
    _rewrite_header(two_generations / "accumulators-2.safetensors", change)
    assert _same(_load(two_generations), old)
    assert "generation 2 is unusable" in caplog.text and message in caplog.text


@pytest.mark.parametrize("damage", [
    lambda m: m["averages"][0]["slots"]["embed.weight"].pop("shape"),
    lambda m: m["averages"][0]["slots"]["embed.weight"].update(shape="64x16"),
    lambda m: m["averages"][0]["slots"]["embed.weight"].update(dtype="float33"),
    lambda m: m["averages"][0]["slots"]["embed.weight"].update(count=None),
    lambda m: m["averages"][1]["slots"]["embed.weight"].update(window=7),
    lambda m: m["averages"][0].update(slots=[]),
    lambda m: m["averages"][0]["folded"].append("x"),
    lambda m: m.update(accumulators="../../etc/passwd"),
    lambda m: m.update(generation=1),
    lambda m: m.update(extra=[]),
    lambda m: m.update(averages={"ema-150": 1}),
    lambda m: m.__setitem__("averages", [None]),
])
def test_malformed_manifests_become_state_errors(two_generations, caplog, damage):
    """No content of a manifest raises anything but StateError: an unchecksummed (schema 1) manifest damaged in
    structure falls back to the previous generation; when it is the only one, the refusal names the file."""
    old = _load(two_generations, at_most=1)
    manifest = _as_schema_1(two_generations, 2)
    damage(manifest)
    (two_generations / "manifest-2.json").write_text(json.dumps(manifest))
    assert _same(_load(two_generations), old) and "generation 2 is unusable" in caplog.text
    StateStore(two_generations)._remove(1)
    with pytest.raises(StateError, match="manifest-2.json|accumulators-2.safetensors"):
        _load(two_generations)


def test_a_verified_newer_schema_is_refused_an_unverified_one_falls_back(two_generations):
    import hashlib

    from ckptavg.errors import NewerStateError

    old = _load(two_generations, at_most=1)
    path = two_generations / "manifest-2.json"
    manifest = json.loads(path.read_text())
    manifest["schema"] = 3  # a flipped digit ('2' ^ 0x01): the checksum no longer matches
    path.write_text(json.dumps(manifest))
    assert _same(_load(two_generations), old)
    del manifest["manifest_sha256"]  # a newer ckptavg's own, verifying, manifest
    manifest["manifest_sha256"] = hashlib.sha256(
        json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    path.write_text(json.dumps(manifest))
    with pytest.raises(NewerStateError, match="newer ckptavg"):
        _load(two_generations)
    with pytest.raises(NewerStateError):
        StateStore(two_generations).history()


def test_keep_history_at_most_and_discard(tmp_path, make_run, caplog):
    ckpts = [open_checkpoint(p) for p in make_run([100, 200, 300, 400, 500])]
    folder = tmp_path / "state"
    store = StateStore(folder, keep=3)
    snaps = {}
    with Engine() as engine:
        avgs = build_averages(FUZZ_SPECS)
        history: dict = {}
        for i, c in enumerate(ckpts, 1):
            _fold(engine, avgs, [c], history)
            assert store.save(avgs, {"last_step": c.step}) == i
            snaps[i] = _snapshot(avgs, {"last_step": c.step})
            assert store.generations() == list(range(max(1, i - 2), i + 1))  # the newest 3
    assert [(h.generation, h.extra) for h in store.history()] == [(3, {"last_step": 300}), (4, {"last_step": 400}),
                                                                  (5, {"last_step": 500})]
    for gen in (3, 4, 5):
        assert _same(_load(folder, at_most=gen), snaps[gen])
    assert _same(_load(folder, at_most=99), snaps[5])
    with pytest.raises(StateError, match="no saved generation at or before 2"):
        _load(folder, at_most=2)
    # a damaged manifest leaves the history; damaged accumulators do not (only load hashes them)
    (folder / "manifest-4.json").write_bytes((folder / "manifest-4.json").read_bytes().replace(b"400", b"410", 1))
    acc = folder / "accumulators-5.safetensors"
    acc.write_bytes(acc.read_bytes()[:-1] + b"\x00")
    assert [h.generation for h in store.history()] == [3, 5]
    caplog.clear()
    assert _same(_load(folder), snaps[3])  # 5 and 4 damaged: back to 3, one warning naming both
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    assert "generation 5 is unusable" in caplog.text and "generation 4 is unusable" in caplog.text
    # pruning counts only generations that verify: the damaged 4 is no fallback
    with Engine():
        avgs = build_averages(FUZZ_SPECS)
        StateStore(folder).load(avgs)
        assert StateStore(folder, keep=2).save(avgs, {"last_step": 300}) == 6
    assert StateStore(folder).generations() == [5, 6]  # 5's manifest verifies (its file is damaged: load tells)
    # a rollback: back to an older generation, and the abandoned newer ones go before the next save
    assert store.discard_after(5) == [6]
    assert store.generations() == [5]
    with pytest.raises(ValueError, match="keep"):
        StateStore(folder, keep=0)
